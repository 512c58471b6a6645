"""Training checkpoints: trainable parameters, optimizer state, RNG and data position.

Everything is safetensors + JSON (no pickle). A checkpoint is a directory written under a
temporary name and renamed into place, so a kill mid-write leaves the previous one intact; the
newest checkpoint whose files all verify is the one a resume uses.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

from ..errors import ArtifactError
from ..fsutil import atomic_dir
from ..manifest import read_manifest, write_manifest
from ..tensors import load_tensors, save_tensors

CKPT_DIR = "checkpoints"
_NAME = re.compile(r"^step-(\d{8})$")


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


def save_checkpoint(run_dir: Path, step: int, params: dict[str, torch.Tensor], optimizer, state: dict,
                    keep: int) -> Path:
    root = run_dir / CKPT_DIR
    root.mkdir(exist_ok=True)
    out = root / f"step-{step:08d}"
    opt_tensors, opt_meta = optimizer_to_tensors(optimizer)
    rng = {"torch": torch.get_rng_state()}
    with atomic_dir(out, overwrite=True) as tmp:
        save_tensors(params, tmp / "trainable.safetensors")
        save_tensors(opt_tensors, tmp / "optimizer.safetensors")
        save_tensors(rng, tmp / "rng.safetensors")
        (tmp / "state.json").write_text(json.dumps({"step": step, "optimizer": opt_meta, **state}, indent=1))
        write_manifest(tmp, "checkpoint", {"step": step})
    for old in list_checkpoints(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return out


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = run_dir / CKPT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name))


def load_latest_checkpoint(run_dir: Path, warn=print) -> dict | None:
    """The newest checkpoint that verifies, as a dict; torn or corrupt ones are skipped with a warning."""
    for path in reversed(list_checkpoints(run_dir)):
        try:
            read_manifest(path, "checkpoint")
            state = json.loads((path / "state.json").read_text())
            return {
                "path": path,
                "state": state,
                "params": load_tensors(path / "trainable.safetensors"),
                "optimizer": load_tensors(path / "optimizer.safetensors"),
                "rng": load_tensors(path / "rng.safetensors"),
            }
        except (ArtifactError, json.JSONDecodeError, OSError) as exc:
            warn(f"warning: skipping checkpoint {path.name}: {exc}")
    return None
