"""Stable Diffusion (v1.5, and 2.x under other settings) by hand, inflated to video as Tune-A-Video does.

    unet.py       the inflated U-Net eps_theta(z_t, t, context) (Eqs. 2-3's network)
    attention.py  its attention kinds: sparse-causal, cross, temporal
    vae.py        the KL autoencoder: frames <-> latents
    text.py       CLIP's tokenizer and text encoder (transformers; SD 2.x's OpenCLIP tower as a CLIPTextModel)
    weights.py    load_stable_diffusion: SD 1.x / 2.x files and folders, every tensor accounted for
"""
