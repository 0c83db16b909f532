"""Reads safetensors files with NumPy alone: no `safetensors` package, no code from the file.

The format (huggingface/safetensors, its README's "Format" section): 8 bytes, a little-endian
unsigned header length N; N bytes of UTF-8 JSON mapping each tensor's name to {"dtype",
"shape", "data_offsets": [begin, end]} (offsets into the byte buffer after the header), plus an
optional "__metadata__" dict of strings; then the buffer, tensors stored C-contiguous and
little-endian. Every offset and size is checked against the file before an array is made, and
arrays are read-only views of a memory map, so a 1.7 GB checkpoint is not read twice.
"""

from __future__ import annotations

import json
import os

import ml_dtypes
import numpy as np

__all__ = ["SafetensorsError", "load", "metadata"]

DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype(np.bool_),
}
MAX_HEADER = 100 * 2 ** 20  # the reference implementation's own limit


class SafetensorsError(ValueError):
    """A missing, corrupt or foreign safetensors file. Its message is one line, for the user."""


def _header(path: str) -> tuple[dict, int]:
    """(header dict, byte offset of the buffer)."""
    if not os.path.isfile(path):
        raise SafetensorsError(f"no such file: {path}")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path} is not a safetensors file (shorter than 8 bytes)")
        n = int.from_bytes(head, "little")
        if n < 2 or n > MAX_HEADER or 8 + n > size:
            raise SafetensorsError(f"{path} is not a safetensors file (header length {n} does "
                                   f"not fit a file of {size} bytes)")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SafetensorsError(f"{path} is not a safetensors file (header is not JSON: "
                               f"{str(e).splitlines()[0][:80]})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path} is not a safetensors file (header is not a JSON object)")
    return header, 8 + n


def metadata(path: str) -> dict[str, str]:
    """The header's free-form "__metadata__" (empty if none)."""
    meta = _header(path)[0].get("__metadata__") or {}
    return meta if isinstance(meta, dict) else {}


def load(path: str) -> dict[str, np.ndarray]:
    """Every tensor in the file, as read-only NumPy arrays (bfloat16 and float8 as ml_dtypes)."""
    header, start = _header(path)
    buffer_size = os.path.getsize(path) - start
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    data = np.memmap(path, np.uint8, mode="r", offset=start, shape=(buffer_size,)) \
        if buffer_size else np.zeros((0,), np.uint8)
    out = {}
    for name, entry in entries.items():
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{path}: tensor {name!r} has a malformed entry "
                                   f"{str(entry)[:80]}") from None
        count = int(np.prod(shape, dtype=np.int64))
        if min(shape, default=0) < 0 or not 0 <= begin <= end <= buffer_size \
                or end - begin != count * dtype.itemsize:
            raise SafetensorsError(f"{path}: tensor {name!r} ({entry['dtype']} {list(shape)}) "
                                   f"does not fit bytes {begin}..{end} of a {buffer_size}-byte "
                                   "buffer")
        array = data[begin:end].view(dtype).reshape(shape)
        out[name] = array.view(np.bool_) if dtype == np.bool_ else array
    return out
