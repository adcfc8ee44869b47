"""apla: a from-scratch PyTorch implementation of APLA (Additional Perturbation for Latent noise with
Adversarial training, AAAI 2024) on top of a Tune-A-Video inflation of Stable Diffusion v1.5."""

__version__ = "0.1.0"

__all__ = ["load_stable_diffusion", "encode_prompt"]


def __getattr__(name):
    # Imported on first use: these pull in transformers, which `import apla` alone should not pay for.
    if name == "load_stable_diffusion":
        from apla.sd.weights import load_stable_diffusion

        return load_stable_diffusion
    if name == "encode_prompt":
        from apla.sd.text import encode_prompt

        return encode_prompt
    raise AttributeError(f"module 'apla' has no attribute {name!r}")
