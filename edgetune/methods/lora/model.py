"""The `lora` rewrite: wrap each target projection in a :class:`LoraLinear`."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ...models.arch import ArchSpec, get_submodule_parent, linear_weight
from .config import LoraConfig
from .layer import LoraLinear


def wrap_projections(model: nn.Module, config: LoraConfig, arch: ArchSpec, materialize: bool,
                     make_base: Callable[[nn.Module], nn.Module]) -> list[str]:
    """Replace every target projection by ``LoraLinear(make_base(old), ...)``.

    Shared by every LoRA-style recipe: they differ only in how the frozen base is stored.
    Already-wrapped projections are left alone, so running the pass twice changes nothing.
    """
    targets = config.resolve_targets(arch.linear_names)
    generator = torch.Generator().manual_seed(config.init_seed)
    changed = []
    for path in arch.target_paths(model, targets):
        parent, leaf = get_submodule_parent(model, path)
        old = getattr(parent, leaf)
        if isinstance(old, LoraLinear) or isinstance(parent, LoraLinear):
            continue
        weight, _ = linear_weight(old, arch)
        out_features, in_features = weight.shape
        base = make_base(old)
        for p in base.parameters():
            p.requires_grad_(False)
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        device = weight.device if materialize else torch.device("meta")
        lora = LoraLinear(base, in_features, out_features, config.r, config.alpha, config.dropout,
                          device=device, dtype=dtype)
        if materialize:
            lora.reset_parameters(generator)
        setattr(parent, leaf, lora)
        changed.append(path)
    return changed


def apply(model: nn.Module, config: LoraConfig, arch: ArchSpec, materialize: bool = True) -> list[str]:
    return wrap_projections(model, config, arch, materialize, make_base=lambda old: old)
