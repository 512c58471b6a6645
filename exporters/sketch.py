"""Sketch deltas: what a sketchtune fine-tune changed, as a small file pair; and dense merging.

A sketchtune model trains only its lookup tables, so the whole fine-tune is ``table − table_init``
per projection (plus the norm weights with ``train_norms``). The delta directory holds:

* ``sketch_delta.safetensors``: ``<module path>.table_delta`` (out, GPR, 2**bits) in fp16 for every
  :class:`~edgetune.methods.sketchtune.layer.SketchLinear`, and the full values (float32) of any
  other trained parameter under its own name;
* ``sketch_delta.json``: format and version, ``base_sha256`` (the model the sketch was built
  from), ``sketch_sha256`` (a fingerprint of the sketch itself: codes and initial tables of every
  layer, so a delta never lands on a sketch built with other settings or other calibration
  text), bits, groups per row, the module list and the trained parameter names.

Why deltas and not tables: the delta of an untrained table is exactly zero and stays small in
fp16 for short fine-tunes; the receiver rebuilds ``table = table_init + delta`` on the same sketch.

``dense_state_dict`` turns a sketch model (trained or not) into a plain transformers state dict,
each projection's ``weight`` gathered from its table (transposed back for GPT-2's ``Conv1D``), so
``AutoModelForCausalLM.from_config(...).load_state_dict(...)`` — or ``save_dense_pretrained`` —
gives a model any server can load.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from edgetune.errors import ArtifactError, EdgetuneError

DELTA_WEIGHTS = "sketch_delta.safetensors"
DELTA_CONFIG = "sketch_delta.json"
FORMAT = "edgetune-sketch-delta"
VERSION = 1
SUFFIX = ".table_delta"

MANIFEST_KIND = "sketch-delta"  # the adapter directory's manifest kind: `edgetune merge` dispatches on it

__all__ = ["sketch_layers", "sketch_fingerprint", "export_sketch_delta", "read_sketch_delta", "load_sketch_delta",
           "merge_sketch_delta", "dense_state_dict", "dense_model", "save_dense_pretrained", "bake_tables",
           "merge_sketch_artifact", "DELTA_WEIGHTS", "DELTA_CONFIG", "MANIFEST_KIND"]


def sketch_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every SketchLinear of ``model`` by module path, in model order."""
    from edgetune.methods.sketchtune.layer import SketchLinear

    return {name: m for name, m in model.named_modules() if isinstance(m, SketchLinear)}


def sketch_fingerprint(model: nn.Module) -> str:
    """sha256 over every sketch layer's path, shape, bits, groups, packed codes and ``table_init`` bytes."""
    h = hashlib.sha256()
    for name, m in sketch_layers(model).items():
        h.update(f"{name}:{m.out_features}x{m.in_features}:b{m.bits}:g{m.groups_per_row}\n".encode())
        h.update(m.codes.detach().cpu().contiguous().numpy().tobytes())
        h.update(m.table_init.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _base_sha(model: nn.Module) -> str | None:
    info = getattr(model, "edgetune", None)
    source = getattr(info, "source", None) or getattr(model, "edgetune_source", None)
    return getattr(source, "sha256", None)


def export_sketch_delta(out_dir: str | os.PathLike, model: nn.Module, base_sha256: str | None = None) -> Path:
    """Write the table deltas (fp16) and the JSON description into ``out_dir`` (created if needed)."""
    from edgetune.tensors import save_tensors

    layers = sketch_layers(model)
    if not layers:
        raise EdgetuneError("this model has no sketch tables to export (compile it with --recipe sketchtune)")
    base_sha256 = base_sha256 if base_sha256 is not None else _base_sha(model)
    tensors: dict[str, torch.Tensor] = {}
    for name, m in layers.items():
        delta = m.table.detach().to(torch.float32) - m.table_init.to(torch.float32)
        tensors[name + SUFFIX] = delta.to(torch.float16)
    table_names = {name + ".table" for name in layers}
    others = [n for n, p in model.named_parameters() if p.requires_grad and n not in table_names]
    params = dict(model.named_parameters())
    for n in others:
        tensors[n] = params[n].detach().to(torch.float32)
    first = next(iter(layers.values()))
    info = {
        "format": FORMAT,
        "version": VERSION,
        "base_sha256": base_sha256,
        "sketch_sha256": sketch_fingerprint(model),
        "model_type": getattr(getattr(model, "config", None), "model_type", None),
        "bits": first.bits,
        "groups_per_row": first.groups_per_row,
        "dtype": "float16",
        "modules": list(layers),
        "trained_parameters": others,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_tensors(tensors, out / DELTA_WEIGHTS, metadata={"format": "pt"})
    (out / DELTA_CONFIG).write_text(json.dumps(info, indent=2) + "\n")
    return out


def read_sketch_delta(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """(description, tensors) of a delta directory, checked for format and completeness."""
    from edgetune.tensors import load_tensors

    from edgetune.manifest import MANIFEST, read_manifest

    directory = Path(directory)
    cfg_path = directory / DELTA_CONFIG
    if not cfg_path.is_file():
        raise ArtifactError(f"{directory} is not a sketch delta (no {DELTA_CONFIG})")
    if (directory / MANIFEST).is_file():  # written by `edgetune export --format sketch`: verify every file's sha256
        manifest = read_manifest(directory, MANIFEST_KIND)
        for name in (DELTA_CONFIG, DELTA_WEIGHTS):
            if name not in manifest["files"]:
                raise ArtifactError(f"{directory / MANIFEST}: {name} is not listed in the manifest")
    try:
        info = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{cfg_path}: not valid JSON ({exc})") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT:
        raise ArtifactError(f"{cfg_path}: not an {FORMAT} description")
    if info.get("version") != VERSION:
        raise ArtifactError(f"{cfg_path}: version {info.get('version')!r} is not supported (expected {VERSION})")
    tensors = load_tensors(directory / DELTA_WEIGHTS)
    expected = {m + SUFFIX for m in info.get("modules", [])} | set(info.get("trained_parameters", []))
    if set(tensors) != expected:
        missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ArtifactError(f"{directory}: tensors do not match {DELTA_CONFIG} (missing {missing[:3]}, extra {extra[:3]})")
    return info, tensors


def load_sketch_delta(directory: str | os.PathLike, model: nn.Module, force: bool = False) -> list[str]:
    """Set every table to ``table_init + delta`` (and trained norms to their values); returns the modules.

    Refuses a delta made for another base model (``base_sha256``) or another sketch
    (``sketch_sha256``) unless ``force``; shapes must match regardless.
    """
    info, tensors = read_sketch_delta(directory)
    layers = sketch_layers(model)
    if not layers:
        raise ArtifactError("this model has no sketch layers; load the sketchtune compiled artifact first")
    mine = _base_sha(model)
    theirs = info.get("base_sha256")
    if not force and theirs and mine and theirs != mine:
        raise ArtifactError(f"{directory} was trained on a different base (sha256 {theirs[:12]}…, this one is "
                            f"{mine[:12]}…); pass --force to apply it anyway")
    if not force and info.get("sketch_sha256") and info["sketch_sha256"] != sketch_fingerprint(model):
        raise ArtifactError(f"{directory} was trained on a different sketch of the base (other bits, groups or "
                            "calibration); pass --force to apply it anyway")
    missing = [m for m in info["modules"] if m not in layers]
    if missing:
        raise ArtifactError(f"{directory}: this model has no sketch layer {missing[0]}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in info["modules"]:
            m, delta = layers[name], tensors[name + SUFFIX]
            if tuple(delta.shape) != tuple(m.table.shape):
                raise ArtifactError(f"{directory}: {name} delta has shape {tuple(delta.shape)}, "
                                    f"the layer's table {tuple(m.table.shape)}")
            m.table.copy_((m.table_init.to(torch.float32) + delta.to(torch.float32)).to(m.table.dtype))
        for name in info.get("trained_parameters", []):
            if name not in params or tuple(params[name].shape) != tuple(tensors[name].shape):
                raise ArtifactError(f"{directory}: parameter {name} does not fit this model")
            params[name].copy_(tensors[name].to(params[name].dtype))
    return list(info["modules"])


def dense_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """An HF-compatible state dict: every sketch layer (and NF4 embedding) as a dense ``weight`` (and ``bias``).

    GPT-2 projections (``Conv1D``) get their (in, out) layout back. Other tensors are taken as
    they are (cast to ``dtype`` if given, floating point only).
    """
    from edgetune.methods.embedding import dense_embedding_state, is_nf4_embedding_key

    layers = sketch_layers(model)
    transposed = getattr(getattr(model, "config", None), "model_type", None) == "gpt2"
    out: dict[str, torch.Tensor] = {}
    for key, t in model.state_dict().items():
        path, _, leaf = key.rpartition(".")
        if path in layers or is_nf4_embedding_key(model, key):
            continue
        out[key] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
    out.update(dense_embedding_state(model, dtype))  # embed_nf4: decoded back to plain weights
    for path, m in layers.items():
        w = m.dense_weight(dtype or m.table.dtype)  # (out, in)
        out[path + ".weight"] = w.t().contiguous() if transposed else w
        if m.bias is not None:
            out[path + ".bias"] = m.bias.detach().to(dtype or m.bias.dtype)
    return out


def merge_sketch_delta(model: nn.Module, delta_dir: str | os.PathLike | None = None, force: bool = False,
                       dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Apply a delta (if given) to a sketch model, then return its dense, HF-compatible state dict."""
    if delta_dir is not None:
        load_sketch_delta(delta_dir, model, force=force)
    return dense_state_dict(model, dtype)


def dense_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A fresh plain transformers model (CPU) holding the dense weights of a sketch model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from edgetune.artifact import _restore_nonpersistent_buffers

    data = model.config.to_dict()
    data.pop("quantization_config", None)
    model_type = data.pop("model_type")
    config = AutoConfig.for_model(model_type, **data)
    state = dense_state_dict(model, dtype)
    dtype = dtype or next(iter(sketch_layers(model).values())).table.dtype
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    result = plain.load_state_dict(state, strict=False, assign=True)
    tied = getattr(plain, "_tied_weights_keys", None) or {}
    missing = [k for k in result.missing_keys if k not in tied and k not in state]
    if result.unexpected_keys or missing:
        raise ArtifactError(f"dense weights do not fit a plain {model_type} model "
                            f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")
    if getattr(config, "tie_word_embeddings", False):
        plain.tie_weights()
    _restore_nonpersistent_buffers(plain)  # rotary inv_freq and the like, left on meta by the load
    return plain.eval()


def save_dense_pretrained(model: nn.Module, out_dir: str | os.PathLike, tokenizer=None,
                          dtype: torch.dtype | None = None) -> Path:
    """``save_pretrained`` of :func:`dense_model`: a directory plain transformers (and servers) load."""
    plain = dense_model(model, dtype)
    out = Path(out_dir)
    plain.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out



def bake_tables(model: nn.Module) -> None:
    """Make the current tables the sketch's initial ones: ``table_init = fp16(table)``, ``table = table_init``.

    What a merged sketched artifact holds: a later fine-tune of it exports deltas against the
    merged tables (and its fingerprint differs from the unmerged sketch's, so a delta of the old
    sketch cannot be applied twice).
    """
    with torch.no_grad():
        for m in sketch_layers(model).values():
            m.table_init = m.table.detach().to(torch.float16).clone()
            m.table.copy_(m.table_init.to(m.table.dtype))


def merge_sketch_artifact(base_dir: str | os.PathLike, adapter_dir: str | os.PathLike, out: str | os.PathLike, *,
                          dense: bool = False, dtype: torch.dtype | None = None, force: bool = False,
                          overwrite: bool = False) -> Path:
    """``edgetune merge`` for a sketch delta: ``base_dir`` (a compiled sketchtune artifact) + delta -> ``out``.

    ``dense=False``: a compiled sketched artifact whose tables are the merged ones (codes
    unchanged, tables fp16). ``dense=True``: a plain Hugging Face model directory (config,
    safetensors, tokenizer) that ``AutoModelForCausalLM.from_pretrained`` loads. Written
    atomically; the base and adapter are verified (sha256 of every file, base and sketch
    fingerprints) before anything is written.
    """
    from edgetune.artifact import load_compiled, save_compiled
    from edgetune.fsutil import atomic_dir, check_output_path, sha256_file
    from edgetune.manifest import MANIFEST, artifact_kind

    check_output_path(out, overwrite)
    if artifact_kind(base_dir) != "compiled":
        raise ArtifactError(f"{base_dir} is not a compiled edgetune artifact (merge needs the sketchtune compiled dir)")
    model, tokenizer, manifest = load_compiled(base_dir)
    if manifest.get("recipe") != "sketchtune" or not sketch_layers(model):
        raise ArtifactError(f"{base_dir} was compiled with {manifest.get('recipe')!r}, not sketchtune")
    load_sketch_delta(adapter_dir, model, force=force)
    if dense:
        with atomic_dir(out, overwrite) as tmp:
            save_dense_pretrained(model, tmp, tokenizer, dtype)
    else:  # save_compiled writes atomically itself
        bake_tables(model)
        adapter_manifest = Path(adapter_dir) / MANIFEST
        save_compiled(model, tokenizer, out, overwrite=overwrite, extra={"merged_from": {
            "base_manifest_sha256": sha256_file(Path(base_dir) / MANIFEST),
            "adapter_manifest_sha256": sha256_file(adapter_manifest) if adapter_manifest.is_file() else None,
        }})
    return Path(out)
