"""A frozen NF4 linear layer whose matmul owns its autograd.

Why not ``bitsandbytes.nn.Linear4bit``: on CPU, bitsandbytes 0.50.2 repacks a ``Linear4bit``
weight after one eval / no-grad forward and from then on backpropagates through
``gemv_4bit``, which has no autograd kernel — gradients w.r.t. the input come out silently
wrong. QLoRA needs exactly that gradient (it flows into the LoRA adapters of earlier
layers), so we use bitsandbytes only to quantize / dequantize (``edgetune.quant.nf4``) and
write the matmul ourselves:

* forward: dequantize W (out, in) transiently, ``y = x @ Wᵀ (+ bias)`` in x's dtype;
* backward: re-dequantize W, ``grad_x = grad_y @ W``; no weight / bias gradient (frozen).

Nothing is saved with ``ctx.save_for_backward``: neither x (the weight gets no gradient, so
x is not needed) nor the packed weight (frozen storage is not an activation). ctx keeps a
plain Python reference to the :class:`~edgetune.quant.nf4.NF4Weight`, so
``torch.autograd.graph.saved_tensors_hooks`` sees no tensors at all for this op and
activation-memory accounting stays honest. Forward changes no state, so an eval forward
before training gives bit-identical results.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from edgetune.quant.nf4 import NF4Weight, dequantize_nf4, quantize_nf4

_QUANT_BUFFERS = NF4Weight.TENSOR_NAMES  # packed, absmax, absmax_q, absmax_scale, absmax_code, absmax_offset


class _NF4Matmul(torch.autograd.Function):
    """y = x @ dequant(W)ᵀ + b with a hand-written backward for x only."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, qweight: NF4Weight, bias: Optional[torch.Tensor]) -> torch.Tensor:
        # x: (..., in) -> y: (..., out)
        w = dequantize_nf4(qweight, dtype=x.dtype)  # (out, in), transient
        y = torch.matmul(x, w.t())
        if bias is not None:
            y = y + bias.to(x.dtype)
        ctx.qweight = qweight  # a plain reference, deliberately not save_for_backward
        return y

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        # grad_out: (..., out) -> grad_x: (..., in)
        grad_x = None
        if ctx.needs_input_grad[0]:
            w = dequantize_nf4(ctx.qweight, dtype=grad_out.dtype)  # (out, in)
            grad_x = torch.matmul(grad_out, w)
        return grad_x, None, None


def nf4_linear(x: torch.Tensor, qweight: NF4Weight, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Functional form: ``x (..., in) @ dequant(qweight)ᵀ (in, out) + bias``."""
    return _NF4Matmul.apply(x, qweight, bias)


class NF4Storage(nn.Module):
    """The frozen NF4 buffers of one (rows, cols) matrix, shared by :class:`NF4Linear` and
    :class:`~edgetune.methods.embedding.NF4Embedding`.

    Buffers: ``packed`` (uint8) plus ``absmax`` (float32) or, with ``double_quant``,
    ``absmax_q`` (uint8), ``absmax_scale`` / ``absmax_code`` / ``absmax_offset`` (float32).
    Casting the module (``.to(torch.bfloat16)``, ``.half()``) changes the compute dtype but never
    the quantization statistics, which stay float32 so the weight stays bit-identical.
    """

    def _init_nf4(self, shape: tuple[int, int], blocksize: int, double_quant: bool, device,
                  dtype: Optional[torch.dtype]) -> None:
        self.nf4_shape, self.blocksize, self.double_quant = tuple(shape), blocksize, double_quant
        self.compute_dtype = dtype if dtype is not None else torch.float32
        for name, (buf_shape, buf_dtype) in NF4Weight.tensor_specs(shape, blocksize, double_quant).items():
            self.register_buffer(name, torch.empty(buf_shape, dtype=buf_dtype, device=device))

    def _quantize_into(self, weight: torch.Tensor) -> None:
        """Fill the buffers from a dense weight of ``nf4_shape``."""
        q = quantize_nf4(weight.detach(), self.blocksize, self.double_quant)
        for name, t in q.to_tensors().items():
            setattr(self, name, t.to(weight.device))

    def nf4_weight(self) -> NF4Weight:
        """The quantized weight as an :class:`NF4Weight` viewing this module's buffers (no copy)."""
        return NF4Weight.from_tensors({n: getattr(self, n, None) for n in _QUANT_BUFFERS}, self.nf4_shape,
                                      self.blocksize)

    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The dense weight in ``dtype`` (default: the compute dtype)."""
        return dequantize_nf4(self.nf4_weight(), dtype=dtype or self.compute_dtype)

    def _apply(self, fn, recurse=True):
        # Let .to()/.cuda()/.to_empty() move the quantized buffers, but never change their dtype.
        before = {n: self._buffers[n] for n in _QUANT_BUFFERS if self._buffers.get(n) is not None}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                if new.is_floating_point():
                    self.compute_dtype = new.dtype
                self._buffers[name] = old.to(device=new.device)
        if self._buffers.get("bias") is not None:
            self.compute_dtype = self._buffers["bias"].dtype
        return self


class NF4Linear(NF4Storage):
    """A frozen linear layer stored in NF4 (bitsandbytes layout) as persistent buffers.

    The NF4 buffers of :class:`NF4Storage`, plus ``bias`` (``dtype``) if any. There are no
    parameters: nothing here trains. ``dtype`` is the compute dtype (the bias dtype and
    ``dequantize()``'s default); forward computes in the input's dtype.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, blocksize: int = 64,
                 double_quant: bool = False, device=None, dtype: Optional[torch.dtype] = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self._init_nf4((out_features, in_features), blocksize, double_quant, device, dtype)
        if bias:
            self.register_buffer("bias", torch.empty(out_features, dtype=self.compute_dtype, device=device))  # (out,)
        else:
            self.register_buffer("bias", None)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, blocksize: int = 64,
                    double_quant: bool = False) -> "NF4Linear":
        """Quantize a dense (out, in) weight; the bias is kept as is (frozen, weight's dtype)."""
        out_features, in_features = weight.shape
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        layer = cls(in_features, out_features, bias is not None, blocksize, double_quant,
                    device="meta", dtype=dtype)
        layer._quantize_into(weight)
        if bias is not None:
            layer.bias = bias.detach().to(device=weight.device, dtype=dtype).clone()
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in) -> (..., out)
        return _NF4Matmul.apply(x, self.nf4_weight(), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, dtype={self.compute_dtype}")
