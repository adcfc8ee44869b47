"""The one-shot measurement (apla.micro.oneshot) on hand-made "samples" whose answers are known."""
import json
import math

from apla.config import TrainConfig
from apla.eval import metrics
from apla.eval.score import sample_stem
from apla.micro import oneshot
from apla.micro.shapes import render_clip
from apla.video import write_gif


def test_oneshot_figures_on_known_samples(tmp_path, capsys):
    cfg = TrainConfig(video="red-circle-right", prompt="a red circle moving to the right", frames=8, size=64,
                      edit_prompts=("a blue circle moving to the right", "a red square moving to the right"))
    run = tmp_path / "run"
    (run / "samples").mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    source, _ = render_clip("circle", "red", "right", num_frames=8, size=9.0)       # the bundled clip itself
    blue, _ = render_clip("circle", "blue", "right", num_frames=8, size=9.0)        # a perfect colour edit
    square_left, _ = render_clip("square", "red", "left", num_frames=8, size=9.0)  # right shape, wrong motion
    for prompt, frames in zip([cfg.prompt, *cfg.edit_prompts], (source, blue, square_left)):
        write_gif(frames, run / "samples" / f"{sample_stem(prompt)}.gif")

    report = oneshot.evaluate_run(run)
    rows = {r["prompt"]: r for r in report["results"]}
    src = rows[cfg.prompt]
    assert src["edited"] == [] and src["psnr_db"] > 40 and src["path_distance_px"] < 0.5
    colour_edit = rows["a blue circle moving to the right"]
    assert colour_edit["edited"] == ["colour"] and colour_edit["edited_attribute_accuracy"] == 1.0
    assert colour_edit["kept_attribute_accuracy"] == 1.0 and colour_edit["path_distance_px"] < 0.5
    shape_edit = rows["a red square moving to the right"]
    assert shape_edit["edited"] == ["shape"] and shape_edit["edited_attribute_accuracy"] == 1.0
    assert shape_edit["path_distance_px"] > 10  # moving the other way is caught
    assert not math.isnan(shape_edit["path_distance_px"])

    assert oneshot.main(["--run", str(run), "--json", str(tmp_path / "r.json")]) == 0
    table = capsys.readouterr().out
    assert "a blue circle moving to the right | colour | 100%" in table
    assert json.loads((tmp_path / "r.json").read_text())["source_prompt"] == cfg.prompt
    assert oneshot.main(["--run", str(tmp_path / "nope")]) == 2


def test_oneshot_uses_the_package_psnr():
    assert oneshot.psnr is metrics.psnr
