"""The compiled-artifact directory: everything `train` needs, and nothing it has to re-derive.

Layout::

    manifest.json         kind "compiled": source + sha256, recipe config, device, versions, file hashes
    config.json           the transformers config of the base
    tokenizer/            the tokenizer, saved by transformers
    base.safetensors      frozen tensors, in their packed form (NF4 bytes + absmax for qlora)
    trainable.safetensors the adapter parameters (the only tensors with requires_grad)

Loading builds the model on the meta device, replays the recipe's rewrite without data
(``materialize=False``), then loads the tensors with ``assign=True``: no full-precision copy of
the base is ever made.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .compiler import CompileInfo, freeze_all, trainable_parameters
from .errors import ArtifactError
from .fsutil import atomic_dir
from .manifest import read_manifest, write_manifest
from .methods import config_from_dict, get_method
from .models.arch import get_submodule_parent
from .models.loader import ModelSource
from .profiles import parse_profile
from .s2a.functions import Compression
from .s2a.rewriter import rewrite
from .tensors import dedup_shared, load_tensors, save_tensors

BASE_FILE, TRAINABLE_FILE = "base.safetensors", "trainable.safetensors"


def compiled_info(model: nn.Module) -> CompileInfo:
    info = getattr(model, "edgetune", None)
    if not isinstance(info, CompileInfo):
        raise ArtifactError("this model was not compiled by edgetune (call edgetune.compile first)")
    return info


def save_compiled(model: nn.Module, tokenizer, out: str | os.PathLike, overwrite: bool = False,
                  extra: dict | None = None) -> Path:
    from .planner import plan_for_model

    info = compiled_info(model)
    plan = plan_for_model(model)
    trainable = set(trainable_parameters(model))
    state, aliases = dedup_shared(model.state_dict())
    with atomic_dir(out, overwrite) as tmp:
        save_tensors({k: v for k, v in state.items() if k not in trainable}, tmp / BASE_FILE)
        save_tensors({k: v for k, v in state.items() if k in trainable}, tmp / TRAINABLE_FILE)
        (tmp / "config.json").write_text(model.config.to_json_string())
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        write_manifest(tmp, "compiled", {
            **info.to_dict(),
            "model_type": model.config.model_type,
            "trainable": sorted(trainable),
            "tied": aliases,
            "rewritten": info.rewritten,
            "rewrite_report": info.report.to_dict() if info.report is not None else None,
            "plan": plan.to_dict() if plan is not None else None,
            **(extra or {}),
        })
    return Path(out)


def _restore_nonpersistent_buffers(model: nn.Module) -> None:
    """Rebuild parameter-free modules whose buffers were never saved (e.g. rotary inv_freq)."""
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)) and not any(True for _ in module.parameters()):
            try:
                fresh = type(module)(config=model.config)
            except TypeError:
                raise ArtifactError(f"cannot rebuild module {name} ({type(module).__name__}) after loading") from None
            parent, leaf = get_submodule_parent(model, name)
            setattr(parent, leaf, fresh)


def load_compiled(directory: str | os.PathLike, activation_rewrite: bool = True):
    """Load a compiled artifact: (model, tokenizer, manifest). Verifies every file's hash first.

    ``activation_rewrite=False`` skips the S2A rewrite recorded in the manifest (the ONNX exporter
    wants the plain ops; forward values are the same).
    """
    from transformers import AutoConfig

    from .models.loader import arch_for_model, auto_model_class, load_preprocessor, model_task

    directory = Path(directory)
    manifest = read_manifest(directory, "compiled")
    try:
        method = get_method(manifest["recipe"])
        config = config_from_dict(method, manifest["recipe_config"])
        profile = parse_profile(manifest["device"], f"{directory}/manifest.json")
        dtype = getattr(torch, manifest["dtype"])
        source = ModelSource(**manifest["source"]) if manifest.get("source") else None
    except (KeyError, TypeError) as exc:
        raise ArtifactError(f"{directory}/manifest.json: malformed ({exc})") from None
    hf_config = AutoConfig.from_pretrained(str(directory))
    arch = arch_for_model(hf_config)
    with torch.device("meta"):
        model = auto_model_class(hf_config).from_config(hf_config, dtype=dtype)
    freeze_all(model)
    rewritten = method.apply(model, config, arch, False)
    try:
        compression = Compression(**manifest.get("s2a", {"act_bits": 16})) if activation_rewrite else Compression(16)
    except TypeError as exc:
        raise ArtifactError(f"{directory}/manifest.json: malformed s2a entry ({exc})") from None
    report = rewrite(model, compression)
    state = load_tensors(directory / BASE_FILE)
    state.update(load_tensors(directory / TRAINABLE_FILE))
    result = model.load_state_dict(state, strict=False, assign=True)
    tied = manifest.get("tied", {})
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise ArtifactError(f"{directory}: tensors do not match the recipe "
                            f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")
    if tied:
        model.tie_weights()
    _restore_nonpersistent_buffers(model)
    trainable = set(manifest.get("trainable", []))
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    model.eval()
    model.edgetune = CompileInfo(manifest["recipe"], config, profile, manifest["dtype"], source, rewritten,
                                 compression, report, task=model_task(hf_config))
    model.edgetune_source = source
    tokenizer = load_preprocessor(directory / "tokenizer", hf_config)
    return model, tokenizer, manifest


def load_trainable(model: nn.Module, path: str | os.PathLike) -> None:
    """Overwrite the trainable parameters with those in a safetensors file (names must match)."""
    state = load_tensors(path)
    params = trainable_parameters(model)
    if set(state) != set(params):
        raise ArtifactError(f"{path}: parameters do not match the compiled model")
    with torch.no_grad():
        for name, p in params.items():
            if state[name].shape != p.shape:
                raise ArtifactError(f"{path}: {name} has shape {tuple(state[name].shape)}, expected {tuple(p.shape)}")
            p.copy_(state[name])
