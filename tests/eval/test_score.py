"""python -m apla.eval: a run's samples folder scored like sample.py scores it, the table and the JSON, and one
line with exit status 2 for each bad input."""
import json

import pytest
import torch

from apla.config import TrainConfig, slug
from apla.eval import metrics
from apla.eval import score as evaluate
from apla.micro.shapes import render_clip
from apla.video import read_video, write_gif, write_png_strip
from tests.eval.test_metrics import fake_entry_points

SOURCE = "a red circle moving to the right"
EDITS = ("a blue circle moving to the right", "a red square moving to the right")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run directory as train.py + sample.py leave it, with hand-made samples: the clip itself, a perfect colour
    edit, and a shape edit moving the wrong way."""
    root = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(video="red-circle-right", prompt=SOURCE, frames=8, size=64, edit_prompts=EDITS)
    (root / "config.json").write_text(json.dumps(cfg.to_dict()))
    samples = root / "samples"
    samples.mkdir()
    clips = {SOURCE: render_clip("circle", "red", "right")[0], EDITS[0]: render_clip("circle", "blue", "right")[0],
             EDITS[1]: render_clip("square", "red", "left")[0]}
    for prompt, frames in clips.items():
        write_gif(frames, samples / f"{slug(prompt)}.gif")
        write_png_strip(frames, samples / f"{slug(prompt)}.png")
    return root, cfg, clips


def test_samples_folder_table_and_json(run, tmp_path, capsys):
    root, cfg, _ = run
    out = tmp_path / "report.json"
    assert evaluate.main([str(root / "samples"), "--source", "red-circle-right", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "FCI ↓" in table and "warp err ↓" in table and "CLIP frames ↑" in table and "PSNR dB ↑" in table
    assert "path px ↓" in table and "edit right ↑" in table
    assert "| micro-CLIP frames ↑ | micro-CLIP text ↑ |" in table  # the micro project's CLIP, named as such
    assert len([line for line in table.splitlines() if line.startswith("| a ")]) == 3
    report = json.loads(out.read_text())
    rows = {r["prompt"]: r for r in report["videos"]}
    assert set(rows) == {SOURCE, *EDITS} and report["clip_model"] == "micro"
    src = rows[SOURCE]["metrics"]
    # the source sample is the clip itself: infinite PSNR, which JSON writes as null
    assert src["psnr"] is None and src["path_error"] < 0.5 and "edited_right" not in src
    blue = rows[EDITS[0]]
    assert blue["edited"] == ["colour"] and blue["metrics"]["edited_right"] == 1.0 and "psnr" not in blue["metrics"]
    assert rows[EDITS[1]]["metrics"]["path_error"] > 10
    for r in rows.values():
        assert {"fci", "warping_error", "clip_frame_consistency", "clip_text_alignment"} <= set(r["metrics"])


def test_clip_columns_name_the_scorer():
    """A CLIP model a project registers is named in the titles ("micro-CLIP"); a CLIPModel folder or hub id is CLIP."""
    row = {"name": "v", "prompt": "p", "frames": 8, "height": 64, "width": 64,
           "metrics": {"clip_frame_consistency": 90.0, "clip_text_alignment": 30.0}}
    for name, head in (("micro", "| micro-CLIP frames ↑ | micro-CLIP text ↑ |"),
                       ("openai/clip-vit-large-patch14", "| CLIP frames ↑ | CLIP text ↑ |")):
        table = evaluate.format_table({"videos": [row], "clip_model": name}, measures={})
        assert table.splitlines()[0] == "| video | frames " + head, name


def test_sample_py_report_is_what_evaluate_prints_for_the_folder(run, tmp_path):
    """score_samples (sample.py's call) on the frames in memory == the command on the written folder (read from
    the lossless PNG strips)."""
    root, cfg, clips = run
    written = evaluate.score_samples(list(clips.items()), cfg, out=tmp_path / "metrics.json")
    assert json.loads((tmp_path / "metrics.json").read_text())["videos"][0]["metrics"]
    items = [{"name": slug(p), "prompt": p, "video": evaluate.load(root / "samples" / f"{slug(p)}.png",
                                                                    root / "samples" / f"{slug(p)}.gif")}
             for p in clips]
    read = evaluate.score_videos(items, cfg.video, cfg.prompt)
    for a, b in zip(written["videos"], read["videos"]):
        assert a["prompt"] == b["prompt"]
        for k, v in a["metrics"].items():
            assert b["metrics"][k] == pytest.approx(v, rel=1e-6, abs=1e-9), k


def test_read_strip_is_lossless(tmp_path):
    frames = evaluate.quantize(torch.rand(5, 3, 16, 16) * 2 - 1)
    write_png_strip(frames, tmp_path / "s.png")
    assert torch.equal(evaluate.read_strip(tmp_path / "s.png"), frames)
    write_png_strip(frames[:1], tmp_path / "one.png")
    assert evaluate.read_strip(tmp_path / "one.png") is None  # one square frame is not a strip


def test_single_file_with_prompt_and_native_size(tmp_path, capsys):
    frames = torch.rand(4, 3, 36, 52) * 2 - 1  # not multiples of 8: read at its own size
    write_gif(frames, tmp_path / "odd.gif")
    assert read_video(str(tmp_path / "odd.gif"), 4, size=None).shape == (4, 3, 36, 52)
    assert evaluate.main([str(tmp_path / "odd.gif"), "--prompt", "anything", "--clip-model", "none"]) == 0
    captured = capsys.readouterr()
    assert "| anything | 4 x 36x52 |" in captured.out and "CLIP" not in captured.out.splitlines()[0]
    assert "--clip-model" in captured.err


@pytest.mark.parametrize("case", ["missing file", "unreadable video", "one frame", "missing CLIP model",
                                  "too short a source", "prompt for a folder"])
def test_bad_input_is_one_line_and_exit_2(run, tmp_path, capsys, case):
    root = run[0]
    broken = tmp_path / "broken.gif"
    broken.write_bytes(b"GIF89a not really")
    one = tmp_path / "one.gif"
    write_gif(render_clip("circle", "red", "right")[0][:1], one)
    short = tmp_path / "short.gif"
    write_gif(render_clip("circle", "red", "right", num_frames=3)[0], short)
    argv, expect = {
        "missing file": ([str(tmp_path / "nope.gif")], "nope.gif"),
        "unreadable video": ([str(broken)], "broken.gif"),
        "one frame": ([str(one), "--clip-model", "none"], "at least 2"),
        "missing CLIP model": ([str(root / "samples"), "--clip-model", str(tmp_path / "no_clip")], "no_clip"),
        "too short a source": ([str(root / "samples"), "--source", str(short), "--clip-model", "none"], "short.gif"),
        "prompt for a folder": ([str(root / "samples"), "--prompt", "a red circle"], "--prompt"),
    }[case]
    out = tmp_path / "report.json"
    with pytest.raises(SystemExit) as e:
        evaluate.main(argv + ["--json", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and expect in err[0], err
    assert not out.exists()


def redness(video, prompt, source):
    """A registered measure (for the tests below): the mean red level (0-255), on prompts that ask for red."""
    if not prompt or "red" not in prompt.split():
        return None
    return {"redness": ((video[:, 0].mean().item() + 1) * 127.5), "frames_seen": video.shape[0]}


redness.columns = {"redness": ("red", "↑", "{:.0f}", "mean red level, 0-255")}


def test_registered_measures_are_the_only_extra_columns(run, tmp_path, capsys, monkeypatch):
    """The scoring knows a project's measures only through the entry-point group: with another measure registered
    in place of the shapes world's, its column shows, where it applies, and the shapes world's do not."""
    root = run[0]
    fake_entry_points(monkeypatch, metrics.MEASURES, red="tests.eval.test_score:redness")
    out = tmp_path / "report.json"
    assert evaluate.main([str(root / "samples"), "--clip-model", "none", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| red ↑ |" in table and "path px" not in table and "edit right" not in table
    rows = {r["prompt"]: r for r in json.loads(out.read_text())["videos"]}
    assert rows[SOURCE]["metrics"]["frames_seen"] == 8 and "redness" in rows[EDITS[1]]["metrics"]
    assert "redness" not in rows[EDITS[0]]["metrics"]  # "a blue circle ...": the measure does not apply
    assert json.loads(out.read_text())["directions"]["redness"] == "↑"


def test_registered_measure_that_does_not_load_is_one_line_and_exit_2(run, capsys, monkeypatch):
    fake_entry_points(monkeypatch, metrics.MEASURES, broken="tests.eval.not_a_module:measure")
    with pytest.raises(SystemExit) as e:
        evaluate.main([str(run[0] / "samples"), "--clip-model", "none"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "apla.measures plugin 'broken'" in err[0] and "does not load" in err[0], err
