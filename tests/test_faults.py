"""Fault injection on a run directory: what a hostile but ordinary user does to train.py and sample.py (two writers,
a torn log, a log that lost its tail, kills, Ctrl-C and a cluster's SIGTERM or SIGUSR1 at any moment, a blow-up, a
full disk, an unwritable folder, damaged files, colliding prompts, settings that cannot hold), and what each must
leave: one line on stderr, a run that `--resume` continues, each step logged once, final weights bit-equal to an
uninterrupted run.

Runs use the tiny model of tests/helpers/tiny_sd.py on 2 frames at 32x32 px. The full-disk and read-only cases mount
a small tmpfs where the test runs as root and `mount` works, and are skipped elsewhere.
"""
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from apla import checkpoint as ckpt
from apla import run as run_mod
from apla.algorithm import APLA
from apla.eval import score as evaluate
from tests.helpers.runs import (ROOT, SHAPES_GIF, logged_steps, make_tiny, run_exit, sample, train, train_args,
                                trained_weights)

pytest.importorskip("diffusers")

STEPS = 6  # the reference run's length
FAST = ("--size", "32")  # 2 frames at 32 px: latents of 4x4, the least the perceptual term's VGG features take


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"))


def args(tiny, out, steps=STEPS, *extra):
    return train_args(tiny, out, steps, SHAPES_GIF, 2, *FAST, *extra)


@pytest.fixture(scope="module")
def reference_at(tiny, tmp_path_factory):
    """reference_at(n): the weights of an uninterrupted run of n steps (each length run once)."""
    cache = {}

    def weights(n):
        if n not in cache:
            run = tmp_path_factory.mktemp("reference") / "run"
            assert train.main(args(tiny, run, n)) == 0
            cache[n] = trained_weights(run)
        return cache[n]

    return weights


@pytest.fixture(scope="module")
def reference(reference_at):
    """The weights of an uninterrupted run of STEPS steps."""
    return reference_at(STEPS)


@pytest.fixture(scope="module")
def trained(tiny, tmp_path_factory):
    """A finished run of 2 steps, to copy or to read (never to change)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    assert train.main(args(tiny, run, 2)) == 0
    return run


def copy_run(run, dest) -> Path:
    return Path(shutil.copytree(run, dest))


def assert_same_weights(run, reference):
    got = trained_weights(run)
    assert got.keys() == reference.keys()
    for k in got:
        assert torch.equal(got[k], reference[k]), k


def one_error_line(stderr: str) -> str:
    """The one error line of a failed command: the last line, the only one that starts with "error:", and no
    traceback anywhere."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines and "Traceback" not in stderr, stderr[-3000:]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert errors == [lines[-1]], lines[-5:]
    return lines[-1]


def fails(fn, argv, capsys, code=2) -> str:
    """fn(argv) ends with exit status `code` and one error line; returns the line."""
    try:
        assert run_exit(fn, argv) == code
    except KeyboardInterrupt:  # would stop pytest itself
        pytest.fail("Ctrl-C came out as a KeyboardInterrupt")
    return one_error_line(capsys.readouterr().err)


def interrupt_at(monkeypatch, call: int, exc=KeyboardInterrupt):
    """Ctrl-C during the `call`-th training step of the next run."""
    real, calls = APLA.train_step, {"n": 0}

    def step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == call:
            raise exc()
        return real(self, *a, **k)

    monkeypatch.setattr(APLA, "train_step", step)


def script_process(name, argv, stderr_path, cwd=ROOT):
    """ROOT/<name>.py as its own process, with the thread count of this one (so that its floats are the same)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, str(ROOT / f"{name}.py"), *argv], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=open(stderr_path, "w"))


def last_whole_step(run) -> int:
    """The step of the last whole record of RUN/log.jsonl (0 when there is none)."""
    try:
        lines = [ln for ln in (Path(run) / "log.jsonl").read_text().splitlines(keepends=True) if ln.endswith("\n")]
    except FileNotFoundError:
        return 0
    return json.loads(lines[-1])["step"] if lines else 0


def wait_for(predicate, proc, timeout=120.0):
    """Poll until predicate() or the process ends."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


# ---------------------------------------------------------------------------------------------------------------
# A small filesystem of our own (root only): a full disk, a read-only folder
# ---------------------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def tmpfs(path: Path, size: str, *options):
    path.mkdir(parents=True, exist_ok=True)
    opts = ",".join((f"size={size}", *options))
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path, leave: int) -> Path:
    """A file that leaves `leave` bytes free on folder's filesystem."""
    filler = folder / "filler"
    filler.unlink(missing_ok=True)
    st = os.statvfs(folder)
    filler.write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return filler


# ---------------------------------------------------------------------------------------------------------------
# One writer per run directory
# ---------------------------------------------------------------------------------------------------------------

def test_a_second_writer_is_refused_while_the_first_runs(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    first = script_process("train", args(tiny, run, 40), tmp_path / "first.err")
    try:
        assert wait_for(lambda: (run / "log.jsonl").is_file() and (run / "log.jsonl").read_text(), first)
        line = fails(train.main, args(tiny, run, 40), capsys)  # the same command again, while the first runs
        assert f"process {first.pid}" in line
        line = fails(train.main, args(tiny, run, 40, "--resume"), capsys)  # nor may it be resumed meanwhile
        assert f"process {first.pid}" in line
    finally:
        rc = first.wait(timeout=300)
    assert rc == 0, (tmp_path / "first.err").read_text()[-2000:]
    assert logged_steps(run) == list(range(1, 41))


def test_sample_reads_a_whole_checkpoint_while_training_prunes(trained, tmp_path, monkeypatch, capsys):
    run = copy_run(trained, tmp_path / "run")
    real = ckpt.list_checkpoints

    def pruned_after_listing(run_dir):  # a train.py writes step 3 and prunes the checkpoint just listed
        found = real(run_dir)
        if found and not ckpt.checkpoint_dir(run_dir, 3).exists():
            shutil.copytree(found[-1], ckpt.checkpoint_dir(run_dir, 3))
            shutil.rmtree(found[-1])
        return found

    monkeypatch.setattr(ckpt, "list_checkpoints", pruned_after_listing)
    assert sample.main(["--run", str(run), "--steps", "2", "--no-progress", "--device", "cpu", "--prompt", "x",
                        "--no-metrics"]) == 0
    assert str(ckpt.checkpoint_dir(run, 3)) in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# The log as a journal
# ---------------------------------------------------------------------------------------------------------------

def test_resume_after_a_torn_log_line(tiny, tmp_path, reference):
    run = tmp_path / "run"
    assert train.main(args(tiny, run, 3, "--checkpoint-every", "2")) == 0  # checkpoint at 2 and 3
    shutil.rmtree(ckpt.latest_checkpoint(run))  # as if killed before step 3's checkpoint
    with open(run / "log.jsonl", "a") as log:
        log.write('{"step": 4, "t": 312, "mse": 1.02, "total": 0.0')  # a disk that filled during an append
    assert train.main(args(tiny, run, STEPS, "--resume")) == 0
    assert logged_steps(run) == list(range(1, STEPS + 1))
    assert_same_weights(run, reference)


def test_a_lost_log_tail_is_restored_from_the_checkpoint(tiny, tmp_path, reference_at, capsys):
    """A 10-step run checkpointed every 5 whose log lost its last lines (8 and 9 gone, 10 cut short) while the
    checkpoint at 10 survived, as a power loss leaves it: resumed to 12, the log holds every step once, steps 1-10
    as they were first written (the checkpoint carried 6-10), and the weights are an uninterrupted run's."""
    run = tmp_path / "run"
    assert train.main(args(tiny, run, 10, "--checkpoint-every", "5")) == 0
    written = (run / "log.jsonl").read_text().splitlines(keepends=True)
    (run / "log.jsonl").write_text("".join(written[:7]) + written[9][:40])
    capsys.readouterr()
    assert train.main(args(tiny, run, 12, "--checkpoint-every", "5", "--resume")) == 0
    assert "restored 3 record(s)" in capsys.readouterr().err
    assert logged_steps(run) == list(range(1, 13))
    assert (run / "log.jsonl").read_text().splitlines(keepends=True)[:10] == written
    assert_same_weights(run, reference_at(12))


def test_the_log_is_durable_before_each_checkpoint(tiny, tmp_path, monkeypatch):
    """Every record up to a checkpoint's step is on the disk (fsync) before the checkpoint's folder is renamed into
    place, and the checkpoint carries the records since the one before."""
    run, events = tmp_path / "run", []
    real_write, real_fsync, real_replace = os.write, os.fsync, os.replace

    def named(fd):
        return os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))

    def write(fd, data):
        if named(fd) == "log.jsonl":
            events.append(("append", json.loads(bytes(data))["step"]))
        return real_write(fd, data)

    def fsync(fd):
        if named(fd) == "log.jsonl":
            events.append(("fsync", None))
        return real_fsync(fd)

    def replace(src, dst):
        if Path(dst).parent.name == "checkpoints":
            events.append(("checkpoint", ckpt.checkpoint_step(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "write", write)
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    assert train.main(args(tiny, run, 5, "--checkpoint-every", "2")) == 0
    monkeypatch.undo()
    checkpoints = [i for i, (kind, _) in enumerate(events) if kind == "checkpoint"]
    assert [events[i][1] for i in checkpoints] == [2, 4, 5]
    for i in checkpoints:
        appended = [step for kind, step in events[:i] if kind == "append"]
        assert appended[-1] == events[i][1] and events[i - 1] == ("fsync", None), events[:i + 1]
    carried = {step: logged_steps(ckpt.checkpoint_dir(run, step)) for step in (4, 5)}  # (2 is pruned: keep 2)
    assert carried == {4: [3, 4], 5: [5]}


def test_rerun_after_a_kill_before_the_first_checkpoint(tiny, tmp_path, reference, monkeypatch, capsys):
    run = tmp_path / "run"
    interrupt_at(monkeypatch, 4)
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        train.main(args(tiny, run))  # checkpoints every 250 steps: none written
    monkeypatch.undo()
    capsys.readouterr()
    assert ckpt.latest_checkpoint(run) is None and logged_steps(run) == [1, 2, 3]
    assert "no checkpoint" in fails(train.main, args(tiny, run, STEPS, "--resume"), capsys)
    assert train.main(args(tiny, run)) == 0
    assert "afresh" in capsys.readouterr().err  # it says that it starts the log again
    assert logged_steps(run) == list(range(1, STEPS + 1))
    assert_same_weights(run, reference)


def test_a_failed_log_append_leaves_whole_lines(tiny, tmp_path, reference, monkeypatch, capsys):
    import errno

    run = tmp_path / "run"
    real_write, writes = os.write, {"n": 0}

    def write(fd, data):  # the disk fills in the middle of step 4's record
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")) == "log.jsonl":
            writes["n"] += 1
            if writes["n"] == 4:
                real_write(fd, bytes(data)[: len(data) // 2])
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", write)
    line = fails(train.main, args(tiny, run, STEPS, "--checkpoint-every", "2"), capsys, code=1)
    assert "no space left on device" in line and "--resume continues from step 2" in line
    monkeypatch.undo()
    text = (run / "log.jsonl").read_text()
    assert text.endswith("\n") and logged_steps(run) == [1, 2, 3]
    assert train.main(args(tiny, run, STEPS, "--resume")) == 0
    assert logged_steps(run) == list(range(1, STEPS + 1))
    assert_same_weights(run, reference)


# ---------------------------------------------------------------------------------------------------------------
# Ctrl-C and kills
# ---------------------------------------------------------------------------------------------------------------

def test_ctrl_c_is_one_line_saying_where_resume_continues(tiny, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    interrupt_at(monkeypatch, 4)
    line = fails(train.main, args(tiny, run, STEPS, "--checkpoint-every", "2"), capsys, code=130)
    assert "interrupted at step 3" in line and "--resume continues from step 2" in line
    monkeypatch.undo()
    interrupt_at(monkeypatch, 1)  # before the first checkpoint: the same command starts afresh
    line = fails(train.main, args(tiny, tmp_path / "fresh"), capsys, code=130)
    assert "interrupted at step 0" in line and "no checkpoint" in line

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_mod, "ddim_sample", interrupted)  # and sample.py (its sampling is apla.run's)
    line = fails(sample.main, ["--run", str(run), "--steps", "2", "--no-progress", "--device", "cpu"], capsys, 130)
    assert "interrupted" in line


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_cluster_signal_checkpoints_the_last_step_then_resume_is_bit_equal(tiny, tmp_path, reference, monkeypatch,
                                                                            capsys, sig):
    """SIGTERM (a time limit) or SIGUSR1 (SLURM's --signal) arriving during step 3: the step finishes, a
    checkpoint of it is written though none was due, one line says how to continue, exit status 143; --resume
    then ends as an uninterrupted run."""
    run, real, calls = tmp_path / "run", APLA.train_step, {"n": 0}

    def step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            os.kill(os.getpid(), sig)
        return real(self, *a, **k)

    monkeypatch.setattr(APLA, "train_step", step)
    line = fails(train.main, args(tiny, run), capsys, code=143)  # checkpoints every 250 steps: none was due
    monkeypatch.undo()
    name = signal.Signals(sig).name
    assert f"stopped by {name} at step 3" in line and "--resume continues from step 3" in line, line
    assert ckpt.checkpoint_step(ckpt.latest_checkpoint(run)) == 3 and logged_steps(run) == [1, 2, 3]
    assert signal.getsignal(sig) is signal.SIG_DFL  # the handlers are train.py's only while it runs
    assert train.main(args(tiny, run, STEPS, "--resume")) == 0
    assert logged_steps(run) == list(range(1, STEPS + 1))
    assert_same_weights(run, reference)


def test_sigterm_to_a_running_train_py_then_resume_is_bit_equal(tiny, tmp_path, reference_at):
    """A real SIGTERM, as SLURM sends it, to train.py running as its own process, at a moment of the run: exit 143,
    one line, a checkpoint of the last step it logged; --resume ends bit-equal to an uninterrupted run."""
    steps, run, err = 24, tmp_path / "run", tmp_path / "train.err"
    proc = script_process("train", args(tiny, run, steps, "--checkpoint-every", "10"), err)
    assert wait_for(lambda: "apla: trains" in err.read_text() and last_whole_step(run) >= 4, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, err.read_text()[-3000:]
    line = one_error_line(err.read_text())
    last = last_whole_step(run)
    assert 4 <= last < steps and ckpt.checkpoint_step(ckpt.latest_checkpoint(run)) == last
    assert f"stopped by SIGTERM at step {last}; --resume continues from step {last}" in line, line
    assert train.main(args(tiny, run, steps, "--checkpoint-every", "10", "--resume")) == 0
    assert logged_steps(run) == list(range(1, steps + 1))
    assert_same_weights(run, reference_at(steps))


def test_random_kills_and_interrupts_then_resume_end_bit_equal(tiny, tmp_path, reference_at):
    """Rounds of SIGINT and SIGKILL in turn, each at a random moment of the run (from its start to its last steps)
    and followed by the command that continues (`--resume` when a checkpoint exists, else the same command), then
    a run to the end."""
    steps, rng = 24, random.Random(24)
    run, interrupted = tmp_path / "run", 0
    for round_, sig in enumerate([signal.SIGINT, signal.SIGKILL] * 2):
        err = tmp_path / f"round{round_}.err"
        latest = ckpt.latest_checkpoint(run)
        start = ckpt.checkpoint_step(latest) if latest else 0
        resume = ["--resume"] if latest else []
        proc = script_process("train", args(tiny, run, steps, "--checkpoint-every", "4", *resume), err)
        target = start + rng.randint(0, max(0, steps - start - 4))  # a step reached, then a moment more
        wait_for(lambda: "apla: trains" in err.read_text() and last_whole_step(run) >= target, proc)
        time.sleep(rng.uniform(0.0, 0.05))
        if proc.poll() is None:
            proc.send_signal(sig)
        rc = proc.wait(timeout=120)
        if rc == 0 or "apla: done" in err.read_text():  # finished before the signal came
            break
        interrupted += 1
        if sig == signal.SIGINT:
            assert rc == 130, err.read_text()[-3000:]
            assert "interrupted at step" in one_error_line(err.read_text())
        else:
            assert rc == -signal.SIGKILL
    assert interrupted >= 2
    latest = ckpt.latest_checkpoint(run)
    if latest is None or ckpt.checkpoint_step(latest) != steps:
        assert train.main(args(tiny, run, steps, *(["--resume"] if latest else []))) == 0
    assert logged_steps(run) == list(range(1, steps + 1))
    assert_same_weights(run, reference_at(steps))
    assert not list((run / "checkpoints").glob(".*"))  # no temporary folder left behind


# ---------------------------------------------------------------------------------------------------------------
# Only finite checkpoints
# ---------------------------------------------------------------------------------------------------------------

def test_a_blow_up_keeps_only_finite_checkpoints(tiny, tmp_path, capsys):
    run = tmp_path / "run"
    line = fails(train.main, args(tiny, run, STEPS, "--lr", "1e30", "--checkpoint-every", "1"), capsys, code=1)
    assert "not finite" in line
    for path in ckpt.list_checkpoints(run):
        weights = load_file(str(path / "weights.safetensors"))
        assert all(torch.isfinite(v).all() for v in weights.values()), path
    out = tmp_path / "samples"
    if ckpt.latest_checkpoint(run) is not None:  # what is kept samples to finite videos
        assert sample.main(["--run", str(run), "--steps", "2", "--no-progress", "--device", "cpu", "--prompt", "x",
                            "--out", str(out)]) == 0
        report = json.loads((out / "metrics.json").read_text())
        assert all(v is not None for row in report["videos"] for v in row["metrics"].values())


def test_sample_refuses_a_non_finite_checkpoint(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path / "run")
    path = ckpt.latest_checkpoint(run) / "weights.safetensors"
    weights = load_file(str(path))
    key = next(k for k in weights if k.startswith("vgt."))
    weights[key] = weights[key] * float("nan")
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    save_file(weights, str(path), metadata=metadata)
    out = tmp_path / "samples"
    line = fails(sample.main, ["--run", str(run), "--steps", "2", "--no-progress", "--device", "cpu", "--out",
                               str(out)], capsys)
    assert "not finite" in line and key in line
    assert not out.exists() or not list(out.glob("*.gif"))


def test_sample_writes_no_video_of_non_finite_values(trained, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(run_mod, "ddim_sample", lambda fn, z, *a, **k: z * float("nan"))  # sample.py's, in apla.run
    out = tmp_path / "samples"
    line = fails(sample.main, ["--run", str(trained), "--steps", "2", "--no-progress", "--device", "cpu", "--out",
                               str(out), "--prompt", "a blue circle"], capsys)
    assert "not finite" in line and "a blue circle" in line
    assert not out.exists() or not list(out.iterdir())


# ---------------------------------------------------------------------------------------------------------------
# Unique outputs
# ---------------------------------------------------------------------------------------------------------------

def test_colliding_prompts_get_their_own_files(trained, tmp_path, capsys):
    long = "a red circle" + " very" * 20  # the same first 60 characters
    prompts = ["a red circle!", "A red circle?", "\U0001F534\u2B55", "", long + " fast", long + " slow"]
    out = tmp_path / "samples"
    argv = ["--run", str(trained), "--steps", "2", "--no-progress", "--device", "cpu", "--out", str(out)]
    assert sample.main(argv + [x for p in prompts for x in ("--prompt", p)]) == 0
    gifs = sorted(p for p in out.glob("*.gif") if p.stem != evaluate.GRID)  # (grid.gif: all of them together)
    assert len(gifs) == len(prompts), [g.name for g in gifs]
    report = json.loads((out / "metrics.json").read_text())
    files = report["files"]
    assert set(files) == set(prompts)
    written = [f for p in prompts for f in files[p]]
    assert len(set(written)) == len(written) and all(Path(f).is_file() for f in written)
    assert len({row["name"] for row in report["videos"]}) == len(prompts)
    # the folder scored again reads the prompt of every file back
    assert evaluate.main([str(out), "--json", str(tmp_path / "again.json")]) == 0
    again = json.loads((tmp_path / "again.json").read_text())
    assert sorted(row["prompt"] for row in again["videos"]) == sorted(prompts)


# ---------------------------------------------------------------------------------------------------------------
# A full disk, an unwritable folder
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("leave", [6_000, 60_000, 300_000])
def test_a_full_disk_is_one_line_and_the_run_continues(tiny, tmp_path, reference, capsys, leave):
    """The disk fills at the config, the clip's latents, the log or a checkpoint (depending on the room left); after
    space is freed, the command the message names finishes the run as if nothing had happened."""
    with tmpfs(tmp_path / "disk", "4m") as disk:
        filler = fill(disk, leave)
        run = disk / "run"
        line = fails(train.main, args(tiny, run, STEPS, "--checkpoint-every", "1"), capsys, code=1)
        assert "no space left on device" in line
        assert not [p for p in run.rglob(".*") if p.name != ".lock"], "temporary files left behind"
        if (run / "log.jsonl").is_file():
            assert (run / "log.jsonl").read_text().endswith("\n") or not (run / "log.jsonl").read_text()
        filler.unlink()
        resume = ckpt.latest_checkpoint(run) is not None
        assert ("--resume continues" in line) == resume
        assert train.main(args(tiny, run, STEPS, *(["--resume"] if resume else []))) == 0
        assert logged_steps(run) == list(range(1, STEPS + 1))
        assert_same_weights(run, reference)


def test_a_full_disk_under_sample_and_evaluate(trained, tmp_path, capsys):
    with tmpfs(tmp_path / "disk", "1m") as disk:
        fill(disk, 4_000)
        line = fails(sample.main, ["--run", str(trained), "--steps", "2", "--no-progress", "--device", "cpu",
                                   "--out", str(disk / "samples")], capsys, code=1)
        assert "no space left on device" in line
        samples = tmp_path / "samples"
        assert sample.main(["--run", str(trained), "--steps", "2", "--no-progress", "--device", "cpu", "--out",
                            str(samples), "--prompt", "x"]) == 0
        fill(disk, 0)
        line = fails(evaluate.main, [str(samples), "--json", str(disk / "report.json")], capsys, code=1)
        assert "no space left on device" in line


@pytest.fixture
def unwritable(tmp_path):
    """A folder this process cannot write into: read-only permissions, or (for root, whom permissions do not stop)
    a read-only tmpfs."""
    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir()
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
    else:
        with tmpfs(tmp_path / "ro", "1m", "ro") as folder:
            yield folder


def test_an_unwritable_folder_is_one_line(tiny, trained, unwritable, capsys):
    line = fails(train.main, args(tiny, unwritable / "run", 1), capsys)
    assert str(unwritable / "run") in line
    line = fails(sample.main, ["--run", str(trained), "--steps", "2", "--no-progress", "--device", "cpu", "--out",
                               str(unwritable / "samples"), "--prompt", "x"], capsys)
    assert str(unwritable / "samples") in line


def test_the_umask_is_honoured(tiny, tmp_path):
    run = tmp_path / "run"
    old = os.umask(0o002)
    try:
        assert train.main(args(tiny, run, 1)) == 0
    finally:
        os.umask(old)
    for path in [run, *run.rglob("*")]:
        mode = path.stat().st_mode & 0o777
        assert mode == (0o775 if path.is_dir() else 0o664), (path, oct(mode))


# ---------------------------------------------------------------------------------------------------------------
# Damaged files and settings that cannot hold: one line each, before anything is written
# ---------------------------------------------------------------------------------------------------------------

def damage(run: Path, case: str) -> None:
    state = ckpt.latest_checkpoint(run) / "state.pt"
    if case == "garbage state.pt":
        state.write_bytes(b"\x00garbage" * 100)
    elif case == "refused state.pt":  # a pickle that would run a command: weights_only refuses it
        import pickle

        class Evil:
            def __reduce__(self):
                return os.system, ("touch planted",)

        state.write_bytes(pickle.dumps(Evil(), protocol=2))
    elif case == "non-JSON config.json":
        (run / "config.json").write_text('{"pretrained": "micro", ')
    elif case == "missing source.safetensors":
        (run / "source.safetensors").unlink()


@pytest.mark.parametrize("case, script, expect", [
    ("garbage state.pt", "train", "state.pt"), ("refused state.pt", "train", "state.pt"),
    ("non-JSON config.json", "train", "config.json"), ("missing source.safetensors", "sample", "source.safetensors")])
def test_a_damaged_run_file_is_one_line(tiny, trained, tmp_path, capsys, case, script, expect):
    run = copy_run(trained, tmp_path / "run")
    damage(run, case)
    argv = (args(tiny, run, 3, "--resume") if script == "train" else
            ["--run", str(run), "--steps", "2", "--no-progress", "--device", "cpu", "--prompt", "x"])
    line = fails(train.main if script == "train" else sample.main, argv, capsys)
    assert expect in line
    assert not (Path.cwd() / "planted").exists()


def test_sample_needs_no_optimiser_state_and_names_its_checkpoint(trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path / "run")
    damage(run, "garbage state.pt")
    assert sample.main(["--run", str(run), "--steps", "2", "--no-progress", "--device", "cpu", "--prompt", "x",
                        "--no-metrics"]) == 0
    assert str(ckpt.latest_checkpoint(run)) in capsys.readouterr().err


@pytest.mark.parametrize("case, expect", [
    ("empty --output-dir", "--output-dir"), ("--output-dir is a file", "not a folder"),
    ("negative VGT width", "width"), ("VGT patch size 0", "patch_size"), ("--size too small", "--size"),
    ("3e9 frames", "frames")])
def test_bad_settings_are_one_line_before_anything_is_written(tiny, tmp_path, monkeypatch, capsys, case, expect):
    monkeypatch.chdir(tmp_path)  # an empty --output-dir must not mean this folder
    run = tmp_path / "run"
    argv = args(tiny, run, 1)
    if case == "empty --output-dir":
        argv += ["--output-dir", ""]
    elif case == "--output-dir is a file":
        run.write_text("a file")
    elif case in ("negative VGT width", "VGT patch size 0"):
        bad = {"width": -8} if case == "negative VGT width" else {"patch_size": 0}
        cfg = tmp_path / "bad.json"
        cfg.write_text(json.dumps({"vgt_model": {**json.loads(Path(tiny["config"]).read_text())["vgt_model"], **bad}}))
        argv += ["--config", str(cfg)]
    elif case == "--size too small":
        argv += ["--size", "16"]  # 2x2 latents: smaller than the perceptual term's VGG features take
    else:
        argv += ["--frames", "3000000000"]
    start = time.monotonic()
    line = fails(train.main, argv, capsys)
    assert expect in line and time.monotonic() - start < 60
    assert (run.is_file() if case == "--output-dir is a file" else not run.exists())
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["run"] * run.exists() + ["bad.json"] * ("VGT" in case))


def test_resume_names_each_conflicting_setting(tiny, trained, tmp_path, capsys):
    run = copy_run(trained, tmp_path / "run")
    line = fails(train.main, args(tiny, run, 3, "--resume", "--frames", "6", "--lr", "0.1"), capsys)
    assert "frames" in line and "2" in line and "6" in line and "lr" in line


# ---------------------------------------------------------------------------------------------------------------
# The small things
# ---------------------------------------------------------------------------------------------------------------

def test_stale_temporary_checkpoints_are_removed_when_a_run_starts(trained, tiny, tmp_path):
    run = copy_run(trained, tmp_path / "run")
    stale = run / "checkpoints" / ".step-000003.abc123.tmp"
    stale.mkdir()
    (stale / "weights.safetensors").write_bytes(b"half")
    assert train.main(args(tiny, run, 3, "--resume")) == 0
    assert not stale.exists()


def test_paths_are_stored_absolute_and_resume_works_from_another_folder(tiny, tmp_path, monkeypatch, reference):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    (work / "clip.gif").write_bytes(SHAPES_GIF.read_bytes())
    monkeypatch.chdir(work)
    argv = args(tiny, "run", 2)
    argv[argv.index("--video") + 1] = "clip.gif"
    assert train.main(argv) == 0
    saved = json.loads((work / "run" / "config.json").read_text())
    assert saved["video"] == str(work / "clip.gif") and saved["output_dir"] == str(work / "run")
    monkeypatch.chdir(elsewhere)
    assert train.main(["--output-dir", str(work / "run"), "--resume", "--max-steps", str(STEPS), "--no-progress"]) == 0
    assert_same_weights(work / "run", reference)


def test_a_prompt_over_77_tokens_gets_one_warning(trained, capsys):
    long = "a red circle " + "moving slowly and then quickly " * 20
    assert sample.main(["--run", str(trained), "--steps", "1", "--no-progress", "--device", "cpu", "--prompt", long,
                        "--no-metrics", "--out", str(trained.parent / "long")]) == 0
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "tokens" in ln]
    assert len(warnings) == 1 and "77" in warnings[0]
