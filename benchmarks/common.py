"""Shared helpers for the scripts in ``benchmarks/``: batches, timing, saved-tensor and RSS accounting.

Nothing here asserts anything; the benchmarks print numbers and leave judging them to the reader.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import resource
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

SHIPPED_DATA = Path(__file__).resolve().parent.parent / "edgetune" / "data" / "instructions.jsonl"
MIB = 2**20


# ----------------------------------------------------------------------------------- the batch


def real_batch(tokenizer, batch: int, seq_len: int, path: str | os.PathLike = SHIPPED_DATA) -> dict[str, torch.Tensor]:
    """The first ``batch`` packed rows of ``path`` at ``seq_len``: input_ids / labels / attention_mask (B, T)."""
    from edgetune.training.data import build_dataset

    ds = build_dataset(path, tokenizer, seq_len)
    if len(ds) < batch:
        raise SystemExit(f"{path} packs into only {len(ds)} rows of {seq_len} tokens; asked for batch {batch}")
    return ds.rows(slice(0, batch))


# ----------------------------------------------------------------------------------- a train step


def lora_optimizer(model: nn.Module, lr: float = 1e-4) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)


def train_step(model: nn.Module, batch: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> float:
    """Forward with labels, backward, optimizer step; returns the loss."""
    optimizer.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - t0, out


def median(xs) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def loadavg() -> str:
    try:
        a, b, c = os.getloadavg()
    except OSError:  # pragma: no cover - not on Linux
        return "n/a"
    return f"{a:.2f} / {b:.2f} / {c:.2f} (1/5/15 min, {os.cpu_count()} CPUs)"


# ----------------------------------------------------------------------------------- saved tensors


def frozen_storage_ptrs(model: nn.Module) -> set[int]:
    """Storage addresses of every parameter and buffer (views of them share the storage)."""
    ptrs = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device.type != "meta" and t.numel():
            ptrs.add(t.untyped_storage().data_ptr())
    return ptrs


@dataclass
class SavedTensors:
    """Unique storages saved for backward during a forward, parameters and buffers excluded."""

    exclude: set[int]
    storages: dict[int, int] = field(default_factory=dict)  # storage ptr -> nbytes
    n_packed: int = 0
    n_excluded: int = 0

    @property
    def nbytes(self) -> int:
        return sum(self.storages.values())

    def _pack(self, t: torch.Tensor):
        self.n_packed += 1
        if isinstance(t, nn.Parameter):
            self.n_excluded += 1
            return t
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr in self.exclude:
            self.n_excluded += 1
        elif ptr not in self.storages:
            self.storages[ptr] = st.nbytes()
        return t

    @contextlib.contextmanager
    def record(self):
        with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
            yield self


def _tensors_in(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors_in(v)


def saved_bytes_by_node(root: torch.autograd.graph.Node, exclude: set[int]) -> Counter:
    """Bytes of saved storages grouped by the autograd node type that holds them.

    Walks the graph from ``root`` (the loss's grad_fn) before backward frees it, reading each
    node's ``_saved_*`` attributes (and ``saved_tensors`` of custom Functions). A storage held by
    several nodes is counted once, for the first node met walking back from the loss.
    """
    by_node: Counter = Counter()
    seen: set[int] = set()
    visited: set[int] = set()
    stack = [root]
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in visited:
            continue
        visited.add(id(fn))
        name = type(fn).__name__
        tensors = []
        for attr in dir(fn):
            if attr.startswith("_saved_"):
                try:
                    tensors += list(_tensors_in(getattr(fn, attr)))
                except Exception:  # freed or not a tensor attribute
                    pass
        if not name.endswith("Backward0") and hasattr(fn, "saved_tensors"):  # custom autograd.Function
            try:
                tensors += list(_tensors_in(fn.saved_tensors))
            except Exception:
                pass
        for t in tensors:
            if isinstance(t, nn.Parameter) or t.device.type == "meta":
                continue
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr in exclude or ptr in seen:
                continue
            seen.add(ptr)
            by_node[name] += st.nbytes()
        stack.extend(f for f, _ in fn.next_functions)
    return by_node


# ----------------------------------------------------------------------------------- memory


def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:  # pragma: no cover - not on Linux
        pass
    return None


def rss_mib() -> float | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib / 1024


def vmhwm_mib() -> float | None:
    kib = _status_kib("VmHWM")
    return None if kib is None else kib / 1024


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the OS (glibc), so RSS means 'in use'."""
    gc.collect()
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux ``clear_refs`` 5). ru_maxrss cannot be reset."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False
