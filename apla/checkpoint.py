"""Run directories and checkpoints: one writer per run, only what trains is saved, every write is atomic.

A run directory (the output of train.py) holds
  .lock                         the lock of the one train.py that writes the run (RunLock), holding its process id
  config.json                   the resolved training configuration (paths absolute)
  source.safetensors            the cached clip latents z0 (1, 4, F, h, w), their posterior std and the prompt's
                                text states, so sampling never re-encodes the clip
  log.jsonl                     one line per step: loss terms, ||phi|| / ||eps_pred||, learning rate, step time
                                (a journal: apla.run.StepLog)
  checkpoints/step-000100/      weights.safetensors (U-Net trainable set, VGT, D) + state.pt (optimiser, learning-
                                rate schedule, gradient scaler and random-generator states) + log.jsonl (the records
                                since the checkpoint before), written into a temporary folder and renamed into place
  inversions/                   z_T of the clip's DDIM inversion, one safetensors file per checkpoint and settings,
                                kept by sample.py for its next calls (apla.sampling.inversion)
  samples/                      GIFs, MP4s and PNG strips written by sample.py, grid.gif / grid.png of all
                                prompts of a call, and their metrics.json
With report_to tensorboard, tensorboard/ holds the same records as TensorBoard events (apla.loop.TensorBoard).

A checkpoint is bound to its base model (a fingerprint of the frozen U-Net) and to its VGT variant; loading it
into anything else is refused with one clear message, and so is a checkpoint with values that are not finite.

Writes fail as the disk does: every file is written whole into a temporary file beside its target, then renamed
into place, so a full disk, a kill or Ctrl-C leaves the previous file, and the error is an OSError naming the target
(errno.ENOSPC on a full disk; torch and safetensors files are encoded in memory first, since their own writers
report a full disk as "unexpected pos" or an error of their own). Files and folders get the permissions the umask
gives, as open() and mkdir() do.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save

LOCK_FILE = ".lock"
TMP_SUFFIX = ".tmp"  # hidden temporary files and checkpoint folders end so: .NAME.XXXX.tmp


class CheckpointError(ValueError):
    """A run directory or checkpoint that cannot be used; the message says why in one line."""


class WeightsError(ValueError):
    """A weights file that cannot be loaded (a Stable Diffusion checkpoint in `apla.sd.weights`, the perceptual
    VGG16 in `apla.losses`); the message names the file and the offending key. Here, beside the other files of
    weights, so that raising it drags in neither module."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path, write: Callable[[str], None]) -> str:
    """The project's one way to write a file: call write(tmp_path) on a temporary file beside `path`, then rename
    it to `path` (atomic on one filesystem); on any error the temporary file is removed and `path` is untouched."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=TMP_SUFFIX)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.remove(tmp)
        raise naming(e, path) from None
    return path


def naming(e: BaseException, path) -> BaseException:
    """An OSError as raised again by a writer: naming `path`, what the caller writes (not a temporary file, and a
    full disk's ENOSPC from a write names no file at all); any other exception as it is."""
    return OSError(e.errno, e.strerror, os.fspath(path)) if isinstance(e, OSError) and e.errno is not None else e


def atomic_write_bytes(path, data) -> str:
    """`data` (bytes or a buffer) written whole and flushed to the disk before the rename."""
    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, write)


def _strict(obj):
    """obj with every non-finite float as None: JSON has no inf or nan (Python's own `Infinity` is not JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


def atomic_write_json(path, obj) -> str:
    """Strict JSON (non-finite numbers written as null), indented, atomically."""
    return atomic_write_bytes(path, (json.dumps(_strict(obj), indent=2, allow_nan=False) + "\n").encode())


def atomic_torch_save(obj, path) -> str:
    """torch.save, encoded in memory, then written as bytes."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getbuffer())


def atomic_save_safetensors(tensors: Dict[str, torch.Tensor], path, metadata: Optional[dict] = None) -> str:
    """A safetensors file, encoded in memory, then written as bytes (metadata values as strings)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write_bytes(path, save(tensors, metadata={k: str(v) for k, v in (metadata or {}).items()}))


def describe_os_error(e: OSError) -> str:
    """A failed read or write in a few words: "no space left on device writing PATH", "permission denied: PATH"."""
    if e.errno == errno.ENOSPC:
        return f"no space left on device writing {e.filename or 'a file'}"
    what = (e.strerror or str(e)).lower()
    return f"{what}: {e.filename}" if e.filename else what


def model_signature(module: torch.nn.Module, probes: int = 16) -> dict:
    """What identifies a base model: a hash of its frozen parameters' names and shapes, and a probe of values
    (the first few entries of up to `probes` frozen tensors, spread through the network).

    The probe is compared with a tolerance (same_model), so a model loaded in float16 on a GPU still matches the
    float32 copy it was tuned from, while another set of weights of the same architecture does not.
    """
    frozen = [(n, p) for n, p in sorted(module.named_parameters(), key=lambda kv: kv[0]) if not p.requires_grad]
    arch = hashlib.sha256("".join(f"{n}{tuple(p.shape)};" for n, p in frozen).encode()).hexdigest()[:16]
    picks = frozen[:: max(1, len(frozen) // probes)][:probes]
    probe = [round(float(v), 6) for _, p in picks for v in p.detach().reshape(-1)[:4].float().cpu().tolist()]
    return {"arch": arch, "probe": probe}


def same_model(a: dict, b: dict) -> bool:
    """Whether two model_signature() results name the same base model (values within 1e-2 relative)."""
    if not a or not b or a.get("arch") != b.get("arch") or len(a.get("probe", [])) != len(b.get("probe", [])):
        return False
    return all(abs(x - y) <= 1e-3 + 1e-2 * abs(y) for x, y in zip(a["probe"], b["probe"]))


def checkpoint_dir(run_dir, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:06d}"


def checkpoint_step(ckpt) -> Optional[int]:
    """N of a checkpoints/step-N folder (None for a folder named otherwise)."""
    name = Path(ckpt).name
    return int(name[5:]) if name.startswith("step-") and name[5:].isdigit() else None


def list_checkpoints(run_dir):
    """Complete checkpoints of a run, oldest first (temporary folders of an interrupted save are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(checkpoint_step(d), d) for d in root.iterdir()
             if checkpoint_step(d) is not None and (d / "weights.safetensors").is_file() and (d / "state.pt").is_file()]
    return [d for _, d in sorted(found)]


def latest_checkpoint(run_dir) -> Optional[Path]:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def write_checkpoint(run_dir, step: int, weights: Dict[str, torch.Tensor], state: dict, meta: dict,
                     keep: int = 2, files: Optional[Dict[str, bytes]] = None) -> Path:
    """Write checkpoints/step-N/ atomically: its files (weights.safetensors, state.pt and `files`, name -> bytes)
    go into a hidden temporary folder that is renamed into place once complete, so an interrupted save leaves the
    previous checkpoint as the latest. Keeps the newest `keep` checkpoints (0 keeps all)."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(run_dir, step)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".step-{step:06d}.", suffix=TMP_SUFFIX))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp creates 0700; give the folder the permissions mkdir() would
        atomic_save_safetensors(weights, tmp / "weights.safetensors", {"apla": json.dumps(meta, sort_keys=True)})
        atomic_torch_save(state, tmp / "state.pt")
        for name, data in (files or {}).items():
            atomic_write_bytes(tmp / name, data)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise naming(e, final) from None
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def remove_temporaries(run_dir) -> None:
    """Delete what interrupted writes left in a run directory: hidden temporary files beside its files and hidden
    temporary checkpoint folders (only the run's writer calls this, holding its RunLock; samples/ is sample.py's)."""
    for folder in (Path(run_dir), Path(run_dir) / "checkpoints"):
        for p in folder.glob(f".*{TMP_SUFFIX}"):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def read_weights(ckpt, expect: Optional[dict] = None):
    """A checkpoint's weights and metadata: (weights, meta). `expect` maps meta keys (e.g. base_model, vgt) to the
    values the caller needs; any difference raises CheckpointError naming it, as do an unreadable file and values
    that are not finite. A checkpoint that is gone (pruned by a running train.py) raises FileNotFoundError."""
    ckpt = Path(ckpt)
    try:
        with safe_open(str(ckpt / "weights.safetensors"), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("apla", "{}"))
            _check_meta(ckpt, meta, expect or {})
            weights = {k: f.get_tensor(k) for k in f.keys()}
    except (FileNotFoundError, CheckpointError):
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line message
        raise CheckpointError(f"unreadable checkpoint {ckpt}: {e}") from None
    bad = [k for k, v in weights.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"checkpoint {ckpt} holds values that are not finite ({bad[0]}"
                              f"{f' and {len(bad) - 1} more' if len(bad) > 1 else ''}); use an earlier one")
    return weights, meta


def _check_meta(ckpt: Path, meta: dict, expect: dict) -> None:
    for key, want in expect.items():
        have = meta.get(key)
        if key == "base_model":
            if not same_model(have, want):
                raise CheckpointError(f"checkpoint {ckpt} was tuned from another base model than the one loaded "
                                      f"(its run used {meta.get('pretrained', '?')!r})")
        elif have != want:
            raise CheckpointError(f"checkpoint {ckpt} was made with {key}={have!r}, but this run uses {key}={want!r}")


def read_state(ckpt) -> dict:
    """A checkpoint's optimiser and random-generator states (state.pt), read with torch.load(weights_only=True): a
    file that is damaged, or that holds anything but tensors and plain values, raises CheckpointError."""
    path = Path(ckpt) / "state.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - damaged, truncated or refused: the same one-line message
        raise CheckpointError(f"cannot read {path}: damaged, or not a file of tensors that torch.load(weights_only="
                              f"True) accepts ({type(e).__name__})") from None


class RunLocked(CheckpointError):
    """Another process writes the run directory."""


class RunLock:
    """The one writer of a run directory: an exclusive flock on RUN/.lock, taken by `acquire` and released by
    `release`, or by the kernel when the process ends however it ends (a killed run leaves no stale lock). The file
    holds the holder's process id, for the message a second writer gets."""

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Take the lock (making the folder), or raise RunLocked naming the process that holds it; OSError when the
        folder cannot be made or written."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "(unknown id)"
            os.close(fd)
            raise RunLocked(f"{self.run_dir} is being written by process {holder} (one train.py per run "
                            "directory); wait for it to end, or choose another --output-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
