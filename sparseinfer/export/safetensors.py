"""A reader for the `.safetensors` weight format, in NumPy (no `safetensors` or torch package).

The format: an 8-byte little-endian unsigned header length N, N bytes of JSON mapping each tensor
name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets relative to the end of the
header; an optional "__metadata__" entry maps strings to strings), then the raw little-endian
tensor data, which the tensors must cover exactly.

`load_safetensors(path)` returns {name: array}. F16 and BF16 tensors are widened to float32 (NumPy
has no bfloat16, and the engine computes in float32); other dtypes keep their own.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

__all__ = ["SafetensorsError", "load_safetensors", "read_safetensors_header"]

# safetensors dtype → little-endian NumPy dtype (BF16 is read as uint16 and widened)
_DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}

# The format caps the header at 100 MB; a larger length field means a corrupt (or not a) file.
_MAX_HEADER = 100_000_000


class SafetensorsError(ValueError):
    """A .safetensors file that cannot be read: truncated, corrupt, or using an unsupported dtype."""


def read_safetensors_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str], int]:
    """(tensors, metadata, data_start): each tensor's {"dtype", "shape", "data_offsets"}, the
    file's "__metadata__" (may be empty), and the byte offset where the data section begins.
    Checks the header against the file size; raises SafetensorsError on any inconsistency."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path}: {size} bytes is too short for a safetensors file (it starts with an 8-byte header length)")
        n = int.from_bytes(head, "little")
        if n > _MAX_HEADER or 8 + n > size:
            raise SafetensorsError(
                f"{path}: header length field says {n} bytes but the file has {size - 8} after it; the file is truncated or not safetensors"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SafetensorsError(f"{path}: the header is not valid JSON ({exc}); the file is corrupt or not safetensors") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: the header must be a JSON object, got {type(header).__name__}")
    metadata = header.pop("__metadata__", None) or {}
    data_len = size - 8 - n
    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise SafetensorsError(f"{path}: tensor {name!r} needs dtype, shape and data_offsets in the header, got {entry!r}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _DTYPES:
            raise SafetensorsError(f"{path}: tensor {name!r} has dtype {dtype!r}; supported: {', '.join(_DTYPES)}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise SafetensorsError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
        if not (
            isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets) and 0 <= offsets[0] <= offsets[1]
        ):
            raise SafetensorsError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}")
        want = math.prod(shape) * _DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != want:
            raise SafetensorsError(
                f"{path}: tensor {name!r} ({dtype}{shape}) needs {want} bytes but data_offsets {offsets} span {offsets[1] - offsets[0]}"
            )
        if offsets[1] > data_len:
            raise SafetensorsError(
                f"{path}: tensor {name!r} ends at data byte {offsets[1]} but the file holds only {data_len} data bytes; the file is truncated"
            )
        spans.append((offsets[0], offsets[1], name))
    # the tensors must tile the data section with no overlap
    spans.sort()
    pos = 0
    for begin, end, name in spans:
        if begin < pos:
            raise SafetensorsError(f"{path}: tensor {name!r} overlaps the tensor before it (data_offsets start {begin} < {pos})")
        pos = end
    return header, dict(metadata), 8 + n


def load_safetensors(path: str | os.PathLike, names: list[str] | None = None) -> dict[str, np.ndarray]:
    """The tensors of a .safetensors file as {name: array} (all of them, or those in `names`).
    F16/BF16 become float32; the other dtypes keep theirs. Arrays are writable copies."""
    path = Path(path)
    header, _, start = read_safetensors_header(path)
    if names is not None:
        missing = [k for k in names if k not in header]
        if missing:
            raise KeyError(f"{path} has no tensor(s) {missing}")
        header = {k: header[k] for k in names}
    out: dict[str, np.ndarray] = {}
    with open(path, "rb") as f:
        data = np.memmap(f, dtype=np.uint8, mode="r", offset=start) if os.path.getsize(path) > start else np.zeros(0, np.uint8)
        for name, entry in header.items():
            begin, end = entry["data_offsets"]
            arr = np.frombuffer(data[begin:end], dtype=_DTYPES[entry["dtype"]]).reshape(entry["shape"])
            if entry["dtype"] == "BF16":
                arr = (arr.astype(np.uint32) << 16).view(np.float32)
            elif entry["dtype"] == "F16":
                arr = arr.astype(np.float32)
            out[name] = arr.astype(arr.dtype.newbyteorder("="), copy=True)  # native byte order, own memory
        del data
    return out
