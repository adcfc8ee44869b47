"""`python -m apla.bench --predict`: the FLOPs and the peak memory of one APLA training step at any size, without a
GPU: the step runs on the meta device, where tensors have shapes and dtypes but no data.

FLOPs: `APLA.train_step` (forward, backward, both optimiser steps) under torch's FlopCounterMode, attention as CUDA's
fused kernel (`fused_attention`), which the counter counts as two matrix products forward and five backward (the
scores recomputed), as it counts the CPU's kernel (apla.bench.core.FLOP_FORMULAS).

Peak memory, as `torch.cuda.max_memory_allocated` would report it on a CUDA device:
  * `StorageTracker` adds up the bytes of every tensor storage from the moment an operation creates it until it is
    freed (a weak reference to the storage), so the peak follows autograd's saved tensors, checkpointing's
    recomputation, the optimiser's states and every temporary exactly as the step creates and frees them;
  * `cuda_step` gives the meta tensors what a CUDA step would do to them: bf16/fp16 autocast (the entries of
    CUDA autocast's op lists that these models call: matrix products, convolutions and attention in the low
    precision, LayerNorm, GroupNorm, softmax, softplus and exp in float32), and attention as CUDA's memory-efficient
    kernel itself, whose meta implementation keeps what the kernel keeps: the output and one float32 log-sum-exp per
    query row (padded to 32), never the attention matrix;
  * the models are built as train.py holds them on the GPU: U-Net, VGT, D and the VGG features of L_per, without the
    VAE and the text encoder (`apla.run.release_encoders`); AdamW is the single-tensor implementation, whose
    temporaries are one parameter's at a time, as the fused kernel train.py uses on CUDA.
Not modelled: the CUDA context (outside the allocator's count), cuBLAS / cuDNN workspaces, the allocator's rounding
to 512-byte blocks, the flash kernel's float32 gradient accumulator (where flash rather than the memory-efficient
kernel runs), and the 8-column padding of a masked attention's bias (VGT's; 2 MB a call at SD size).
"""
from __future__ import annotations

import weakref
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves, tree_map

from apla import run
from apla.bench.core import BenchModel, build, count_flops, gb, latent_shape, run_config
from apla.cli import resolve_gradient_checkpointing

GOAL_BYTES = 20e9  # the memory budget of a 24 GB card, with room for the CUDA context and workspaces


class StorageTracker(TorchDispatchMode):
    """While active: `live`, the bytes of all tensor storages created by operations and not yet freed, and `peak`,
    its maximum. Views share their storage and count once; a storage counts from the operation that creates it until
    its last tensor is gone."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._refs = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t.untyped_storage())
        return out

    def _track(self, storage) -> None:
        key = storage._cdata
        if key in self._refs:
            return
        nbytes = storage.nbytes()
        self.live += nbytes
        self.peak = max(self.peak, self.live)
        self._refs[key] = weakref.ref(storage, lambda _, key=key, n=nbytes: self._free(key, n))

    def _free(self, key, nbytes: int) -> None:
        self.live -= nbytes
        self._refs.pop(key, None)


def fused_attention(q, k, v, attn_mask=None, **_):
    """scaled_dot_product_attention as CUDA's memory-efficient kernel runs it, called on the meta device: it keeps the
    output and a float32 log-sum-exp per query row (never the attention matrix), and its backward recomputes the
    scores. A boolean mask becomes a float bias of the mask's own shape, broadcast over batch and heads (as torch
    does). (N, L, C) inputs are one head."""
    one_head = q.dim() == 3
    if one_head:
        q, k, v = (x.unsqueeze(1) for x in (q, k, v))  # (N, L, C) -> (N, 1, L, C)
    bias = None
    if attn_mask is not None:
        bias = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~attn_mask, float("-inf"))
        bias = bias.expand(*q.shape[:2], q.shape[2], k.shape[2])  # (Lq, Lk) -> (B, h, Lq, Lk), a view
    needs_grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    out = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, needs_grad)[0]
    return out.squeeze(1) if one_head else out


# the CUDA autocast policy of the torch.nn.functional calls these models make (torch's autocast op lists, CUDA)
LOWER_PRECISION = ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose2d", "conv_transpose3d",
                   "scaled_dot_product_attention")
FLOAT32 = ("layer_norm", "group_norm", "softmax", "log_softmax", "softplus", "mse_loss", "l1_loss")


@contextmanager
def cuda_step(dtype: torch.dtype | None):
    """While active, the functions of torch.nn.functional that these models call do to meta tensors what a CUDA step
    does: autocast to `dtype` (None: no autocast) by the policy above, and scaled_dot_product_attention as a fused
    kernel (`fused_attention`). They are swapped in the module itself (not a torch function mode), so checkpointing's
    recomputation in backward sees them too, as it sees the real autocast."""
    originals = {name: getattr(F, name) for name in LOWER_PRECISION + FLOAT32}

    def wrap(name, to):
        def call(*args, **kwargs):
            if to is not None:
                cast = lambda a: a.to(to) if isinstance(a, torch.Tensor) and a.is_floating_point() \
                    and a.dtype not in (to, torch.float64) else a  # noqa: E731
                args, kwargs = tree_map(cast, args), tree_map(cast, kwargs)
            if name == "scaled_dot_product_attention":
                return fused_attention(*args, **kwargs)
            return originals[name](*args, **kwargs)
        return call

    try:
        for name in LOWER_PRECISION:
            setattr(F, name, wrap(name, dtype))
        for name in FLOAT32:
            setattr(F, name, wrap(name, None if dtype is None else torch.float32))
        yield
    finally:
        for name, fn in originals.items():
            setattr(F, name, fn)


def _meta_batch(spec: BenchModel, cfg):
    shape = latent_shape(spec, cfg)
    z0, eps = torch.empty(shape, device="meta"), torch.empty(shape, device="meta")
    context = torch.empty(1, 77, spec.context_dim, device="meta")
    return z0, context, torch.tensor([500], device="meta"), eps


def step_flops(spec: BenchModel, cfg) -> dict:
    """FLOPs on the meta device: one U-Net forward, and one whole training step (forward, backward, optimiser
    steps; with cfg's checkpointing, its recomputation included)."""
    with torch.device("meta"):
        model, _ = build(spec, cfg, "meta", with_vae=False)
    opt_g, opt_d = run.optimizers(cfg, model)
    z0, context, t, eps = _meta_batch(spec, cfg)
    with cuda_step(None):
        with torch.no_grad():
            unet = count_flops(lambda: model.unet(z0, t, context))
        step = count_flops(lambda: model.train_step(z0, context, t, eps, opt_g, opt_d, None, cfg.max_grad_norm))
    return {"unet_forward": unet, "step": step}


def predict_memory(spec: BenchModel, cfg, steps: int = 2) -> dict:
    """Bytes on a CUDA device for training `cfg` on `spec`: the weights (U-Net, VGT, D, VGG), the weights with
    gradients and AdamW's states after a step, and the peak over `steps` steps (the second step has the states)."""
    dtype = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.mixed_precision]
    tracker = StorageTracker()
    with tracker:
        with torch.device("meta"):
            model, _ = build(spec, cfg, "meta", with_vae=False)
        weights = tracker.live
        opt_g, opt_d = run.optimizers(cfg, model)
        batch = _meta_batch(spec, cfg)
        for _ in range(steps):
            with cuda_step(dtype):
                model.train_step(*batch, opt_g, opt_d, None, cfg.max_grad_norm)
        states = tracker.live
        peak = tracker.peak
    return {"weights": weights, "after_step": states, "peak": peak}


def predict_table(spec: BenchModel, frames: int, size: int, variants, mixed_precision: str, checkpointing) -> str:
    """FLOPs and predicted peak memory per VGT variant, with precision and checkpointing resolved as on CUDA."""
    mp = "bf16" if mixed_precision == "auto" else mixed_precision
    ckpt = resolve_gradient_checkpointing(checkpointing, torch.device("cuda"), spec.unet)
    dtype = {"no": "float32", "bf16": "bf16 autocast", "fp16": "fp16 autocast"}[mp]
    lines = [f"One training step on the meta device, {frames} frames x {size}^2 px, {dtype}, "
             f"{'gradient checkpointing' if ckpt else 'no checkpointing'}; memory as a CUDA device would count it "
             "(apla/bench/predict.py)", "",
             "| VGT | U-Net forward TFLOP | step TFLOP | weights GB | + gradients, AdamW states GB | predicted peak GB "
             "| within 20 GB |", "| --- " * 7 + "|"]
    for variant in variants:
        cfg = run_config(spec, frames, size, variant, mp, ckpt)
        flops, memory = step_flops(spec, cfg), predict_memory(spec, cfg)
        lines.append(f"| {variant} | {flops['unet_forward'] / 1e12:.2f} | {flops['step'] / 1e12:.2f} | "
                     f"{gb(memory['weights'])[:-3]} | {gb(memory['after_step'])[:-3]} | {gb(memory['peak'])[:-3]} | "
                     f"{'yes' if memory['peak'] <= GOAL_BYTES else 'no'} |")
    return "\n".join(lines)

