"""The torch training loop: AdamW over the trainable parameters only, checkpointed and resumable.

A run directory holds ``metrics.jsonl`` (one object per step), ``loss.png``, ``checkpoints/``,
the final ``trainable.safetensors`` and a manifest that points back at the compiled artifact.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..compiler import trainable_parameters
from ..errors import EdgetuneError
from ..manifest import write_manifest
from ..tensors import save_tensors
from .checkpoint import load_latest_checkpoint, optimizer_from_tensors, save_checkpoint
from .report import MetricsLog, make_progress, memory_label, plot_loss, read_metrics, rss_mib


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM (what a service manager sends) checkpoints and exits like Ctrl-C does."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _help(text, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass(frozen=True)
class TrainConfig:
    steps: int | None = _help("optimizer steps to run (or give epochs)", default=None)
    epochs: float | None = _help("passes over the data (used when steps is not given)", default=None)
    batch: int = _help("sequences per step", default=4)
    seq_len: int = _help("tokens per sequence (packed)", default=256)
    lr: float = _help("peak learning rate (AdamW)", default=2e-4)
    warmup_steps: int | None = _help("linear warmup steps (default: 5% of steps, at least 1)", default=None)
    weight_decay: float = _help("AdamW weight decay", default=0.0)
    grad_clip: float = _help("clip the global gradient norm to this (0: off)", default=1.0)
    seed: int = _help("seed for data order and dropout", default=0)
    save_every: int = _help("checkpoint every N steps (0: only at the end)", default=50)
    keep: int = _help("how many checkpoints to keep", default=2)

    def __post_init__(self):
        if self.batch < 1 or self.seq_len < 2:
            raise EdgetuneError("--batch must be >= 1 and --seq-len >= 2")
        if self.steps is not None and self.steps < 1:
            raise EdgetuneError("--steps must be >= 1")
        if self.epochs is not None and self.epochs <= 0:
            raise EdgetuneError("--epochs must be > 0")
        if self.lr <= 0:
            raise EdgetuneError("--lr must be > 0")

    def total_steps(self, n_rows: int) -> int:
        if self.steps is not None:
            return self.steps
        per_epoch = math.ceil(n_rows / self.batch)
        return max(1, math.ceil(per_epoch * (self.epochs if self.epochs is not None else 1.0)))


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak (step counts from 1)."""
    if step <= warmup:
        return peak * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    first_loss: float
    last_loss: float
    metrics: list[dict]


def train_model(model: nn.Module, dataset, config: TrainConfig, run_dir: Path, *, resume: bool = False,
                run_info: dict | None = None, progress: bool = True) -> TrainResult:
    """Train ``model``'s trainable parameters on ``dataset`` (a TokenDataset), writing ``run_dir``."""
    from .data import BatchIterator

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    params = trainable_parameters(model)
    if not params:
        raise EdgetuneError("the model has no trainable parameters")
    device = next(iter(params.values())).device
    total = config.total_steps(len(dataset))
    warmup = config.warmup_steps if config.warmup_steps is not None else max(1, total // 20)
    optimizer = torch.optim.AdamW(list(params.values()), lr=config.lr, weight_decay=config.weight_decay)
    batches = BatchIterator(dataset, config.batch, config.seed)

    start = 0
    torch.manual_seed(config.seed)
    if resume:
        ckpt = load_latest_checkpoint(run_dir, warn=lambda m: print(m, file=sys.stderr))
        if ckpt is not None:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(ckpt["params"][name])
            optimizer_from_tensors(optimizer, ckpt["optimizer"], ckpt["state"]["optimizer"])
            torch.set_rng_state(ckpt["rng"]["torch"])
            batches.load_state(ckpt["state"]["data"])
            start = ckpt["state"]["step"]
    log = MetricsLog(run_dir / "metrics.jsonl", truncate_after_step=start if resume else 0)

    model.train()
    tty = sys.stderr.isatty()
    t_last = time.perf_counter()
    done_step, done_data = start, batches.state()  # the last fully applied step
    with make_progress(progress) as bar, _sigterm_as_interrupt():
        task = bar.add_task("train", total=total, completed=start, loss="-", tps="-", mem=memory_label())
        try:
            for step in range(start + 1, total + 1):
                batch = {k: v.to(device) for k, v in next(batches).items()}  # (B, T) each
                lr = lr_at(step, total, config.lr, warmup)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss = model(**batch).loss
                if not torch.isfinite(loss):
                    raise EdgetuneError(f"loss became {loss.item()} at step {step}; lower --lr")
                loss.backward()
                if config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(list(params.values()), config.grad_clip)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                done_step, done_data = step, batches.state()
                now = time.perf_counter()
                n_tokens = batch["input_ids"].numel()
                record = {"step": step, "loss": loss.item(), "lr": lr,
                          "tokens_per_s": n_tokens / max(now - t_last, 1e-9), "tokens": n_tokens,
                          "rss_mib": round(rss_mib(), 1)}
                t_last = now
                log.write(record)
                bar.update(task, advance=1, loss=f"{record['loss']:.4f}",
                           tps=f"{record['tokens_per_s']:.0f}", mem=memory_label())
                if progress and not tty and (step % 10 == 0 or step == total):
                    print(f"step {step}/{total} loss {record['loss']:.4f} "
                          f"{record['tokens_per_s']:.0f} tok/s {memory_label()}", file=sys.stderr)
                if config.save_every and step % config.save_every == 0 and step < total:
                    save_checkpoint(run_dir, step, params, optimizer, {"data": done_data}, config.keep)
        except KeyboardInterrupt:
            if done_step > start:
                save_checkpoint(run_dir, done_step, params, optimizer, {"data": done_data}, config.keep)
            log.close()
            raise EdgetuneError(f"interrupted after step {done_step}; continue with the same command "
                                f"plus --resume") from None
    log.close()
    model.eval()

    save_tensors(params, run_dir / "trainable.safetensors")
    metrics = read_metrics(run_dir / "metrics.jsonl")
    plot_loss(metrics, run_dir / "loss.png")
    summary = {"steps": total, "first_loss": metrics[0]["loss"] if metrics else None,
               "last_loss": metrics[-1]["loss"] if metrics else None}
    write_manifest(run_dir, "run", {"train_config": dataclasses.asdict(config), "summary": summary,
                                    **(run_info or {})})
    return TrainResult(run_dir, total, summary["first_loss"], summary["last_loss"], metrics)
