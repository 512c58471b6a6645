"""The ``reference`` backend: pure torch, always present, the oracle every other backend is tested against.

Each function here has exactly the signature of its op in :mod:`edgetune.kernels.ops` and calls
the existing reference code (``edgetune.quant.actpack``'s ``*_reference`` functions,
``edgetune.quant.nf4``, the SketchTune layer's index rule) wherever it exists.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from edgetune.quant import actpack

ACT_FORWARDS = {  # identical to edgetune.s2a.tables.FORWARDS
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
}
ACT_IDS = {"silu": 0, "gelu": 1, "gelu_tanh": 2}


def act4_forward(x: torch.Tensor, borders: torch.Tensor, op: str) -> tuple[torch.Tensor, torch.Tensor]:
    codes = torch.bucketize(x.detach().float(), borders.to(device=x.device, dtype=torch.float32)).to(torch.uint8)
    return ACT_FORWARDS[op](x), actpack.pack_nibbles_reference(codes)


def act4_backward(grad: torch.Tensor, packed: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    codes = actpack.unpack_nibbles_reference(packed, grad.numel()).view(grad.shape)
    return grad * levels.to(device=grad.device, dtype=grad.dtype)[codes.long()]


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    return actpack.pack_nibbles_reference(codes)


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    return actpack.unpack_nibbles_reference(packed, numel).clone()


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    return actpack.pack_bits_reference(mask)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    return actpack.unpack_bits_reference(packed, numel).clone()


def quantize_int8(x: torch.Tensor, group: int, noise: Optional[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """``quantize_int8_groups_reference`` with the uniform [0, 1) noise of stochastic rounding passed in.

    ``noise=torch.rand((G, group), generator=g)`` gives exactly the reference's stochastic codes
    for the same generator state.
    """
    flat = x.detach().reshape(-1).float()
    pad = (-flat.numel()) % group
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    g = flat.view(-1, group)
    lo = g.amin(dim=1, keepdim=True)
    hi = g.amax(dim=1, keepdim=True)
    scale = (hi - lo) / 255.0
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    v = (g - lo) * inv
    v = torch.floor(v + noise.to(v.dtype).view_as(v)) if noise is not None else torch.round(v)
    return v.clamp_(0, 255).to(torch.uint8), lo, scale


def dequantize_int8(codes: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor, numel: int,
                    dtype: torch.dtype) -> torch.Tensor:
    return (codes.float() * scale.float().reshape(-1, 1) + lo.float().reshape(-1, 1)).reshape(-1)[:numel].to(dtype).clone()


def nf4_matmul(x: torch.Tensor, packed: torch.Tensor, absmax: torch.Tensor, out_features: int, in_features: int,
               blocksize: int, transposed: bool) -> torch.Tensor:
    from edgetune.quant.nf4 import dequantize_nf4_reference

    w = dequantize_nf4_reference(packed, absmax, (out_features, in_features), blocksize, x.dtype)
    return torch.matmul(x, w) if transposed else torch.matmul(x, w.t())


def silu_mul(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(g) * u


def silu_mul_backward(dy: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dY·u·silu′(g), dY·silu(g)): the gated product's input gradients."""
    return torch.ops.aten.silu_backward(dy * u, g), dy * torch.nn.functional.silu(g)


def _index(codes: torch.Tensor, bits: int, in_features: int, groups_per_row: int) -> torch.Tensor:
    from edgetune.methods.sketchtune.layer import gather_index

    return gather_index(codes, bits, in_features, groups_per_row)


def sketch_gather(table: torch.Tensor, codes: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    out_f, gpr, k = table.shape
    return table.reshape(out_f, gpr * k).gather(1, _index(codes, bits, in_features, gpr))


def sketch_scatter_add(grad_w: torch.Tensor, codes: torch.Tensor, bits: int, groups_per_row: int) -> torch.Tensor:
    out_f, in_f = grad_w.shape
    acc = torch.promote_types(grad_w.dtype, torch.float32)
    out = torch.zeros(out_f, groups_per_row * (1 << bits), dtype=acc, device=grad_w.device)
    out.scatter_add_(1, _index(codes, bits, in_f, groups_per_row), grad_w.to(acc))
    return out.view(out_f, groups_per_row, 1 << bits)


def sketch_grad_table(dy: torch.Tensor, x: torch.Tensor, codes: torch.Tensor, bits: int,
                      groups_per_row: int) -> torch.Tensor:
    out_f, in_f = dy.shape[-1], x.shape[-1]
    g2 = dy.reshape(-1, out_f)
    grad_w = g2.t() @ x.reshape(-1, in_f).to(g2.dtype)
    return sketch_scatter_add(grad_w, codes, bits, groups_per_row)


def lora_add_(y: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scale: float) -> torch.Tensor:
    """The oracle, the plain formula with its temporaries: y += (scale · h Bᵀ) in y's dtype."""
    h = x.reshape(-1, x.shape[-1]).to(A.dtype) @ A.t()  # (N, r)
    y.add_(((h @ B.t()) * scale).view(y.shape).to(y.dtype))
    return h


def lora_backward(dy: torch.Tensor, x: torch.Tensor, h: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                  scale: float, grad_x: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    g2 = dy.reshape(-1, dy.shape[-1]).to(A.dtype)  # (N, out)
    dh = (g2 @ B) * scale  # (N, r)
    dB = (g2.t() @ h.reshape(-1, h.shape[-1])) * scale  # (out, r)
    dA = dh.t() @ x.reshape(-1, x.shape[-1]).to(A.dtype)  # (r, in)
    if grad_x is not None:
        grad_x.add_((dh @ A).view(grad_x.shape).to(grad_x.dtype))
    return dA, dB
