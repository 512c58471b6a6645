"""The planner's ViT and ResNet formulas against what autograd saves on tiny configs, and the shipped configs."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from edgetune.errors import EdgetuneError
from edgetune.memory import SavedTensorCounter
from edgetune.planner import (JobSpec, ResNetShape, VitShape, choose, resnet_walk, shape_for, vit_activation_bytes,
                              vit_weight_bytes)
from edgetune.profiles import load_profile
from tiny_models import norm_tuning


def _tiny_vit(targets, act_bits, r=4):
    from transformers import ViTConfig, ViTForImageClassification

    from edgetune.methods.lora.layer import LoraLinear
    from edgetune.s2a.functions import Compression
    from edgetune.s2a.rewriter import rewrite

    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=80, image_size=40,
                    patch_size=8, num_labels=5)
    model = ViTForImageClassification(cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.classifier.parameters():
        p.requires_grad_(True)
    for path in [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("vit.layers")
                 and n.endswith(targets)]:
        parent, _, leaf = path.rpartition(".")
        old = model.get_submodule(path)
        setattr(model.get_submodule(parent), leaf, LoraLinear(old, old.in_features, old.out_features, r, 2.0 * r))
    rewrite(model, Compression(act_bits))
    return model, cfg


@pytest.mark.parametrize("act_bits", [16, 8, 4])
@pytest.mark.parametrize("targets", [
    ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"),
    ("q_proj", "k_proj", "v_proj", "fc1", "fc2"),  # benchmarks/s2a_vision.py
    ("o_proj", "fc2"),  # block 0 saves from o_proj's input on
])
def test_vit_saved_bytes_match_autograd(targets, act_bits):
    model, cfg = _tiny_vit(targets, act_bits)
    model.train()
    batch = 3
    pixels = torch.randn(batch, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    with SavedTensorCounter(model) as counter:
        logits = model(pixel_values=pixels).logits
        loss = nn.functional.cross_entropy(logits, torch.tensor([0, 3, 4]))
    loss.backward()
    shape = VitShape.from_config(cfg)
    assert shape.tokens == 26
    job = JobSpec("lora", 4, targets, dtype="float32", act_bits=act_bits)
    assert sum(vit_activation_bytes(shape, job, batch).values()) == counter.bytes
    if act_bits == 16:
        frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
        trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
        assert vit_weight_bytes(shape, job) == (frozen, trainable)
        assert shape.params == sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("recipe,act_bits", [("full", 16), ("norm", 16), ("norm", 8), ("norm", 4)])
@pytest.mark.parametrize("kw,image,batch", [
    ({}, 64, 2),
    ({"downsample_in_bottleneck": True, "downsample_in_first_stage": True}, 45, 3),  # odd sizes round up
])
def test_resnet_saved_bytes_match_autograd(kw, image, batch, recipe, act_bits):
    from transformers import ResNetConfig, ResNetForImageClassification

    from edgetune.s2a.functions import Compression
    from edgetune.s2a.rewriter import rewrite

    torch.manual_seed(0)
    cfg = ResNetConfig(embedding_size=8, hidden_sizes=[16, 32, 64], depths=[2, 1, 2], num_labels=7, **kw)
    model = ResNetForImageClassification(cfg)
    if recipe == "norm":
        norm_tuning(model)
    rewrite(model, Compression(act_bits))
    model.train()
    pixels = torch.randn(batch, 3, image, image, generator=torch.Generator().manual_seed(1))
    with SavedTensorCounter(model) as counter:
        logits = model(pixel_values=pixels).logits
        loss = nn.functional.cross_entropy(logits, torch.arange(batch) % 7)
    loss.backward()
    shape = ResNetShape.from_config({**cfg.to_dict(), "image_size": image})
    walk = resnet_walk(shape, batch, 4, recipe, act_bits)
    predicted = sum(walk[k] for k in ("conv_inputs", "batchnorm", "relu", "pool", "head"))
    assert predicted == counter.bytes
    assert walk["params"] == sum(p.numel() for p in model.parameters())
    assert walk["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert walk["buffers"] == sum(b.numel() * b.element_size() for b in model.buffers())


def test_shipped_vision_configs_plan_at_once():
    nano = load_profile("jetson-orin-nano-8gb")
    vit = shape_for("vit-b-16")
    assert isinstance(vit, VitShape) and 86e6 < vit.params < 87e6 and vit.tokens == 197  # ViT-B/16, 1000 classes
    plan = choose(vit, JobSpec("qlora", dtype="bfloat16", act_bits=4), nano)
    assert plan.fits and plan.seq_len == 197 and plan.image_size == 224 and plan.batch > 1
    assert not choose(vit, JobSpec("qlora", dtype="bfloat16", act_bits=4), nano, plan.batch + 1).fits  # the largest
    lean = choose(vit, JobSpec("lora", dtype="bfloat16", act_bits=4), nano, 32)
    plain = choose(vit, JobSpec("lora", dtype="bfloat16", act_bits=16), nano, 32)
    assert lean.components["activations"] < 0.75 * plain.components["activations"]
    resnet = shape_for("resnet-50")
    assert isinstance(resnet, ResNetShape) and resnet.params == 25_557_032  # torchvision's resnet50, 1000 classes
    plan = choose(resnet, JobSpec("full", dtype="bfloat16", act_bits=16), nano)
    assert plan.fits and plan.batch > 1 and plan.components["trainable"] == 2 * 25_557_032
    norm = choose(resnet, JobSpec("norm", dtype="bfloat16", act_bits=4), nano)
    assert norm.fits and norm.batch > plan.batch
    full32 = choose(resnet, JobSpec("full", dtype="bfloat16", act_bits=16), nano, 32)
    norm32 = choose(resnet, JobSpec("norm", dtype="bfloat16", act_bits=4), nano, 32)
    # frozen convolutions keep nothing, ReLU 1 bit, BN 8 bits
    assert norm32.components["activations"] < full32.components["activations"] / 3
    with pytest.raises(EdgetuneError, match="no LoRA for convolutions"):
        choose(resnet, JobSpec("lora", act_bits=16), nano)
    with pytest.raises(EdgetuneError, match="act-bits 16 only"):
        choose(resnet, JobSpec("full", act_bits=4), nano)
    with pytest.raises(EdgetuneError, match="does not apply"):
        choose(vit, JobSpec("lora"), nano, 1, 512)
