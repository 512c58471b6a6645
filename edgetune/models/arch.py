"""What edgetune needs to know about each supported architecture, in one table.

A rewrite pass asks an :class:`ArchSpec` where the decoder blocks are and which projections are
linear layers; it never sniffs class names itself. Adding an architecture is one entry here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import EdgetuneError


@dataclass(frozen=True)
class ArchSpec:
    model_types: tuple[str, ...]
    # Regex over module paths that selects a decoder block's projections, capturing the layer index.
    block_pattern: str
    # Leaf names of the projections inside a block (PEFT's ``target_modules`` vocabulary).
    linear_names: tuple[str, ...]
    # GPT-2 stores its projections as ``Conv1D`` with a transposed (in, out) weight.
    transposed_weights: bool = False

    def block_index(self, module_path: str) -> int | None:
        m = re.match(self.block_pattern, module_path)
        return int(m.group(1)) if m else None

    def target_paths(self, model: nn.Module, targets: tuple[str, ...] | list[str]) -> list[str]:
        """Module paths of the projections named in ``targets``, in model order."""
        unknown = sorted(set(targets) - set(self.linear_names))
        if unknown:
            raise EdgetuneError(
                f"unknown target module(s) {', '.join(unknown)}; this architecture has "
                f"{', '.join(self.linear_names)}"
            )
        wanted = set(targets)
        return [
            name
            for name, _ in model.named_modules()
            if self.block_index(name) is not None and name.rsplit(".", 1)[-1] in wanted
        ]


LLAMA_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

ARCHITECTURES: tuple[ArchSpec, ...] = (
    ArchSpec(("llama", "qwen2", "mistral"), r"^model\.layers\.(\d+)\.", LLAMA_LINEARS),
    ArchSpec(("gpt2",), r"^transformer\.h\.(\d+)\.", ("c_attn", "c_proj", "c_fc"), transposed_weights=True),
)

SUPPORTED_MODEL_TYPES = tuple(t for a in ARCHITECTURES for t in a.model_types)


def arch_for(config) -> ArchSpec:
    """The spec for a transformers config, or a one-line error listing what is supported."""
    model_type = getattr(config, "model_type", None)
    for spec in ARCHITECTURES:
        if model_type in spec.model_types:
            return spec
    raise EdgetuneError(
        f"unsupported architecture {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
    )


def linear_weight(module: nn.Module, spec: ArchSpec) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A projection's weight as (out, in), and its bias, whatever layout the architecture uses."""
    weight = module.weight
    if spec.transposed_weights:
        weight = weight.t()
    return weight, getattr(module, "bias", None)


def get_submodule_parent(model: nn.Module, path: str) -> tuple[nn.Module, str]:
    parent_path, _, leaf = path.rpartition(".")
    return (model.get_submodule(parent_path) if parent_path else model), leaf
