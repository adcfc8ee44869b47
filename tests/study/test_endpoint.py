"""The study's primary endpoint (`apla.eval.metrics.source_deviation`) validated before any run: on every benchmark
clip, as the study reads it (its first STUDY_FRAMES frames, 8-bit), the source scores 0 and six ways of departing
from it, drawn from the clip's own scene description, each score clearly more. A measure that a frozen frame or
half the motion wins (FCI, the warping error) fails this test."""
import dataclasses

import numpy as np
import pytest
import torch

from apla.eval.metrics import fci, source_deviation
from apla.micro.shapes import render_tensor
from apla.study import clips as benchmark

CLEARLY = 0.25  # every perturbation scores at least this on every clip (the source scores 0)


def eight_bit(v: torch.Tensor) -> torch.Tensor:
    return ((v + 1) * 127.5).round() / 127.5 - 1


def draw(scenes) -> torch.Tensor:
    return eight_bit(torch.stack([render_tensor(s) for s in scenes]))


def perturbations(spec: benchmark.ClipSpec, frames: int) -> dict:
    """The clip's scenes changed in one way each; the first `frames` frames drawn."""
    sc = benchmark.scenes(spec)[:frames]
    c = np.array([[s.x, s.y] for s in sc])

    def moved(k):  # the centroid path scaled by k about the first frame's position
        return [dataclasses.replace(s, x=float(p[0]), y=float(p[1])) for s, p in zip(sc, c[0] + k * (c - c[0]))]
    odd = [i % 2 == 1 for i in range(len(sc))]
    return {
        "frozen first frame": draw([sc[0]] * len(sc)),
        "half the motion": draw(moved(0.5)),
        "double the motion": draw(moved(2.0)),
        "shape flips": draw([dataclasses.replace(s, shape=spec.edit_shape) if o else s for s, o in zip(sc, odd)]),
        "colour flips": draw([dataclasses.replace(s, colour=spec.edit_colour) if o else s for s, o in zip(sc, odd)]),
        "size jitter ±20%": draw([dataclasses.replace(s, size=s.size * (1.2 if o else 0.8)) for s, o in zip(sc, odd)]),
    }


@pytest.fixture(scope="module")
def scores():
    out = {}
    for spec in benchmark.benchmark_clips(benchmark.read_record()):
        source = eight_bit(benchmark.render(spec)[:benchmark.STUDY_FRAMES])
        out[spec.name] = {"source": source_deviation(source, source),
                          **{k: source_deviation(v, source)
                             for k, v in perturbations(spec, benchmark.STUDY_FRAMES).items()}}
    return out


def test_the_source_scores_best_and_every_perturbation_clearly_worse(scores):
    assert len(scores) >= 24
    for name, s in scores.items():
        assert s["source"] == pytest.approx(0.0, abs=1e-9), name
        for kind, value in s.items():
            if kind != "source":
                assert value >= CLEARLY, f"{name}: {kind} scores {value:.3f}"
        # standing still costs about the source's whole motion, and more than half the motion does
        assert s["frozen first frame"] >= 0.9 and s["frozen first frame"] > s["half the motion"], name


def test_fci_alone_would_reward_standing_still():
    """Why the endpoint is relative to the source: on a benchmark clip FCI prefers the frozen frame to the source."""
    spec = benchmark.benchmark_clips(benchmark.read_record())[0]
    source = eight_bit(benchmark.render(spec)[:benchmark.STUDY_FRAMES])
    frozen = perturbations(spec, benchmark.STUDY_FRAMES)["frozen first frame"]
    assert fci(frozen) < fci(source)
    assert source_deviation(frozen, source) > source_deviation(source, source)
