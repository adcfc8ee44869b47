"""The inflated U-Net with its temporal attention silenced, for comparisons with a 2D U-Net.

A fresh inflation starts as Tune-A-Video's (`apla.sd.attention.TransformerBlock.start_temporal_output`): the temporal
attention's output weight is zero but its bias is not, so the layer adds a per-channel constant. Taking that bias to
zero as well makes the layer add nothing, and the inflated U-Net on one frame (or on identical frames) is the 2D
U-Net: what the parity tests against diffusers' UNet2DConditionModel compare.
"""
from contextlib import contextmanager

import torch


@contextmanager
def temporal_output_zero(unet):
    """Within the block, every `attn_temp.to_out.0.bias` of `unet` is zero; on leaving, each is restored."""
    biases = [p for n, p in unet.named_parameters() if n.endswith("attn_temp.to_out.0.bias")]
    kept = [p.detach().clone() for p in biases]
    with torch.no_grad():
        for p in biases:
            p.zero_()
    try:
        yield unet
    finally:
        with torch.no_grad():
            for p, k in zip(biases, kept):
                p.copy_(k)
