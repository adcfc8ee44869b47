"""apla.run, what train.py and sample.py share: seeds that reach every new weight, the GroupNorm setting of a run,
the perceptual weights a run records, and checkpoints of every part that trains."""
import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from apla import run
from apla.config import TrainConfig
from apla.scheduler import make_alpha_bar
from apla.sd.unet import FrameGroupNorm, UNet3DConditionModel, UNetConfig

TINY_UNET = UNetConfig(block_out_channels=(16, 32), layers_per_block=1, attention_head_dim=4, cross_attention_dim=32,
                       norm_num_groups=8, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
TINY_VGT = {"width": 32, "spatial_depth": 1, "temporal_depth": 1, "heads": 2, "mlp_hidden": 64, "sample_size": 8,
            "max_frames": 4}
SHAPE = (1, 4, 4, 8, 8)  # (B, C, F, h, w)


def tiny_sd():
    torch.manual_seed(0)
    return SimpleNamespace(unet=UNet3DConditionModel(TINY_UNET), vae=nn.Linear(1, 1), text_encoder=nn.Linear(1, 1),
                           alpha_bar=make_alpha_bar(), prediction_type="epsilon")


def config(**values):
    return TrainConfig.from_dict({"pretrained": "tiny", "vgt_model": TINY_VGT, **values})


def initial_weights(cfg):
    model = run.build_apla(cfg, tiny_sd(), SHAPE, "cpu")
    return {f"{prefix}.{k}": v.clone() for prefix in ("vgt", "disc") for k, v in getattr(model, prefix).state_dict().items()}


def test_seed_reaches_vgt_and_discriminator_initialisation():
    one, again, two = initial_weights(config(seed=1)), initial_weights(config(seed=1)), initial_weights(config(seed=2))
    assert all(torch.equal(one[k], again[k]) for k in one)
    differ = {k for k in one if not torch.equal(one[k], two[k])}
    assert "disc.conv.weight" in differ and "vgt.patch_embed.weight" in differ and "vgt.head.fc2.weight" in differ
    # an explicit init_seed wins over the run's seed
    pinned = initial_weights(config(seed=2, init_seed=1))
    assert all(torch.equal(one[k], pinned[k]) for k in one)


def test_seed_reaches_random_vgg_features():
    vgg = [run.build_apla(config(seed=s, apla={"perceptual_weights": "random"}), tiny_sd(), SHAPE, "cpu").perceptual
           for s in (1, 1, 2)]
    w = [v.features[0].weight for v in vgg]
    assert torch.equal(w[0], w[1]) and not torch.equal(w[0], w[2])


def test_groupnorm_setting_reaches_the_unet_and_round_trips_through_config_json():
    for setting, pooled in (("frames", True), ("per-frame", False)):
        cfg = TrainConfig.from_dict(json.loads(json.dumps(config(groupnorm=setting).to_dict())))
        model = run.build_apla(cfg, tiny_sd(), SHAPE, "cpu", train=False)
        norms = [m for m in model.unet.modules() if isinstance(m, FrameGroupNorm)]
        assert norms and all(m.over_frames == pooled for m in norms) and model.unet.config.norm_over_frames == pooled
    assert TrainConfig().groupnorm == "frames"  # Tune-A-Video's network for runs; a loaded SD stays per image
    assert UNetConfig().norm_over_frames is False


def test_pooled_groupnorm_lets_frame_0_see_later_frames_and_per_frame_does_not():
    """With the temporal attention's output at zero (as inflated) and sparse-causal attention, frame 0 sees only
    itself unless GroupNorm pools statistics over frames."""
    unet = tiny_sd().unet.eval()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 4, 4, 8, 8, generator=g)
    changed = z.clone()
    changed[:, :, 3] += 1.0  # only the last frame changes
    context = torch.randn(1, 77, 32, generator=g)
    for pooled in (False, True):
        unet.set_norm_over_frames(pooled)
        with torch.no_grad():
            diff = (unet(z, 10, context)[:, :, 0] - unet(changed, 10, context)[:, :, 0]).abs().max().item()
        assert (diff > 1e-4) if pooled else (diff == 0.0), (pooled, diff)


def test_perceptual_weights_resolution(tmp_path, monkeypatch, capsys):
    from apla.config import APLAConfig
    from apla.losses import VGGFeatures

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    # nothing cached: random features, said in one line, and the run config records "random"
    assert run.resolve_perceptual_weights(APLAConfig()) == "random"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "random VGG16 features" in err[0] and "--perceptual-weights" in err[0]
    # a run without the perceptual term keeps its setting and says nothing
    assert run.resolve_perceptual_weights(APLAConfig(gamma=0.0)) is None
    assert run.resolve_perceptual_weights(APLAConfig(use_hyper_loss=False)) is None
    assert capsys.readouterr().err == ""
    # torchvision's file in the torch hub cache is used, and a file given by the user wins
    cached = tmp_path / "hub" / "checkpoints" / run.TORCHVISION_VGG16
    cached.parent.mkdir(parents=True)
    torch.save(VGGFeatures(seed=5).state_dict(), cached)
    assert run.resolve_perceptual_weights(APLAConfig()) == str(cached)
    assert run.resolve_perceptual_weights(APLAConfig(perceptual_weights="my.pth")) == "my.pth"
    assert run.resolve_perceptual_weights(APLAConfig(perceptual_weights="random")) == "random"
    model = run.build_apla(config(apla={"perceptual_weights": str(cached)}), tiny_sd(), SHAPE, "cpu")
    assert torch.equal(model.perceptual.features[0].weight, VGGFeatures(seed=5).features[0].weight)


def test_checkpoint_round_trip_of_every_part(tmp_path):
    cfg = config(keep_checkpoints=0)
    model = run.build_apla(cfg, tiny_sd(), SHAPE, "cpu")
    opt_g, opt_d = run.optimizers(cfg, model)
    gen = torch.Generator().manual_seed(7)
    meta = run.checkpoint_meta(cfg, model)
    run.save_checkpoint(tmp_path, 5, cfg, model, opt_g, opt_d, gen, meta)
    fresh = run.build_apla(dataclasses.replace(cfg, seed=99), tiny_sd(), SHAPE, "cpu")
    with torch.no_grad():
        for p in fresh.unet.parameters():
            if p.requires_grad:
                p.add_(1.0)
    gen2 = torch.Generator()
    assert run.load_checkpoint(tmp_path / "checkpoints" / "step-000005", cfg, fresh, *run.optimizers(cfg, fresh),
                               gen2) == 5
    for prefix in ("vgt", "disc"):
        a, b = getattr(model, prefix).state_dict(), getattr(fresh, prefix).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), prefix
    assert all(torch.equal(p, q) for p, q in zip(model.unet.parameters(), fresh.unet.parameters()))
    assert torch.equal(gen.get_state(), gen2.get_state())


def test_truncate_log_keeps_each_step_once(tmp_path):
    lines = [{"step": s, "total": 0.1 * s} for s in (1, 2, 3, 2, 3, 4)]  # a resumed run's log, before the fix
    (tmp_path / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    run.truncate_log(tmp_path, 2)
    assert [json.loads(x)["step"] for x in (tmp_path / "log.jsonl").read_text().splitlines()] == [1, 2]


def test_json_files_are_strict_json(tmp_path):
    """JSON has no inf or nan: an infinite PSNR (identical videos) is written as null, and the file parses strictly."""
    from apla.checkpoint import atomic_write_json

    atomic_write_json(tmp_path / "m.json", {"psnr": float("inf"), "rows": [1.5, float("nan")], "n": 3})
    text = (tmp_path / "m.json").read_text()
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}")) == {
        "psnr": None, "rows": [1.5, None], "n": 3}
