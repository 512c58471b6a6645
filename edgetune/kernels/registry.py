"""Backends and how one is chosen for each call.

Backends, best first per device:

* ``cuda`` tensors: ``cuda`` (csrc/cuda, built as ``edgetune._cuda_ops``) > ``triton`` > ``reference``;
* ``cpu`` tensors: ``cpu`` (csrc/cpu, built as ``edgetune._cpu_ops``) > ``reference``.
  (``triton`` runs CPU tensors only when forced and ``TRITON_INTERPRET=1``: the interpreter.)

``EDGETUNE_BACKEND=reference|cpu|cuda|triton`` (read on every call) or :func:`use_backend`
forces one; a forced backend that cannot run raises :class:`BackendUnavailable` with the reason
the first time an op needs it. A backend that lacks a particular op falls back to the reference
for that op. Nothing here loads a native library, Triton or CUDA at import time.
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import threading
from pathlib import Path

import torch

log = logging.getLogger("edgetune.kernels")

BACKENDS = ("reference", "cpu", "cuda", "triton")
ENV = "EDGETUNE_BACKEND"


class BackendUnavailable(RuntimeError):
    """A forced or required backend cannot run here; the message says why."""


_lock = threading.Lock()
_state: dict[str, tuple[bool, str]] = {}  # backend -> (ok, reason)
_forced = threading.local()
last_backend: dict[str, str] = {}  # op name -> backend that ran it last (for logs, tests, doctor)


def _build_status() -> dict:
    p = Path(__file__).resolve().parent.parent / "_build_status.json"
    try:
        return json.loads(p.read_text())
    except Exception:
        return {}


def _load_native(backend: str) -> tuple[bool, str]:
    module = f"edgetune._{backend}_ops"
    try:
        spec = importlib.util.find_spec(module)
    except Exception as exc:  # pragma: no cover
        spec, why = None, repr(exc)
    if spec is None or spec.origin is None:
        built = _build_status().get(backend)
        why = built or "not built (no build record; reinstall with `pip install -e .` to build it)"
        return False, f"{module} is missing: {why}"
    if backend == "cuda" and torch.version.cuda is None:
        return False, f"{module} exists but torch {torch.__version__} has no CUDA"
    try:
        torch.ops.load_library(spec.origin)
    except Exception as exc:
        return False, (f"{module} failed to load from {spec.origin}: {exc} "
                       f"(built against another torch? reinstall edgetune with this torch)")
    return True, f"loaded {spec.origin}"


def _probe(backend: str) -> tuple[bool, str]:
    if backend == "reference":
        return True, "pure torch, always present"
    if backend in ("cpu", "cuda"):
        return _load_native(backend)
    if backend == "triton":
        if importlib.util.find_spec("triton") is None:
            return False, "the triton package is not installed (pip install 'edgetune[triton]')"
        return True, "triton importable (kernels compile on first use)"
    raise ValueError(backend)


def status(backend: str) -> tuple[bool, str]:
    """(usable, reason) for a backend, probing (and loading) it once."""
    if backend not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    with _lock:
        if backend not in _state:
            _state[backend] = _probe(backend)
        return _state[backend]


def forced() -> str | None:
    name = getattr(_forced, "name", None) or os.environ.get(ENV) or None
    if name is not None and name not in BACKENDS:
        raise BackendUnavailable(f"{ENV}={name!r} is not a backend; choose one of {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: str | None):
    """Force ``name`` (or clear the force with None) for ops run in this thread inside the block."""
    if name is not None and name not in BACKENDS:
        raise BackendUnavailable(f"unknown backend {name!r}")
    old = getattr(_forced, "name", None)
    _forced.name = name
    try:
        yield
    finally:
        _forced.name = old


def _device_ok(backend: str, device: torch.device) -> tuple[bool, str]:
    if backend == "reference":
        return True, ""
    if backend == "cpu":
        return device.type == "cpu", f"the cpu backend runs CPU tensors, got {device.type}"
    if backend == "cuda":
        return device.type == "cuda", f"the cuda backend runs CUDA tensors, got {device.type}"
    if backend == "triton":
        if device.type == "cuda":
            return True, ""
        ok = device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
        return ok, "triton runs CUDA tensors (or CPU tensors under TRITON_INTERPRET=1)"
    return False, backend


def preferred(device: torch.device) -> tuple[str, ...]:
    if device.type == "cuda":
        return ("cuda", "triton", "reference")
    if device.type == "cpu":
        return ("cpu", "reference")
    return ("reference",)


def choose(op: str, device: torch.device, implemented: dict[str, object]) -> str:
    """The backend that runs ``op`` on ``device``; ``implemented`` maps backend -> implementation."""
    name = forced()
    if name is not None:
        if name not in implemented:
            log.debug("backend %s has no %s; using the reference", name, op)
            return "reference"
        ok, why = status(name)
        if not ok:
            raise BackendUnavailable(f"{ENV}={name} but the {name} backend is unavailable: {why}")
        ok, why = _device_ok(name, device)
        if not ok:
            raise BackendUnavailable(f"{ENV}={name} cannot run edgetune::{op}: {why}")
        return name
    for name in preferred(device):
        if name in implemented and status(name)[0] and _device_ok(name, device)[0]:
            return name
    return "reference"


def report() -> list[dict]:
    """One row per backend for ``edgetune doctor``: name, usable, reason, default devices."""
    rows = []
    for name in BACKENDS:
        ok, why = status(name)
        if name == "cuda" and ok and not torch.cuda.is_available():
            why += "; no CUDA device visible"
        rows.append({"backend": name, "usable": ok, "reason": why})
    return rows
