"""Build edgetune's optional native ops; all metadata lives in pyproject.toml.

* ``edgetune._cpu_ops``: csrc/cpu/*.cpp (C++ with at::parallel_for), built whenever torch's
  ``cpp_extension`` works.
* ``edgetune._cuda_ops``: csrc/cuda/*.cu, built only when nvcc is found AND the build's torch
  has CUDA (a CPU torch wheel cannot link CUDA ops). ``EDGETUNE_BUILD_CUDA=0`` skips it,
  ``TORCH_CUDA_ARCH_LIST`` overrides the default targets (8.0 8.7 8.9 9.0).

A native build that fails never fails the install: the error is written to
``edgetune/_build_status.json`` and ``edgetune doctor`` prints it; the ops then run on the
pure-torch reference backend. ``EDGETUNE_BUILD_STRICT=1`` turns build failures into errors (CI).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import traceback
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
STATUS_FILE = ROOT / "edgetune" / "_build_status.json"
STRICT = os.environ.get("EDGETUNE_BUILD_STRICT") == "1"
CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off"]  # no FMA contraction: bit-exact with torch


def _status(**entries) -> None:
    try:
        old = json.loads(STATUS_FILE.read_text()) if STATUS_FILE.exists() else {}
    except Exception:
        old = {}
    old.update(entries)
    STATUS_FILE.write_text(json.dumps(old, indent=1))


def _extensions():
    try:
        import torch
        from torch.utils.cpp_extension import CppExtension, CUDAExtension, BuildExtension  # noqa: F401
    except Exception as exc:  # torch missing from the build environment
        _status(cpu=f"not built: torch.utils.cpp_extension unavailable at build time ({exc!r})",
                cuda="not built: no torch at build time")
        return [], None
    exts = [CppExtension("edgetune._cpu_ops", sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc/cpu").glob("*.cpp")),
                         extra_compile_args={"cxx": CXX_FLAGS}, extra_link_args=["-fopenmp"])]
    nvcc = shutil.which("nvcc") or (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin/nvcc")
    want_cuda = os.environ.get("EDGETUNE_BUILD_CUDA", "1") != "0"
    if not want_cuda:
        _status(cuda="not built: EDGETUNE_BUILD_CUDA=0")
    elif torch.version.cuda is None:
        _status(cuda=f"not built: torch {torch.__version__} has no CUDA (a CPU wheel)")
    elif not Path(nvcc).exists():
        _status(cuda="not built: nvcc not found (set CUDA_HOME)")
    else:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0 8.7 8.9 9.0")
        sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc/cuda").glob("*.c[up]*"))
        exts.append(CUDAExtension("edgetune._cuda_ops", sources,
                                  extra_compile_args={"cxx": ["-O3"],
                                                      "nvcc": ["-O3"]}))
    return exts, BuildExtension


EXTENSIONS, _BuildExtension = _extensions()
cmdclass = {}
if _BuildExtension is not None:
    class OptionalBuildExt(_BuildExtension):
        """Build each extension on its own; a failure is recorded, not raised (unless strict)."""

        def build_extension(self, ext):
            key = "cuda" if "cuda" in ext.name else "cpu"
            try:
                super().build_extension(ext)
            except Exception as exc:
                if STRICT:
                    raise
                tail = traceback.format_exc().strip().splitlines()[-3:]
                _status(**{key: f"build failed: {exc!r}; " + " | ".join(tail)})
                print(f"edgetune: WARNING: {ext.name} failed to build; the reference backend will be used "
                      f"({exc})", file=sys.stderr)
            else:
                _status(**{key: "built"})

    cmdclass["build_ext"] = OptionalBuildExt.with_options(use_ninja=shutil.which("ninja") is not None)

setup(ext_modules=EXTENSIONS, cmdclass=cmdclass)
