"""Tests of apla/vgt.py: every equation (Eqs. 4, 7-15, free functions and block forwards) against hand-computed
values or closed forms, the intermediates VGT returns, the mask, shapes, bf16, the initial perturbation ratio and
the parameter counts of Table 1."""

import math

import pytest
import torch
import torch.nn.functional as F_

from apla import vgt as V
from apla.scheduler import timestep_embedding
from apla.vgt import VGT, VGTConfig
from apla.sd.weights import count_parameters

TABLE1 = {"pure": 60.362e6, "hyper": 97.136e6, "pure-en": 60.362e6, "hyper-en": 97.136e6}


def tiny(variant="pure", **kw):
    base = dict(variant=variant, width=16, heads=2, spatial_depth=2, temporal_depth=2, mlp_hidden=32,
                sample_size=64, max_frames=24, patch_size=4)
    base.update(kw)
    return VGTConfig(**base)


# --------------------------------------------------------------------------------------------- equations


def test_eq4_perturbed_eps_hand_value():
    eps_pred = torch.tensor([1.0, -2.0, 0.5])
    phi = torch.tensor([0.25, 0.5, -0.5])
    assert torch.equal(V.perturbed_eps(eps_pred, phi), torch.tensor([1.25, -1.5, 0.0]))


def test_perturbation_ratio_closed_form():
    x = torch.randn(2, 4, 3, 8, 8, dtype=torch.float64)
    assert V.perturbation_ratio(0.125 * x, x).item() == pytest.approx(0.125, rel=1e-6)
    assert V.perturbation_ratio(torch.tensor([3.0, 4.0]), torch.tensor([0.0, 10.0])).item() == pytest.approx(0.5)


def test_decoder_mask_hand_value():
    expected = torch.tensor(
        [[1, 1, 1, 1],
         [0, 1, 0, 0],
         [0, 1, 1, 0],
         [0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(V.decoder_mask(4), expected)


def test_patchify_hand_value_and_round_trip():
    z = torch.arange(2 * 4 * 3 * 8 * 6, dtype=torch.float64).reshape(2, 4, 3, 8, 6)
    tok = V.patchify(z, 2)
    assert tok.shape == (2, 3, 4 * 3, 4 * 2 * 2)
    # batch 1, frame 2, patch (row 1, col 2) = token 1*3+2; element (channel 3, dy 1, dx 0)
    assert tok[1, 2, 5, 3 * 4 + 1 * 2 + 0] == z[1, 3, 2, 1 * 2 + 1, 2 * 2 + 0]
    assert torch.equal(V.unpatchify(tok, 2, 4, 8, 6), z)


def test_eq9_spatial_tokens_hand_value():
    patches = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])  # (1, N=2, d=2)
    cls = torch.tensor([[[10.0, 20.0]]])
    pos = torch.tensor([[[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]]])
    out = V.spatial_tokens(patches, cls, pos)
    assert torch.allclose(out, torch.tensor([[[10.1, 20.2], [1.3, 2.4], [3.5, 4.6]]]))


def test_eq10_temporal_input_hand_value():
    D = torch.nn.Linear(2, 2)
    with torch.no_grad():
        D.weight.copy_(torch.tensor([[2.0, 0.0], [0.0, -1.0]]))
        D.bias.copy_(torch.tensor([1.0, 1.0]))
    cls_s = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])  # (B=1, F=2, d=2)
    cls_t = torch.tensor([[[5.0, 6.0]]])
    pos = torch.tensor([[[0.0, 1.0], [1.0, 0.0], [2.0, 2.0]]])
    out = V.temporal_input(cls_s, cls_t, D, pos)
    assert torch.allclose(out, torch.tensor([[[5.0, 7.0], [4.0, -1.0], [9.0, -1.0]]]))


def test_eq11_temporal_output_split():
    z = torch.arange(2 * 4 * 3.0).reshape(2, 4, 3)
    cls_t, frames = V.temporal_output(z)
    assert torch.equal(cls_t, z[:, 0]) and torch.equal(frames, z[:, 1:])


def _reference_attention(block, x, mask):
    """Float64 multi-head attention written out: softmax(QK^T/sqrt(d_h) + mask) V, then the projection."""
    B, N, d = x.shape
    h = block.attn.heads
    q, k, v = block.attn.qkv(x).split(d, dim=-1)
    out = torch.zeros_like(x)
    for head in range(h):
        s = slice(head * d // h, (head + 1) * d // h)
        scores = q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(d // h)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        out[..., s] = torch.softmax(scores, dim=-1) @ v[..., s]
    return block.attn.proj(out)


@pytest.mark.parametrize("shape", [(6, 5, 8), (2, 4, 8)], ids=["eq7-spatial-B*F,1+N,d", "eq8-temporal-B,1+F,d"])
@pytest.mark.parametrize("masked", [True, False])
def test_eq7_eq8_decoder_block_written_out(shape, masked):
    torch.manual_seed(0)
    block = V.DecoderBlock(8, 2).double()
    x = torch.randn(*shape, dtype=torch.float64)
    mask = V.decoder_mask(shape[1]) if masked else None
    # $$z^{\ell+1} = \mathrm{MMSA}(\mathrm{LN}(z^\ell)) + z^\ell$$
    ref = _reference_attention(block, block.norm(x), mask) + x
    assert torch.allclose(block(x, mask), ref, atol=1e-12)


def test_eq12_hadamard_fusion_hand_value():
    z_s = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])  # (B=1, F=1, N=2, d=2)
    z_tmp = torch.tensor([[[10.0, -1.0]]])  # (B=1, F=1, d=2)
    assert torch.equal(V.hadamard_fusion(z_s, z_tmp), torch.tensor([[[[10.0, -2.0], [30.0, -4.0]]]]))


def test_eq13_eq15_mlp_head_hand_value():
    head = V.MLPHead(2, 2, 1)
    with torch.no_grad():
        head.fc1.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        head.fc1.bias.zero_()
        head.fc2.weight.copy_(torch.tensor([[1.0, 1.0]]))
        head.fc2.bias.copy_(torch.tensor([0.5]))
    y = torch.tensor([[3.0, -3.0]])
    gelu = lambda v: 0.5 * v * (1 + math.erf(v / math.sqrt(2)))
    assert head(y).item() == pytest.approx(gelu(3.0) + gelu(-3.0) + 0.5, rel=1e-6)


def test_eq14_hyper_block_matches_functional_convolutions():
    torch.manual_seed(0)
    B, F, Hp, Wp, d = 2, 3, 2, 4, 4
    block = V.HyperBlock(d).double()
    z_s = torch.randn(B, F, Hp * Wp, d, dtype=torch.float64)
    cls_t_M = torch.randn(B, d, dtype=torch.float64)
    z_tmp_C = torch.randn(B, F, d, dtype=torch.float64)
    out = block(z_s, cls_t_M, z_tmp_C, (Hp, Wp))
    # independent path: build the grid element by element, then the two transposed convolutions
    grid = torch.zeros(B, 2 * d, F, Hp, Wp, dtype=torch.float64)
    for b in range(B):
        for f in range(F):
            for i in range(Hp):
                for j in range(Wp):
                    grid[b, :d, f, i, j] = z_s[b, f, i * Wp + j]
                    grid[b, d:, f, i, j] = z_tmp_C[b, f] + cls_t_M[b]
    y = F_.conv_transpose3d(grid, block.conv1.weight, block.conv1.bias, padding=1)
    y = F_.conv_transpose3d(F_.gelu(y), block.conv2.weight, block.conv2.bias, padding=(0, 1, 1))
    assert out.shape == (B, F, Hp * Wp, d)
    assert torch.allclose(out[1, 2, 1 * Wp + 3], y[1, :, 2, 1, 3], atol=1e-12)
    assert torch.allclose(out, y.reshape(B, d, F, Hp * Wp).permute(0, 2, 3, 1), atol=1e-12)


@pytest.mark.parametrize("variant", V.ALL_VARIANTS)
def test_intermediates_shapes_and_are_what_forward_uses(variant):
    cfg = tiny(variant, patch_size=2, sample_size=32)
    model = VGT(cfg).double()
    B, C, F, H, W = 2, 4, 3, 8, 12
    P, d, N = cfg.patch_size, cfg.width, (8 // 2) * (12 // 2)
    z = torch.randn(B, C, F, H, W, dtype=torch.float64)
    t = torch.tensor([5, 700])
    with torch.no_grad():
        out = model(z, t, return_intermediates=True)
        phi = model(z, t)
    assert isinstance(out, V.VGTIntermediates)
    assert {k: tuple(v.shape) for k, v in out._asdict().items()} == {
        "z_s_0": (B * F, 1 + N, d), "z_s_L": (B * F, 1 + N, d), "z_tmp_1": (B, 1 + F, d), "z_tmp_M": (B, 1 + F, d),
        "y": (B, F, N, d), "z_hat": (B, F, N, C * P * P), "phi": (B, C, F, H, W)}
    assert torch.equal(out.phi, phi)
    # each intermediate is the previous one through the next equation's code
    mask_s = V.decoder_mask(1 + N) if cfg.masked else None
    mask_t = V.frame_mask(1 + F) if cfg.per_frame else V.decoder_mask(1 + F) if cfg.masked else None
    with torch.no_grad():
        cls = (model.cls_s[0] + timestep_embedding(t, d).double()).repeat_interleave(F, dim=0)  # (B*F, d)
        assert torch.allclose(out.z_s_0[:, 0], cls + model.pos_s[0, 0], atol=1e-12)  # Eq. 9's class token carries t
        z_s = out.z_s_0
        for block in model.spatial:
            z_s = block(z_s, mask_s)  # Eq. 7
        assert torch.equal(model.norm_s(z_s), out.z_s_L)
        cls_s_L = out.z_s_L[:, 0].reshape(B, F, d)  # (B*F, d) -> (B, F, d)
        assert torch.equal(V.temporal_input(cls_s_L, model.cls_t, model.D, model.pos_t[:, : 1 + F]), out.z_tmp_1)
        z_tmp = out.z_tmp_1
        for block in model.temporal:
            z_tmp = block(z_tmp, mask_t)  # Eq. 8
        assert torch.equal(model.norm_t(z_tmp), out.z_tmp_M)
        z_s_C = out.z_s_L[:, 1:].reshape(B, F, N, d)  # (B*F, 1+N, d) -> (B, F, N, d)
        cls_t_M, z_tmp_C = V.temporal_output(out.z_tmp_M)  # Eq. 11
        if cfg.hyper:
            y = model.fusion(z_s_C, cls_t_M, z_tmp_C, (H // P, W // P))  # Eq. 14
        else:
            y = V.hadamard_fusion(z_s_C, z_tmp_C)  # Eq. 12
        assert torch.equal(y, out.y)
        assert torch.equal(model.head(out.y), out.z_hat)  # Eq. 13 / 15
        assert torch.equal(V.unpatchify(out.z_hat, P, C, H, W), phi)


@pytest.mark.parametrize("variant", V.ALL_VARIANTS)
def test_mask_keeps_earlier_frames_of_temporal_decoder(variant):
    cfg = tiny(variant)
    model = VGT(cfg).double()
    z = torch.randn(1, 4, 6, 16, 16, dtype=torch.float64)
    k = 3
    z2 = z.clone()
    z2[:, :, k] += torch.randn_like(z2[:, :, k])
    with torch.no_grad():
        t1 = model(z, 10, return_intermediates=True).z_tmp_M
        t2 = model(z2, 10, return_intermediates=True).z_tmp_M
        phi1, phi2 = model(z, 10), model(z2, 10)
    earlier = slice(1, 1 + k)  # temporal tokens of frames 0..k-1 (index 0 is the class token)
    assert not torch.allclose(t1[:, 1 + k], t2[:, 1 + k])  # frame k itself changes
    if cfg.masked:
        assert torch.equal(t1[:, earlier], t2[:, earlier])
    else:
        assert (t1[:, earlier] - t2[:, earlier]).abs().max() > 1e-8
    if variant == "pure":  # VGT-Pure's whole output is causal in time (Eq. 12 is per frame)
        assert torch.equal(phi1[:, :, :k], phi2[:, :, :k])
    if variant == "pure-en":
        assert (phi1[:, :, :k] - phi2[:, :, :k]).abs().max() > 0


@pytest.mark.parametrize("variant", V.ALL_VARIANTS)
@pytest.mark.parametrize("frames", [1, 8, 24])
@pytest.mark.parametrize("size", [32, 64])
def test_output_shape_equals_input_shape(variant, frames, size):
    model = VGT(tiny(variant))
    z = torch.randn(1, 4, frames, size, size)
    with torch.no_grad():
        phi = model(z, torch.tensor([500]))
    assert phi.shape == z.shape


@pytest.mark.parametrize("variant", ["pure", "hyper"])
def test_output_shape_patch_size_2_and_batch_of_timesteps(variant):
    model = VGT(tiny(variant, patch_size=2, sample_size=32))
    z = torch.randn(2, 4, 8, 32, 24)
    with torch.no_grad():
        phi = model(z, torch.tensor([1, 999]))
    assert phi.shape == z.shape


@pytest.mark.parametrize("variant", V.ALL_VARIANTS)
def test_bf16_autocast_no_nan(variant):
    model = VGT(tiny(variant))
    z = torch.randn(2, 4, 8, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        phi = model(z, 999)
    assert phi.shape == z.shape and torch.isfinite(phi.float()).all()


@pytest.mark.parametrize("variant", V.ALL_VARIANTS)
def test_initial_perturbation_is_tiny_tiny_model(variant):
    model = VGT(tiny(variant))
    g = torch.Generator().manual_seed(1)
    z = torch.randn(2, 4, 8, 32, 32, generator=g)
    eps_pred = torch.randn(z.shape, generator=g)  # unit-variance stand-in for eps_theta
    with torch.no_grad():
        phi = model(z, torch.tensor([10, 900]))
    ratio = V.perturbation_ratio(phi, eps_pred).item()
    assert 0 < ratio < 1e-2


@pytest.mark.parametrize("variant", ["pure", "hyper"])
def test_initial_perturbation_is_tiny_paper_size(variant):
    model = VGT(VGTConfig(variant=variant))
    g = torch.Generator().manual_seed(2)
    z = torch.randn(1, 4, 2, 16, 16, generator=g)
    eps_pred = torch.randn(z.shape, generator=g)
    with torch.no_grad():
        ratio = V.perturbation_ratio(model(z, 999), eps_pred).item()
    print(f"{variant}: ||phi|| / ||eps_theta|| at init = {ratio:.2e}")
    assert 0 < ratio < 1e-2


def test_parameter_counts_match_table1():
    counts = {}
    for variant in V.ALL_VARIANTS:
        with torch.device("meta"):
            counts[variant] = count_parameters(VGT(VGTConfig(variant=variant)))
    assert counts.pop("pure-frame") == counts["pure"]  # the capacity control: VGT-Pure's parameters exactly
    for variant, n in counts.items():
        print(f"VGT-{variant}: {n / 1e6:.3f} M (Table 1: {TABLE1[variant] / 1e6:.3f} M, "
              f"{100 * (n / TABLE1[variant] - 1):+.2f}%)")
        assert abs(n / TABLE1[variant] - 1) < 0.05
    # "the mask operation did not change the quantities of trainable parameters" (Table 1)
    assert counts["pure"] == counts["pure-en"] and counts["hyper"] == counts["hyper-en"]


def test_same_seed_same_weights_and_bad_inputs_named():
    a, b = VGT(tiny()), VGT(tiny())
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    with pytest.raises(V.VGTShapeError, match="max_frames"):
        a(torch.randn(1, 4, 25, 16, 16), 0)
    with pytest.raises(V.VGTShapeError, match="patch_size"):
        a(torch.randn(1, 4, 2, 18, 16), 0)
    with pytest.raises(ValueError, match="variant"):
        VGTConfig(variant="giant")


def test_capacity_control_sees_no_other_frame():
    """"pure-frame" (the study's capacity control) has VGT-Pure's parameters, and phi of frame f depends on frame f
    of z_t only: changing frame 1 leaves every other frame's phi exactly as it was, while VGT-Pure's later frames
    change (its temporal decoder reads earlier frames)."""
    torch.manual_seed(0)
    small = dict(in_channels=4, sample_size=8, max_frames=4, width=32, spatial_depth=1, temporal_depth=2, heads=4,
                 mlp_hidden=64, out_init_std=0.02)
    control, pure = VGT(VGTConfig(variant="pure-frame", **small)), VGT(VGTConfig(variant="pure", **small))
    assert sum(p.numel() for p in control.parameters()) == sum(p.numel() for p in pure.parameters())
    z = torch.randn(1, 4, 4, 8, 8, dtype=torch.float64)
    z2 = z.clone()
    z2[:, :, 1] += torch.randn_like(z2[:, :, 1])
    for model in (control, pure):
        model.double()
    with torch.no_grad():
        a, b = control(z, 10), control(z2, 10)
        assert torch.equal(a[:, :, [0, 2, 3]], b[:, :, [0, 2, 3]])
        assert not torch.equal(a[:, :, 1], b[:, :, 1])
        p, q = pure(z, 10), pure(z2, 10)
        assert (p[:, :, 2:] - q[:, :, 2:]).abs().max() > 1e-9  # VGT-Pure's frames 2, 3 read frame 1
