"""What a person watching a run sees: a progress bar, metrics.jsonl and a loss curve PNG."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch


def rss_mib() -> float:
    """Resident memory of this process (what the OOM killer looks at), in MiB."""
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:  # pragma: no cover - psutil is a dependency
        return float("nan")


def memory_label() -> str:
    if torch.cuda.is_initialized():
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB GPU"
    return f"{rss_mib() / 1024:.2f} GiB RSS"


def _parse_line(line: str) -> dict | None:
    """One metrics record, or None for a blank line or one torn by a kill mid-write."""
    if not line.strip():
        return None
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


class MetricsLog:
    """Append-only JSONL, flushed per line so a killed run keeps every step it finished."""

    def __init__(self, path: Path, truncate_after_step: int | None = None):
        self.path = path
        if truncate_after_step is not None and path.exists():
            # On resume, drop lines past the checkpoint (and any torn line) so steps are not duplicated.
            kept = []
            for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
                record = _parse_line(line)
                if record is not None and record["step"] <= truncate_after_step:
                    kept.append(line)
            path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        self._f = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def sync(self) -> None:
        """Flush to the disk itself (before a checkpoint copies the file)."""
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()


def read_metrics(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = (_parse_line(line) for line in path.read_text(encoding="utf-8", errors="replace").splitlines())
    return [r for r in records if r is not None]


def plot_loss(metrics: list[dict], out: Path, title: str = "training loss") -> None:
    if not metrics:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    loss = [m["loss"] for m in metrics]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, loss, lw=1, alpha=0.5, label="loss")
    if len(loss) >= 5:
        k = max(2, len(loss) // 10)
        smooth = [sum(loss[max(0, i - k + 1): i + 1]) / len(loss[max(0, i - k + 1): i + 1]) for i in range(len(loss))]
        ax.plot(steps, smooth, lw=2, label=f"mean of {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)


def make_progress(enabled: bool = True):
    """A rich progress bar with loss, tokens/s and memory fields; disabled when not a terminal."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
        TextColumn("{task.fields[mem]}"), TimeRemainingColumn(),
        console=console, disable=not enabled or not (sys.stderr.isatty() or os.environ.get("EDGETUNE_PROGRESS")),
        transient=False,
    )
