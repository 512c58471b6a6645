"""Op registry: one torch.library schema per update-path op, with reference/cpu/cuda/triton backends.

Importing this package is light (no torch.library registration, no native library, no Triton,
no CUDA): the schemas are declared when :mod:`edgetune.kernels.ops` is first imported, and each
backend is loaded the first time an op would run on it. See docs/kernels.md.

* ``edgetune.kernels.ops`` — the ops (``torch.ops.edgetune.<name>``) and thin Python wrappers;
* ``edgetune.kernels.registry`` — backend discovery, selection (``EDGETUNE_BACKEND``), diagnostics.
"""
from __future__ import annotations

import importlib

__all__ = ["ops", "registry", "reference"]


def __getattr__(name):
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(name)
