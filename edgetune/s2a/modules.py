"""Drop-in modules that route their op through a compressed-saving Function.

Each keeps the parameters of the module it replaces under the same names (``weight``,
``bias``, ``gate_proj`` ...), so state dicts, PEFT export and artifact loading see no change.
Outside autograd (no grad, or nothing requires grad) they run the plain op: compression only
pays when something will be saved.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .functions import (Compression, LeanGatedProduct, LeanLayerNorm, LeanRMSNorm, gated, lean_pointwise)
from .tables import FORWARDS


def _recording(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class LeanRMSNormModule(nn.Module):
    """Llama/Qwen2 RMSNorm whose backward keeps an 8-bit copy of the input and 1/rms per row."""

    def __init__(self, weight: nn.Parameter, eps: float, comp: Compression):
        super().__init__()
        self.weight, self.variance_epsilon, self.comp = weight, eps, comp

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., C)
        if not _recording(x, self.weight):
            h = x.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return self.weight * h.to(x.dtype)
        return LeanRMSNorm.apply(x, self.weight, self.variance_epsilon, self.comp)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, act_bits={self.comp.act_bits}"


class LeanLayerNormModule(nn.Module):
    """LayerNorm over the last dimension keeping an 8-bit input plus per-row mean and 1/std."""

    def __init__(self, weight, bias, eps: float, comp: Compression):
        super().__init__()
        self.weight, self.bias, self.eps, self.comp = weight, bias, eps, comp
        self.normalized_shape = (weight.shape[0],) if weight is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _recording(x, self.weight, self.bias):
            return F.layer_norm(x, x.shape[-1:], self.weight, self.bias, self.eps)
        return LeanLayerNorm.apply(x, self.weight, self.bias, self.eps, self.comp)

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, act_bits={self.comp.act_bits}"


class LeanActivation(nn.Module):
    """A pointwise nonlinearity saving a 4-bit derivative code (act-bits 4), 8 bits, or 1 bit (ReLU)."""

    def __init__(self, op: str, comp: Compression):
        super().__init__()
        self.op, self.comp = op, comp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _recording(x):
            return torch.relu(x) if self.op == "relu" else FORWARDS[self.op](x)
        return lean_pointwise(x, self.op, self.comp)

    def extra_repr(self) -> str:
        return f"op={self.op}, act_bits={self.comp.act_bits}"


class LeanGatedMLP(nn.Module):
    """down(f(gate(x)) · up(x)) with the gated product saved compressed (see LeanGatedProduct)."""

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module, op: str, comp: Compression):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj
        self.op, self.comp = op, comp

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        g, u = self.gate_proj(x), self.up_proj(x)  # (B, T, F) each
        if not _recording(g, u):
            return self.down_proj(gated(g, u, self.op))
        return self.down_proj(LeanGatedProduct.apply(g, u, self.op, self.comp))

    def extra_repr(self) -> str:
        return f"op={self.op}, act_bits={self.comp.act_bits}"
