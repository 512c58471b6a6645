"""Train on ORT training artifacts with ``onnxruntime.training.api`` (``edgetune ort-train``).

It behaves like the torch loop (:mod:`edgetune.training.loop`): the same options
(:class:`~edgetune.training.loop.TrainConfig`), the same packed data and batch order
(:class:`~edgetune.training.data.BatchIterator`), the same warmup + cosine learning rate
(:func:`~edgetune.training.loop.lr_at`), a rich progress bar with loss / tokens/s / memory,
``metrics.jsonl`` and ``loss.png``, atomic checkpoints every ``save_every`` steps (and by time and
on SIGINT/SIGTERM), and ``--resume``. A run directory holds::

    manifest.json           kind "ort-run": the ORT directory (path, relpath, manifest sha256), data, options
    metrics.jsonl, loss.png
    checkpoints/step-NNNNNNNN/   ort_checkpoint (parameters + AdamW state), state.json, metrics.jsonl
    ort_checkpoint          the final ORT checkpoint (adapter + frozen base + optimizer state)
    trainable.safetensors   the adapter, with its torch names (what `ort-export --format peft` reads)

AdamW's weight decay and gradient clipping are part of ``optimizer_model.onnx``, so a run must
use the values the directory was exported with; ``lr`` is set every step.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import ArtifactError, EdgetuneError
from ..fsutil import DiskFull, atomic_dir, atomic_file, check_output_path, disk_full_error, is_disk_full, sha256_file
from ..manifest import read_manifest, write_manifest
from ._deps import require_ort
from .export import CHECKPOINT_FILE, read_ort_dir

RUN_KIND = "ort-run"
CKPT_DIR, METRICS_FILE, ORT_CKPT = "checkpoints", "metrics.jsonl", "ort_checkpoint"
CKPT_KIND = "ort-checkpoint"


@dataclass
class OrtSession:
    """An ORT training session over an ORT directory: ``state``, ``module``, ``optimizer``."""

    state: object
    module: object
    optimizer: object
    manifest: dict


def session_options(manifest: dict, threads: int | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.enable_cpu_mem_arena = False  # peak RSS then reflects what the graph needs
    threads = threads or int(os.environ.get("OMP_NUM_THREADS", "0") or 0)
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if manifest.get("custom_op_library"):
        from .custom_ops import build_library, sources_sha256

        want = manifest["custom_op_library"]["sources_sha256"]
        if sources_sha256() != want:
            raise ArtifactError("this ORT directory was exported with other custom-op sources than this edgetune "
                                "has; export it again with edgetune export-training")
        so.register_custom_ops_library(str(build_library()))
    return so


def open_session(ort_dir: str | os.PathLike, checkpoint: str | os.PathLike | None = None,
                 threads: int | None = None) -> OrtSession:
    """Load the training and eval graphs, the optimizer and a checkpoint (default: the exported one)."""
    require_ort()
    import onnxruntime as ort
    from onnxruntime.training.api import CheckpointState, Module, Optimizer

    ort.set_default_logger_severity(3)
    ort_dir = Path(ort_dir)
    manifest = read_ort_dir(ort_dir)
    so = session_options(manifest, threads)
    state = CheckpointState.load_checkpoint(str(checkpoint or ort_dir / CHECKPOINT_FILE))
    module = Module(str(ort_dir / "training_model.onnx"), state, str(ort_dir / "eval_model.onnx"), device="cpu",
                    session_options=so)
    optimizer = Optimizer(str(ort_dir / "optimizer_model.onnx"), module)
    return OrtSession(state, module, optimizer, manifest)


def adapter_arrays(state, manifest: dict) -> dict:
    """The trainable parameters of an ORT checkpoint as numpy arrays, under their torch names."""
    return {torch_name: state.parameters[onnx_name].data for onnx_name, torch_name in manifest["parameters"].items()}


def set_parameters(state, arrays: dict, manifest: dict) -> None:
    inverse = {t: o for o, t in manifest["parameters"].items()}
    for name, value in arrays.items():
        state.parameters[inverse[name]].data = value


def _batch_arrays(batch: dict) -> list:
    return [batch[k].numpy() for k in ("input_ids", "attention_mask", "labels")]


def _config_dict(config) -> dict:
    from ..training.loop import RESUME_NEUTRAL

    return json.loads(json.dumps({k: v for k, v in dataclasses.asdict(config).items() if k not in RESUME_NEUTRAL}))


def _list_checkpoints(run_dir: Path) -> list[Path]:
    d = run_dir / CKPT_DIR
    return sorted(p for p in d.glob("step-*") if p.is_dir()) if d.is_dir() else []


def _latest_checkpoint(run_dir: Path, warn) -> tuple[Path, dict] | None:
    for path in reversed(_list_checkpoints(run_dir)):
        try:
            read_manifest(path, CKPT_KIND)
            return path, json.loads((path / "state.json").read_text())
        except (ArtifactError, OSError, ValueError) as exc:
            warn(f"warning: skipping checkpoint {path.name}: {exc}")
    return None


def train_ort(ort_dir: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, *,
              overwrite: bool = False, resume: bool = False, progress: bool = True, threads: int | None = None,
              **options):
    """Fine-tune on ORT: ``options`` are :class:`~edgetune.training.loop.TrainConfig` fields. Returns a
    :class:`~edgetune.training.loop.TrainResult`."""
    require_ort()
    from ..training.data import build_dataset
    from ..training.loop import TrainConfig, _run_lock

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise EdgetuneError(f"unknown training option(s): {', '.join(unknown)}")
    config = TrainConfig(**options)
    ort_dir, out = Path(ort_dir), Path(out)
    manifest = read_ort_dir(ort_dir)
    opt = manifest["optimizer"]
    for key in ("weight_decay", "grad_clip"):
        if not math.isclose(getattr(config, key), opt[key], rel_tol=1e-9, abs_tol=1e-12):
            flag = "--" + key.replace("_", "-")
            raise EdgetuneError(f"{ort_dir} was exported with {flag} {opt[key]} (it is part of optimizer_model.onnx); "
                                f"train with {flag} {opt[key]} or export again with edgetune export-training {flag} ...")
    if not resume:
        check_output_path(out, overwrite)
    elif out.exists() and not out.is_dir():
        raise EdgetuneError(f"--resume: {out} is not a run directory")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(ort_dir / "tokenizer"))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    limit = json.loads((ort_dir / "config.json").read_text()).get("max_position_embeddings")
    if limit is not None and config.seq_len > limit:
        raise EdgetuneError(f"--seq-len {config.seq_len} is beyond the model's context of {limit} tokens")
    dataset = build_dataset(data, tokenizer, config.seq_len)
    if resume and not out.is_dir():
        resume = False
    if not resume and out.exists():
        shutil.rmtree(out) if out.is_dir() and not out.is_symlink() else out.unlink()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if is_disk_full(exc):
            raise disk_full_error(out, exc) from None
        raise EdgetuneError(f"cannot create the run directory {out} ({exc.strerror or exc})") from None
    info = {
        "ort": {"path": str(ort_dir.resolve()), "relpath": os.path.relpath(ort_dir.resolve(), out.resolve()),
                "manifest_sha256": sha256_file(ort_dir / "manifest.json")},
        "data": {"path": str(Path(data).resolve()), "sha256": sha256_file(data), "rows": len(dataset)},
        "base_sha256": manifest.get("base_sha256"),
        "recipe": manifest.get("recipe"),
        "backend": "ort",
    }
    with _run_lock(out):
        return _train(ort_dir, manifest, dataset, config, out, resume, info, progress, threads)


def _train(ort_dir: Path, manifest: dict, dataset, config, run_dir: Path, resume: bool, info: dict,
           progress: bool, threads: int | None):
    import numpy as np
    from onnxruntime.training.api import CheckpointState

    from ..tensors import save_tensors
    from ..training.data import BatchIterator
    from ..training.loop import TrainingInterrupted, TrainResult, _Interrupts, lr_at
    from ..training.report import MetricsLog, make_progress, memory_label, plot_loss, read_metrics, rss_mib

    def warn(message: str) -> None:
        print(message, file=sys.stderr)

    total = config.total_steps(len(dataset))
    warmup = config.warmup_steps if config.warmup_steps is not None else max(1, total // 20)
    batches = BatchIterator(dataset, config.batch, config.seed)
    identity = {"data_sha256": info["data"]["sha256"], "ort_manifest_sha256": info["ort"]["manifest_sha256"]}
    metrics_path = run_dir / METRICS_FILE
    start, ckpt_file = 0, None
    if resume:
        try:
            done = read_manifest(run_dir, RUN_KIND)
            if (done.get("summary") or {}).get("steps") == total and \
                    {k: v for k, v in done["train_config"].items() if k in _config_dict(config)} == _config_dict(config):
                warn(f"{run_dir} already finished its {total} steps; nothing to resume")
                metrics = read_metrics(metrics_path)
                return TrainResult(run_dir, total, done["summary"]["first_loss"], done["summary"]["last_loss"], metrics)
        except ArtifactError:
            pass
        found = _latest_checkpoint(run_dir, warn)
        if found is not None:
            path, saved = found
            if saved.get("config") != _config_dict(config):
                raise ArtifactError(f"cannot resume from {path}: it was trained with other options; resume with the "
                                    "same options or start a new run with --overwrite")
            if saved.get("run") != identity:
                raise ArtifactError(f"cannot resume from {path}: the data or the ORT directory changed since it was "
                                    "written; resume with the same inputs or start a new run with --overwrite")
            batches.load_state(saved["data"])
            start, ckpt_file = int(saved["step"]), path / ORT_CKPT
            if (path / METRICS_FILE).is_file():
                with atomic_file(metrics_path) as tmp:
                    shutil.copyfile(path / METRICS_FILE, tmp)
            warn(f"resuming {run_dir} from checkpoint step {start} of {total}")
    if start >= total:
        raise ArtifactError(f"cannot resume: the newest checkpoint is step {start}, but this run has {total} steps")

    sess = open_session(ort_dir, ckpt_file, threads)
    module, optimizer, state = sess.module, sess.optimizer, sess.state
    log = MetricsLog(metrics_path, truncate_after_step=start)
    done_step, done_data = start, batches.state()
    last_saved = start
    last_save_time = time.monotonic()

    def checkpoint() -> None:
        nonlocal last_saved, last_save_time
        log.sync()
        target = run_dir / CKPT_DIR / f"step-{done_step:08d}"
        with atomic_dir(target, overwrite=True) as tmp:
            CheckpointState.save_checkpoint(state, str(tmp / ORT_CKPT), include_optimizer_state=True)
            shutil.copyfile(metrics_path, tmp / METRICS_FILE)
            (tmp / "state.json").write_text(json.dumps({"step": done_step, "data": done_data,
                                                        "config": _config_dict(config), "run": identity}))
            write_manifest(tmp, CKPT_KIND, {"step": done_step})
        if config.keep:
            for old in _list_checkpoints(run_dir)[:-config.keep]:
                shutil.rmtree(old, ignore_errors=True)
        last_saved, last_save_time = done_step, time.monotonic()

    module.train()
    tty = sys.stderr.isatty()
    t_last = time.perf_counter()
    step = start
    with make_progress(progress) as bar, _Interrupts() as interrupts:
        task = bar.add_task("train (ort)", total=total, completed=start, loss="-", tps="-", mem=memory_label())
        try:
            for step in range(start + 1, total + 1):
                origin = [batches.epoch, batches.position]
                batch = next(batches)
                lr = lr_at(step, total, config.lr, warmup)
                optimizer.set_learning_rate(lr)
                loss = float(np.asarray(module(*_batch_arrays(batch))).reshape(-1)[0])
                if not math.isfinite(loss):
                    raise EdgetuneError(f"loss became {loss} at step {step}; lower --lr")
                optimizer.step()
                module.lazy_reset_grad()
                done_step, done_data = step, batches.state()
                now = time.perf_counter()
                n_tokens = int(batch["input_ids"].numel())
                record = {"step": step, "loss": loss, "lr": lr, "tokens_per_s": n_tokens / max(now - t_last, 1e-9),
                          "tokens": n_tokens, "data": origin, "rss_mib": round(rss_mib(), 1)}
                t_last = now
                log.write(record)
                bar.update(task, advance=1, loss=f"{loss:.4f}", tps=f"{record['tokens_per_s']:.0f}",
                           mem=memory_label())
                if progress and not tty and (step % 10 == 0 or step == total):
                    print(f"step {step}/{total} loss {loss:.4f} {record['tokens_per_s']:.0f} tok/s {memory_label()}",
                          file=sys.stderr)
                if step == total:
                    break
                if interrupts.signum is not None:
                    checkpoint()
                    raise TrainingInterrupted(
                        f"interrupted by {interrupts.name} after step {done_step} of {total}; checkpoint saved in "
                        f"{run_dir / CKPT_DIR / f'step-{done_step:08d}'}; continue with the same command plus --resume")
                if ((config.save_every and step % config.save_every == 0)
                        or (config.save_interval_s and time.monotonic() - last_save_time >= config.save_interval_s)):
                    checkpoint()
        except KeyboardInterrupt:
            raise TrainingInterrupted(f"aborted during step {step} of {total}; "
                                      + (f"the checkpoint of step {last_saved} is intact; continue with the same "
                                         "command plus --resume" if last_saved else "no checkpoint was written")
                                      ) from None
        except (DiskFull, OSError) as exc:
            if isinstance(exc, DiskFull):
                raise
            if is_disk_full(exc):
                raise disk_full_error(run_dir, exc, f"the checkpoint of step {last_saved} is intact") from None
            raise
        finally:
            log.close()

    import torch

    _save_final_checkpoint(CheckpointState, state, run_dir / ORT_CKPT)
    with atomic_file(run_dir / "trainable.safetensors") as tmp:
        save_tensors({k: torch.from_numpy(np.array(v)) for k, v in adapter_arrays(state, manifest).items()}, tmp)
    metrics = read_metrics(metrics_path)
    plot_loss(metrics, run_dir / "loss.png", title="training loss (ORT)")
    summary = {"steps": total, "first_loss": metrics[0]["loss"] if metrics else None,
               "last_loss": metrics[-1]["loss"] if metrics else None}
    write_manifest(run_dir, RUN_KIND, {"train_config": dataclasses.asdict(config), "summary": summary, **info})
    return TrainResult(run_dir, total, summary["first_loss"], summary["last_loss"], metrics)


def _save_final_checkpoint(CheckpointState, state, dest: Path) -> None:
    """Save under the final file name inside a hidden folder, then move every file it wrote (the
    checkpoint and, for a large model, ORT's ``<name>.data`` external data, which the checkpoint
    refers to by name) into place."""
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        CheckpointState.save_checkpoint(state, str(tmp / dest.name), include_optimizer_state=True)
        for path in sorted(tmp.iterdir(), key=lambda p: p.name == dest.name):  # data files before the checkpoint
            os.replace(path, dest.parent / path.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["train_ort", "open_session", "adapter_arrays", "set_parameters", "OrtSession", "RUN_KIND"]
