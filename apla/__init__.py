"""apla: APLA (Additional Perturbation for Latent noise with Adversarial training, Yao et al., AAAI 2024) from
scratch in PyTorch, on Stable Diffusion v1.5 inflated to video as Tune-A-Video does.

Reading order: the paper, then what the two scripts share, then the measures.

  file                      equations                                   notebook
  scheduler.py              Eqs. 1-3: alpha_bar, q_sample, DDIM step,   01_diffusion_and_ddim
                            loop and inversion, guidance
  sd/                       the network eps_theta of Eqs. 2-6:          02_stable_diffusion_by_hand
    unet.py                   the U-Net inflated to video
    attention.py              sparse-causal, cross and temporal attention
    vae.py                    the autoencoder: frames <-> latents z0
    text.py                   the prompt's condition c (CLIP, transformers)
    weights.py                load_stable_diffusion: SD v1.5 files and folders
  vgt.py                    Eq. 4 and Eqs. 7-15: VGT's perturbation phi  03_vgt
  discriminator.py          Eq. 19 and L_g: the 1x1-convolution D       04_losses_and_discriminator
  losses.py                 Eqs. 5-6, 16-18, 20: the hyper-loss        04_losses_and_discriminator
  algorithm.py              Algorithm 1: APLA.forward, one step         05_algorithm1_end_to_end
  config.py                 a run's settings (TrainConfig), Table 3's ablations as values
  run.py                    a run's models, clip encoding, checkpoints (what train.py and sample.py share)
  checkpoint.py             run directories, atomic writes
  video.py                  reading clips, writing GIF / MP4 / PNG strips
  cli.py                    command lines and one-line errors
  eval/                     the paper's measures                        05_algorithm1_end_to_end
    flow.py                   optical flow by hand (Horn-Schunck)
    metrics.py                FCI, warping error, CLIP scores, PSNR
    score.py, __main__.py     python -m apla.eval VIDEO: a table and JSON
  assets/                   shipped weights and clips; __init__.py is the registry of bundled names,
                            make_clips.py cuts the test clip

Projects that use the library and that it never imports, each with a README:
  micro/   the shapes world and the micro Stable Diffusion pretrained on it (the CPU demo's base model)
  study/   the ablation study: Tune-A-Video against APLA and its ablations, a plan of ordinary runs
  bench/   time, FLOPs and memory of a step, inversion and sampling
"""

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
