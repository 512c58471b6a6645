"""Pictures for people: the planner's memory breakdown as a stacked bar (matplotlib, offscreen)."""
from __future__ import annotations

import os
from pathlib import Path


def plot_plan(plan, out: str | os.PathLike, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gib = 2**30
    fig, ax = plt.subplots(figsize=(5, 4.5), dpi=100)
    bottom = 0.0
    for name, n in plan.components.items():
        ax.bar([plan.device], [n / gib], bottom=bottom, label=name)
        bottom += n / gib
    ax.axhline(plan.budget_bytes / gib, color="black", ls="--", lw=1, label="usable memory")
    ax.set_ylabel("GiB")
    ax.set_title(title or plan.device, fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
