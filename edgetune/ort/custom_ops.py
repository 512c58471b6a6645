"""edgetune's ONNX Runtime custom-op library (``csrc/ort``): build it, register its gradients.

The library provides two families of ops (``csrc/ort/nf4_matmul.cc``, ``csrc/ort/act4.cc``).

**The 4-bit derivative-coded nonlinearity** (S2A's ``Act4Pointwise``):
``edgetune::Act4SiLU | Act4GELU | Act4GELUTanh(x, borders, levels) -> (f(x), codes)`` with
``codes`` the packed 4-bit derivative codes (two per byte, :mod:`edgetune.quant.actpack`'s
layout, :mod:`edgetune.s2a.tables`' borders), and ``edgetune::Act4Grad(dy, codes, levels) ->
levels[code] · dy``. Their gradient definition ``Act4* → Act4Grad(GO(0), O(1), I(2))`` makes
ORT's backward keep the codes (0.5 B per element) instead of x and sigmoid(x) (8 B).

**The frozen NF4 matmul**: ``edgetune::NF4MatMul(x, packed, absmax) -> x @ Wᵀ`` and
``edgetune::NF4MatMulGrad(dy, packed, absmax) -> dy @ W``, where ``W`` is a frozen NF4 weight in
bitsandbytes' layout (the one :mod:`edgetune.quant.nf4` writes). Both decode 16 weight rows at a
time inside the kernel, so the dense weight never exists, neither between forward and backward
(as it would with ``DequantizeLinear`` → ``MatMul``) nor transiently. The gradient definition
``NF4MatMul → NF4MatMulGrad(GO(0), I(1), I(2))`` is registered in-process before
``generate_artifacts`` and is baked into ``training_model.onnx``; at training time only the
library itself is needed.

:func:`build_library` compiles the sources with the system C++ compiler into a per-user cache
(``$EDGETUNE_CACHE`` or ``~/.cache/edgetune``), keyed by the sources' hash, so a changed source
rebuilds and an unchanged one is reused. The ORT wheel ships no C headers;
``csrc/ort/ort_abi.h`` declares the few ABI pieces used.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import torch

from ..errors import EdgetuneError
from ..fsutil import atomic_file

DOMAIN = "edgetune"
FORWARD_OP, BACKWARD_OP = "NF4MatMul", "NF4MatMulGrad"
ACT4_OPS = {"silu": "Act4SiLU", "gelu": "Act4GELU", "gelu_tanh": "Act4GELUTanh"}  # S2A op name -> ORT op
ACT4_GRAD = "Act4Grad"
CC_SOURCES = ("nf4_matmul.cc", "act4.cc", "register.cc")
SOURCES = (*CC_SOURCES, "ort_abi.h", "kernel_io.h")
ALL_OPS = [f"{DOMAIN}::{op}" for op in (FORWARD_OP, BACKWARD_OP, *ACT4_OPS.values(), ACT4_GRAD)]
LIB_PREFIX = "libedgetune_ort"


def source_dir() -> Path:
    """``csrc/ort`` of this checkout (an installed package carries a copy under ``edgetune/ort/csrc``)."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent.parent / "csrc" / "ort", here / "csrc"):
        if all((candidate / s).is_file() for s in SOURCES):
            return candidate
    raise EdgetuneError(f"the ORT custom-op sources ({', '.join(SOURCES)}) are not in this installation; "
                        "export with --nf4 graph to decode NF4 with standard ONNX ops instead")


def sources_sha256() -> str:
    h = hashlib.sha256()
    src = source_dir()
    for name in SOURCES:
        h.update(name.encode() + b"\0" + (src / name).read_bytes())
    h.update(repr(_FLAG_SETS).encode())  # a change of flags is a new library
    return h.hexdigest()


def cache_dir() -> Path:
    return Path(os.environ.get("EDGETUNE_CACHE") or Path.home() / ".cache" / "edgetune") / "ort"


# No -ffast-math: a shared library linked with it sets flush-to-zero for the whole process when
# loaded (crtfastmath), silently changing every later float computation in it.
_FLAG_SETS = (
    ["-O3", "-march=native", "-fno-math-errno"],
    ["-O3", "-fno-math-errno"],  # a compiler without -march=native
)


def build_library(force: bool = False) -> Path:
    """Compile ``csrc/ort`` into a shared library (cached); returns its path."""
    digest = sources_sha256()
    out = cache_dir() / f"{LIB_PREFIX}-{digest[:16]}.so"
    if out.is_file() and not force:
        return out
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        raise EdgetuneError("building the ORT custom-op library needs a C++ compiler (g++ or clang++); "
                            "install one, or export with --nf4 graph")
    src = source_dir()
    errors = ""
    with atomic_file(out) as tmp:
        for flags in _FLAG_SETS:
            cmd = [cxx, *flags, "-std=c++17", "-fPIC", "-shared", "-fvisibility=hidden",
                   *(str(src / c) for c in CC_SOURCES), "-o", str(tmp)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode == 0:
                break
            errors = (proc.stderr or proc.stdout).strip().splitlines()
            errors = errors[0] if errors else f"exit code {proc.returncode}"
        else:
            raise EdgetuneError(f"compiling the ORT custom-op library failed ({errors}); "
                                "export with --nf4 graph to avoid it")
    return out


_REGISTERED = False


def register_gradients() -> None:
    """Tell ORT's gradient builder (in-process, before ``generate_artifacts``) that NF4MatMul's input
    gradient is NF4MatMulGrad(dy, packed, absmax) and each Act4 op's is Act4Grad(dy, codes, levels)."""
    global _REGISTERED
    if _REGISTERED:
        return
    from onnxruntime.capi import _pybind_state as C

    def grad_node(op_type, inputs):
        node = C.GradientNodeDefinition()
        node.op_type, node.domain = op_type, DOMAIN
        node.inputs = inputs
        node.outputs = ["GI(0)"]  # only x gets a gradient: the packed weight and the tables are frozen
        node.attributes = []
        return node

    C.register_gradient_definition(f"{DOMAIN}::{FORWARD_OP}", [grad_node(BACKWARD_OP, ["GO(0)", "I(1)", "I(2)"])])
    for op_type in ACT4_OPS.values():  # GO(0): dy of f(x); O(1): the codes output; I(2): the levels input
        C.register_gradient_definition(f"{DOMAIN}::{op_type}", [grad_node(ACT4_GRAD, ["GO(0)", "O(1)", "I(2)"])])
    _REGISTERED = True


_TORCH_OP = None


def torch_nf4_matmul():
    """``torch.ops.edgetune_ort.nf4_matmul(x, packed, absmax)``: the export-time stand-in of
    ``edgetune::NF4MatMul``. It computes the same product with the reference dequantization (so
    tracing sees real values and shapes) and the TorchScript exporter writes it as the custom node.
    Like the kernel it reads every size off the tensors: out = 2·len(packed) / in,
    blocksize = 2·len(packed) / len(absmax). (A torch.autograd.Function with ``symbolic`` would be
    simpler, but torch 2.13's tracer fails with "unordered_map::at" on its second use.)
    """
    global _TORCH_OP
    if _TORCH_OP is not None:
        return _TORCH_OP

    @torch.library.custom_op("edgetune_ort::nf4_matmul", mutates_args=())
    def nf4_matmul(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor) -> torch.Tensor:
        from ..quant.nf4 import NF4_CODE

        k = x.shape[-1]
        codes = torch.stack([packed >> 4, packed & 15], dim=-1).reshape(-1).long()  # (N*K,)
        bs = codes.numel() // absmax.numel()
        w = (NF4_CODE.to(x.device)[codes].reshape(-1, bs) * absmax.reshape(-1, 1)).reshape(-1, k)  # (N, K)
        return x @ w.to(x.dtype).t()

    @nf4_matmul.register_fake
    def _(x, packed, absmax):
        return x.new_empty((*x.shape[:-1], 2 * packed.numel() // x.shape[-1]))

    def symbolic(g, x, packed, absmax):
        return g.op(f"{DOMAIN}::{FORWARD_OP}", x, packed, absmax)

    torch.onnx.register_custom_op_symbolic("edgetune_ort::nf4_matmul", symbolic, 1)
    _TORCH_OP = torch.ops.edgetune_ort.nf4_matmul
    return _TORCH_OP


_TORCH_ACT4 = None


def torch_act4():
    """``torch.ops.edgetune_ort.act4(x, borders, levels, op) -> (f(x), codes)``: the export-time
    stand-in of ``edgetune::Act4<op>``, computed with the references (``FORWARDS[op]``,
    ``torch.bucketize`` and :func:`edgetune.quant.actpack.pack_nibbles_reference`) so tracing sees
    real values; the exporter writes it as the custom node with two outputs.
    """
    global _TORCH_ACT4
    if _TORCH_ACT4 is not None:
        return _TORCH_ACT4
    from torch.onnx import symbolic_helper

    @torch.library.custom_op("edgetune_ort::act4", mutates_args=())
    def act4(x: torch.Tensor, borders: torch.Tensor, levels: torch.Tensor, op: str) -> tuple[torch.Tensor, torch.Tensor]:
        from ..quant.actpack import pack_nibbles_reference
        from ..s2a.tables import FORWARDS

        codes = torch.bucketize(x.detach().float(), borders)
        return FORWARDS[op](x), pack_nibbles_reference(codes)

    @act4.register_fake
    def _(x, borders, levels, op):
        return torch.empty_like(x), x.new_empty(((x.numel() + 1) // 2,), dtype=torch.uint8)

    @symbolic_helper.parse_args("v", "v", "v", "s")
    def symbolic(g, x, borders, levels, op):
        y, codes = g.op(f"{DOMAIN}::{ACT4_OPS[op]}", x, borders, levels, outputs=2)
        y.setType(x.type())
        return y, codes

    torch.onnx.register_custom_op_symbolic("edgetune_ort::act4", symbolic, 1)
    _TORCH_ACT4 = torch.ops.edgetune_ort.act4
    return _TORCH_ACT4
