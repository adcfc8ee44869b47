"""Stable Diffusion v1.5 by hand, inflated to video as Tune-A-Video does.

    unet.py       the inflated U-Net eps_theta(z_t, t, context) (Eqs. 2-3's network)
    attention.py  its attention kinds: sparse-causal, cross, temporal
    vae.py        the KL autoencoder: frames <-> latents
    text.py       CLIP's tokenizer and text encoder (transformers)
    weights.py    load_stable_diffusion: SD v1.5 files and folders, every tensor accounted for
"""
