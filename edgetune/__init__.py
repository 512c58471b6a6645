"""edgetune: fine-tune models on memory-constrained devices.

The public API (``load``, ``compile``, ``save``, ``load_compiled``, ``train``, ``export_adapter``)
is imported lazily, so ``import edgetune`` is cheap and never initialises CUDA or imports Triton.
"""
from __future__ import annotations

__version__ = "0.1.0"

_API = ("load", "compile", "save", "load_compiled", "load_run", "train", "export_adapter", "attach_adapter",
        "open_model")

__all__ = [*_API, "EdgetuneError", "__version__"]

from .errors import EdgetuneError  # noqa: E402


def __getattr__(name: str):
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'edgetune' has no attribute {name!r}")
