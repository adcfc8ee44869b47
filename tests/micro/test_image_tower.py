"""The micro CLIP (apla.micro.image_tower): the shipped tower retrieves held-out scenes' captions far above chance,
scores a clip's own prompt above others, and trains against a text encoder it never changes."""
import json

import pytest
import torch

from apla.eval.metrics import clip_frame_consistency, clip_text_alignment, load_clip
from apla.micro import image_tower, shapes
from apla.micro.pretrain import clip_frames


@pytest.fixture(scope="module")
def micro():
    return load_clip("micro")


def test_held_out_retrieval_beats_chance(micro):
    """64 held-out scenes and 64 clip frames (seeds never trained on). The shipped figures, on 512 + 512, are in
    clip_image/config.json: exact scene caption 98.6% (chance 0.46%), clip frames' colour and shape 100% (4.2%)."""
    r = image_tower.retrieval(micro, n=64)
    assert r["scene_exact"] > 0.8 > 100 * r["scene_exact_chance"]
    assert min(r["scene_colour"], r["scene_shape"], r["scene_position"]) > 0.9
    assert r["clip_colour_shape"] > 0.9 and r["clip_exact"] > 20 * r["clip_exact_chance"]
    shipped = json.loads((image_tower.TOWER_DIR / "config.json").read_text())["retrieval"]
    assert shipped["scene_exact"] > 0.9 and shipped["held_out_images"] == 1024


def test_own_prompt_scores_highest(micro):
    frames, _ = shapes.render_clip("circle", "red", "right")
    own = clip_text_alignment(frames, "a red circle moving to the right", micro)
    for other in ("a blue circle moving to the right", "a red square moving to the right",
                  "a green triangle moving up"):
        assert own > clip_text_alignment(frames, other, micro) + 5, other
    assert clip_frame_consistency(frames[:1].repeat(4, 1, 1, 1), micro) == pytest.approx(100, abs=1e-4)


def test_captions_cover_the_world():
    _, captions, _ = shapes.sample_dataset(200, seed=11)
    assert set(captions) <= set(image_tower.scene_captions()) and len(image_tower.scene_captions()) == 216
    _, captions = clip_frames(100, 12)
    assert set(captions) <= set(image_tower.clip_captions()) and len(image_tower.clip_captions()) == 192


def test_training_leaves_the_text_encoder_as_shipped():
    cfg = image_tower.TowerConfig(steps=2, pool_size=64, batch=16, warmup=1)
    model, _ = image_tower.train(cfg, log_every=1000)
    import apla

    shipped = apla.load_stable_diffusion("micro", components=("text_encoder",)).text_encoder.state_dict()
    for k, v in model.text_encoder.state_dict().items():
        assert torch.equal(v, shipped[k]), k
    assert set(model.trainable_state()) == {k for k, _ in model.named_parameters() if not k.startswith("text_encoder.")}
