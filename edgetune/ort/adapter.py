"""Get a trained adapter out of an ORT run: a PEFT directory, an inference ONNX model, or any of
the torch path's other formats (``gguf``, ``sketch``, ``s2a``).

``peft`` and ``onnx`` need only the ORT directory (self-contained). The other formats are
written by the torch exporters (:func:`edgetune.api.export_adapter`) from the compiled artifact
the ORT directory was exported from (its manifest records the path and manifest sha256) with
the run's trained tensors loaded into it, so they are byte-for-byte the torch path's formats.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import ArtifactError, EdgetuneError
from ..fsutil import atomic_dir, atomic_file, check_output_path
from ..manifest import read_manifest, write_manifest
from .export import read_ort_dir

FORMATS = ("peft", "onnx")
TORCH_FORMATS = ("gguf", "sketch", "s2a")  # through the compiled artifact and the torch exporters


def ort_dir_of_run(run_dir: Path) -> tuple[Path, dict, dict]:
    """(ORT directory, its manifest, the run's manifest) for an ORT run, checked against each other."""
    from ..fsutil import sha256_file
    from .train import RUN_KIND

    run = read_manifest(run_dir, RUN_KIND)
    ref = run["ort"]
    ort_dir = Path(ref["path"])
    if ref.get("relpath") and (run_dir / ref["relpath"]).is_dir():
        ort_dir = run_dir / ref["relpath"]
    if not ort_dir.is_dir():
        raise ArtifactError(f"{run_dir}: its ORT directory {ort_dir} is gone")
    if sha256_file(ort_dir / "manifest.json") != ref["manifest_sha256"]:
        raise ArtifactError(f"{run_dir}: ORT directory {ort_dir} changed since this run was trained")
    return ort_dir, read_ort_dir(ort_dir), run


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, format: str = "peft",  # noqa: A002
               dtype: str = "float32", overwrite: bool = False) -> Path:
    """Write the adapter of an ORT run (``peft``) or the trained model for ORT inference (``onnx``)."""
    import torch

    if format not in FORMATS + TORCH_FORMATS:
        raise EdgetuneError(f"an ORT run exports --format {', '.join(FORMATS + TORCH_FORMATS)}, not {format!r}")
    if dtype not in ("float32", "float16"):
        raise EdgetuneError(f"--dtype must be float32 or float16, got {dtype!r}")
    check_output_path(out, overwrite)
    run_dir = Path(run_dir)
    ort_dir, manifest, run = ort_dir_of_run(run_dir)
    if format in TORCH_FORMATS:
        from ..api import export_adapter

        return export_adapter(_torch_model(run_dir, manifest), out, format=format, dtype=dtype, overwrite=overwrite)
    if format == "onnx":
        from .train import open_session

        sess = open_session(ort_dir, run_dir / "ort_checkpoint")
        with atomic_file(out) as tmp:
            if manifest.get("custom_op_library"):
                # ORT 1.19's export_model_for_inferencing refuses graphs with custom-domain nodes
                # ("edgetune:NF4MatMul(-1) is not a registered function/op"); do the same by hand.
                _inference_model(ort_dir / "eval_model.onnx", sess.state, tmp)
            else:
                sess.module.export_model_for_inferencing(str(tmp), ["logits"])
        return Path(out)

    from ..exporters.peft import export_peft
    from ..tensors import load_tensors

    state = load_tensors(run_dir / "trainable.safetensors")
    cfg = manifest["recipe_config"]
    adapters = {}
    for name in manifest["parameters"].values():
        path, _, which = name.rpartition(".")
        if which not in ("lora_A", "lora_B"):
            raise ArtifactError(f"{run_dir}: parameter {name} is not a LoRA matrix")
        adapters.setdefault(path, {})[which] = state[name]
    pairs = {p: (d["lora_A"], d["lora_B"]) for p, d in sorted(adapters.items())}
    targets = sorted({p.rsplit(".", 1)[-1] for p in pairs})
    source = manifest.get("source") or {}
    base_name = source.get("name", "unknown")
    with atomic_dir(out, overwrite) as tmp:
        export_peft(tmp, pairs, r=int(cfg["r"]), alpha=float(cfg["alpha"]), dropout=float(cfg["dropout"]),
                    target_modules=targets, base_model_name_or_path=base_name,
                    fan_in_fan_out=manifest.get("model_type") == "gpt2", dtype=getattr(torch, dtype))
        write_manifest(tmp, "adapter", {"adapter_format": "peft", "recipe": manifest["recipe"], "backend": "ort",
                                        "base_sha256": manifest.get("base_sha256"), "base_name": base_name})
    return Path(out)


def _torch_model(run_dir: Path, manifest: dict):
    """The compiled artifact behind an ORT directory, with the run's trained tensors loaded."""
    import torch

    from ..artifact import load_compiled
    from ..fsutil import sha256_file
    from ..tensors import load_tensors

    ref = manifest.get("compiled") or {}
    compiled = Path(ref.get("path", ""))
    if not (compiled / "manifest.json").is_file():
        raise ArtifactError(f"{run_dir}: this format is written from the compiled artifact {compiled}, which is "
                            "gone; use --format peft or onnx (they need only the ORT directory)")
    if sha256_file(compiled / "manifest.json") != ref.get("manifest_sha256"):
        raise ArtifactError(f"{run_dir}: the compiled artifact {compiled} changed since the ORT export")
    model, tokenizer, _ = load_compiled(compiled)
    params = dict(model.named_parameters())
    state = load_tensors(run_dir / "trainable.safetensors")
    missing = sorted(set(state) - set(params))
    if missing:
        raise ArtifactError(f"{run_dir}: trained tensor {missing[0]} is not a parameter of {compiled}")
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)
    model.edgetune_tokenizer = tokenizer
    return model


def _inference_model(eval_model: Path, state, out: Path) -> None:
    """eval_model.onnx cut at ``logits``, with every checkpoint parameter as an initializer."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(eval_model))
    graph = model.graph
    needed, keep = {"logits"}, []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    keep.reverse()
    del graph.node[:]
    graph.node.extend(keep)
    logits = next((o for o in graph.output if o.name == "logits"), None)
    del graph.output[:]
    graph.output.append(logits if logits is not None else onnx.helper.make_empty_tensor_value_info("logits"))
    inputs = [i for i in graph.input if i.name in needed]
    params = [i.name for i in inputs if i.name in state.parameters]
    del graph.input[:]
    graph.input.extend(i for i in inputs if i.name not in params)
    graph.initializer.extend(numpy_helper.from_array(state.parameters[n].data, n) for n in params)
    for init in list(graph.initializer):
        if init.name not in needed:
            graph.initializer.remove(init)
    onnx.save(model, str(out))


__all__ = ["export_run", "FORMATS"]
