"""The lite side branch: a narrow network beside the frozen backbone, fed by pooled hidden states.

At every ``every``-th decoder block's input h_l (B, T, C), the channels are average-pooled in
groups of C/d (parameter-free, no gradient: h_l is detached) and RMS-normalised to p_l (B, T, d).
A residual stream of width d runs beside the backbone::

    s_0 = 0,   s_{j+1} = s_j + W2 · silu(W1 · (s_j + p_j) + b1) + b2

and the last state feeds an up-projection U (d → C, zero at start) that is added to the final
hidden state before the final norm: h_L + U · s. The backbone's last block output is pooled in as
one more p_j, so the side sees the backbone's final state too.

Why it is activation-lean: the side's gradient never enters the backbone (every p_j is detached),
so the backbone stores nothing for it. With bias tuning and prompts off nothing in the backbone
requires grad, so autograd records no backbone node at all: its backward is simply not run. Each
side block saves only its input u_j = s_j + p_j (B, T, d) and recomputes W1·u and silu in
backward (:class:`SideMLP`); the up-projection saves s (B, T, d). Per token:
(n_blocks + 1) · d · dtype bytes, with n_blocks = ceil(L / every) + 1.

The side is position-wise (no mixing across tokens), so cached incremental decoding is exact.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def pool_channels(h: torch.Tensor, dim: int, eps: float = 1e-6) -> torch.Tensor:
    """(B, T, C) -> (B, T, d): average over groups of C/d channels, then RMS-normalised. No parameters."""
    with torch.no_grad():
        c = h.shape[-1]
        if c % dim == 0:
            p = h.reshape(*h.shape[:-1], dim, c // dim).mean(-1)  # (B, T, d)
        else:  # uneven groups: adaptive average pooling over the channel axis
            p = F.adaptive_avg_pool1d(h.reshape(-1, 1, c), dim).reshape(*h.shape[:-1], dim)
        p = p.float()
        p = p * torch.rsqrt(p.pow(2).mean(-1, keepdim=True) + eps)
        return p.to(h.dtype)


class SideMLP(torch.autograd.Function):
    """W2 · silu(W1 u + b1) + b2 for u (N, d) that saves only u and recomputes the hidden in backward."""

    @staticmethod
    def forward(ctx, u, w1, b1, w2, b2):
        a = F.silu(F.linear(u, w1, b1))  # (N, m)
        ctx.save_for_backward(u, w1, b1, w2)
        return F.linear(a, w2, b2)  # (N, d)

    @staticmethod
    def backward(ctx, grad):  # grad (N, d)
        u, w1, b1, w2 = ctx.saved_tensors
        z = F.linear(u, w1, b1)  # (N, m), recomputed
        sig = torch.sigmoid(z)
        a = z * sig
        g2 = grad.reshape(-1, grad.shape[-1])
        dw2 = g2.t() @ a.reshape(-1, a.shape[-1])
        db2 = g2.sum(0)
        da = grad @ w2  # (N, m)
        dz = da * (sig * (1 + z * (1 - sig)))  # silu'(z)
        dz2 = dz.reshape(-1, dz.shape[-1])
        dw1 = dz2.t() @ u.reshape(-1, u.shape[-1])
        db1 = dz2.sum(0)
        du = dz @ w1 if ctx.needs_input_grad[0] else None
        return du, dw1, db1, dw2, db2


def side_mlp_reference(u, w1, b1, w2, b2):
    """Plain-autograd oracle for :class:`SideMLP`."""
    return F.linear(F.silu(F.linear(u, w1, b1)), w2, b2)


class SideBlock(nn.Module):
    """One residual step of the side stream: s + W2 · silu(W1 · (s + p) + b1) + b2."""

    def __init__(self, dim: int, device=None, dtype=None):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim, device=device, dtype=dtype)
        self.fc2 = nn.Linear(dim, dim, device=device, dtype=dtype)

    def forward(self, s: torch.Tensor | None, p: torch.Tensor) -> torch.Tensor:  # (B, T, d)
        u = p if s is None else s + p
        out = SideMLP.apply(u, self.fc1.weight, self.fc1.bias, self.fc2.weight, self.fc2.bias)
        return out if s is None else s + out


class SideBranch(nn.Module):
    """The side network of one model: blocks for the chosen decoder inputs plus the final state, and U."""

    def __init__(self, hidden: int, dim: int, layer_ids: list[int], device=None, dtype=None):
        super().__init__()
        if not 1 <= dim <= hidden:
            raise ValueError(f"side_dim must be in [1, hidden size {hidden}], got {dim}")
        self.dim = dim
        self.layer_ids = list(layer_ids)
        self.blocks = nn.ModuleList(SideBlock(dim, device, dtype) for _ in range(len(layer_ids) + 1))
        self.up = nn.Linear(dim, hidden, bias=False, device=device, dtype=dtype)  # zero: starts at the base
        self._state: torch.Tensor | None = None  # (B, T, d) during one forward

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            d = self.dim
            for b in self.blocks:
                b.fc1.weight.normal_(0.0, d ** -0.5, generator=generator)
                b.fc2.weight.normal_(0.0, 0.5 * d ** -0.5, generator=generator)
                b.fc1.bias.zero_()
                b.fc2.bias.zero_()
            self.up.weight.zero_()

    def absorb(self, slot: int, h: torch.Tensor) -> None:
        """Feed block ``slot`` the pooled (detached) hidden state h (B, T, C); slot 0 starts a new forward."""
        s = None if slot == 0 else self._state
        self._state = self.blocks[slot](s, pool_channels(h.detach(), self.dim))

    def merge(self, h: torch.Tensor) -> torch.Tensor:
        """h (B, T, C) + U · s_final, s_final having also absorbed h itself."""
        self.absorb(len(self.layer_ids), h)
        s, self._state = self._state, None
        return h + self.up(s).to(h.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, layers={self.layer_ids}"


def _hidden_arg(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _side_pre_hook(layer: nn.Module, args, kwargs):
    """forward pre-hook of a decoder layer: give the side branch this block's (detached) input."""
    layer._s2a_side.absorb(layer._s2a_side_slot, _hidden_arg(args, kwargs))


def _side_post_hook(layer: nn.Module, args, kwargs, output):
    """forward hook of the last decoder layer: add the side branch's output to the final hidden state."""
    if isinstance(output, tuple):
        return (layer._s2a_side.merge(output[0]),) + tuple(output[1:])
    return layer._s2a_side.merge(output)


def attach_side(layers: list[nn.Module], side: SideBranch) -> None:
    """Hook ``side`` into the decoder ``layers``. The side is referenced (not registered) on each layer,
    so its parameters have one name; the hooks are module-level functions, so deepcopy keeps them right."""
    for slot, i in enumerate(side.layer_ids):
        object.__setattr__(layers[i], "_s2a_side", side)
        layers[i]._s2a_side_slot = slot
        layers[i].register_forward_pre_hook(_side_pre_hook, with_kwargs=True)
    last = layers[-1]
    object.__setattr__(last, "_s2a_side", side)
    last.register_forward_hook(_side_post_hook, with_kwargs=True)
