"""Safetensors files, read as memory maps and written in shards.

The header is parsed here and the bytes viewed with ml_dtypes, because safetensors' numpy API
cannot return bfloat16 or float8 (its flax API no float8): a checkpoint's tensors are views of
its memory-mapped files, read tensor by tensor as they are copied, so it is never held twice.
"""

from __future__ import annotations

import json
import mmap
import os
from pathlib import Path

import ml_dtypes
import numpy as np

from dsjax.hf.tensors import CheckpointError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "F8_E8M0": ml_dtypes.float8_e8m0fnu,  # DeepSeek-V4's power-of-two block scales
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}  # fmt: skip


def memmap_file(file: Path) -> dict[str, np.ndarray]:
    """A safetensors file's tensors as read-only views of its memory map (no bytes are read yet)."""
    size = os.path.getsize(file)
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        try:
            if not 2 <= n <= size - 8:
                raise ValueError(f"a header of {n} bytes in a file of {size}")
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{file}: not a safetensors file, or its header is damaged ({e})") from None
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    header.pop("__metadata__", None)
    out = {}
    for name, h in header.items():
        if h["dtype"] not in _DTYPES:
            raise CheckpointError(f"{file}: {name} has dtype {h['dtype']}, which dsjax does not read")
        dtype, (start, end) = np.dtype(_DTYPES[h["dtype"]]), h["data_offsets"]
        if 8 + n + end > size:
            raise CheckpointError(f"{file}: truncated ({size} bytes; {name} ends at byte {8 + n + end})")
        a = np.frombuffer(buf, dtype, count=(end - start) // dtype.itemsize, offset=8 + n + start)
        out[name] = a.reshape(h["shape"])
    return out


def read_tensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint directory (``model.safetensors.index.json``'s shards, or every
    ``*.safetensors``), by hub name, as memory-mapped views."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        absent = [f for f in files if not (path / f).is_file()]
        if absent:
            raise CheckpointError(f"{index} names shard files that do not exist: {', '.join(absent)}")
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors files")
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        part = memmap_file(path / f)
        if twice := sorted(set(part) & set(tensors)):
            raise CheckpointError(f"{path / f}: tensors also stored in another shard: {', '.join(twice)}")
        tensors.update(part)
    return tensors


def shard_groups(sizes: list[int], max_bytes: int) -> list[list[int]]:
    """Consecutive groups of tensor indices, each at most ``max_bytes`` (unless one tensor alone is larger)."""
    shards, total = [[]], 0
    for i, n in enumerate(sizes):
        if shards[-1] and total + n > max_bytes:
            shards.append([])
            total = 0
        shards[-1].append(i)
        total += n
    return shards
