"""The LoRA wrapper: any frozen projection plus a trainable low-rank update."""
from __future__ import annotations

import math

import torch
from torch import nn


class LoraLinear(nn.Module):
    """y = base(x) + scaling · dropout(x) Aᵀ Bᵀ.

    ``base`` is any frozen module mapping (..., in) → (..., out): ``nn.Linear``, GPT-2's
    ``Conv1D`` or :class:`~edgetune.methods.qlora.layer.NF4Linear`. Shapes follow PEFT
    (``lora_A`` is (r, in), ``lora_B`` is (out, r)) so export is a rename, not a reshape.
    """

    def __init__(self, base: nn.Module, in_features: int, out_features: int, r: int, alpha: float,
                 dropout: float = 0.0, device=None, dtype=None):
        super().__init__()
        self.base = base
        self.in_features, self.out_features, self.r = in_features, out_features, r
        self.scaling = alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, in_features, device=device, dtype=dtype))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(out_features, r, device=device, dtype=dtype))  # (out, r)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Set by the S2A rewrite: save the LoRA input compressed (edgetune.s2a.functions.Compression).
        self.compression = None

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        # PEFT's default: kaiming-uniform A (a = sqrt(5)), zero B, so training starts at the base.
        bound = 1.0 / math.sqrt(self.in_features)
        with torch.no_grad():
            self.lora_A.uniform_(-bound, bound, generator=generator)
            self.lora_B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, in)
        y = self.base(x)  # (B, T, out)
        x = self.dropout(x)
        if self.compression is not None and torch.is_grad_enabled() and (self.lora_A.requires_grad or x.requires_grad):
            from ...s2a.functions import LeanLoraBranch

            return LeanLoraBranch.apply(x, self.lora_A, self.lora_B, self.scaling, self.compression, y)
        h = x.to(self.lora_A.dtype) @ self.lora_A.t()  # (B, T, r)
        # y + scaling · h Bᵀ in one addmm: no (B, T, out) temporaries for the branch or its scale
        out = torch.addmm(y.reshape(-1, y.shape[-1]).to(h.dtype), h.reshape(-1, self.r), self.lora_B.t(),
                          alpha=self.scaling)  # (B·T, out)
        return out.view(y.shape).to(y.dtype)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, r={self.r}, scaling={self.scaling:g}"
