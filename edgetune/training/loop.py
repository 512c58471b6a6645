"""The torch training loop: AdamW over the trainable parameters only, checkpointed and resumable.

A run directory holds ``metrics.jsonl`` (one object per step), ``loss.png``, ``checkpoints/``,
the final ``trainable.safetensors`` and a manifest that points back at the compiled artifact.

Crash safety, and what a resume guarantees:

* **When checkpoints are written.** After every ``save_every``-th step, and also after any step
  that ends more than ``save_interval_s`` seconds after the last checkpoint (the time rule, so a
  slow device never loses more than that much work whatever ``save_every`` is), and when the run
  is interrupted. Each one is atomic (see :mod:`edgetune.training.checkpoint`); the newest ``keep``
  are kept. Writing a checkpoint reads state and changes none, so *when* they are written never
  changes the result.
* **Bitwise resume.** A checkpoint holds the trainable parameters, the AdamW state (its step
  counts are tensors too), the RNG state as it was at the end of the step (dropout draws from
  it), the data position and the step; the learning rate is a function of the step. ``--resume``
  continues from the newest valid checkpoint and, on the same machine and torch build, ends with
  exactly the parameters of an uninterrupted run, having seen each batch exactly once.
  ``metrics.jsonl`` is restored from the checkpoint's copy, so each step appears once.
  A resume with different training options or data is refused (only ``save_every``,
  ``save_interval_s`` and ``keep`` may change).
* **SIGINT / SIGTERM** finish the current step, write a checkpoint and exit with a one-line
  message saying how to resume (exit code 130). A second signal aborts at once; the checkpoint
  of the last step that completed is still written unless the signal landed inside the optimizer
  update.
* **Out of memory** (CUDA OOM, ``MemoryError``, torch's CPU allocator) and **out of disk** end the
  run with a one-line message; a failed checkpoint write leaves the previous checkpoint intact.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..compiler import trainable_parameters
from ..errors import ArtifactError, EdgetuneError
from ..fsutil import DiskFull, atomic_file, disk_full_error, is_disk_full
from ..manifest import read_manifest, write_manifest
from ..models.loader import IMAGE_CLASSIFICATION, model_task
from ..s2a.loss import causal_lm_loss
from ..tensors import save_tensors
from .checkpoint import (CKPT_DIR, METRICS_FILE, list_checkpoints, load_latest_checkpoint, optimizer_from_tensors,
                         remove_torn_checkpoints, rng_state, save_checkpoint, set_rng_state)
from .report import MetricsLog, make_progress, memory_label, plot_loss, read_metrics, rss_mib

# Options that do not change the result, so a resume may use other values.
RESUME_NEUTRAL = ("save_every", "save_interval_s", "keep")
LOCK_FILE = ".edgetune.lock"


class TrainingInterrupted(EdgetuneError):
    """SIGINT/SIGTERM stopped a run after its checkpoint was written; ``--resume`` continues it."""

    exit_code = 130


class _Interrupts:
    """SIGINT and SIGTERM (what a service manager sends) are noted and acted on between steps.

    Acting on them inside a step could checkpoint half-updated parameters; a second signal does
    raise ``KeyboardInterrupt`` at once, for a user who really wants out.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous = {}

    def _handler(self, signum, frame):
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "interrupt"

    def __enter__(self):
        try:
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handler)
        except ValueError:  # not the main thread: leave signals alone
            pass
        return self

    def __exit__(self, *exc):
        for s, previous in self._previous.items():
            signal.signal(s, previous)
        return False


def _raise_disk_full(exc: OSError, run_dir: Path, hint: str):
    """Re-raise a full disk as a one-line error that says how to resume; anything else as it was."""
    if isinstance(exc, DiskFull):
        raise DiskFull(f"{exc}; {hint}") from None
    if is_disk_full(exc):
        raise disk_full_error(run_dir, exc, hint) from None
    raise exc


@contextlib.contextmanager
def _run_lock(run_dir: Path):
    """Only one process trains into a run directory at a time (the kernel drops the lock on a kill)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise EdgetuneError(f"another edgetune process is training into {run_dir}") from None
        yield
    finally:
        os.close(fd)


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
    save_every: int = _help("checkpoint every N steps (0: only by time and on interrupt)", default=50)
    save_interval_s: float = _help("also checkpoint when this many seconds passed since the last one (0: off)",
                                   default=600.0)
    keep: int = _help("how many checkpoints to keep (0: all)", default=2)

    def __post_init__(self):
        if self.batch < 1 or self.seq_len < 2:
            raise EdgetuneError("--batch must be >= 1 and --seq-len >= 2")
        if self.steps is not None and self.steps < 1:
            raise EdgetuneError("--steps must be >= 1")
        if self.epochs is not None and not (0 < self.epochs < 1e9):
            raise EdgetuneError("--epochs must be > 0 (and finite)")
        if not (0 < self.lr < math.inf):
            raise EdgetuneError("--lr must be > 0 (and finite)")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise EdgetuneError("--warmup-steps must be >= 0")
        if not (0 <= self.weight_decay < math.inf):
            raise EdgetuneError("--weight-decay must be >= 0 (and finite)")
        if not (0 <= self.grad_clip < math.inf):
            raise EdgetuneError("--grad-clip must be >= 0 (and finite)")
        if self.save_every < 0 or self.keep < 0:
            raise EdgetuneError("--save-every and --keep must be >= 0")
        if not self.save_interval_s >= 0:
            raise EdgetuneError("--save-interval-s must be >= 0")

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


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, (MemoryError, getattr(torch, "OutOfMemoryError", MemoryError))):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())


def oom_advice(config: TrainConfig, model: nn.Module | None = None) -> str:
    """What to change after an out-of-memory error, from the planner where it has a formula."""
    from ..planner import format_bytes, plan_for_model

    try:
        plan = plan_for_model(model, config.batch, config.seq_len) if model is not None else None
    except EdgetuneError:
        plan = None
    if plan is not None and not plan.fits and plan.suggestion:
        return (f"the plan agrees: it needs {format_bytes(plan.total_bytes)} of {format_bytes(plan.budget_bytes)}; "
                f"{plan.suggestion}")
    tips = []
    if config.batch > 1:
        tips.append(f"--batch {max(1, config.batch // 2)}")
    if config.seq_len > 16:
        tips.append(f"--seq-len {config.seq_len // 2}")
    advice = ("lower " + " or ".join(tips)) if tips else "use a smaller model or a lower-memory recipe (qlora)"
    if plan is not None:
        advice += (f" (the plan for {plan.device} expected {format_bytes(plan.total_bytes)} of "
                   f"{format_bytes(plan.budget_bytes)}: less memory is free than the device profile assumes)")
    return advice


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    first_loss: float
    last_loss: float
    metrics: list[dict]


def _config_dict(config: TrainConfig) -> dict:
    return json.loads(json.dumps({k: v for k, v in dataclasses.asdict(config).items() if k not in RESUME_NEUTRAL}))


def _check_resumable(ckpt: dict, config: TrainConfig, identity: dict) -> None:
    where = ckpt["path"]
    saved = ckpt["state"].get("config")
    if isinstance(saved, dict):
        mine = _config_dict(config)
        for key in sorted(set(saved) | set(mine)):
            if key in RESUME_NEUTRAL:
                continue
            if saved.get(key) != mine.get(key):
                flag = "--" + key.replace("_", "-")
                raise ArtifactError(f"cannot resume from {where}: it was trained with {flag} {saved.get(key)}, "
                                    f"this run has {mine.get(key)}; resume with the same options or start a new "
                                    "run with --overwrite")
    saved_run = ckpt["state"].get("run")
    if isinstance(saved_run, dict):
        for key, what in (("data_sha256", "the training data"), ("compiled_manifest_sha256", "the compiled model")):
            if saved_run.get(key) and identity.get(key) and saved_run[key] != identity[key]:
                raise ArtifactError(f"cannot resume from {where}: {what} changed since it was written; "
                                    "resume with the same inputs or start a new run with --overwrite")


def _finished(run_dir: Path, config: TrainConfig, total: int) -> TrainResult | None:
    """The result of a run that already completed with this config, or None."""
    try:
        manifest = read_manifest(run_dir, "run")
    except ArtifactError:
        return None
    saved = manifest.get("train_config")
    summary = manifest.get("summary")
    if not isinstance(saved, dict) or not isinstance(summary, dict) or summary.get("steps") != total:
        return None
    if {k: v for k, v in saved.items() if k not in RESUME_NEUTRAL} != _config_dict(config):
        return None
    metrics = read_metrics(run_dir / METRICS_FILE)
    return TrainResult(run_dir, total, summary.get("first_loss"), summary.get("last_loss"), metrics)


def _is_run_dir(run_dir: Path) -> bool:
    """Empty (hidden files aside), or holding what a run writes: a resume never writes into anything else."""
    empty = not any(p for p in run_dir.iterdir() if not p.name.startswith("."))
    return (empty or (run_dir / CKPT_DIR).is_dir() or (run_dir / METRICS_FILE).is_file()
            or (run_dir / "manifest.json").is_file())


def image_classification_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy of the classifier's logits (B, K) against the class index (B,)."""
    logits = model(pixel_values=batch["pixel_values"]).logits  # (B, K)
    return nn.functional.cross_entropy(logits.float(), batch["labels"])


def task_loss(model: nn.Module):
    """The loss of a model's task (from its config): causal LM, or image classification."""
    config = getattr(model, "config", None)
    return image_classification_loss if config is not None and model_task(config) == IMAGE_CLASSIFICATION \
        else causal_lm_loss


def _check_data_for_task(model: nn.Module, dataset) -> None:
    image_model = task_loss(model) is image_classification_loss
    image_data = getattr(dataset, "task", None) == IMAGE_CLASSIFICATION
    if image_model and not image_data:
        raise EdgetuneError("this is an image classifier: --data must be a directory with one sub-folder of images "
                            "per class")
    if image_data and not image_model:
        raise EdgetuneError(f"{dataset.source or 'the data'} is image data, but this model is a causal LM; "
                            "give it a .jsonl or .txt file")


def train_model(model: nn.Module, dataset, config: TrainConfig, run_dir: Path, *, resume: bool = False,
                run_info: dict | None = None, progress: bool = True) -> TrainResult:
    """Train ``model``'s trainable parameters on ``dataset``, writing ``run_dir``.

    ``dataset`` is a TokenDataset for a causal LM or an ImageDataset for an image classifier; the
    loss follows from the model's task (:func:`task_loss`). For images ``tokens`` in the metrics
    counts images.
    """
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full_error(run_dir, exc) from None
        raise EdgetuneError(f"cannot create the run directory {run_dir} ({exc.strerror or exc})") from None
    if resume and not _is_run_dir(run_dir):
        raise EdgetuneError(f"--resume: {run_dir} is not an edgetune run directory")
    with _run_lock(run_dir):
        return _train(model, dataset, config, run_dir, resume, run_info or {}, progress)


def _train(model, dataset, config: TrainConfig, run_dir: Path, resume: bool, run_info: dict,
           progress: bool) -> TrainResult:
    from .data import BatchIterator

    params = trainable_parameters(model)
    if not params:
        raise EdgetuneError("the model has no trainable parameters")
    _check_data_for_task(model, dataset)
    loss_fn = task_loss(model)
    unit = "img" if loss_fn is image_classification_loss else "tok"
    device = next(iter(params.values())).device
    total = config.total_steps(len(dataset))
    warmup = config.warmup_steps if config.warmup_steps is not None else max(1, total // 20)
    optimizer = torch.optim.AdamW(list(params.values()), lr=config.lr, weight_decay=config.weight_decay)
    batches = BatchIterator(dataset, config.batch, config.seed)
    identity = {"data_sha256": (run_info.get("data") or {}).get("sha256"),
                "compiled_manifest_sha256": (run_info.get("compiled") or {}).get("manifest_sha256")}
    metrics_path = run_dir / METRICS_FILE

    def warn(message: str) -> None:
        print(message, file=sys.stderr)

    start = 0
    torch.manual_seed(config.seed)
    if resume:
        done = _finished(run_dir, config, total)
        if done is not None:
            warn(f"{run_dir} already finished its {total} steps; nothing to resume")
            return done
        remove_torn_checkpoints(run_dir)
        ckpt = load_latest_checkpoint(run_dir, warn=warn, params=params)
        if ckpt is not None:
            _check_resumable(ckpt, config, identity)
            try:
                optimizer_from_tensors(optimizer, ckpt["optimizer"], ckpt["state"]["optimizer"])
                batches.load_state(ckpt["state"]["data"])
            except (KeyError, TypeError, ValueError, RuntimeError) as exc:
                raise ArtifactError(f"cannot resume from {ckpt['path']}: its optimizer or data state does not fit "
                                    f"this run ({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})"
                                    ) from None
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(ckpt["params"][name])
            set_rng_state(ckpt["rng"])
            start = ckpt["state"]["step"]
            if ckpt["metrics"] is not None:
                with atomic_file(metrics_path) as tmp:
                    shutil.copyfile(ckpt["metrics"], tmp)
            for bad in ckpt["skipped"]:  # they failed verification; training past them writes new ones
                shutil.rmtree(bad, ignore_errors=True)
            warn(f"resuming {run_dir} from checkpoint step {start} of {total}")
        elif list_checkpoints(run_dir):
            warn(f"warning: no valid checkpoint in {run_dir / CKPT_DIR}; starting again from step 0")
    if start >= total:
        raise ArtifactError(f"cannot resume: the newest checkpoint is step {start}, but this run has {total} steps")
    try:
        log = MetricsLog(metrics_path, truncate_after_step=start)
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full_error(metrics_path, exc) from None
        raise

    model.train()
    tty = sys.stderr.isatty()
    t_last = time.perf_counter()
    # The last fully applied step and what a checkpoint of it needs (RNG as it was right then).
    done_step, done_data, done_rng = start, batches.state(), rng_state()
    last_saved, last_save_time = start, time.monotonic()
    in_update = False
    step = start

    def checkpoint() -> None:
        nonlocal last_saved, last_save_time
        log.sync()
        state = {"data": done_data, "config": _config_dict(config), "run": identity}
        save_checkpoint(run_dir, done_step, params, optimizer, state, config.keep, metrics_file=metrics_path,
                        rng=done_rng)
        last_saved, last_save_time = done_step, time.monotonic()

    def resume_hint() -> str:
        if last_saved > 0:
            return f"the checkpoint of step {last_saved} is intact; continue with the same command plus --resume"
        return "no checkpoint was written yet"

    with make_progress(progress) as bar, _Interrupts() as interrupts:
        task = bar.add_task("train", total=total, completed=start, loss="-", tps="-", mem=memory_label())
        try:
            for step in range(start + 1, total + 1):
                origin = [batches.epoch, batches.position]
                batch = {k: v.to(device) for k, v in next(batches).items()}  # (B, T) each
                lr = lr_at(step, total, config.lr, warmup)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss = loss_fn(model, batch)
                if not torch.isfinite(loss):
                    raise EdgetuneError(f"loss became {loss.item()} at step {step}; lower --lr")
                loss.backward()
                if config.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(list(params.values()), config.grad_clip)
                in_update = True
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                done_step, done_data, done_rng = step, batches.state(), rng_state()
                in_update = False
                now = time.perf_counter()
                n_tokens = batch["input_ids"].numel() if "input_ids" in batch else batch["labels"].numel()  # images
                record = {"step": step, "loss": loss.item(), "lr": lr,
                          "tokens_per_s": n_tokens / max(now - t_last, 1e-9), "tokens": n_tokens,
                          "data": origin, "rss_mib": round(rss_mib(), 1)}
                t_last = now
                log.write(record)
                bar.update(task, advance=1, loss=f"{record['loss']:.4f}",
                           tps=f"{record['tokens_per_s']:.0f}", mem=memory_label())
                if progress and not tty and (step % 10 == 0 or step == total):
                    print(f"step {step}/{total} loss {record['loss']:.4f} "
                          f"{record['tokens_per_s']:.0f} {unit}/s {memory_label()}", file=sys.stderr)
                if step == total:
                    break  # the final outputs follow; an interrupt now just lets them be written
                if interrupts.signum is not None:
                    checkpoint()
                    raise TrainingInterrupted(
                        f"interrupted by {interrupts.name} after step {done_step} of {total}; checkpoint saved in "
                        f"{run_dir / CKPT_DIR / f'step-{done_step:08d}'}; continue with the same command plus --resume")
                due = ((config.save_every and step % config.save_every == 0)
                       or (config.save_interval_s and time.monotonic() - last_save_time >= config.save_interval_s))
                if due:
                    checkpoint()
        except KeyboardInterrupt:  # a second signal, or Ctrl-C where no handler could be installed
            if not in_update and done_step > last_saved:
                with contextlib.suppress(EdgetuneError, OSError):
                    checkpoint()
            when = f"during step {step}" if done_step < step else f"after step {done_step}"
            raise TrainingInterrupted(f"aborted {when} of {total}; "
                                      + (f"the checkpoint of step {last_saved} is intact; continue with the same "
                                         "command plus --resume" if last_saved else "no checkpoint was written")
                                      ) from None
        except (DiskFull, OSError) as exc:
            _raise_disk_full(exc, run_dir, resume_hint())
        except (MemoryError, RuntimeError) as exc:
            if not is_out_of_memory(exc):
                raise
            optimizer.zero_grad(set_to_none=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            raise EdgetuneError(f"out of memory at step {step} with --batch {config.batch} --seq-len "
                                f"{config.seq_len} on {device}: {oom_advice(config, model)}") from None
        finally:
            log.close()
    model.eval()

    try:
        with atomic_file(run_dir / "trainable.safetensors") as tmp:
            save_tensors(params, tmp)
        metrics = read_metrics(metrics_path)
        plot_loss(metrics, run_dir / "loss.png")
        summary = {"steps": total, "first_loss": metrics[0]["loss"] if metrics else None,
                   "last_loss": metrics[-1]["loss"] if metrics else None}
        write_manifest(run_dir, "run", {"train_config": dataclasses.asdict(config), "summary": summary,
                                        **run_info})
    except (DiskFull, OSError) as exc:
        _raise_disk_full(exc, run_dir, resume_hint())
    return TrainResult(run_dir, total, summary["first_loss"], summary["last_loss"], metrics)
