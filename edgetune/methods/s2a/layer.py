"""The S2A activation modules: trainable parameters whose gradients need no stored input.

* :class:`BiasTuned` — y = f(x) + b. dL/db = Σ dY: nothing of x is kept; the frozen f backpropagates
  dY to x through its own (input-free) backward.
* :class:`LowRankPrompt` — h[:, :L] += A·B at a block's input. dA = dP·Bᵀ, dB = Aᵀ·dP with
  dP = Σ_batch dh[:, :L]: again no stored input.
"""
from __future__ import annotations

import torch
from torch import nn


class BiasTuned(nn.Module):
    """A frozen module plus a trainable output bias ``delta_bias`` (zero at start)."""

    def __init__(self, base: nn.Module, features: int, device=None, dtype=None):
        super().__init__()
        self.base = base
        self.delta_bias = nn.Parameter(torch.zeros(features, device=device, dtype=dtype))  # (out,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.delta_bias

    def extra_repr(self) -> str:
        return f"features={self.delta_bias.shape[0]}"


class LowRankPrompt(nn.Module):
    """P = A·B (L, d) added to the first L positions of the hidden states (B, T, d)."""

    def __init__(self, length: int, hidden: int, rank: int, device=None, dtype=None):
        super().__init__()
        self.A = nn.Parameter(torch.zeros(length, rank, device=device, dtype=dtype))  # (L, r)
        self.B = nn.Parameter(torch.empty(rank, hidden, device=device, dtype=dtype))  # (r, d)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            self.A.zero_()  # the prompt starts at zero: training starts at the base model
            self.B.normal_(0.0, self.B.shape[1] ** -0.5, generator=generator)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, T, d)
        length = min(self.A.shape[0], h.shape[1])
        prompt = (self.A[:length] @ self.B).to(h.dtype)  # (L, d)
        pad = h.new_zeros(h.shape[1] - length, h.shape[2])
        return h + torch.cat([prompt, pad], dim=0)


def _prompt_pre_hook(layer: nn.Module, args, kwargs):
    """forward pre-hook of a decoder layer: add its prompt to the incoming hidden states."""
    if args:
        return (layer.s2a_prompt(args[0]),) + tuple(args[1:]), kwargs
    kwargs = dict(kwargs)
    kwargs["hidden_states"] = layer.s2a_prompt(kwargs["hidden_states"])
    return args, kwargs


def attach_prompt(layer: nn.Module, prompt: LowRankPrompt) -> None:
    layer.s2a_prompt = prompt
    layer.register_forward_pre_hook(_prompt_pre_hook, with_kwargs=True)
