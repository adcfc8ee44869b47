"""apla: APLA (Additional Perturbation for Latent noise with Adversarial training, Yao et al., AAAI 2024) from
scratch in PyTorch, on Stable Diffusion v1.5 inflated to video as Tune-A-Video does.

Reading order: the paper, then what the two scripts share, then the measures.

  file                      equations                                   notebook
  scheduler.py              Eqs. 1-3: alpha_bar, q_sample, DDIM step,   01_diffusion_and_ddim
                            loop and inversion, guidance; the timestep embedding
  sd/                       the network eps_theta of Eqs. 2-6:          02_stable_diffusion_by_hand
    sd/unet.py                the U-Net inflated to video
    sd/attention.py           sparse-causal, cross and temporal attention
    sd/vae.py                 the autoencoder: frames <-> latents z0
    sd/text.py                the prompt's condition c (CLIP, transformers)
    sd/weights.py             load_stable_diffusion: SD 1.x / 2.x files and folders
    sd/variants.py            what a single file is, from its names: SD 1.x or 2.x, its SD 2 variant
  vgt.py                    Eqs. 4, 7-15: VGT's perturbation phi        03_vgt
  discriminator.py          Eq. 19 and L_g: the 1x1-convolution D       04_losses_and_discriminator
  losses.py                 Eqs. 5-6, 16-18, 20: the hyper-loss         04_losses_and_discriminator
  algorithm.py              Algorithm 1: APLA.forward, one step         05_algorithm1_end_to_end
  config.py                 a run's settings (TrainConfig), Table 3's ablations as values
  run.py                    a run's models, clip encoding, checkpoints (what train.py and sample.py share)
  loop.py                   the training loop's conventions: learning-rate schedules, a stop on SIGTERM, TensorBoard
  sampling.py               sampling as a Python call: apla.sample(run, prompts) -> videos; the inversion kept
  checkpoint.py             run directories, atomic writes
  video.py                  reading clips, writing GIF / MP4 / PNG strips
  cli.py                    command lines and one-line errors
  tav.py                    Tune-A-Video's YAML configs mapped onto TrainConfig
  show.py                   the library's own source on a notebook's page (show(apla.vgt.perturbed_eps)), and
                            a network's data flow traced from one forward pass and drawn (trace, draw)
  eval/                     the paper's measures                        05_algorithm1_end_to_end
    eval/flow.py              optical flow by hand (Horn-Schunck)
    eval/metrics.py           FCI, warping error, CLIP scores, PSNR
    eval/score.py             python -m apla.eval VIDEO (eval/__main__.py): a table and JSON
  assets/                   shipped weights and clips
    assets/__init__.py        the registry of bundled names: models, clips, their CLIP scorers
    assets/make_clips.py      cuts the test clip from a longer video

Projects that use the library and that it never imports, each with a README:
  micro/   the shapes world and the micro Stable Diffusion pretrained on it (the CPU demo's base model)
  study/   the ablation study: Tune-A-Video against APLA and its ablations, a plan of ordinary runs
  bench/   time, FLOPs and memory of a step, inversion and sampling
"""

__version__ = "0.1.0"

__all__ = ["load_stable_diffusion", "encode_prompt", "sample"]


def __getattr__(name):
    # Imported on first use: these pull in transformers, which `import apla` alone should not pay for.
    if name == "sample":
        from apla.sampling import sample

        return sample
    if name == "load_stable_diffusion":
        from apla.sd.weights import load_stable_diffusion

        return load_stable_diffusion
    if name == "encode_prompt":
        from apla.sd.text import encode_prompt

        return encode_prompt
    raise AttributeError(f"module 'apla' has no attribute {name!r}")
