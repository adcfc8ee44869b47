"""The attention kinds of the inflated U-Net (`apla.sd.unet`), as Tune-A-Video inflates Stable Diffusion's transformer
block to video (Wu et al. 2022, Sec. 4.2):

  * sparse-causal self-attention: the queries of frame i attend to the keys and values of frames 0 and i-1;
  * cross-attention to the text, per frame;
  * after the feed-forward, temporal self-attention over the F frames at each spatial position (`attn_temp`, with
    its own LayerNorm `norm_temp`), no positional encoding, its output projection starting at zero.

Tokens are (B*F, L, C) with L = H*W per frame, and stay in that layout through the whole block: every attention is
one call of `torch.nn.functional.scaled_dot_product_attention` (`attention`) on views of it (no attention matrix is built here,
and only the sparse-causal keys and values are gathered into a new tensor). The cross-attention folds the F frames
into the query sequence, since all frames attend to the same text; the temporal attention reads the L*heads
sequences of F frames as strided views of the per-frame layout. Module names are diffusers' (`attn1`, `attn2`,
`ff.net.0.proj`, `to_out.0`), so SD's weights load by name.

`TransformerBlock.inflated = False` switches the inflation off: plain per-frame self-attention and no temporal
attention, i.e. SD's block frame by frame (`apla.sd.unet.UNet3DConditionModel.set_inflation`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def attention(q, k, v, upcast: bool = False):
    """softmax(q kᵀ / sqrt(d)) v on (N, heads, L, d) tensors, in float32 when `upcast` and q is half precision.

    `upcast` is diffusers' `upcast_attention`, which SD 2.1 (768)'s config sets; Stability's own code computes the
    logits q kᵀ in float32 for every SD 2 model (`ATTN_PRECISION`, "fp32" by default), against overflow in float16.
    Here the whole attention (q, k and v) runs in float32, outside autocast, and its output returns to q's dtype, so
    only the projections around it stay in half precision."""
    if not upcast or q.dtype not in (torch.float16, torch.bfloat16):
        # $$\mathrm{softmax}\left(QK^\top/\sqrt{d}\right)V$$
        return F.scaled_dot_product_attention(q, k, v)
    with torch.autocast(q.device.type, enabled=False):
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)


def _heads(x, heads: int):
    N, L, C = x.shape
    return x.view(N, L, heads, C // heads).transpose(1, 2)  # (N, L, C) -> (N, heads, L, C/heads)


def _merge(x):
    N, h, L, d = x.shape
    return x.transpose(1, 2).reshape(N, L, h * d)  # (N, heads, L, d) -> (N, L, heads*d)


def sparse_causal_kv(x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """Keys/values of frame 0 and frame i-1 side by side, for every frame i: (B*F, L, C) -> (B*F, 2L, C).

    Frame 0 gets its own tokens twice (as in Tune-A-Video), which leaves softmax attention unchanged."""
    BF, L, C = x.shape
    x = x.view(BF // num_frames, num_frames, L, C)  # (B*F, L, C) -> (B, F, L, C)
    first = x[:, :1].expand(-1, num_frames, -1, -1)  # frame 0 for every frame: (B, F, L, C), a view
    previous = torch.cat([x[:, :1], x[:, :-1]], dim=1)  # frame max(i-1, 0) for frame i: (B, F, L, C)
    return torch.cat([first, previous], dim=2).view(BF, 2 * L, C)  # (B, F, 2L, C) -> (B*F, 2L, C)


class Attention(nn.Module):
    """Multi-head attention, q from x, k/v from `kv` (or x). Projections without bias, output with bias; `upcast`: the
    attention itself in float32 under half precision (`attention`)."""

    def __init__(self, dim: int, heads: int, kv_dim: int | None = None, upcast: bool = False):
        super().__init__()
        kv_dim = dim if kv_dim is None else kv_dim
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(kv_dim, dim, bias=False)
        self.to_v = nn.Linear(kv_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # index 0 as in SD's checkpoint names

    def attend(self, q, k, v):
        """softmax(q kᵀ / sqrt(d)) v per head, (N, Lq, C), (N, Lk, C), (N, Lk, C) -> (N, Lq, C)."""
        out = attention(_heads(q, self.heads), _heads(k, self.heads), _heads(v, self.heads), self.upcast)
        return self.to_out[0](_merge(out))

    def forward(self, x, kv=None):
        kv = x if kv is None else kv
        return self.attend(self.to_q(x), self.to_k(kv), self.to_v(kv))

    def sparse_causal(self, x, num_frames: int):
        """Sparse-causal self-attention (Tune-A-Video): frame i's queries attend to frames {0, i-1}.
        x: (B*F, L, C) -> (B*F, L, C)."""
        k = sparse_causal_kv(self.to_k(x), num_frames)  # (B*F, 2L, C)
        v = sparse_causal_kv(self.to_v(x), num_frames)  # (B*F, 2L, C)
        return self.attend(self.to_q(x), k, v)

    def cross(self, x, context, num_frames: int):
        """Cross-attention to the text, per frame. x: (B*F, L, C), context: (B, T, D) -> (B*F, L, C).

        Every frame of a clip attends to the same keys and values, and each query's softmax is its own, so the F
        frames' queries are one sequence of F*L queries: no copy of the text's keys per frame."""
        BF, L, C = x.shape
        q = self.to_q(x).view(BF // num_frames, num_frames * L, C)  # (B*F, L, C) -> (B, F*L, C), a view
        out = self.attend(q, self.to_k(context), self.to_v(context))  # (B, F*L, C)
        return out.view(BF, L, C)  # (B, F*L, C) -> (B*F, L, C)

    def temporal(self, x, num_frames: int):
        """Self-attention over the F frames at each spatial position. x: (B*F, L, C) -> (B*F, L, C).

        The L*heads sequences of F tokens are read as a strided view of the per-frame layout, (B, L*heads, F, d),
        so x is never transposed to (B*L, F, C) and back."""
        BF, L, C = x.shape
        B, h = BF // num_frames, self.heads

        def over_frames(t):
            return t.view(B, num_frames, L * h, C // h).transpose(1, 2)  # (B*F, L, C) -> (B, L*h, F, d), a view

        # softmax(QKᵀ/√d)V over the F frames of each position and head
        out = attention(over_frames(self.to_q(x)), over_frames(self.to_k(x)), over_frames(self.to_v(x)), self.upcast)
        return self.to_out[0](out.transpose(1, 2).reshape(BF, L, C))  # (B, L*h, F, d) -> (B*F, L, C)


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x):
        a, gate = self.proj(x).chunk(2, dim=-1)
        # $$a \odot \mathrm{GELU}(g)$$
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # indices 0 and 2 as in SD's checkpoint names; slot 1 is SD's (inactive) dropout
        self.net = nn.ModuleList([GEGLU(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim)])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class TransformerBlock(nn.Module):
    """Sparse-causal self-attention, cross-attention, GEGLU feed-forward, temporal attention; pre-LayerNorm, residual.
    With `inflated = False`: per-frame self-attention and no temporal attention (SD's block on each frame). The temporal
    attention has the block's head count and `upcast`, as Tune-A-Video builds its `attn_temp`."""

    inflated = True

    def __init__(self, dim: int, heads: int, cross_attention_dim: int, eps: float, upcast: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn1 = Attention(dim, heads, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.attn2 = Attention(dim, heads, kv_dim=cross_attention_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim, eps=eps)
        self.ff = FeedForward(dim)
        self.norm_temp = nn.LayerNorm(dim, eps=eps)
        self.attn_temp = Attention(dim, heads, upcast=upcast)
        self.start_temporal_output()

    def start_temporal_output(self) -> None:
        """The temporal attention's start, exactly as Tune-A-Video's: it zeroes `attn_temp.to_out[0].weight` alone
        (`nn.init.zeros_` on the weight in its BasicTransformerBlock); the bias keeps PyTorch's default init,
        uniform in ±1/√C. So the new layer's output is that bias whatever the frames hold: at the start it passes
        nothing between frames, and a fresh inflated U-Net is SD's (with sparse-causal self-attention) up to a
        per-channel constant added after each temporal attention, which the layers after it then see. Zeroing
        the bias too would start from SD's output exactly, a point Tune-A-Video's tuning never starts from."""
        nn.init.zeros_(self.attn_temp.to_out[0].weight)

    def init_temporal(self, device="cpu") -> None:
        """Allocate and initialise the temporal layers alone, as construction does (PyTorch's default init, the
        output projection's weight zero): for a block built on the meta device whose other weights come from a
        file."""
        for module in (self.norm_temp, self.attn_temp):
            module.to_empty(device=device)
            for m in module.modules():
                if isinstance(m, (nn.Linear, nn.LayerNorm)):
                    m.reset_parameters()
        self.start_temporal_output()

    def forward(self, x, context, num_frames: int):
        # x: (B*F, L, C) with L = H*W tokens per frame; LayerNorm is per token, so it needs no other layout
        h = self.norm1(x)
        x = x + (self.attn1.sparse_causal(h, num_frames) if self.inflated else self.attn1(h))
        x = x + self.attn2.cross(self.norm2(x), context, num_frames)
        x = x + self.ff(self.norm3(x))
        if self.inflated:
            x = x + self.attn_temp.temporal(self.norm_temp(x), num_frames)  # over the F frames at each position
        return x
