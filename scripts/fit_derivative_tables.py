"""Fit the shipped derivative tables (edgetune/s2a/derivative_tables.json).

SiLU's weight w(x) is the real distribution of SiLU inputs (the gate projections' outputs) of
the embedded default model on the shipped calibration text; the GELU tables use a standard
normal weight, because no GELU model ships with edgetune (ViT/GPT-2 pre-activations after
their LayerNorm-fed projections are close to that). 4-bit tables for act-bits 4; 2- and 3-bit
ones are fitted too for experiments.

    python scripts/fit_derivative_tables.py [--out edgetune/s2a/derivative_tables.json]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from edgetune.s2a.tables import fit_table, weighted_l2_error

EDGES = np.linspace(-24.0, 24.0, 4801)  # 0.01-wide bins


def silu_input_histogram(max_tokens: int) -> np.ndarray:
    from edgetune.api import load
    from edgetune.cli import shipped_data

    model, tokenizer = load("default")
    model.eval()
    text = shipped_data("calib.txt").read_text()
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :max_tokens]
    counts = np.zeros(len(EDGES) - 1)

    def hook(_module, _inp, out):
        counts[:] += np.histogram(out.detach().float().clamp(EDGES[0], EDGES[-1]).numpy(), EDGES)[0]

    handles = [layer.mlp.gate_proj.register_forward_hook(hook) for layer in model.model.layers]
    with torch.no_grad():
        for start in range(0, ids.shape[1], 512):
            model(input_ids=ids[:, start:start + 512])
    for h in handles:
        h.remove()
    return counts


def grid_from_counts(counts: np.ndarray, tail: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """Bin centres and weights, trimmed to the central (1 - 2·tail) mass and thinned to ~1200 points."""
    centres = 0.5 * (EDGES[1:] + EDGES[:-1])
    cdf = np.cumsum(counts) / counts.sum()
    keep = (cdf >= tail) & (cdf <= 1 - tail)
    x, w = centres[keep], counts[keep]
    step = max(1, len(x) // 1200)
    n = len(x) // step * step
    return x[:n].reshape(-1, step).mean(1), w[:n].reshape(-1, step).sum(1) + 1e-12


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "edgetune/s2a/derivative_tables.json"))
    ap.add_argument("--max-tokens", type=int, default=4096)
    args = ap.parse_args()
    tables = {}
    counts = silu_input_histogram(args.max_tokens)
    xs, ws = grid_from_counts(counts)
    normal_x = np.linspace(-6, 6, 1201)
    normal_w = np.exp(-0.5 * normal_x ** 2)
    sources = {
        "silu": (xs, ws, f"SmolLM2-135M gate_proj outputs on calib.txt ({int(counts.sum())} values)"),
        "gelu": (normal_x, normal_w, "standard normal"),
        "gelu_tanh": (normal_x, normal_w, "standard normal"),
    }
    for op, (x, w, source) in sources.items():
        for bits in (2, 3, 4):
            t = fit_table(op, x, w, bits, source)
            err = weighted_l2_error(t, torch.from_numpy(x), torch.from_numpy(w))
            tables[f"{op}@{bits}"] = {**t.to_dict(), "weighted_l2_error": err}
            print(f"{op}@{bits}: weighted L2 error of f' {err:.4f}  borders {t.borders.numel()}")
    Path(args.out).write_text(json.dumps(tables, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
