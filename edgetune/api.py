"""The public Python API. The CLI is a thin layer over these functions.

    model, tok = edgetune.load("default")
    compiled = edgetune.compile(model, recipe="qlora", device="cpu-16gb", r=16)
    edgetune.save(compiled, "smol.qlora")
    result = edgetune.train("smol.qlora", data="train.jsonl", out="run1", steps=100)
    edgetune.export_adapter("run1", "adapter", format="peft")
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from torch import nn

from .artifact import TRAINABLE_FILE, compiled_info, load_compiled as _load_compiled, load_trainable, save_compiled
from .compiler import compile_model
from .errors import ArtifactError, EdgetuneError
from .fsutil import atomic_dir, atomic_file, check_output_path, sha256_file
from .manifest import artifact_kind, read_manifest, write_manifest
from .models.loader import load_model

ADAPTER_FORMATS = ("peft", "gguf", "sketch", "s2a")

# `merge`: the adapter directory's manifest kind -> "module:function" that merges it, imported
# lazily. Each takes (base_dir, adapter_dir, out, *, dense, dtype, force, overwrite) and returns the
# output path. Another adapter kind plugs in with :func:`register_merger`.
_MERGERS: dict[str, str] = {
    "sketch-delta": "edgetune.exporters.sketch:merge_sketch_artifact",
    "s2a-adapter": "edgetune.exporters.s2a:merge_s2a_artifact",
}


def load(src: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """Load a base model: a HF directory, a ``.gguf`` file or ``"default"``. Returns (model, tokenizer)."""
    model, tokenizer, _ = load_model(src, dtype=dtype)
    model.edgetune_tokenizer = tokenizer
    return model, tokenizer


def compile(model: nn.Module, recipe: str = "qlora", device: str | None = None, **options) -> nn.Module:  # noqa: A001
    """Rewrite ``model`` in place for a recipe and device profile; see ``edgetune.methods``."""
    return compile_model(model, recipe, device, **options)


def save(compiled: nn.Module, directory: str | os.PathLike, tokenizer=None, overwrite: bool = False) -> Path:
    tokenizer = tokenizer or getattr(compiled, "edgetune_tokenizer", None)
    if tokenizer is None:
        raise EdgetuneError("save needs the tokenizer: pass tokenizer=... or load the model with edgetune.load")
    return save_compiled(compiled, tokenizer, directory, overwrite=overwrite)


def load_compiled(directory: str | os.PathLike):
    """Load a compiled artifact directory. Returns (model, tokenizer)."""
    model, tokenizer, _ = _load_compiled(directory)
    model.edgetune_tokenizer = tokenizer
    return model, tokenizer


def load_run(run_dir: str | os.PathLike):
    """The compiled model of a run with the run's trained parameters. Returns (model, tokenizer, manifest)."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir, "run")
    ref = manifest["compiled"]
    compiled_dir = Path(ref["path"])
    if ref.get("relpath") and (run_dir / ref["relpath"]).is_dir():
        compiled_dir = run_dir / ref["relpath"]
    if not compiled_dir.is_dir():
        raise ArtifactError(f"{run_dir}: its compiled artifact {compiled_dir} is gone")
    if sha256_file(compiled_dir / "manifest.json") != manifest["compiled"]["manifest_sha256"]:
        raise ArtifactError(f"{run_dir}: compiled artifact {compiled_dir} changed since this run was trained")
    model, tokenizer = load_compiled(compiled_dir)
    load_trainable(model, run_dir / TRAINABLE_FILE)
    return model, tokenizer, manifest


def open_model(target: str | os.PathLike, adapter: str | os.PathLike | None = None, force: bool = False):
    """Whatever the user named — base model, compiled dir or run dir — as (model, tokenizer)."""
    kind = artifact_kind(target) if Path(target).is_dir() else None
    if kind == "compiled":
        model, tokenizer = load_compiled(target)
    elif kind == "run":
        model, tokenizer, _ = load_run(target)
    elif kind is not None:
        raise ArtifactError(f"{target} is an edgetune {kind}; expected a model, a compiled directory or a run")
    else:
        model, tokenizer = load(target)
    if adapter is not None:
        attach_adapter(model, adapter, force=force)
    return model, tokenizer


def train(compiled: str | os.PathLike, data: str | os.PathLike, out: str | os.PathLike, *,
          overwrite: bool = False, resume: bool = False, progress: bool = True, force: bool = False, **options):
    """Fine-tune a compiled artifact on ``data``; options are :class:`~edgetune.training.loop.TrainConfig` fields."""
    from .training.data import build_dataset
    from .training.images import data_sha256
    from .training.loop import TrainConfig, train_model

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise EdgetuneError(f"unknown training option(s): {', '.join(unknown)}")
    config = TrainConfig(**options)
    out = Path(out)
    if not resume:
        check_output_path(out, overwrite)
    elif out.exists() and not out.is_dir():
        raise EdgetuneError(f"--resume: {out} is not a run directory")
    compiled = Path(compiled)
    model, tokenizer = load_compiled(compiled)
    check_seq_len(model, config.seq_len)
    check_plan(model, config.batch, config.seq_len, force)
    dataset = build_dataset(data, tokenizer, config.seq_len)
    if resume and not out.is_dir():
        resume = False
    if not resume and out.exists():
        import shutil

        shutil.rmtree(out) if out.is_dir() and not out.is_symlink() else out.unlink()
    info = {
        # The relative path keeps a run valid when it moves together with its compiled artifact
        # (the quickstart builds both in a temporary directory, then renames it into place).
        "compiled": {"path": str(compiled.resolve()), "relpath": os.path.relpath(compiled.resolve(), out.resolve()),
                     "manifest_sha256": sha256_file(compiled / "manifest.json")},
        "data": {"path": str(Path(data).resolve()), "sha256": data_sha256(data), "rows": len(dataset)},
        "base_sha256": compiled_info(model).source.sha256 if compiled_info(model).source else None,
    }
    return train_model(model, dataset, config, out, resume=resume, run_info=info, progress=progress)


def check_seq_len(model: nn.Module, seq_len: int) -> None:
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and seq_len > limit:
        raise EdgetuneError(f"--seq-len {seq_len} is beyond the model's context of {limit} tokens")


def check_plan(model: nn.Module, batch: int, seq_len: int, force: bool = False) -> None:
    """Refuse a batch/seq_len that the planner says overflows the compiled device profile."""
    from .planner import format_bytes, plan_for_model

    plan = plan_for_model(model, batch, seq_len)
    if plan is not None and not plan.fits and not force:
        raise EdgetuneError(f"batch {batch} x seq-len {seq_len} needs {format_bytes(plan.total_bytes)} but "
                            f"{plan.device} has {format_bytes(plan.budget_bytes)}; {plan.suggestion} "
                            "(or pass --force)")


def lora_adapters(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Every LoRA pair of a compiled model, keyed by the HF module path it adapts."""
    from .methods.lora.layer import LoraLinear

    return {name: (m.lora_A.detach(), m.lora_B.detach())
            for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def export_adapter(compiled_or_run, out: str | os.PathLike, format: str = "peft",  # noqa: A002
                   dtype: str = "float32", overwrite: bool = False) -> Path:
    """Write the trained adapter for a server: a PEFT directory or a llama.cpp GGUF LoRA file.

    An ORT run directory (manifest kind ``ort-run``, from ``train --backend ort``) goes to
    :func:`edgetune.ort.adapter.export_run`: ``peft`` (the adapter from the ORT checkpoint),
    ``onnx`` (an inference model), or ``gguf``/``sketch``/``s2a`` (through the compiled artifact)."""
    if not isinstance(compiled_or_run, nn.Module):
        from .manifest import artifact_kind

        if artifact_kind(compiled_or_run) == "ort-run":
            from .ort.adapter import export_run

            return export_run(compiled_or_run, out, format=format, dtype=dtype, overwrite=overwrite)
    if format == "onnx":
        raise EdgetuneError("--format onnx needs an ORT run (from `edgetune train DIR --backend ort`); "
                            f"{compiled_or_run if not isinstance(compiled_or_run, nn.Module) else 'this model'} "
                            "is not one")
    if format not in ADAPTER_FORMATS:
        raise EdgetuneError(f"unknown adapter format {format!r}; available: {', '.join(ADAPTER_FORMATS)}")
    if dtype not in ("float32", "float16"):
        raise EdgetuneError(f"--dtype must be float32 or float16, got {dtype!r}")
    check_output_path(out, overwrite)
    if isinstance(compiled_or_run, nn.Module):
        model = compiled_or_run
    else:
        model, _ = open_model(compiled_or_run)
    info = compiled_info(model)
    if format == "sketch":
        return export_sketch(model, out, overwrite=overwrite)
    if format == "s2a":
        from .exporters.s2a import export_s2a

        return export_s2a(out, model, overwrite=overwrite)
    if not hasattr(info.config, "r"):
        raise EdgetuneError(f"recipe {info.recipe!r} has no LoRA adapter to export in {format} format")
    adapters = lora_adapters(model)
    cfg = info.config
    targets = sorted({path.rsplit(".", 1)[-1] for path in adapters})
    base_name = info.source.name if info.source else "unknown"
    base_sha = info.source.sha256 if info.source else None
    if format == "peft":
        from .exporters.peft import export_peft

        with atomic_dir(out, overwrite) as tmp:
            export_peft(tmp, adapters, r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout, target_modules=targets,
                        base_model_name_or_path=base_name,
                        fan_in_fan_out=model.config.model_type == "gpt2",
                        dtype=getattr(torch, dtype))
            write_manifest(tmp, "adapter", {"adapter_format": "peft", "recipe": info.recipe,
                                            "base_sha256": base_sha, "base_name": base_name})
    else:
        from .exporters.gguf_lora import export_gguf_lora

        with atomic_file(out) as tmp:
            provenance = {"recipe": info.recipe, "base_name": base_name}
            if base_sha:
                provenance["base_sha256"] = base_sha
            export_gguf_lora(tmp, adapters, alpha=cfg.alpha, model_config=model.config.to_dict(),
                             dtype="f16" if dtype == "float16" else "f32", provenance=provenance)
    return Path(out)


def export_sketch(model: nn.Module, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a sketchtune model's table deltas (trained − initial, fp16) and a manifest with the base's sha256."""
    from .exporters.sketch import MANIFEST_KIND, export_sketch_delta

    info = compiled_info(model)
    if info.recipe != "sketchtune":
        raise EdgetuneError(f"recipe {info.recipe!r} has no sketch tables to export; --format sketch needs a "
                            "sketchtune run")
    base_sha = info.source.sha256 if info.source else None
    with atomic_dir(out, overwrite) as tmp:
        export_sketch_delta(tmp, model, base_sha256=base_sha)
        write_manifest(tmp, MANIFEST_KIND, {"adapter_format": "sketch", "recipe": info.recipe,
                                            "base_sha256": base_sha,
                                            "base_name": info.source.name if info.source else "unknown"})
    return Path(out)


def register_merger(kind: str, target: str) -> None:
    """Teach `merge` an adapter kind: ``target`` is ``"module:function"`` (see ``_MERGERS``)."""
    _MERGERS[kind] = target


def merge(base_dir: str | os.PathLike, adapter: str | os.PathLike, out: str | os.PathLike, *, dense: bool = False,
          dtype: str | None = None, force: bool = False, overwrite: bool = False) -> Path:
    """Apply an exported adapter to its base on the server side; dispatches on the adapter manifest's kind.

    Sketch deltas: ``out`` is the sketched artifact with the merged tables, or with ``dense`` a
    plain Hugging Face model directory.
    """
    import importlib

    if dtype not in (None, "float32", "float16", "bfloat16"):
        raise EdgetuneError(f"--dtype must be float32, float16 or bfloat16, got {dtype!r}")
    check_output_path(out, overwrite)
    if not Path(adapter).is_dir():
        raise ArtifactError(f"{adapter} is not an adapter directory")
    kind = artifact_kind(adapter)
    if kind is None:
        raise ArtifactError(f"{adapter} has no edgetune manifest; merge takes an adapter written by `edgetune export`")
    if kind not in _MERGERS:
        raise EdgetuneError(f"merge does not know adapters of kind {kind!r}; it merges {', '.join(sorted(_MERGERS))}")
    module, _, func = _MERGERS[kind].partition(":")
    merger = getattr(importlib.import_module(module), func)
    return merger(base_dir, adapter, out, dense=dense, dtype=getattr(torch, dtype) if dtype else None,
                  force=force, overwrite=overwrite)


def attach_adapter(model: nn.Module, adapter_dir: str | os.PathLike, force: bool = False) -> nn.Module:
    """Load an adapter into ``model``: a sketch delta into its tables; a PEFT adapter into its LoRA layers,
    or by adding LoRA to a plain model."""
    from .exporters.peft import read_peft
    from .exporters.sketch import DELTA_CONFIG, load_sketch_delta
    from .methods.lora.layer import LoraLinear

    adapter_dir = Path(adapter_dir)
    if (adapter_dir / DELTA_CONFIG).is_file():
        load_sketch_delta(adapter_dir, model, force=force)
        return model
    if not (adapter_dir / "adapter_config.json").is_file():
        raise ArtifactError(f"{adapter_dir} is not a PEFT adapter directory (no adapter_config.json)")
    if (adapter_dir / "manifest.json").is_file():
        manifest = read_manifest(adapter_dir, "adapter")
        source = getattr(model, "edgetune_source", None)
        if (not force and manifest.get("base_sha256") and source is not None
                and manifest["base_sha256"] != source.sha256):
            raise ArtifactError(f"{adapter_dir} was trained on a different base (sha256 "
                                f"{manifest['base_sha256'][:12]}…, this one is {source.sha256[:12]}…); "
                                "pass --force to apply it anyway")
    config, adapters = read_peft(adapter_dir)
    try:  # a foreign adapter's config is unchecked input: r and alpha must describe its tensors
        r, alpha, targets = int(config["r"]), float(config["lora_alpha"]), tuple(config["target_modules"])
        if (r < 1 or alpha != alpha or not adapters or not all(isinstance(t, str) for t in targets)
                or any(a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r
                       for a, b in adapters.values())):
            raise ValueError
    except (KeyError, TypeError, ValueError, OverflowError):
        raise ArtifactError(f"{adapter_dir / 'adapter_config.json'}: r, lora_alpha or target_modules are missing "
                            "or do not match the adapter's tensors") from None
    if getattr(model, "edgetune", None) is None:
        compile_model(model, "lora", r=r, alpha=alpha, target_modules=targets,
                      dtype=str(model.dtype).removeprefix("torch."))
    modules = dict(model.named_modules())
    with torch.no_grad():
        for path, (a, b) in adapters.items():
            layer = modules.get(path)
            if not isinstance(layer, LoraLinear) or layer.lora_A.shape != a.shape or layer.lora_B.shape != b.shape:
                raise ArtifactError(f"{adapter_dir}: adapter for {path} does not fit this model")
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)
            layer.scaling = alpha / r
    return model
