"""Aggregating client adapters: exact for low-rank LoRA updates, FedAvg for plain tensors.

LoRA (``lora_A`` (r, in), ``lora_B`` (out, r), update ΔW = s·B·A with s = alpha/r)
--------------------------------------------------------------------------------------
Averaging A and B separately is wrong: mean(B)·mean(A) ≠ mean(B·A). The server instead averages
the *products*, weighted by example counts,

    ΔW = Σ_k w_k · s·B_k·A_k,   w_k = n_k / Σ n_j,

and re-factors ΔW to rank r with a truncated SVD, ΔW ≈ U_r Σ_r V_rᵀ (Eckart–Young: the best
rank-r approximation in Frobenius and spectral norm). When the clients' updates together have
rank ≤ r (e.g. identical clients, or clients whose A's span the same row space) the result is
exact.

ΔW is never formed densely: it equals B_cat·A_cat with B_cat = [w_1 s B_1 … w_K s B_K]
(out, K·r) and A_cat = [A_1; …; A_K] (K·r, in), so two thin QRs and the SVD of a (K·r, K·r)
core give the same singular triplets in O((out + in)·(K·r)²) — milliseconds per projection
instead of a dense (out, in) SVD (the dense path is used only when K·r exceeds out or in).

How ΔW_r is split back into factors (any split has the same product): A's rows are the right
singular vectors scaled to ``A_ROW_NORM`` (the row norm of PEFT's kaiming-uniform initial A),
and B = U_r Σ_r / (s·A_ROW_NORM) carries the magnitudes. So the next round starts in the same
regime as a fresh LoRA (A at its initial scale, B small), and a direction with σ = 0 still has a
live A row (its B column is zero, and gets a gradient), which a balanced √σ split would kill.

Everything else (sketch-table deltas, S2A modules, any trainable tensor that is not a LoRA pair)
is averaged element-wise with the same weights (FedAvg). All arithmetic is float64; results
come back in each tensor's dtype.
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

from ..errors import EdgetuneError

A_SUFFIX, B_SUFFIX = ".lora_A", ".lora_B"
# Row norm of PEFT's initial lora_A (kaiming-uniform, a=√5: entries U(±1/√in), variance 1/(3·in)).
A_ROW_NORM = 1.0 / math.sqrt(3.0)


def split_lora(names) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """``{module path: (A key, B key)}`` for every complete LoRA pair, and the other keys."""
    names = set(names)
    pairs, others = {}, []
    for name in sorted(names):
        if name.endswith(A_SUFFIX):
            module = name[: -len(A_SUFFIX)]
            if module + B_SUFFIX in names:
                pairs[module] = (name, module + B_SUFFIX)
                continue
        if name.endswith(B_SUFFIX) and name[: -len(B_SUFFIX)] + A_SUFFIX in names:
            continue
        others.append(name)
    return pairs, others


def delta_w(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The dense update s·B·A (out, in) of one LoRA pair, in float64."""
    return scaling * (b.double() @ a.double())


def normalized_weights(counts: Sequence[float]) -> list[float]:
    if not counts:
        raise EdgetuneError("nothing to aggregate: no client adapters")
    if any(not (c > 0 and math.isfinite(c)) for c in counts):
        raise EdgetuneError(f"example counts must be positive, got {list(counts)}")
    total = float(sum(counts))
    return [c / total for c in counts]


def _svd_of_sum(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], weights: Sequence[float], scaling: float):
    """Singular triplets (U, S, V) of Σ_k w_k s B_k A_k, without forming it when it is cheaper not to."""
    b_cat = torch.cat([w * scaling * b.double() for (a, b), w in zip(pairs, weights)], dim=1)  # (out, K·r)
    a_cat = torch.cat([a.double() for a, _ in pairs], dim=0)  # (K·r, in)
    out_f, kr = b_cat.shape
    in_f = a_cat.shape[1]
    if kr <= min(out_f, in_f):
        q_b, r_b = torch.linalg.qr(b_cat)  # (out, Kr), (Kr, Kr)
        q_a, r_a = torch.linalg.qr(a_cat.t())  # (in, Kr), (Kr, Kr)
        u, s, vh = torch.linalg.svd(r_b @ r_a.t())  # core (Kr, Kr)
        return q_b @ u, s, q_a @ vh.t()  # (out, Kr), (Kr,), (in, Kr)
    u, s, vh = torch.linalg.svd(b_cat @ a_cat, full_matrices=False)
    return u, s, vh.t()


def aggregate_lora(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], weights: Sequence[float],
                   scaling: float, r: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The rank-r (A, B) whose s·B·A is the best rank-r approximation of Σ_k w_k s B_k A_k."""
    a0, b0 = pairs[0]
    r = r or a0.shape[0]
    for a, b in pairs:
        if a.shape != a0.shape or b.shape != b0.shape:
            raise EdgetuneError(f"LoRA shapes differ between clients: {tuple(a.shape)}/{tuple(b.shape)} vs "
                                f"{tuple(a0.shape)}/{tuple(b0.shape)}")
    u, s, v = _svd_of_sum(pairs, weights, scaling)
    if u.shape[1] < r:
        raise EdgetuneError(f"rank {r} is beyond the projection's size {tuple(b0.shape[:1] + a0.shape[1:])}")
    u, s, v = u[:, :r], s[:r], v[:, :r]
    a = A_ROW_NORM * v.t()  # (r, in): orthogonal rows of norm A_ROW_NORM
    b = u * (s / (scaling * A_ROW_NORM))  # (out, r)
    return a.to(a0.dtype), b.to(b0.dtype)


def fedavg(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Σ_k w_k T_k (element-wise), in the first tensor's dtype."""
    t0 = tensors[0]
    for t in tensors:
        if t.shape != t0.shape:
            raise EdgetuneError(f"tensor shapes differ between clients: {tuple(t.shape)} vs {tuple(t0.shape)}")
    out = sum(w * t.double() for t, w in zip(tensors, weights))
    return out.to(t0.dtype)


def aggregate(clients: Sequence[Mapping[str, torch.Tensor]], counts: Sequence[float], scaling: float,
              r: int | None = None) -> dict[str, torch.Tensor]:
    """Aggregate full trainable-tensor dicts (same keys on every client), weighted by ``counts``.

    LoRA pairs (``<module>.lora_A`` / ``<module>.lora_B``) are aggregated by their products
    (:func:`aggregate_lora`); every other tensor by FedAvg (:func:`fedavg`).
    """
    weights = normalized_weights(counts)
    keys = set(clients[0])
    for c in clients[1:]:
        if set(c) != keys:
            missing = sorted(keys ^ set(c))[:3]
            raise EdgetuneError(f"client adapters hold different tensors (e.g. {missing})")
    pairs, others = split_lora(keys)
    out: dict[str, torch.Tensor] = {}
    for module, (ka, kb) in pairs.items():
        out[ka], out[kb] = aggregate_lora([(c[ka], c[kb]) for c in clients], weights, scaling, r)
    for key in others:
        out[key] = fedavg([c[key] for c in clients], weights)
    return out
