"""Derivative tables: the optimal piecewise-constant approximation of a nonlinearity's f′.

A pointwise op y = f(x) needs only f′(x) for backward. With ``bits`` bits we keep a code
c(x) ∈ [0, 2^bits) of the input and approximate f′(x) ≈ levels[c(x)], where
``c(x) = #{borders < x}`` (``torch.bucketize``). Borders and levels minimise

    ∫ w(x) (f′(x) − levels[c(x)])² dx

for a weight w that matches the op's real inputs (Few-Bit Backward, arXiv 2202.00441). On a fine
grid the problem is an optimal 1-D segmentation, solved exactly by dynamic programming over
prefix sums; the optimal level of a segment is the weighted mean of f′ on it. Borders come out
sorted by construction.

Tables are fitted offline (``scripts/fit_derivative_tables.py``) and shipped in
``derivative_tables.json``; nothing is fitted at run time.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Callable

import numpy as np
import torch

TABLES_FILE = "derivative_tables.json"


def silu_grad(x: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(x)
    return s * (1 + x * (1 - s))


def gelu_grad(x: torch.Tensor) -> torch.Tensor:
    """d/dx of x·Φ(x) (the erf GELU)."""
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    return cdf + x * pdf


def gelu_tanh_grad(x: torch.Tensor) -> torch.Tensor:
    """d/dx of the tanh approximation 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³)))."""
    k = math.sqrt(2 / math.pi)
    u = k * (x + 0.044715 * x ** 3)
    t = torch.tanh(u)
    return 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * k * (1 + 3 * 0.044715 * x * x)


DERIVATIVES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": silu_grad, "gelu": gelu_grad, "gelu_tanh": gelu_tanh_grad,
}
# grad · f′(x) in one fused aten kernel each: what a backward that holds the exact x uses
# (one pass over memory instead of the five of ``grad * DERIVATIVES[op](x)``).
BACKWARDS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "silu": lambda grad, x: torch.ops.aten.silu_backward(grad, x),
    "gelu": lambda grad, x: torch.ops.aten.gelu_backward(grad, x),
    "gelu_tanh": lambda grad, x: torch.ops.aten.gelu_backward(grad, x, approximate="tanh"),
}
FORWARDS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": torch.nn.functional.silu,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh"),
}


@dataclass(frozen=True)
class DerivativeTable:
    op: str
    bits: int
    borders: torch.Tensor  # float32 (2^bits - 1,), ascending
    levels: torch.Tensor  # float32 (2^bits,)
    source: str = ""  # where the weight w(x) came from

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 codes of x, same shape."""
        return torch.bucketize(x.detach().float(), self.borders.to(x.device)).to(torch.uint8)

    def derivative(self, codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.levels.to(device=codes.device, dtype=dtype)[codes.long()]

    def to_dict(self) -> dict:
        return {"op": self.op, "bits": self.bits, "borders": self.borders.tolist(),
                "levels": self.levels.tolist(), "source": self.source}

    @classmethod
    def from_dict(cls, d: dict) -> "DerivativeTable":
        borders = torch.tensor(d["borders"], dtype=torch.float32)
        levels = torch.tensor(d["levels"], dtype=torch.float32)
        if levels.numel() != 2 ** d["bits"] or borders.numel() != levels.numel() - 1:
            raise ValueError(f"derivative table {d.get('op')}: wrong sizes")
        if not bool((borders[1:] > borders[:-1]).all()):
            raise ValueError(f"derivative table {d.get('op')}: borders are not increasing")
        return cls(d["op"], int(d["bits"]), borders, levels, d.get("source", ""))


def weighted_l2_error(table: DerivativeTable, x: torch.Tensor, w: torch.Tensor) -> float:
    """sqrt(Σ w (f′ − approx)² / Σ w) on sample points x with weights w."""
    exact = DERIVATIVES[table.op](x.double())
    approx = table.derivative(table.encode(x), torch.float64)
    return float(torch.sqrt((w * (exact - approx) ** 2).sum() / w.sum()))


def fit_table(op: str, x: np.ndarray, w: np.ndarray, bits: int = 4, source: str = "") -> DerivativeTable:
    """Exact optimal segmentation of f′ on sorted grid points ``x`` (weights ``w``) into 2^bits levels."""
    order = np.argsort(x)
    x, w = np.asarray(x, np.float64)[order], np.asarray(w, np.float64)[order]
    f = DERIVATIVES[op](torch.from_numpy(x)).numpy()
    n, k_levels = len(x), 2 ** bits
    s0 = np.concatenate([[0.0], np.cumsum(w)])
    s1 = np.concatenate([[0.0], np.cumsum(w * f)])
    s2 = np.concatenate([[0.0], np.cumsum(w * f * f)])
    i = np.arange(n + 1)[:, None]
    j = np.arange(n + 1)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        w_seg = s0[j] - s0[i]
        cost = (s2[j] - s2[i]) - np.where(w_seg > 0, (s1[j] - s1[i]) ** 2 / w_seg, 0.0)
    cost = np.where(j > i, np.maximum(cost, 0.0), np.inf)  # cost[i, j]: points i..j-1 in one segment
    best = cost[0].copy()  # best[j]: points 0..j-1 in one segment
    back = np.zeros((k_levels, n + 1), dtype=np.int64)
    for k in range(1, k_levels):
        total = best[:, None] + cost  # (i, j)
        back[k] = np.argmin(total, axis=0)
        best = total[back[k], np.arange(n + 1)]
    cuts = [n]
    for k in range(k_levels - 1, 0, -1):
        cuts.append(int(back[k][cuts[-1]]))
    cuts = cuts[::-1]  # segment k covers points cuts[k-1]..cuts[k]-1, with cuts[-1] = 0
    starts = [0] + cuts[:-1]
    levels = [(s1[e] - s1[s]) / (s0[e] - s0[s]) if s0[e] > s0[s] else 0.0 for s, e in zip(starts, cuts)]
    borders = [0.5 * (x[e - 1] + x[e]) for e in cuts[:-1]]
    return DerivativeTable(op, bits, torch.tensor(borders, dtype=torch.float32),
                           torch.tensor(levels, dtype=torch.float32), source)


@lru_cache(maxsize=None)
def shipped_tables() -> dict[str, DerivativeTable]:
    text = resources.files("edgetune.s2a").joinpath(TABLES_FILE).read_text()
    return {name: DerivativeTable.from_dict(d) for name, d in json.loads(text).items()}


def table_for(op: str, bits: int = 4) -> DerivativeTable:
    key = f"{op}@{bits}"
    tables = shipped_tables()
    if key not in tables:
        raise KeyError(f"no shipped derivative table for {op} at {bits} bits (have {', '.join(sorted(tables))})")
    return tables[key]
