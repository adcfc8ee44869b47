"""Shared fixtures: the SD v1.5 tensor manifest and a full-size single-file checkpoint of random weights.

No Stable Diffusion weights ship with the project; `tests/data/sd15_tensors.json` lists the name and shape of
every tensor of SD v1.5 in both published layouts, and `write_checkpoint` fills such a list into a real
`.safetensors` file, streaming one tensor at a time.
"""
import json
import math
import os
from pathlib import Path

import pytest
import torch

MANIFEST = Path(__file__).parent / "data" / "sd15_tensors.json"
INT64_KEYS = ("position_ids", "num_updates")  # entries real files store as int64
_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.int64: "I64"}


def load_manifest() -> dict:
    return json.loads(MANIFEST.read_text(encoding="utf-8"))


def ldm_entries(manifest: dict | None = None) -> dict[str, list[int]]:
    """Every tensor of the single file: the three networks ("ldm") plus the extras a loader skips."""
    m = manifest or load_manifest()
    return {**m["ldm"], **m["ldm_extras"]}


def _dtype_of(name: str, float_dtype: torch.dtype) -> torch.dtype:
    return torch.int64 if name.endswith(INT64_KEYS) else float_dtype


def _value(name, shape, dtype, pool, gen) -> torch.Tensor:
    """Seeded random values, scaled so that a full-size network stays finite: weights ~ N(0, 1/fan_in),
    norm scales ~ 1 + N(0, 0.01), biases ~ N(0, 0.01). A slice of a random pool at a random offset keeps
    the generation of ~1.07 G values cheap."""
    if dtype == torch.int64:
        return torch.arange(math.prod(shape), dtype=torch.int64).reshape(shape)
    n = math.prod(shape)
    start = int(torch.randint(0, pool.numel() - n + 1, (1,), generator=gen))
    x = pool[start : start + n].reshape(shape)
    if len(shape) >= 2:
        x = x / math.sqrt(math.prod(shape[1:]))
    elif name.endswith("weight") and "norm" in name:
        x = 1.0 + 0.1 * x
    else:
        x = 0.1 * x
    return x.to(dtype)


def write_checkpoint(path, entries: dict, *, fill="random", float_dtype=torch.float32, seed=0) -> Path:
    """Write `entries` (name -> shape) as a safetensors file, atomically.

    fill="random": seeded values (see `_value`); fill="zeros": a sparse file whose data region is never
    written (instant; for tests that only need names and shapes to be checked).
    """
    path = Path(path)
    header, offset = {}, 0
    # int64 entries first, so every tensor starts at a multiple of its element size
    order = sorted(entries, key=lambda k: (_dtype_of(k, float_dtype) != torch.int64, k))
    for name in order:
        dtype = _dtype_of(name, float_dtype)
        nbytes = math.prod(entries[name]) * dtype.itemsize
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(entries[name]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head)
        if fill == "zeros":
            f.truncate(8 + len(head) + offset)
        else:
            gen = torch.Generator().manual_seed(seed)
            largest = max(math.prod(s) for s in entries.values())
            pool = torch.randn(largest + (1 << 20), generator=gen)
            for name in order:
                t = _value(name, entries[name], _dtype_of(name, float_dtype), pool, gen)
                f.write(t.contiguous().numpy().tobytes())
    os.replace(tmp, path)
    return path


@pytest.fixture(scope="session")
def sd15_manifest() -> dict:
    return load_manifest()


@pytest.fixture(scope="session")
def sd15_single_file(tmp_path_factory, sd15_manifest):
    """A full-size SD v1.5 single-file checkpoint (all 1,130 weights + the 15 extras, float32, ~4.3 GB) of
    seeded random values, written once per session and deleted at its end."""
    path = write_checkpoint(tmp_path_factory.mktemp("sd15") / "sd15-random.safetensors", ldm_entries(sd15_manifest))
    yield path
    path.unlink(missing_ok=True)
