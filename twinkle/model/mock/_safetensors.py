"""Read/write ``.safetensors`` files from numpy: ``safetensors.numpy`` when installed, else a small writer of
the same format (8-byte little-endian header length, JSON header, raw little-endian tensor bytes)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

_DTYPES = {"F64": np.float64, "F32": np.float32, "I64": np.int64, "I32": np.int32}
_NAMES = {np.dtype(v).str: k for k, v in _DTYPES.items()}


def save_file(tensors: dict[str, np.ndarray], path: Path, metadata: dict[str, str] | None = None) -> None:
    try:
        from safetensors.numpy import save_file as _save
    except ImportError:
        pass
    else:
        _save({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=metadata)
        return
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    blobs: list[bytes] = []
    offset = 0
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        dtype = arr.dtype.newbyteorder("<")
        blob = arr.astype(dtype).tobytes()
        header[name] = {"dtype": _NAMES[dtype.str], "shape": list(arr.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for blob in blobs:
            f.write(blob)


def load_file(path: Path) -> dict[str, np.ndarray]:
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    base = 8 + n
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = np.dtype(_DTYPES[info["dtype"]]).newbyteorder("<")
        out[name] = np.frombuffer(data[base + start : base + end], dtype=dtype).reshape(info["shape"]).copy()
    return out
