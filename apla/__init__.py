"""apla: a from-scratch PyTorch implementation of APLA (Additional Perturbation for Latent noise with
Adversarial training, AAAI 2024) on top of a Tune-A-Video inflation of Stable Diffusion v1.5."""

__version__ = "0.1.0"
