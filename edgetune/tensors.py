"""safetensors in and out, with errors that name the file. No pickle anywhere in edgetune.

:func:`load_tensors` checks the header itself before safetensors maps the file: its length, that
it is a JSON object, and that every tensor's dtype, shape and ``data_offsets`` agree with each
other and with the file size (no overlaps, no gaps, nothing past the end). A file whose header
lies is refused with one line naming the file and the tensor.
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import torch

from .errors import ArtifactError

MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
             "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def save_tensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path),
              metadata={k: str(v) for k, v in (metadata or {}).items()})


def _short(text: str, limit: int = 60) -> str:
    text = repr(text)
    return text if len(text) <= limit else text[:limit] + "…"


def check_header(path: str | os.PathLike) -> dict:
    """Validate a safetensors file's header against the file; return the header (tensor entries only)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ArtifactError(f"{path}: not a valid safetensors file (truncated: {size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or n + 8 > size:
                raise ArtifactError(f"{path}: not a valid safetensors file (header length {n} does not fit "
                                    f"the file of {size} bytes)")
            raw = f.read(n)
    except OSError as exc:
        raise ArtifactError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ArtifactError(f"{path}: not a valid safetensors file (header is not JSON)") from None
    if not isinstance(header, dict):
        raise ArtifactError(f"{path}: not a valid safetensors file (header is not a JSON object)")
    data_len = size - 8 - n
    spans = []
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise ArtifactError(f"{path}: not a valid safetensors file (__metadata__ must map strings to strings)")
            continue
        bad = f"{path}: not a valid safetensors file (tensor {_short(name)}"
        if not isinstance(entry, dict):
            raise ArtifactError(f"{bad} has no dtype/shape/offsets)")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in _ITEMSIZE:
            raise ArtifactError(f"{bad} has unknown dtype {_short(str(dtype), 20)})")
        if (not isinstance(shape, list) or len(shape) > 64
                or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**62 for d in shape)):
            raise ArtifactError(f"{bad} has a bad shape)")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise ArtifactError(f"{bad} has bad data_offsets)")
        begin, end = offsets
        if not 0 <= begin <= end <= data_len:
            raise ArtifactError(f"{bad} lies outside the file: offsets {begin}..{end}, data is {data_len} bytes)")
        if end - begin != math.prod(shape) * _ITEMSIZE[dtype]:
            raise ArtifactError(f"{bad}: shape {shape} of {dtype} needs {math.prod(shape) * _ITEMSIZE[dtype]} "
                                f"bytes, offsets give {end - begin})")
        spans.append((begin, end, name))
        tensors[name] = entry
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            what = "overlaps another" if begin < pos else "leaves a gap before it"
            raise ArtifactError(f"{path}: not a valid safetensors file (tensor {_short(name)} {what})")
        pos = end
    if pos != data_len:
        raise ArtifactError(f"{path}: not a valid safetensors file ({data_len - pos} bytes past the last tensor)")
    return tensors


def load_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: missing")
    check_header(path)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, OverflowError) as exc:
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise ArtifactError(f"{path}: not a valid safetensors file ({first})") from None


def dedup_shared(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that share storage with an earlier one (tied embeddings); return the aliases."""
    seen: dict[tuple, str] = {}
    unique, aliases = {}, {}
    for name, t in state.items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        unique[name] = t
    return unique, aliases
