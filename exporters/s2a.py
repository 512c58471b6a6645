"""S2A adapters: export the activation modules, and fold their biases into a dense model.

The PEFT format has no slot for per-projection bias deltas or per-block prompts, so an S2A
adapter is its own small directory::

    s2a.safetensors   every trainable tensor (delta_bias, s2a_prompt.A/.B, s2a_side.*), by module path
    manifest.json     kind "s2a-adapter": recipe config and the base's sha256

``merge --dense`` writes a plain transformers model: NF4 weights are dequantized, a projection's
delta becomes its bias (``attention_bias`` / ``mlp_bias`` switched on), and a norm's delta is
folded into the projections that read the norm (W·(n + b) = W·n + W·b). A trained low-rank prompt is
position-dependent and a trained side branch is a separate network (pooled block inputs through an
MLP); neither has a place in a plain transformers model, so a dense merge of one is refused. An
untrained one (zero A, zero up-projection) contributes exactly nothing and is dropped.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from edgetune.errors import ArtifactError, EdgetuneError
from edgetune.fsutil import atomic_dir
from edgetune.manifest import read_manifest, write_manifest
from edgetune.tensors import save_tensors

MANIFEST_KIND = "s2a-adapter"
TENSORS_FILE = "s2a.safetensors"
# norm -> the projections that read its output, per decoder block
NORM_CONSUMERS = {"input_layernorm": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
                  "post_attention_layernorm": ("mlp.gate_proj", "mlp.up_proj")}


def export_s2a(out: str | os.PathLike, model: nn.Module, overwrite: bool = False) -> Path:
    from edgetune.artifact import compiled_info

    info = compiled_info(model)
    if info.recipe != "s2a":
        raise EdgetuneError(f"recipe {info.recipe!r} has no S2A modules; --format s2a needs an s2a run")
    tensors = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
    base_sha = info.source.sha256 if info.source else None
    with atomic_dir(out, overwrite) as tmp:
        save_tensors(tensors, tmp / TENSORS_FILE)
        write_manifest(tmp, MANIFEST_KIND, {
            "adapter_format": "s2a", "recipe": "s2a", "recipe_config": info.to_dict()["recipe_config"],
            "base_sha256": base_sha, "base_name": info.source.name if info.source else "unknown",
        })
    return Path(out)


def load_s2a(directory: str | os.PathLike, model: nn.Module, force: bool = False) -> None:
    """Copy an exported S2A adapter into a compiled s2a model (same base, same module layout)."""
    from edgetune.artifact import compiled_info, load_trainable

    manifest = read_manifest(directory, MANIFEST_KIND)
    info = compiled_info(model)
    base_sha = info.source.sha256 if info.source else None
    if not force and manifest.get("base_sha256") and base_sha and manifest["base_sha256"] != base_sha:
        raise ArtifactError(f"{directory} was trained on a different base (sha256 {manifest['base_sha256'][:12]}…, "
                            f"this one is {base_sha[:12]}…); pass --force to merge anyway")
    load_trainable(model, Path(directory) / TENSORS_FILE)


def _dense(module: nn.Module, dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(weight (out, in), bias) of a frozen projection, NF4 dequantized."""
    if hasattr(module, "dequantize"):
        return module.dequantize(dtype), module.bias
    return module.weight.detach().to(dtype), module.bias


def dense_s2a_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """A plain transformers model computing what the s2a ``model`` computes (biases folded in)."""
    from transformers import AutoModelForCausalLM

    from edgetune.methods.s2a.layer import BiasTuned

    dtype = dtype or next(model.parameters()).dtype
    for name, m in model.named_modules():
        prompt = getattr(m, "s2a_prompt", None)
        if prompt is not None and bool(prompt.A.detach().abs().sum() > 0):
            raise EdgetuneError(f"{name}: a trained low-rank prompt cannot be folded into a dense model; "
                                "merge without --dense, or train with --prompt-len 0")
        side = getattr(m, "s2a_side", None)
        if side is not None and bool(side.up.weight.detach().abs().sum() > 0):
            raise EdgetuneError(f"{name}.s2a_side: a trained side branch is a separate network and cannot be folded "
                                "into a dense model; merge without --dense, or train with --no-side")
    if model.config.model_type not in ("llama", "qwen2", "mistral"):
        raise EdgetuneError(f"dense S2A merge supports Llama-family models, not {model.config.model_type!r}")
    config = model.config.__class__.from_dict(model.config.to_dict())
    config.attention_bias, config.mlp_bias = True, True
    state: dict[str, torch.Tensor] = {}
    layers = model.base_model.layers
    for path, m in model.named_modules():
        if isinstance(m, BiasTuned) and not path.endswith("layernorm"):
            weight, bias = _dense(m.base, dtype)
            b = m.delta_bias.detach().to(dtype) + (bias.to(dtype) if bias is not None else 0)
            state[f"{path}.weight"], state[f"{path}.bias"] = weight, b
    for i, layer in enumerate(layers):
        for norm_name, consumers in NORM_CONSUMERS.items():
            norm = getattr(layer, norm_name)
            if isinstance(norm, BiasTuned):
                shift = norm.delta_bias.detach().to(dtype)  # (d,)
                norm = norm.base
                for c in consumers:
                    key = f"{model.base_model_prefix}.layers.{i}.{c}"
                    state[f"{key}.bias"] = state[f"{key}.bias"] + state[f"{key}.weight"] @ shift
    with torch.device("meta"):
        dense = AutoModelForCausalLM.from_config(config, dtype=dtype)
    full = {k: v.detach().to(dtype) for k, v in model.state_dict().items()
            if not any(s in k for s in ("packed", "absmax", "delta_bias", "s2a_prompt", "s2a_side"))}
    remapped = {k.replace(".base.", "."): v for k, v in full.items()}
    remapped.update(state)
    missing, unexpected = dense.load_state_dict(remapped, strict=False, assign=True)
    tied = getattr(dense.config, "tie_word_embeddings", False)
    missing = [k for k in missing if not (tied and k == "lm_head.weight")]
    if missing:
        raise ArtifactError(f"dense merge left tensors unset: {missing[:4]}")
    if tied:
        dense.tie_weights()
    _copy_unsaved_buffers(dense, model)
    dense.eval()
    return dense


def _copy_unsaved_buffers(dense: nn.Module, model: nn.Module) -> None:
    """Non-persistent buffers (the rotary ``inv_freq``) are not in a state dict, so the meta-built
    dense model still has them on meta; take them from the s2a model, which computed them."""
    source = {k.replace(".base.", "."): v for k, v in model.named_buffers()}
    for name, buf in list(dense.named_buffers()):
        if buf.is_meta and name in source:
            owner, _, leaf = name.rpartition(".")
            dense.get_submodule(owner)._buffers[leaf] = source[name].detach().clone()


def merge_s2a_artifact(base_dir, adapter_dir, out, *, dense: bool = False, dtype=None, force: bool = False,
                       overwrite: bool = False) -> Path:
    """``edgetune merge`` for an S2A adapter: the compiled s2a artifact with the adapter's tensors,
    or (``dense``) a plain Hugging Face model directory with the biases folded in."""
    from edgetune.artifact import load_compiled, save_compiled

    model, tokenizer, _ = load_compiled(base_dir)
    load_s2a(adapter_dir, model, force=force)
    if not dense:
        return save_compiled(model, tokenizer, out, overwrite=overwrite)
    merged = dense_s2a_model(model, dtype)
    with atomic_dir(out, overwrite) as tmp:
        merged.save_pretrained(str(tmp))
        tokenizer.save_pretrained(str(tmp))
    return Path(out)
