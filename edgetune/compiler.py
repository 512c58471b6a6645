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
from .models.loader import IMAGE_CLASSIFICATION, ModelSource, arch_for_model, model_task
from .profiles import DeviceProfile, load_profile
from .s2a.functions import Compression

DEFAULT_DEVICE = "cpu-16gb"
DEFAULT_ACT_BITS = 4


@dataclass
class CompileInfo:
    recipe: str
    config: Any  # the recipe's config dataclass
    device: DeviceProfile
    dtype: str
    source: ModelSource | None
    rewritten: list[str] = field(default_factory=list)
    compression: Compression = field(default_factory=lambda: Compression(16))
    report: Any = None  # the S2A RewriteReport
    task: str = "causal-lm"  # or "image-classification": follows from the config (models.loader.model_task)

    def to_dict(self) -> dict:
        cfg = dataclasses.asdict(self.config)
        return {
            "task": self.task,
            "recipe": self.recipe,
            "recipe_config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()},
            "s2a": dataclasses.asdict(self.compression),
            "device": self.device.to_dict(),
            "dtype": self.dtype,
            "source": self.source.to_dict() if self.source else None,
        }


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def freeze_all(model: nn.Module) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


IMAGE_RECIPES = ("lora", "qlora")


def _image_trainables(model: nn.Module, arch) -> list[str]:  # names of what it made trainable
    """What trains in an image classifier besides the recipe's adapters.

    The classifier always trains: a fine-tune onto new classes needs its own head (what PEFT's
    ``modules_to_save=["classifier"]`` does). An architecture without linear projections in its
    blocks (ResNet) has nothing for LoRA, so its BatchNorm affine parameters train (norm tuning).
    """
    names = []
    head = getattr(model, "classifier", None)
    if head is not None:
        for n, p in head.named_parameters():
            p.requires_grad_(True)
            names.append(f"classifier.{n}")
    if not arch.linear_names:
        for path, m in model.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.requires_grad_(True)
                m.bias.requires_grad_(True)
                names.append(path)
    return names


def compile_model(model: nn.Module, recipe: str = "qlora", device: str | DeviceProfile | None = None,
                  source: ModelSource | None = None, dtype: str | None = None, act_bits: int = DEFAULT_ACT_BITS,
                  act_stochastic: bool = False, act_gate_code4: bool = False, **options) -> nn.Module:
    """Rewrite ``model`` in place for ``recipe`` on ``device``; only adapter parameters train.

    ``act_bits`` (16, 8 or 4) then applies the S2A activation-lean rewrite on top of the recipe:
    what backward keeps is stored in 8 bits (4-bit derivative codes for nonlinearities at 4);
    16 leaves every op as transformers wrote it.
    """
    from .errors import EdgetuneError
    from .s2a.rewriter import rewrite

    if act_bits not in (16, 8, 4):
        raise EdgetuneError(f"--act-bits must be 16, 8 or 4, got {act_bits}")
    method = get_method(recipe)
    config = make_config(method, options)
    profile = device if isinstance(device, DeviceProfile) else load_profile(device or DEFAULT_DEVICE)
    dtype = dtype or profile.default_dtype
    arch = arch_for_model(model.config)
    image = model_task(model.config) == IMAGE_CLASSIFICATION
    if image and recipe not in IMAGE_RECIPES:
        raise EdgetuneError(f"recipe {recipe!r} does not support image models; use {' or '.join(IMAGE_RECIPES)}")
    model.to(getattr(torch, dtype))
    freeze_all(model)
    rewritten = method.apply(model, config, arch, True)
    if image:
        _image_trainables(model, arch)
    compression = Compression(act_bits, stochastic=act_stochastic, gate_code4=act_gate_code4)
    report = rewrite(model, compression)
    model.edgetune = CompileInfo(recipe, config, profile, dtype,
                                 source or getattr(model, "edgetune_source", None), rewritten, compression, report,
                                 task=model_task(model.config))
    return model
