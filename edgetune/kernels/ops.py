"""The op schemas, declared once with ``torch.library.custom_op`` in the ``edgetune`` namespace.

Every op has a fake (meta) implementation, so it traces under ``torch.compile`` / FakeTensor,
and one real implementation that asks :mod:`.registry` which backend runs this call and
forwards to it: ``reference`` (:mod:`.reference`), ``cpu`` (``torch.ops.edgetune_cpu``, C++ in
csrc/cpu), ``cuda`` (``torch.ops.edgetune_cuda``, csrc/cuda) or ``triton`` (:mod:`.triton_ops`,
imported on first use). The ops hold no autograd: they are the kernels *inside* the autograd
Functions (edgetune.s2a, the NF4 and sketch layers), which call them on detached tensors.

Layouts (all flat, row-major): nibbles — element 2i in the low nibble of byte i; bits — element
8i+j in bit j of byte i; int8 groups — (G, group) uint8 codes with float32 lo/scale (G, 1); NF4 —
bitsandbytes' layout, first element in the HIGH nibble; sketch codes — dense little-endian bit
stream per row (quant/bitpack.py).
"""
from __future__ import annotations

import importlib
import math
from typing import Callable, Optional

import torch
from torch import Tensor

from . import reference as ref
from .registry import choose, last_backend, log

_TRITON = "edgetune.kernels.triton_ops"


def _native(ns: str, name: str) -> Callable:
    def call(*args):
        return getattr(getattr(torch.ops, ns), name)(*args)
    return call


def _triton(name: str) -> Callable:
    def call(*args):
        return getattr(importlib.import_module(_TRITON), name)(*args)
    return call


def _impls(name: str, cpu: bool = True, cuda: bool = True, triton: bool = False,
           adapt: Callable | None = None) -> dict[str, Callable]:
    """backend -> implementation; ``adapt`` maps the public args to the native schema's."""
    table: dict[str, Callable] = {"reference": getattr(ref, name)}
    for backend, present, make in (("cpu", cpu, lambda: _native("edgetune_cpu", name)),
                                   ("cuda", cuda, lambda: _native("edgetune_cuda", name)),
                                   ("triton", triton, lambda: _triton(name))):
        if present:
            fn = make()
            if adapt is not None and backend != "triton":
                fn = (lambda f: (lambda *a: f(*adapt(*a))))(fn)
            table[backend] = fn
    return table


def _run(name: str, impls: dict[str, Callable], device: torch.device, *args):
    backend = choose(name, device, impls)
    if last_backend.get(name) != backend:
        log.debug("edgetune::%s runs on the %s backend", name, backend)
    last_backend[name] = backend
    return impls[backend](*args)


def _ceil(a, b):
    return (a + b - 1) // b


# ----------------------------------------------------------------------------------- act4

_ACT4_FWD = _impls("act4_forward", triton=True, adapt=lambda x, b, op: (x, b, ref.ACT_IDS[op]))


@torch.library.custom_op("edgetune::act4_forward", mutates_args=())
def act4_forward(x: Tensor, borders: Tensor, op: str) -> tuple[Tensor, Tensor]:
    """y = f(x) (op: silu | gelu | gelu_tanh) and the nibble-packed codes bucketize(x, borders)."""
    if op not in ref.ACT_IDS:
        raise ValueError(f"act4_forward: unknown op {op!r}; one of {sorted(ref.ACT_IDS)}")
    return _run("act4_forward", _ACT4_FWD, x.device, x, borders, op)


@act4_forward.register_fake
def _(x, borders, op):
    return torch.empty_like(x), x.new_empty((_ceil(x.numel(), 2),), dtype=torch.uint8)


_ACT4_BWD = _impls("act4_backward", triton=True)


@torch.library.custom_op("edgetune::act4_backward", mutates_args=())
def act4_backward(grad: Tensor, packed: Tensor, levels: Tensor) -> Tensor:
    """grad · levels[code] (levels cast to grad's dtype), codes unpacked from ``packed``."""
    return _run("act4_backward", _ACT4_BWD, grad.device, grad, packed, levels)


@act4_backward.register_fake
def _(grad, packed, levels):
    return torch.empty_like(grad)


# ------------------------------------------------------------------------- nibbles and bits

_PACK_NIB = _impls("pack_nibbles", triton=True)
_UNPACK_NIB = _impls("unpack_nibbles", triton=True)
_PACK_BITS = _impls("pack_bits", triton=True)
_UNPACK_BITS = _impls("unpack_bits", triton=True)


@torch.library.custom_op("edgetune::pack_nibbles", mutates_args=())
def pack_nibbles(codes: Tensor) -> Tensor:
    """uint8 codes in [0, 16) (any shape) -> uint8 (ceil(n/2),), element 2i in the low nibble."""
    return _run("pack_nibbles", _PACK_NIB, codes.device, codes)


@pack_nibbles.register_fake
def _(codes):
    return codes.new_empty((_ceil(codes.numel(), 2),), dtype=torch.uint8)


@torch.library.custom_op("edgetune::unpack_nibbles", mutates_args=())
def unpack_nibbles(packed: Tensor, numel: int) -> Tensor:
    return _run("unpack_nibbles", _UNPACK_NIB, packed.device, packed, numel)


@unpack_nibbles.register_fake
def _(packed, numel):
    return packed.new_empty((numel,), dtype=torch.uint8)


@torch.library.custom_op("edgetune::pack_bits", mutates_args=())
def pack_bits(mask: Tensor) -> Tensor:
    """bool (any shape) -> uint8 (ceil(n/8),), least significant bit first."""
    return _run("pack_bits", _PACK_BITS, mask.device, mask)


@pack_bits.register_fake
def _(mask):
    return mask.new_empty((_ceil(mask.numel(), 8),), dtype=torch.uint8)


@torch.library.custom_op("edgetune::unpack_bits", mutates_args=())
def unpack_bits(packed: Tensor, numel: int) -> Tensor:
    return _run("unpack_bits", _UNPACK_BITS, packed.device, packed, numel)


@unpack_bits.register_fake
def _(packed, numel):
    return packed.new_empty((numel,), dtype=torch.bool)


# -------------------------------------------------------------------------- int8 groups

_QUANT8 = _impls("quantize_int8", triton=True)
_DEQUANT8 = _impls("dequantize_int8", triton=True)


@torch.library.custom_op("edgetune::quantize_int8", mutates_args=())
def quantize_int8(x: Tensor, group: int, noise: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Per-group asymmetric uint8 codes (G, group), float32 lo and scale (G, 1).

    ``noise`` (uniform [0, 1), G·group values) selects stochastic rounding floor(v + noise);
    None rounds to nearest (half to even).
    """
    return _run("quantize_int8", _QUANT8, x.device, x, group, noise)


@quantize_int8.register_fake
def _(x, group, noise):
    g = _ceil(x.numel(), group)
    return (x.new_empty((g, group), dtype=torch.uint8), x.new_empty((g, 1), dtype=torch.float32),
            x.new_empty((g, 1), dtype=torch.float32))


@torch.library.custom_op("edgetune::dequantize_int8", mutates_args=())
def dequantize_int8(codes: Tensor, lo: Tensor, scale: Tensor, numel: int, dtype: torch.dtype) -> Tensor:
    """codes · scale + lo in float32, the first ``numel`` values, cast to ``dtype``: flat (numel,)."""
    return _run("dequantize_int8", _DEQUANT8, codes.device, codes, lo, scale, numel, dtype)


@dequantize_int8.register_fake
def _(codes, lo, scale, numel, dtype):
    return codes.new_empty((numel,), dtype=dtype)


# ---------------------------------------------------------------------------------- NF4

_NF4MM = _impls("nf4_matmul")


@torch.library.custom_op("edgetune::nf4_matmul", mutates_args=())
def nf4_matmul(x: Tensor, packed: Tensor, absmax: Tensor, out_features: int, in_features: int, blocksize: int,
               transposed: bool) -> Tensor:
    """x (..., in) · Wᵀ -> (..., out); with ``transposed`` x = dY (..., out) · W -> (..., in).

    W (out, in) is the NF4 weight (packed, float32 per-block absmax); backends dequantize it tile
    by tile in x's dtype and never hold the full fp weight.
    """
    return _run("nf4_matmul", _NF4MM, x.device, x, packed, absmax, out_features, in_features, blocksize, transposed)


@nf4_matmul.register_fake
def _(x, packed, absmax, out_features, in_features, blocksize, transposed):
    return x.new_empty((*x.shape[:-1], in_features if transposed else out_features))


# ------------------------------------------------------------------------------- sketch

_SK_GATHER = _impls("sketch_gather", triton=True)
_SK_SCATTER = _impls("sketch_scatter_add")
_SK_GRADT = _impls("sketch_grad_table")


@torch.library.custom_op("edgetune::sketch_gather", mutates_args=())
def sketch_gather(table: Tensor, codes: Tensor, bits: int, in_features: int) -> Tensor:
    """W[r, c] = table[r, g(c), code[r, c]] (out, in) in table's dtype; codes bit-packed per row."""
    return _run("sketch_gather", _SK_GATHER, table.device, table, codes, bits, in_features)


@sketch_gather.register_fake
def _(table, codes, bits, in_features):
    return table.new_empty((table.shape[0], in_features))


@torch.library.custom_op("edgetune::sketch_scatter_add", mutates_args=())
def sketch_scatter_add(grad_w: Tensor, codes: Tensor, bits: int, groups_per_row: int) -> Tensor:
    """grad_table[r, g(c), code[r, c]] += grad_w[r, c] -> (out, GPR, 2**bits), float32 (float64 for double)."""
    return _run("sketch_scatter_add", _SK_SCATTER, grad_w.device, grad_w, codes, bits, groups_per_row)


@sketch_scatter_add.register_fake
def _(grad_w, codes, bits, groups_per_row):
    return grad_w.new_empty((grad_w.shape[0], groups_per_row, 1 << bits),
                            dtype=torch.promote_types(grad_w.dtype, torch.float32))


@torch.library.custom_op("edgetune::sketch_grad_table", mutates_args=())
def sketch_grad_table(dy: Tensor, x: Tensor, codes: Tensor, bits: int, groups_per_row: int) -> Tensor:
    """The table gradient from dY (..., out) and X (..., in) directly: scatter_add(dYᵀX) without a full grad_W."""
    return _run("sketch_grad_table", _SK_GRADT, dy.device, dy, x, codes, bits, groups_per_row)


@sketch_grad_table.register_fake
def _(dy, x, codes, bits, groups_per_row):
    return dy.new_empty((dy.shape[-1], groups_per_row, 1 << bits), dtype=torch.promote_types(dy.dtype, torch.float32))


# --------------------------------------------------------------------------------- LoRA

_LORA_ADD = _impls("lora_add_")
_LORA_BWD = _impls("lora_backward")


@torch.library.custom_op("edgetune::lora_add_", mutates_args=("y",))
def lora_add_(y: Tensor, x: Tensor, A: Tensor, B: Tensor, scale: float) -> Tensor:
    """y (..., out) += scale · (x (..., in) · Aᵀ) · Bᵀ **in y's buffer**; returns h = x·Aᵀ (N, r).

    A (r, in) and B (out, r) share a dtype; h is computed in it (x cast to it). Native backends
    add with one BLAS ``addmm_`` (scale as alpha) into y viewed as (N, out), so the only new
    tensor is h (keep it for :func:`lora_backward`'s dB); when y's dtype differs from A's the
    update runs in y's dtype (h and B cast, both small).
    """
    return _run("lora_add_", _LORA_ADD, y.device, y, x, A, B, float(scale))


@lora_add_.register_fake
def _(y, x, A, B, scale):
    return x.new_empty((math.prod(x.shape[:-1]), A.shape[0]), dtype=A.dtype)


@torch.library.custom_op("edgetune::lora_backward", mutates_args=("grad_x",))
def lora_backward(dy: Tensor, x: Tensor, h: Tensor, A: Tensor, B: Tensor, scale: float,
                  grad_x: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(dA (r, in), dB (out, r)) of y = base + scale·(x Aᵀ) Bᵀ, in A's dtype; ``grad_x`` (..., in),
    if given, gets ``+= scale · (dY·B)·A`` in place (e.g. the frozen base's grad_x buffer).

    dy (..., out), x (..., in) (e.g. dequantized from its 8-bit save), h = x·Aᵀ from :func:`lora_add_`.
    """
    return _run("lora_backward", _LORA_BWD, dy.device, dy, x, h, A, B, float(scale), grad_x)


@lora_backward.register_fake
def _(dy, x, h, A, B, scale, grad_x):
    return A.new_empty(A.shape), B.new_empty(B.shape)


# ------------------------------------------------------------------------- gated product (SwiGLU)

_SILU_MUL = _impls("silu_mul", cuda=False)
_SILU_MUL_BWD = _impls("silu_mul_backward", cuda=False)


@torch.library.custom_op("edgetune::silu_mul", mutates_args=())
def silu_mul(g: Tensor, u: Tensor) -> Tensor:
    """silu(g) · u in one pass (g, u of one shape and dtype). CUDA runs the reference (aten's fused
    kernels are fast there); on the CPU aten's sigmoid costs ~5x an exp, which the native op avoids."""
    return _run("silu_mul", _SILU_MUL, g.device, g, u)


@silu_mul.register_fake
def _(g, u):
    return torch.empty_like(g)


@torch.library.custom_op("edgetune::silu_mul_backward", mutates_args=())
def silu_mul_backward(dy: Tensor, g: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """(dY·u·silu′(g), dY·silu(g)) in one pass: the gradients of silu(g)·u."""
    return _run("silu_mul_backward", _SILU_MUL_BWD, g.device, dy, g, u)


@silu_mul_backward.register_fake
def _(dy, g, u):
    return torch.empty_like(g), torch.empty_like(g)


ALL_OPS = {
    "act4_forward": act4_forward, "act4_backward": act4_backward, "pack_nibbles": pack_nibbles,
    "unpack_nibbles": unpack_nibbles, "pack_bits": pack_bits, "unpack_bits": unpack_bits,
    "quantize_int8": quantize_int8, "dequantize_int8": dequantize_int8, "nf4_matmul": nf4_matmul,
    "sketch_gather": sketch_gather, "sketch_scatter_add": sketch_scatter_add, "sketch_grad_table": sketch_grad_table,
    "lora_add_": lora_add_, "lora_backward": lora_backward,
    "silu_mul": silu_mul, "silu_mul_backward": silu_mul_backward,
}
IMPLS = {"act4_forward": _ACT4_FWD, "act4_backward": _ACT4_BWD, "pack_nibbles": _PACK_NIB,
         "unpack_nibbles": _UNPACK_NIB, "pack_bits": _PACK_BITS, "unpack_bits": _UNPACK_BITS,
         "quantize_int8": _QUANT8, "dequantize_int8": _DEQUANT8, "nf4_matmul": _NF4MM,
         "sketch_gather": _SK_GATHER, "sketch_scatter_add": _SK_SCATTER, "sketch_grad_table": _SK_GRADT,
         "lora_add_": _LORA_ADD, "lora_backward": _LORA_BWD,
         "silu_mul": _SILU_MUL, "silu_mul_backward": _SILU_MUL_BWD}
