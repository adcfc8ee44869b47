"""Tests of apla/unet.py: parity with diffusers' 2D U-Net (tiny folder and full-size single file), the sparse-causal
attention against a direct reference, causality in frames, bf16 autocast, checkpointing, trainable-set I/O."""

import gc
import json
import math
from pathlib import Path

import pytest
import torch

from apla.config import DEFAULT_TRAINABLE
from apla.sd.attention import Attention, sparse_causal_kv
from apla.sd.unet import (UNet3DConditionModel, UNetConfig, UNetConfigError, is_temporal_param,
                       load_trainable_state, mark_trainable, trainable_state)
from apla.sd.weights import unet_key_from_ldm
from tests.helpers.inflation import temporal_output_zero

DIFFUSERS = "diffusers (a dev extra) is the reference"
# names and shapes (no weights) of Stable Diffusion v1.5 as published (Rombach et al. 2022; CreativeML OpenRAIL-M)
MANIFEST = Path(__file__).resolve().parents[1] / "data" / "sd15_tensors.json"

TINY = dict(block_out_channels=(32, 64, 64), layers_per_block=2, attention_head_dim=8, cross_attention_dim=32,
            norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), sample_size=8)


def _randomise(named_tensors, seed):
    """Fill tensors in place: weights ~ N(0, 1/fan_in), norm scales ~ 1 + N(0, 0.1²), other vectors ~ N(0, 0.1²)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in named_tensors:
            p.normal_(generator=g)
            if p.dim() > 1:
                p.mul_(1.0 / math.sqrt(p[0].numel()))
            else:
                p.mul_(0.1).add_(1.0 if ("norm" in name and name.endswith("weight")) else 0.0)


def _load_folder(folder, **overrides):
    """The U-Net of a diffusers-style folder through load_stable_diffusion (unet/ is its only component)."""
    from apla import load_stable_diffusion

    from apla.sd.unet import FrameGroupNorm

    unet = load_stable_diffusion(Path(folder).parent, components=("unet",)).unet.eval()
    if "norm_over_frames" in overrides:  # a switch read at construction: set it on every GroupNorm
        unet.config.norm_over_frames = overrides["norm_over_frames"]
        for m in unet.modules():
            if isinstance(m, FrameGroupNorm):
                m.over_frames = overrides["norm_over_frames"]
    return unet


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny random diffusers UNet2DConditionModel with SD's block types, saved as a diffusers folder."""
    UNet2DConditionModel = pytest.importorskip("diffusers", reason=DIFFUSERS).UNet2DConditionModel

    torch.manual_seed(0)
    ref = UNet2DConditionModel(**TINY).eval()
    _randomise(ref.named_parameters(), seed=1)
    folder = tmp_path_factory.mktemp("tiny_sd") / "unet"
    ref.save_pretrained(folder, safe_serialization=True)
    return folder, ref


def _inputs(B=2, Fr=4, C=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(B, 4, Fr, 8, 8, generator=g)
    context = torch.randn(B, 77, C, generator=g)
    return z, torch.tensor([10, 700])[:B], context


@pytest.mark.parametrize("norm_over_frames", [True, False])
def test_tiny_parity_with_diffusers_f1_and_identical_frames(tiny_folder, norm_over_frames):
    """The spatial path against diffusers' 2D U-Net: with the temporal attention's output at zero (weight zero as
    loaded, bias taken to zero here), one frame, or F identical frames, give the 2D model's output."""
    folder, ref = tiny_folder
    unet = _load_folder(folder, norm_over_frames=norm_over_frames)
    z, t, context = _inputs(Fr=1)
    with torch.no_grad(), temporal_output_zero(unet):
        eps_ref = ref(z[:, :, 0], t, context).sample  # (B, 4, h, w)
        eps_f1 = unet(z, t, context)
        eps_f4 = unet(z.expand(-1, -1, 4, -1, -1).contiguous(), t, context)
    assert eps_ref.abs().max() > 1e-2  # a non-trivial output
    assert eps_f1.shape == z.shape and eps_f4.shape == (2, 4, 4, 8, 8)
    torch.testing.assert_close(eps_f1[:, :, 0], eps_ref, rtol=0, atol=1e-5)
    for i in range(4):
        torch.testing.assert_close(eps_f4[:, :, i], eps_ref, rtol=0, atol=1e-5)


def _manifest():
    return json.loads(MANIFEST.read_text())


def test_full_size_single_file_parity_with_diffusers(sd15_single_file):
    """All 686 U-Net tensors of a full-size single file (random values), loaded through load_stable_diffusion;
    diffusers' own single-file conversion of the same tensors gives the same names and the same output."""
    UNet2DConditionModel = pytest.importorskip("diffusers", reason=DIFFUSERS).UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    from safetensors import safe_open

    from apla import load_stable_diffusion

    manifest = _manifest()
    config = manifest["configs"]["unet"]
    sd = load_stable_diffusion(sd15_single_file, components=("unet",))
    unet = sd.unet.eval()
    assert sd.vae is None and sd.text_encoder is None
    temporal = {n for n, _ in unet.named_parameters() if is_temporal_param(n)}
    assert len(temporal) == 112  # 16 transformer blocks x (attn_temp q, k, v, out w + b, norm_temp w + b)

    with safe_open(str(sd15_single_file), framework="pt") as f:
        ldm = {k: f.get_tensor(k) for k in f.keys() if k.startswith("model.diffusion_model.")}
    assert len(ldm) == 686
    ours = dict(unet.named_parameters())
    mapped = {unet_key_from_ldm(k): k for k in ldm}
    assert len(mapped) == 686 and set(mapped) == set(ours) - temporal  # every tensor consumed, once
    for name, key in mapped.items():
        assert torch.equal(ours[name].detach(), ldm[key]), name

    ref_sd = convert_ldm_unet_checkpoint(ldm, config)
    assert set(ref_sd) == set(mapped)  # the rules reproduce diffusers' conversion name for name
    with torch.device("meta"):
        ref = UNet2DConditionModel(**config)
    ref.load_state_dict(ref_sd, strict=True, assign=True)
    ref.eval()
    del ldm, ref_sd
    gc.collect()

    z, t, context = torch.randn(1, 4, 1, 8, 8), 999, torch.randn(1, 77, 768)
    with torch.no_grad(), temporal_output_zero(unet):
        eps_ref = ref(z[:, :, 0], t, context).sample
        eps = unet(z, t, context)[:, :, 0]
    rel = ((eps - eps_ref).norm() / eps_ref.norm()).item()
    print(f"\nfull-size single-file parity: relative error {rel:.2e}")
    assert eps_ref.abs().max() > 1e-3 and rel < 1e-4
    del unet, ref, sd
    gc.collect()


def _transformer_dims(cfg):
    """Channels of every transformer block of the U-Net: down levels, mid, up levels."""
    ch = cfg.block_out_channels
    down = [c for c, k in zip(ch, cfg.down_block_types) if k.startswith("CrossAttn") for _ in range(cfg.layers_per_block)]
    up = [c for c, k in zip(ch[::-1], cfg.up_block_types) if k.startswith("CrossAttn") for _ in range(cfg.layers_per_block + 1)]
    return down + [ch[-1]] + up


def test_full_size_parameter_counts_on_meta():
    manifest = _manifest()
    with torch.device("meta"):
        unet = UNet3DConditionModel(UNetConfig())
    params = dict(unet.named_parameters())
    sd_shapes = {n: tuple(p.shape) for n, p in params.items() if not is_temporal_param(n)}
    assert sd_shapes == {k: tuple(v) for k, v in manifest["diffusers"]["unet"].items()}
    n_sd = sum(math.prod(s) for s in sd_shapes.values())
    n_temporal = sum(p.numel() for n, p in params.items() if is_temporal_param(n))
    dims = _transformer_dims(unet.config)
    assert len(dims) == 16
    # attn_temp: q, k, v, out (d² each) + out bias d; norm_temp: 2d
    assert n_temporal == sum(4 * d * d + d + 2 * d for d in dims)
    assert round(n_sd / 1e6, 3) == manifest["param_counts_millions"]["unet"]  # 859.521 M
    n_train = mark_trainable(unet, DEFAULT_TRAINABLE)
    # attn1.to_q, attn2.to_q: d² each; attn_temp: 4d² + d; norm_temp: 2d
    assert n_train == sum(6 * d * d + d + 2 * d for d in dims)
    n_tav = mark_trainable(unet, ("attn1.to_q", "attn2.to_q", "attn_temp"))  # Tune-A-Video's configs
    assert n_train == n_tav + sum(2 * d for d in dims)
    print(f"\nU-Net parameters: SD v1.5 {n_sd:,} + temporal {n_temporal:,} = {n_sd + n_temporal:,}; "
          f"trainable (default {DEFAULT_TRAINABLE}) {n_train:,}; without norm_temp {n_tav:,}")


def _reference_sparse_causal(attn, x, Fr):
    """softmax over frame 0's and frame i-1's tokens, written out per frame and head, float64."""
    B = x.shape[0] // Fr
    x = x.view(B, Fr, *x.shape[1:])
    Wq, Wk, Wv = attn.to_q.weight, attn.to_k.weight, attn.to_v.weight
    Wo, bo = attn.to_out[0].weight, attn.to_out[0].bias
    h, d = attn.heads, Wq.shape[0] // attn.heads
    out = torch.empty_like(x)
    for b in range(B):
        for i in range(Fr):
            kv_in = torch.cat([x[b, 0], x[b, max(i - 1, 0)]], dim=0)  # (2L, C)
            q, k, v = x[b, i] @ Wq.T, kv_in @ Wk.T, kv_in @ Wv.T
            heads = []
            for j in range(h):
                s = slice(j * d, (j + 1) * d)
                w = torch.softmax(q[:, s] @ k[:, s].T / math.sqrt(d), dim=-1)
                heads.append(w @ v[:, s])
            out[b, i] = torch.cat(heads, dim=-1) @ Wo.T + bo
    return out.view(B * Fr, *x.shape[2:])


def test_sparse_causal_attention_matches_reference_and_is_causal():
    torch.manual_seed(0)
    Fr, L, C = 4, 6, 16
    attn = Attention(C, heads=2).double()
    x = torch.randn(2 * Fr, L, C, dtype=torch.float64)
    with torch.no_grad():
        out = attn.sparse_causal(x, Fr)
        torch.testing.assert_close(out, _reference_sparse_causal(attn, x, Fr), rtol=1e-10, atol=1e-10)
        # keys of frame i are frames (0, i-1): frame 0 twice, then (0, 0), (0, 1), (0, 2)
        kv = sparse_causal_kv(x, Fr).view(2, Fr, 2 * L, C)
        frames = x.view(2, Fr, L, C)
        for i in range(Fr):
            assert torch.equal(kv[:, i], torch.cat([frames[:, 0], frames[:, max(i - 1, 0)]], dim=1))

        x3 = x.clone().view(2, Fr, L, C)
        x3[:, 3] += 1.0
        out3 = attn.sparse_causal(x3.view(2 * Fr, L, C), Fr).view(2, Fr, L, C)
        assert torch.equal(out3[:, :3], out.view(2, Fr, L, C)[:, :3])
        assert not torch.allclose(out3[:, 3], out.view(2, Fr, L, C)[:, 3])

        x0 = x.clone().view(2, Fr, L, C)
        x0[:, 0] += 1.0
        out0 = attn.sparse_causal(x0.view(2 * Fr, L, C), Fr).view(2, Fr, L, C)
        for i in range(Fr):
            assert (out0[:, i] - out.view(2, Fr, L, C)[:, i]).abs().max() > 1e-3


def _tiny_unet(seed=0, **overrides):
    cfg = UNetConfig.from_diffusers(TINY)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    unet = UNet3DConditionModel(cfg).eval()
    _randomise(((n, p) for n, p in unet.named_parameters() if not is_temporal_param(n)), seed=seed + 1)
    return unet


def _perturb_last_frame(unet):
    z, t, context = _inputs()
    z2 = z.clone()
    z2[:, :, -1] += torch.randn(z2[:, :, -1].shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return unet(z, t, context), unet(z2, t, context)


def test_fresh_inflation_starts_as_tune_a_video_does(tiny_folder):
    """Tune-A-Video zeroes attn_temp.to_out[0].weight only: built here or loaded from a file (meta device, temporal
    layers made alone), every temporal output weight is zero and every bias at PyTorch's default init (uniform in
    ±1/sqrt(C), not zero); the temporal attention then outputs that bias whatever the frames hold."""
    folder, _ = tiny_folder
    for unet in (_tiny_unet(), _load_folder(folder)):
        outs = {n: p for n, p in unet.named_parameters() if ".attn_temp.to_out.0." in n}
        assert len(outs) == 2 * len([m for m in unet.modules() if type(m).__name__ == "TransformerBlock"]) > 0
        for name, p in outs.items():
            if name.endswith("weight"):
                assert torch.count_nonzero(p) == 0, name
                continue
            bound = 1 / math.sqrt(p.numel())  # nn.Linear's default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            assert p.abs().max() <= bound and p.abs().max() > 0.5 * bound, name
            assert abs(p.float().std().item() - bound / math.sqrt(3)) < 0.35 * bound / math.sqrt(3), name
        block = next(m for m in unet.modules() if type(m).__name__ == "TransformerBlock")
        C = block.attn_temp.to_out[0].bias.numel()
        x = torch.randn(2 * 4, 6, C)  # (B*F, L, C), frames all different
        with torch.no_grad():
            out = block.attn_temp.temporal(block.norm_temp(x), 4)
        torch.testing.assert_close(out, block.attn_temp.to_out[0].bias.expand_as(out), rtol=0, atol=1e-6)


def test_whole_model_causal_in_frames_until_temporal_attention_is_nonzero():
    unet = _tiny_unet()  # the default: per-frame GroupNorm
    assert unet.config.norm_over_frames is False
    eps, eps2 = _perturb_last_frame(unet)
    torch.testing.assert_close(eps2[:, :, :-1], eps[:, :, :-1], rtol=0, atol=1e-6)
    assert (eps2[:, :, -1] - eps[:, :, -1]).abs().max() > 1e-2

    with torch.no_grad():
        for n, p in unet.named_parameters():
            if "attn_temp.to_out" in n:
                p.normal_(std=0.2)
    eps, eps2 = _perturb_last_frame(unet)
    for i in range(eps.shape[2] - 1):
        assert (eps2[:, :, i] - eps[:, :, i]).abs().max() > 1e-4


def test_tune_a_video_groupnorm_pools_frames():
    """With statistics over all frames (Tune-A-Video's GroupNorm), frames interact even with attn_temp at zero."""
    eps, eps2 = _perturb_last_frame(_tiny_unet(norm_over_frames=True))
    assert (eps2[:, :, 0] - eps[:, :, 0]).abs().max() > 1e-4


def test_bf16_autocast_close_to_float32():
    unet = _tiny_unet()
    _randomise(((n, p) for n, p in unet.named_parameters() if is_temporal_param(n)), seed=9)
    z, t, context = _inputs()
    with torch.no_grad():
        eps = unet(z, t, context)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            eps_bf16 = unet(z, t, context)
    assert eps_bf16.dtype == torch.bfloat16
    rel = ((eps_bf16.float() - eps).norm() / eps.norm()).item()
    assert rel < 3e-2, rel


def test_gradient_checkpointing_same_output_and_grads():
    unet = _tiny_unet()
    _randomise(((n, p) for n, p in unet.named_parameters() if is_temporal_param(n)), seed=9)
    mark_trainable(unet, DEFAULT_TRAINABLE)
    z, t, context = _inputs(Fr=2)
    results = []
    for flag in (False, True):
        unet.enable_gradient_checkpointing(flag)
        unet.zero_grad(set_to_none=True)
        eps = unet(z, t, context)
        eps.square().mean().backward()
        results.append((eps.detach(), {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=1e-6)
    assert results[0][1].keys() == results[1][1].keys() and len(results[0][1]) > 0
    for n in results[0][1]:
        torch.testing.assert_close(results[1][1][n], results[0][1][n], rtol=1e-5, atol=1e-7)


def test_mark_trainable_and_trainable_state_roundtrip():
    unet = _tiny_unet()
    n = mark_trainable(unet, DEFAULT_TRAINABLE)
    names = {k for k, p in unet.named_parameters() if p.requires_grad}
    expected = {k for k in dict(unet.named_parameters())
                if ".attn1.to_q." in k or ".attn2.to_q." in k or ".attn_temp." in k or ".norm_temp." in k}
    assert names == expected and n == sum(p.numel() for k, p in unet.named_parameters() if k in expected)
    assert any("norm_temp" in k for k in names) and not any("attn1.to_k" in k for k in names)
    mark_trainable(unet, ("attn1.to_q", "attn2.to_q", "attn_temp"))  # Tune-A-Video's set: no norm_temp
    names = {k for k, p in unet.named_parameters() if p.requires_grad}

    state = {k: v.clone() for k, v in trainable_state(unet).items()}
    assert set(state) == names
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(1.0)
    load_trainable_state(unet, state)
    for k, p in unet.named_parameters():
        if k in state:
            assert torch.equal(p, state[k])

    mark_trainable(unet, DEFAULT_TRAINABLE)
    with pytest.raises(ValueError, match="missing trainable parameter .*norm_temp"):
        load_trainable_state(unet, state)
    mark_trainable(unet, ("attn_temp",))
    with pytest.raises(ValueError, match="unexpected tensor .*to_q"):
        load_trainable_state(unet, state)
    other = _tiny_unet(**{"cross_attention_dim": 16})  # same names, attn2.to_k differs: not trainable here
    mark_trainable(other, ("attn2",))
    mark_trainable(unet, ("attn2",))
    with pytest.raises(ValueError, match="attn2.to_k.weight has shape"):
        load_trainable_state(unet, trainable_state(other))


def test_key_rules_reject_and_config_rejects():
    assert unet_key_from_ldm("model.diffusion_model.input_blocks.3.0.op.weight") == \
        "down_blocks.0.downsamplers.0.conv.weight"
    assert unet_key_from_ldm("model.diffusion_model.output_blocks.5.2.conv.bias") == \
        "up_blocks.1.upsamplers.0.conv.bias"
    for bad in ("first_stage_model.encoder.conv_in.weight", "model.diffusion_model.input_blocks.1.0.foo.weight"):
        with pytest.raises(ValueError, match=bad.replace(".", r"\.")):
            unet_key_from_ldm(bad)
    with pytest.raises(UNetConfigError, match="only_cross_attention"):  # SD 2.x's settings are built; others are not
        UNetConfig.from_diffusers({**TINY, "only_cross_attention": True})
    with pytest.raises(UNetConfigError, match="attention_head_dim"):  # a head count per level, or one for all
        UNet3DConditionModel(UNetConfig.from_diffusers({**TINY, "attention_head_dim": [2, 4]}))
    unet = _tiny_unet()
    with pytest.raises(ValueError, match="shape"):
        unet(torch.zeros(1, 4, 8, 8), 0, torch.zeros(1, 77, 32))


def test_inflation_off_is_sd_frame_by_frame(tiny_folder):
    """set_inflation(False) (per-frame self-attention, no temporal attention) with per-frame GroupNorm: on F different
    frames, the output equals diffusers' 2D U-Net on the F frames as a batch of images; back on, it differs."""
    folder, ref = tiny_folder
    unet = _load_folder(folder, norm_over_frames=False)
    z, t, context = _inputs(B=1, Fr=4)
    with torch.no_grad():
        _randomise(((n, p) for n, p in unet.named_parameters() if is_temporal_param(n)), seed=9)
        images = z[0].transpose(0, 1)  # (1, 4, F, h, w) -> (F, 4, h, w)
        eps_ref = ref(images, t.expand(4), context.expand(4, -1, -1)).sample  # (F, 4, h, w)
        unet.set_inflation(False)
        eps_off = unet(z, t, context)[0].transpose(0, 1)
        unet.set_inflation(True)
        eps_on = unet(z, t, context)[0].transpose(0, 1)
    torch.testing.assert_close(eps_off, eps_ref, rtol=0, atol=1e-5)
    assert (eps_on[1:] - eps_ref[1:]).abs().max() > 1e-3
