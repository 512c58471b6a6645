"""The activation-lean rewrite: passes that swap ops for compressed-saving ones.

A pass looks at every module once and returns the paths it changed. Passes only touch what they
recognise and never re-touch what they made, so running the rewrite twice changes nothing. Two
things are not modules and are caught by hooks that transformers already has:

* attention is a function call; the ``attention`` pass registers ``edgetune_lean`` in
  transformers' ``AttentionInterface`` (and its mask interface) and points the model's config
  at it;
* the loss is computed by the model's forward from full logits; the ``loss_head`` pass marks
  the model so :func:`edgetune.s2a.loss.causal_lm_loss` runs the decoder and a chunked
  cross-entropy instead.

Leaf modules that no pass knows and that are not known to be harmless are left as they are and
listed in the report (``unknown``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

from torch import nn

from ..models.arch import get_submodule_parent
from .functions import Compression, lean_attention
from .loss import LOSS_MAX_ROWS
from .modules import LeanActivation, LeanGatedMLP, LeanLayerNormModule, LeanRMSNormModule
from .vision import LeanBatchNorm, LeanConv2d, LeanGlobalAvgPool, LeanMaxPool2d

ATTN_NAME = "edgetune_lean"


@dataclass
class RewriteReport:
    compression: Compression
    changed: dict[str, list[str]] = field(default_factory=dict)  # pass name -> paths
    unknown: list[tuple[str, str]] = field(default_factory=list)  # (path, type) left untouched

    @property
    def total(self) -> int:
        return sum(len(v) for v in self.changed.values())

    def to_dict(self) -> dict:
        return {"compression": dataclasses.asdict(self.compression), "changed": self.changed,
                "unknown": [list(u) for u in self.unknown]}


# --------------------------------------------------------------------------- the passes


def _replace(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, leaf = get_submodule_parent(model, path)
    setattr(parent, leaf, new)


def norms_pass(model: nn.Module, comp: Compression) -> list[str]:
    changed = []
    for path, m in list(model.named_modules()):
        if type(m).__name__ in ("LlamaRMSNorm", "Qwen2RMSNorm", "MistralRMSNorm"):
            _replace(model, path, LeanRMSNormModule(m.weight, m.variance_epsilon, comp))
        elif isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
            _replace(model, path, LeanLayerNormModule(m.weight, m.bias, m.eps, comp))
        else:
            continue
        changed.append(path)
    return changed


def batchnorm_pass(model: nn.Module, comp: Compression) -> list[str]:
    """nn.BatchNorm1d/2d/3d -> LeanBatchNorm (8-bit input + per-channel stats; same train/eval semantics)."""
    changed = []
    for path, m in list(model.named_modules()):
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and path:
            _replace(model, path, LeanBatchNorm(m, comp))
            changed.append(path)
    return changed


def conv_pool_pass(model: nn.Module, comp: Compression) -> list[str]:
    """Convolutions keep no input while their weight is frozen; global average pooling keeps
    nothing; 2-D max pooling keeps a 4-bit window position instead of fp input + int64 indices."""
    changed = []
    for path, m in list(model.named_modules()):
        if not path:
            continue
        if LeanConv2d.accepts(m):
            _replace(model, path, LeanConv2d(m))
        elif isinstance(m, nn.AdaptiveAvgPool2d) and LeanGlobalAvgPool.accepts(m):
            _replace(model, path, LeanGlobalAvgPool())
        elif isinstance(m, nn.MaxPool2d) and LeanMaxPool2d.accepts(m):
            _replace(model, path, LeanMaxPool2d(m))
        else:
            continue
        changed.append(path)
    return changed


def activation_op(m: nn.Module) -> str | None:
    """The name of the pointwise nonlinearity a module computes, if we know it."""
    name = type(m).__name__
    if isinstance(m, nn.ReLU):
        return "relu"
    if isinstance(m, nn.SiLU) or name == "SiLUActivation":
        return "silu"
    if isinstance(m, nn.GELU):
        return "gelu_tanh" if m.approximate == "tanh" else "gelu"
    if name in ("NewGELUActivation", "GELUTanh", "PytorchGELUTanh", "FastGELUActivation"):
        return "gelu_tanh"
    if name == "GELUActivation":
        return "gelu"
    return None


def gated_mlp_pass(model: nn.Module, comp: Compression) -> list[str]:
    changed = []
    for path, m in list(model.named_modules()):
        if type(m).__name__ in ("LlamaMLP", "Qwen2MLP", "MistralMLP"):
            op = activation_op(m.act_fn)
            if op is None or op == "relu":
                continue
            _replace(model, path, LeanGatedMLP(m.gate_proj, m.up_proj, m.down_proj, op, comp))
            changed.append(path)
    return changed


def activations_pass(model: nn.Module, comp: Compression) -> list[str]:
    changed = []
    for path, m in list(model.named_modules()):
        if isinstance(m, LeanGatedMLP):
            continue
        op = activation_op(m)
        if op is not None and path:
            _replace(model, path, LeanActivation(op, comp))
            changed.append(path)
    return changed


def lora_inputs_pass(model: nn.Module, comp: Compression) -> list[str]:
    """Inputs kept for adapter gradients (LoRA's dA, SketchTune's table gradient) go 8-bit."""
    changed = []
    for path, m in model.named_modules():
        if type(m).__name__ in ("LoraLinear", "SketchLinear") and getattr(m, "compression", None) != comp:
            m.compression = comp
            changed.append(path)
    return changed


def attention_pass(model: nn.Module, comp: Compression) -> list[str]:
    register_attention()
    changed = []
    for path, m in model.named_modules():
        if type(m).__name__.endswith("Attention") and hasattr(m, "config"):
            # A module may hold its own config object (a loader can swap model.config after
            # construction), and it dispatches on *its* config: point each one at us.
            if getattr(m, "edgetune_comp", None) != comp or m.config._attn_implementation != ATTN_NAME:
                m.edgetune_comp = comp
                m.config._attn_implementation = ATTN_NAME
                changed.append(path)
    if changed and getattr(model.config, "_attn_implementation", None) != ATTN_NAME:
        model.config._attn_implementation = ATTN_NAME
    return changed


def loss_head_pass(model: nn.Module, comp: Compression) -> list[str]:
    head = getattr(model, "get_output_embeddings", None)  # plain nn.Modules (torchvision) have none
    if getattr(model, "edgetune_loss_chunk", None) == LOSS_MAX_ROWS or head is None or head() is None:
        return []
    model.edgetune_loss_chunk = LOSS_MAX_ROWS  # rows per chunk; the logits are vocab-sliced
    return ["<loss head>"]


PASSES: dict[str, Callable[[nn.Module, Compression], list[str]]] = {
    "norms": norms_pass,
    "batchnorm": batchnorm_pass,
    "conv_pool": conv_pool_pass,
    "gated_mlp": gated_mlp_pass,
    "activations": activations_pass,
    "attention": attention_pass,
    "lora_inputs": lora_inputs_pass,
    "loss_head": loss_head_pass,
}

# Leaf modules whose backward keeps nothing worth compressing (frozen matmuls keep no input; the
# rotary embedding and dropout-free layers keep nothing), matched by class name.
HARMLESS = ("Linear", "Conv1D", "Embedding", "Dropout", "Identity", "NF4Linear", "NF4LMHead", "SketchLinear", "LowRankPrompt",
            "LeanRMSNormModule", "LeanLayerNormModule", "LeanActivation", "LeanBatchNorm", "LeanConv2d", "LeanGlobalAvgPool",
            "LeanMaxPool2d", "Flatten")


def _unknown_modules(model: nn.Module) -> list[tuple[str, str]]:
    out = []
    for path, m in model.named_modules():
        name = type(m).__name__
        if next(m.children(), None) is not None or not path:
            continue  # containers: their children are checked
        if name in HARMLESS or name.endswith("RotaryEmbedding") or name.endswith("Embedding"):
            continue
        out.append((path, name))
    return out


def rewrite(model: nn.Module, comp: Compression, passes: tuple[str, ...] | None = None) -> RewriteReport:
    """Run the passes (all by default) with ``comp``; ``act_bits=16`` leaves the model as it is."""
    report = RewriteReport(comp)
    if comp.act_bits == 16:
        return report
    if comp.act_bits not in (4, 8):
        raise ValueError(f"act_bits must be 16, 8 or 4, got {comp.act_bits}")
    for name in passes or tuple(PASSES):
        changed = PASSES[name](model, comp)
        if changed:
            report.changed[name] = changed
    report.unknown = _unknown_modules(model)
    return report


# --------------------------------------------------------------------------- transformers hooks

_REGISTERED = False


def lean_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                           is_causal=None, **kwargs):
    """transformers attention-interface function: (B, H, T, D) in, (B, T, H, D) out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    comp = getattr(module, "edgetune_comp", None)
    needs_grad = any(t.requires_grad for t in (query, key, value))
    if comp is None or not needs_grad or kwargs.get("position_bias") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, is_causal=is_causal, **kwargs)
    n_rep = query.shape[1] // key.shape[1]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = bool(query.shape[2] > 1 and attention_mask is None and causal)
    mask = attention_mask[:, :, :, : key.shape[-2]] if attention_mask is not None else None
    return lean_attention(query, key, value, mask, causal, scaling, n_rep, comp, dropout), None  # (B, T, H, D)


def register_attention() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, lean_attention_forward)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
    _REGISTERED = True
