"""Training checkpoints: trainable parameters, optimizer state, RNG, data position, step and metrics.

Everything is safetensors + JSON (no pickle). A checkpoint is a directory written under a
temporary name, fsynced, renamed into place and its parent directory fsynced, so a kill or power
cut mid-write leaves the previous one intact (plus a hidden ``.step-*.tmp-*`` leftover that the
next run removes). The newest checkpoint whose manifest verifies *and* whose contents fit the
model is the one a resume uses; the others are skipped with a warning.

Layout of ``checkpoints/step-XXXXXXXX/``::

    trainable.safetensors  the trainable parameters after that step
    optimizer.safetensors  the optimizer's tensors ("<param index>.<key>", e.g. "3.exp_avg", "3.step")
    rng.safetensors        torch's CPU generator ("torch") and each CUDA device's ("cuda.<i>")
    state.json             step, optimizer param groups, data position, train config, run identity
    metrics.jsonl          metrics.jsonl of the run up to and including that step
    manifest.json          sha256 of all of the above
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from ..errors import ArtifactError
from ..fsutil import atomic_dir, remove_stale_temporaries
from ..manifest import read_manifest, write_manifest
from ..tensors import load_tensors, save_tensors

CKPT_DIR = "checkpoints"
METRICS_FILE = "metrics.jsonl"
_NAME = re.compile(r"^step-(\d{8})$")
_OPT_KEY = re.compile(r"^(\d+)\.([A-Za-z_][A-Za-z0-9_]*)$")


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON-able structure."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> dict[str, torch.Tensor]:
    """Every generator that training draws from (dropout): torch's CPU one and each CUDA device's."""
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"cuda.{i}"] = s
    return rng


def set_rng_state(rng: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(rng["torch"])
    cuda = [rng[f"cuda.{i}"] for i in range(len(rng)) if f"cuda.{i}" in rng]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])


def save_checkpoint(run_dir: Path, step: int, params: dict[str, torch.Tensor], optimizer, state: dict,
                    keep: int, metrics_file: Path | None = None, rng: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``checkpoints/step-<step>`` atomically, then delete all but the newest ``keep`` (0: keep all).

    ``rng`` is the generator state to store (default: the current one); ``metrics_file`` is copied
    in. A failure (a full disk) leaves every earlier checkpoint as it was.
    """
    root = run_dir / CKPT_DIR
    root.mkdir(exist_ok=True)
    out = root / f"step-{step:08d}"
    opt_tensors, opt_meta = optimizer_to_tensors(optimizer)
    with atomic_dir(out, overwrite=True) as tmp:
        save_tensors(params, tmp / "trainable.safetensors")
        save_tensors(opt_tensors, tmp / "optimizer.safetensors")
        save_tensors(rng if rng is not None else rng_state(), tmp / "rng.safetensors")
        (tmp / "state.json").write_text(json.dumps({"step": step, "optimizer": opt_meta, **state}, indent=1))
        if metrics_file is not None and metrics_file.is_file():
            shutil.copyfile(metrics_file, tmp / METRICS_FILE)
        write_manifest(tmp, "checkpoint", {"step": step})
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return out


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The checkpoint directories of a run, oldest first (torn temporaries are not listed)."""
    root = run_dir / CKPT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and _NAME.match(p.name))


def remove_torn_checkpoints(run_dir: Path) -> list[Path]:
    """Delete the hidden leftovers of checkpoint writes that a kill interrupted."""
    return remove_stale_temporaries(run_dir / CKPT_DIR)


def _check_contents(path: Path, ckpt: dict, params: dict[str, torch.Tensor] | None) -> None:
    state = ckpt["state"]
    if not isinstance(state, dict):
        raise ArtifactError(f"{path / 'state.json'}: not a JSON object")
    step = state.get("step")
    if isinstance(step, bool) or not isinstance(step, int) or step != int(_NAME.match(path.name)[1]):
        raise ArtifactError(f"{path / 'state.json'}: step {step!r} does not match the directory name")
    opt = state.get("optimizer")
    if (not isinstance(opt, dict) or not isinstance(opt.get("param_groups"), list)
            or not isinstance(opt.get("scalars"), dict) or not isinstance(state.get("data"), dict)):
        raise ArtifactError(f"{path / 'state.json'}: missing optimizer or data state")
    for name in list(ckpt["optimizer"]) + list(opt["scalars"]):
        if not _OPT_KEY.match(name):
            raise ArtifactError(f"{path / 'optimizer.safetensors'}: unexpected entry {name!r}")
    rng = ckpt["rng"].get("torch")
    if rng is None or rng.dtype != torch.uint8 or rng.dim() != 1 or rng.numel() != torch.get_rng_state().numel():
        raise ArtifactError(f"{path / 'rng.safetensors'}: no valid torch generator state")
    if params is None:
        return
    saved = ckpt["params"]
    if set(saved) != set(params):
        extra, missing = sorted(set(saved) - set(params)), sorted(set(params) - set(saved))
        raise ArtifactError(f"{path / 'trainable.safetensors'}: parameters do not match this model "
                            f"(missing {missing[:2]}, unexpected {extra[:2]})")
    for name, p in params.items():
        if saved[name].shape != p.shape or saved[name].dtype != p.dtype:
            raise ArtifactError(f"{path / 'trainable.safetensors'}: {name} is {tuple(saved[name].shape)} "
                                f"{saved[name].dtype}, the model has {tuple(p.shape)} {p.dtype}")
    by_index = list(params.values())
    for name, t in ckpt["optimizer"].items():
        idx, key = _OPT_KEY.match(name).groups()
        if int(idx) >= len(by_index):
            raise ArtifactError(f"{path / 'optimizer.safetensors'}: state for parameter {idx}, the model has "
                                f"{len(by_index)}")
        if key != "step" and t.shape != by_index[int(idx)].shape:
            raise ArtifactError(f"{path / 'optimizer.safetensors'}: {name} has shape {tuple(t.shape)}, "
                                f"expected {tuple(by_index[int(idx)].shape)}")


def read_checkpoint(path: Path, params: dict[str, torch.Tensor] | None = None) -> dict:
    """Verify and read one checkpoint directory; ArtifactError if it is torn, corrupt or does not fit."""
    read_manifest(path, "checkpoint")
    try:
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:  # ValueError covers JSON and UTF-8 errors
        raise ArtifactError(f"{path / 'state.json'}: unreadable ({str(exc).splitlines()[0][:120]})") from None
    ckpt = {
        "path": path,
        "state": state,
        "params": load_tensors(path / "trainable.safetensors"),
        "optimizer": load_tensors(path / "optimizer.safetensors"),
        "rng": load_tensors(path / "rng.safetensors"),
        "metrics": path / METRICS_FILE if (path / METRICS_FILE).is_file() else None,
    }
    _check_contents(path, ckpt, params)
    return ckpt


def load_latest_checkpoint(run_dir: Path, warn=print, params: dict[str, torch.Tensor] | None = None) -> dict | None:
    """The newest checkpoint that verifies, as a dict; torn or corrupt ones are skipped with a warning.

    The dict has ``path``, ``state`` (state.json), ``params``, ``optimizer``, ``rng`` (tensor dicts),
    ``metrics`` (the path of its metrics copy, or None) and ``skipped`` (newer checkpoints that
    failed, newest first).
    """
    skipped = []
    for path in reversed(list_checkpoints(run_dir)):
        try:
            ckpt = read_checkpoint(path, params)
        except ArtifactError as exc:
            warn(f"warning: skipping checkpoint {path.name}: {exc}")
            skipped.append(path)
            continue
        ckpt["skipped"] = skipped
        return ckpt
    return None
