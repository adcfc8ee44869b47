"""The study's report is recomputed from its committed raw data, and its analysis does what its docstring says."""
from pathlib import Path

import pytest
import torch

from apla.eval import metrics
from apla.study import report
from apla.study.measures import best_linear_d

HERE = Path(report.__file__).parent


def test_the_reports_primary_numbers_come_from_the_committed_csv():
    rows = report.read_csv(HERE / "results.csv")
    text = (HERE / "REPORT.md").read_text().splitlines()
    p = report.primary(rows)
    assert text[2] == report.primary_sentence(p)  # the opening sentence, recomputed
    assert f"Primary endpoint: `apla.eval.metrics.{metrics.source_deviation.__name__}`" in text
    assert metrics.source_deviation.__name__ in {r["measure"] for r in rows}
    assert p["n"] >= 24 and p["steps"] == 300
    table = (HERE / "REPORT.md").read_text().split("## Core variants on every clip, 300 steps")[1]
    primary_row = next(ln for ln in table.splitlines() if ln.startswith("| source deviation"))
    assert report.cell(p, 1.0) + " (primary)" in primary_row


def test_csv_columns_are_exactly_the_issues(tmp_path):
    assert (HERE / "results.csv").read_text().splitlines()[0] == "clip,seed,variant,steps,prompt_kind,measure,value"
    bad = tmp_path / "bad.csv"
    bad.write_text("clip,seed,variant,steps,measure,value\n")
    with pytest.raises(ValueError, match="columns"):
        report.read_csv(bad)


def rows_of(values: dict, measure="source_deviation", kind="source", steps=300):
    """{(clip, seed, variant): value} -> CSV rows."""
    return [{"clip": c, "seed": s, "variant": v, "steps": steps, "prompt_kind": kind, "measure": measure, "value": x}
            for (c, s, v), x in values.items()]


def test_seeds_are_averaged_within_a_clip_and_clips_are_the_unit():
    rows = rows_of({("a", 0, "full"): 1.0, ("a", 1, "full"): 3.0, ("b", 0, "full"): 5.0})
    rows += rows_of({("a", 0, "full"): 10.0}, kind="colour")  # another prompt kind, not asked for
    assert report.clip_values(rows, "full", 300, "source_deviation", ("source",)) == {"a": 2.0, "b": 5.0}
    # prompts of a seed are averaged first: seed 0 of clip a is (1 + 10) / 2, seed 1 is 3
    assert report.clip_values(rows, "full", 300, "source_deviation", report.ALL)["a"] == pytest.approx(4.25)


def test_primary_and_the_holm_family_on_hand_made_rows():
    values = {}
    for i, d in enumerate([-0.5, -0.4, -0.6, -0.3, -0.5, -0.45, -0.55, -0.3]):  # full lower on every clip
        values[(f"c{i}", 0, "Tune-A-Video")] = 1.0
        values[(f"c{i}", 0, "full")] = 1.0 + d
        values[(f"c{i}", 0, "capacity control")] = 1.0
    rows = rows_of(values)
    p = report.primary(rows)
    assert p["n"] == 8 and p["mean"] == pytest.approx(-0.45) and p["p"] == pytest.approx(2 / 2 ** 8)
    assert report.primary_sentence(p).startswith("At 300 steps full APLA's videos depart less")
    tests = report.secondary(rows)
    # the family: control vs TAV and full vs control (the primary is left out of it)
    assert {(t["a"], t["b"]) for t in tests} == {("capacity control", "Tune-A-Video"), ("full", "capacity control")}
    raw = sorted(t["p"] for t in tests)
    assert sorted(t["p_holm"] for t in tests) == pytest.approx([min(1, 2 * raw[0]), max(min(1, 2 * raw[0]), raw[1])])
    null = rows_of({k: (1.0 if k[2] != "full" else 1.0 + (0.1 if int(k[0][1]) % 2 else -0.1)) for k in values})
    assert report.primary_sentence(report.primary(null)).startswith("At 300 steps we find no difference")


def test_the_best_linear_d_is_at_chance_for_symmetric_noise_and_not_for_a_shifted_mean():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(20000, 4, generator=g), 1.5 * torch.randn(20000, 4, generator=g)
    same = best_linear_d(real, fake)  # a variance difference alone: a linear D cannot use it
    assert abs(same["linear_d_accuracy"] - 0.5) < 0.01 and same["linear_d_w_norm"] < 0.05
    shifted = best_linear_d(real, fake + 0.3)
    assert shifted["linear_d_accuracy"] > 0.57
