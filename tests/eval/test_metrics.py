"""apla.eval.metrics: FCI and the warping error on clips whose consistency is known, PSNR's closed form, the CLIP scores
with a tiny random CLIPModel and hand-made embeddings, CLIP models and measures registered as plugins."""
import math
from importlib.metadata import EntryPoint

import pytest
import torch
from PIL import Image

from apla.eval import metrics
from apla.eval.metrics import (MetricsError, clip_frame_consistency, clip_preprocess, clip_text_alignment, fci,
                               frame_consistency, load_clip, psnr, warping_error)
from apla.micro.shapes import render_clip
from apla.video import to_uint8
from tests.helpers.synthetic import moving_texture


# ---------------------------------------------------------------------------------------------------------------
# FCI and the warping error
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clips():
    """A textured pan (1, 0.5) px per frame, and the same with per-frame noise, with flicker, shuffled."""
    g = torch.Generator().manual_seed(0)
    pan = moving_texture(8, 64)
    noisy = (pan + 0.1 * torch.randn(pan.shape, generator=g)).clamp(-1, 1)
    flicker = (pan + torch.tensor([0.15 * (-1) ** k for k in range(8)]).view(-1, 1, 1, 1)).clamp(-1, 1)
    order = torch.tensor([1, 3, 7, 6, 4, 5, 2, 0])
    return {"static": pan[:1].repeat(8, 1, 1, 1), "pan": pan, "noisy": noisy, "flicker": flicker,
            "pan shuffled": pan[order], "noisy shuffled": noisy[order]}


@pytest.fixture(scope="module")
def scores(clips):
    return {name: (fci(v), warping_error(v)) for name, v in clips.items()}


def test_static_clip_scores_zero(scores):
    f, w = scores["static"]
    assert f == pytest.approx(0, abs=1e-6) and w == pytest.approx(0, abs=1e-6)


def test_rigid_pan_scores_near_zero(scores):
    """Measured: FCI 0.037 px, warping error 3.3e-4."""
    f, w = scores["pan"]
    assert f < 0.1 and w < 1e-3


@pytest.mark.parametrize("spoiled", ["noisy", "flicker"])
def test_noise_and_flicker_score_clearly_higher(scores, spoiled):
    """Measured: FCI 0.18 (noise) and 7.4 (flicker) vs 0.037; warping error 3.8e-3 and 2.8e-2 vs 3.3e-4."""
    assert scores[spoiled][0] > 3 * scores["pan"][0]
    assert scores[spoiled][1] > 3 * scores["pan"][1]


def test_shuffled_frames_score_higher_again(scores):
    """FCI compares one pair's flow with the next, so frames out of order raise it. Measured: FCI 2.96 (pan
    shuffled) and 2.95 (noisy shuffled). The warping error reads one pair at a time, and every pair of a shuffled
    pan is still one rigid shift that the flow explains: with the pixels whose flow leaves the frame left out, it
    stays as low as the ordered pan's and does not see the order (measured 2.4e-4 vs 3.3e-4; noisy 4.1e-3 vs
    3.8e-3)."""
    for ordered in ("pan", "noisy"):
        shuffled = scores[f"{ordered} shuffled"]
        assert shuffled[0] > 2 * scores[ordered][0], ordered
    assert scores["pan shuffled"][0] > scores["noisy"][0]
    assert scores["pan shuffled"][1] < 1e-3 and scores["pan shuffled"][1] < 0.1 * scores["noisy"][1]


def test_fci_follows_the_motion():
    """An object sliding at constant speed keeps its flow (FCI small); the same frames out of order do not."""
    frames, _ = render_clip("square", "blue", "down-right")
    assert fci(frames) < 1.0
    assert fci(frames[torch.tensor([0, 4, 1, 6, 2, 7, 3, 5])]) > 4 * fci(frames)


def test_warping_error_leaves_out_pixels_whose_flow_leaves_the_frame():
    """A pan by whole pixels with its exact flows: the 3 right-hand columns of frame k move out of frame k+1 (new
    content enters on the left). They pass the forward-backward test, yet have nothing to be compared with; left out,
    the error is 0, while counting them (reading the edge pixel) would not be."""
    g = torch.Generator().manual_seed(0)
    wide = torch.rand(1, 3, 16, 40, generator=g, dtype=torch.float64) * 2 - 1
    video = torch.cat([wide[..., 12 - 3 * k:36 - 3 * k] for k in range(3)])  # (3, 3, 16, 24): content moves 3 px right
    forward = torch.zeros(2, 2, 16, 24, dtype=torch.float64)
    forward[:, 0] = 3.0  # frame k at x shows what frame k+1 shows at x + 3
    assert warping_error(video, (forward, -forward)) == pytest.approx(0, abs=1e-12)
    # the left-out columns alone: their error is what the old mask added
    x = (video + 1) / 2
    edge = (x[:-1, :, :, -3:] - x[1:, :, :, -1:]).pow(2).mean().item()
    assert edge > 0.05


def test_flow_metrics_need_enough_frames():
    video = moving_texture(3, 32)
    with pytest.raises(MetricsError, match="at least 3"):
        fci(video[:2])
    with pytest.raises(MetricsError, match="at least 2"):
        warping_error(video[:1])
    with pytest.raises(MetricsError, match=r"\(F, 3, H, W\)"):
        fci(video[0])


def test_local_flow_is_the_3x3_mean():
    flow = torch.arange(2 * 4 * 5, dtype=torch.float64).view(1, 2, 4, 5) ** 2
    local = metrics.local_flow(flow)
    assert torch.allclose(local[0, 1, 1, 2], flow[0, 1, 0:3, 1:4].mean())
    assert torch.allclose(local[0, 0, 0, 0], torch.stack([flow[0, 0, 0, 0]] * 4 + [flow[0, 0, 0, 1]] * 2 +
                                                         [flow[0, 0, 1, 0]] * 2 + [flow[0, 0, 1, 1]]).mean())


def test_fci_closed_form_on_given_flows():
    """With the flows given: a flow that doubles from one pair to the next changes by |w| everywhere."""
    video = torch.zeros(3, 3, 8, 8)
    flow = torch.zeros(2, 2, 8, 8)
    flow[0, 0], flow[1, 0] = 0.5, 1.0  # uniform: the local means are the values, the warp reads a constant
    assert fci(video, flow) == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------------------------------
# PSNR
# ---------------------------------------------------------------------------------------------------------------

def test_psnr_closed_form():
    a = torch.zeros(2, 3, 4, 4, dtype=torch.float64)
    assert psnr(a, a) == math.inf
    # a difference of d in [-1, 1] units is d/2 on [0, 1]: PSNR = 10 log10(1 / (d/2)^2)
    assert psnr(a, a + 0.1) == pytest.approx(10 * math.log10(1 / 0.05**2), abs=1e-9)
    with pytest.raises(MetricsError, match="shapes"):
        psnr(a, a[:1])


# ---------------------------------------------------------------------------------------------------------------
# CLIP
# ---------------------------------------------------------------------------------------------------------------

class GivenEmbeddings:
    """A scorer returning hand-made embeddings."""

    def __init__(self, images, texts=None):
        self.images, self.texts = images, texts

    def image_features(self, video):
        return self.images

    def text_features(self, prompts):
        return self.texts


def test_frame_consistency_is_the_mean_over_all_pairs():
    e = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # pairs (0,1), (0,2), (1,2): cosines 0, 1/sqrt2, 1/sqrt2; each counted in both orders, 6 ordered pairs
    expected = 100 * (0 + 2 / math.sqrt(2)) / 3
    assert frame_consistency(e) == pytest.approx(expected)
    # scale does not matter (cosines), and adjacent pairs alone would give another number
    assert frame_consistency(e * torch.tensor([[3.0], [0.5], [2.0]])) == pytest.approx(expected)
    assert expected != pytest.approx(100 * (0 + 1 / math.sqrt(2)) / 2)
    video = torch.zeros(3, 3, 8, 8)
    assert clip_frame_consistency(video, GivenEmbeddings(e)) == pytest.approx(expected)


def test_text_alignment_by_hand():
    images = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    text = torch.tensor([[2.0, 0.0]])
    expected = 100 * (1 + 1 / math.sqrt(2)) / 2
    assert clip_text_alignment(torch.zeros(2, 3, 8, 8), "a prompt", GivenEmbeddings(images, text)) == \
        pytest.approx(expected)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny random transformers CLIPModel saved as a folder (weights and config only: no tokenizer files)."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    config = CLIPConfig(text_config=dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=77),
                        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                           num_hidden_layers=2, num_attention_heads=4),
                        projection_dim=16)
    folder = tmp_path_factory.mktemp("tiny_clip")
    CLIPModel(config).save_pretrained(folder)
    return folder


def test_tiny_clip_identical_frames_score_100(tiny_clip):
    clip = load_clip(str(tiny_clip))
    frame = torch.rand(1, 3, 48, 40) * 2 - 1
    assert clip_frame_consistency(frame.repeat(5, 1, 1, 1), clip) == pytest.approx(100, abs=1e-4)
    other = torch.rand(5, 3, 48, 40) * 2 - 1
    assert clip_frame_consistency(other, clip) < 100 - 1e-3


def test_tiny_clip_scores_match_transformers_own_path(tiny_clip):
    """Our written-out preprocessing and feature path give what CLIPImageProcessor + get_image_features and the
    tokenizer + get_text_features give."""
    from transformers import CLIPImageProcessor, CLIPModel

    from apla.sd.text import load_tokenizer

    clip = load_clip(str(tiny_clip))
    model = CLIPModel.from_pretrained(str(tiny_clip)).eval()
    video = torch.rand(4, 3, 40, 56) * 2 - 1
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    pixels = processor(images=[Image.fromarray(a) for a in to_uint8(video)], return_tensors="pt").pixel_values
    with torch.no_grad():
        images = model.get_image_features(pixel_values=pixels)
        images = images if isinstance(images, torch.Tensor) else images.pooler_output
        tokens = load_tokenizer()(["a tiny prompt"], padding=True, return_tensors="pt")
        text = model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
        text = text if isinstance(text, torch.Tensor) else text.pooler_output
    assert torch.allclose(clip.image_features(video), images, atol=1e-5)
    cos = torch.nn.functional.cosine_similarity(images, text)
    assert clip_text_alignment(video, "a tiny prompt", clip) == pytest.approx(100 * cos.mean().item(), abs=1e-4)


@pytest.mark.parametrize("size", [(64, 64), (48, 80), (72, 128), (100, 60), (33, 47)])
def test_clip_preprocess_matches_transformers_processor(size):
    from transformers import CLIPImageProcessor

    video = torch.rand(2, 3, *size) * 2 - 1
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    reference = processor(images=[Image.fromarray(a) for a in to_uint8(video)], return_tensors="pt").pixel_values
    assert torch.allclose(clip_preprocess(video, 32), reference, atol=1e-6)


def test_load_clip_errors_are_one_line(tmp_path):
    for name, expect in ((str(tmp_path / "nope"), "no such folder"), (str(tmp_path), "no config.json"),
                         ("not a model", "no such folder")):
        with pytest.raises(MetricsError, match=expect) as e:
            load_clip(name)
        assert "\n" not in str(e.value)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(MetricsError, match="cannot load a CLIPModel") as e:
        load_clip(str(tmp_path))
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# Plugins
# ---------------------------------------------------------------------------------------------------------------

def fake_entry_points(monkeypatch, group, **names):
    """Pretend that installed packages register `names` (name -> "module:object") in `group`, and nothing else."""
    eps = [EntryPoint(name, value, group) for name, value in names.items()]
    monkeypatch.setattr(metrics, "entry_points", lambda group: [ep for ep in eps if ep.group == group])


def test_a_clone_not_installed_registers_its_plugins_from_its_pyproject(monkeypatch, tmp_path):
    """Without an installed apla, the entry-point tables of the source tree's pyproject.toml are the plugins (a clone
    run as it is); once installed, only the metadata's; a pyproject.toml of another project is not read."""
    monkeypatch.setattr(metrics, "entry_points", lambda group: [])
    monkeypatch.setattr(metrics, "installed", lambda: False)
    clip, measures = metrics.registered(metrics.CLIP_MODELS), metrics.registered(metrics.MEASURES)
    assert {k: v.value for k, v in clip.items()} == {"micro": "apla.micro.image_tower:load_micro_clip"}
    assert {k: v.value for k, v in measures.items()} == {"shapes": "apla.micro.shapes_eval:shapes_measures"}
    assert metrics.load_plugin(measures["shapes"]).columns  # resolved by importlib, as an installed entry point
    monkeypatch.setattr(metrics, "installed", lambda: True)
    assert metrics.registered(metrics.CLIP_MODELS) == {}
    monkeypatch.setattr(metrics, "installed", lambda: False)
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "other"\n[project.entry-points."apla.clip_models"]\n'
                                             'x = "other:load"\n')
    monkeypatch.setattr(metrics, "SOURCE_TREE", tmp_path)
    assert metrics.registered(metrics.CLIP_MODELS) == {}


def test_registered_clip_model_loads_by_name(monkeypatch):
    fake_entry_points(monkeypatch, metrics.CLIP_MODELS, given="tests.eval.test_metrics:given_clip")
    clip = load_clip("given", device="cpu")
    assert clip_frame_consistency(torch.zeros(3, 3, 8, 8), clip) == pytest.approx(100.0)


def given_clip(device="cpu"):
    """A registered CLIP model's loader (for the test above): every frame has the same embedding."""
    return GivenEmbeddings(torch.ones(3, 4))


def failing_clip(device="cpu"):
    raise FileNotFoundError("clip_image/model.safetensors: no such file\nsecond line")


@pytest.mark.parametrize("value, expect", [("tests.eval.not_a_module:load", "does not load: No module named"),
                                           ("tests.eval.test_metrics:failing_clip", "does not load: clip_image")])
def test_registered_clip_model_that_does_not_load_is_one_line(monkeypatch, value, expect):
    fake_entry_points(monkeypatch, metrics.CLIP_MODELS, broken=value)
    with pytest.raises(MetricsError, match=expect) as e:
        load_clip("broken")
    assert "\n" not in str(e.value) and "broken" in str(e.value)
    with pytest.raises(MetricsError, match=r"not a registered CLIP model \(registered: broken\)"):
        load_clip("other")
