"""`compile`: turn a plain transformers model into a training-ready, memory-lean one.

The compiled model is the same ``nn.Module`` with its projections rewritten by a recipe; it keeps
the usual HF forward (``input_ids, attention_mask, labels`` → ``.loss``, ``.logits``). What was
done is recorded on ``model.edgetune`` (a :class:`CompileInfo`) and later in the manifest.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .methods import get_method, make_config
from .models.arch import arch_for
from .models.loader import ModelSource
from .profiles import DeviceProfile, load_profile

DEFAULT_DEVICE = "cpu-16gb"


@dataclass
class CompileInfo:
    recipe: str
    config: Any  # the recipe's config dataclass
    device: DeviceProfile
    dtype: str
    source: ModelSource | None
    rewritten: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        cfg = dataclasses.asdict(self.config)
        return {
            "recipe": self.recipe,
            "recipe_config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
            "device": self.device.to_dict(),
            "dtype": self.dtype,
            "source": self.source.to_dict() if self.source else None,
        }


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def compile_model(model: nn.Module, recipe: str = "qlora", device: str | DeviceProfile | None = None,
                  source: ModelSource | None = None, dtype: str | None = None, **options) -> nn.Module:
    """Rewrite ``model`` in place for ``recipe`` on ``device``; only adapter parameters train."""
    method = get_method(recipe)
    config = make_config(method, options)
    profile = device if isinstance(device, DeviceProfile) else load_profile(device or DEFAULT_DEVICE)
    dtype = dtype or profile.default_dtype
    arch = arch_for(model.config)
    model.to(getattr(torch, dtype))
    freeze_all(model)
    rewritten = method.apply(model, config, arch, True)
    model.edgetune = CompileInfo(recipe, config, profile, dtype,
                                 source or getattr(model, "edgetune_source", None), rewritten)
    return model
