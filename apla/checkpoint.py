"""Run directories and checkpoints: only what trains is saved, every write is atomic.

A run directory (the output of train.py) holds
  config.json                   the resolved training configuration
  source.safetensors            the cached clip latents z0 (1, 4, F, h, w), their posterior std and the prompt's
                                text states, so sampling never re-encodes the clip
  log.jsonl                     one line per step: loss terms, ||phi|| / ||eps_pred||, step time
  checkpoints/step-000100/      weights.safetensors (U-Net trainable set, VGT, D) + state.pt (optimiser states,
                                random-generator state), written into a temporary folder and renamed into place
  samples/                      GIFs, MP4s and PNG strips written by sample.py

A checkpoint is bound to its base model (a fingerprint of the frozen U-Net) and to its VGT variant; loading it
into anything else is refused with one clear message.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Dict, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file


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
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def atomic_write_bytes(path, data: bytes) -> str:
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


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
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_save_safetensors(tensors: Dict[str, torch.Tensor], path, metadata: Optional[dict] = None) -> str:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={k: str(v) for k, v in (metadata or {}).items()}))


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


def list_checkpoints(run_dir):
    """Complete checkpoints of a run, oldest first (temporary folders of an interrupted save are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        if d.is_dir() and d.name.startswith("step-") and (d / "weights.safetensors").is_file() \
                and (d / "state.pt").is_file():
            try:
                found.append((int(d.name[5:]), d))
            except ValueError:
                continue
    return [d for _, d in sorted(found)]


def latest_checkpoint(run_dir) -> Optional[Path]:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def write_checkpoint(run_dir, step: int, weights: Dict[str, torch.Tensor], state: dict, meta: dict,
                    keep: int = 2) -> Path:
    """Write checkpoints/step-N/ atomically: both files go into a hidden temporary folder that is renamed into
    place once complete, so an interrupted save leaves the previous checkpoint as the latest. Keeps the newest
    `keep` checkpoints (0 keeps all)."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = checkpoint_dir(run_dir, step)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".step-{step:06d}.", suffix=".tmp"))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, str(tmp / "weights.safetensors"),
                  metadata={"apla": json.dumps(meta, sort_keys=True)})
        torch.save(state, tmp / "state.pt")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint_meta(ckpt: Path) -> dict:
    try:
        with safe_open(str(Path(ckpt) / "weights.safetensors"), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("apla", "{}"))
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line message
        raise CheckpointError(f"unreadable checkpoint {ckpt}: {e}") from None


def read_checkpoint(ckpt: Path, expect: Optional[dict] = None):
    """Read a checkpoint: (weights, state, meta). `expect` maps meta keys (e.g. base_model, vgt) to the values the
    caller needs; any difference raises CheckpointError naming it."""
    ckpt = Path(ckpt)
    meta = read_checkpoint_meta(ckpt)
    for key, want in (expect or {}).items():
        have = meta.get(key)
        if key == "base_model":
            if not same_model(have, want):
                raise CheckpointError(f"checkpoint {ckpt} was tuned from another base model than the one loaded "
                                      f"(its run used {meta.get('pretrained', '?')!r})")
        elif have != want:
            raise CheckpointError(f"checkpoint {ckpt} was made with {key}={have!r}, but this run uses {key}={want!r}")
    weights = {}
    with safe_open(str(ckpt / "weights.safetensors"), framework="pt") as f:
        for k in f.keys():
            weights[k] = f.get_tensor(k)
    state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=True)
    return weights, state, meta
