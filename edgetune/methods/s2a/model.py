"""The `s2a` rewrite: freeze (and optionally NF4-quantize) the base, add bias tuning, low-rank prompts
and the lite side branch."""
from __future__ import annotations

import torch
from torch import nn

from ...errors import EdgetuneError
from ...models.arch import ArchSpec, get_submodule_parent, linear_weight
from .config import S2AConfig
from .layer import BiasTuned, LowRankPrompt, attach_prompt
from .side import SideBranch, attach_side

NORM_NAMES = ("input_layernorm", "post_attention_layernorm", "ln_1", "ln_2")


def _frozen_base(old: nn.Module, config: S2AConfig, arch: ArchSpec, materialize: bool) -> nn.Module:
    if config.base == "dense":
        return old
    from ..qlora.layer import NF4Linear

    weight, bias = linear_weight(old, arch)
    out_features, in_features = weight.shape
    if not materialize:
        return NF4Linear(in_features, out_features, bias is not None, config.blocksize, config.double_quant,
                         device="meta", dtype=weight.dtype)
    return NF4Linear.from_weight(weight.detach(), None if bias is None else bias.detach(),
                                 config.blocksize, config.double_quant)


def apply(model: nn.Module, config: S2AConfig, arch: ArchSpec, materialize: bool = True) -> list[str]:
    changed = []
    dtype = next(model.parameters()).dtype
    device = None if materialize else torch.device("meta")
    for path in arch.target_paths(model, arch.linear_names):
        parent, leaf = get_submodule_parent(model, path)
        old = getattr(parent, leaf)
        if isinstance(old, BiasTuned) or isinstance(parent, BiasTuned):
            continue
        weight, _ = linear_weight(old, arch)
        base = _frozen_base(old, config, arch, materialize)
        for p in base.parameters():
            p.requires_grad_(False)
        if config.bias:
            base = BiasTuned(base, weight.shape[0], device=device or weight.device, dtype=dtype)
        setattr(parent, leaf, base)
        changed.append(path)
    layers = [m for m in model.modules() if any(hasattr(m, n) for n in NORM_NAMES)]
    if config.bias:
        for layer in layers:
            for n in NORM_NAMES:
                norm = getattr(layer, n, None)
                if norm is not None and not isinstance(norm, BiasTuned):
                    setattr(layer, n, BiasTuned(norm, norm.weight.shape[0], device=device, dtype=dtype))
    if config.prompt_len:
        generator = torch.Generator().manual_seed(config.init_seed)
        hidden = model.config.hidden_size
        for layer in layers:
            if hasattr(layer, "s2a_prompt"):
                continue
            prompt = LowRankPrompt(config.prompt_len, hidden, config.prompt_rank, device=device, dtype=dtype)
            if materialize:
                prompt.reset_parameters(generator)
            attach_prompt(layer, prompt)
    if config.side:
        _add_side(model, config, layers, device, dtype, materialize)
    return changed


def _add_side(model: nn.Module, config: S2AConfig, layers: list[nn.Module], device, dtype, materialize: bool) -> None:
    """Register the side branch on the base model (``<base>.s2a_side``) and hook it into the blocks.
    Its hooks are registered after the prompts', so the side reads a block's prompted input."""
    base = model.base_model
    if hasattr(base, "s2a_side"):
        return
    if not 1 <= config.side_dim <= model.config.hidden_size:
        raise EdgetuneError(f"side_dim must be in [1, hidden size {model.config.hidden_size}], got {config.side_dim}")
    side = SideBranch(model.config.hidden_size, config.side_dim, list(range(0, len(layers), config.side_every)),
                      device=device, dtype=dtype)
    if materialize:
        side.reset_parameters(torch.Generator().manual_seed(config.init_seed + 1))
    base.s2a_side = side
    attach_side(layers, side)
