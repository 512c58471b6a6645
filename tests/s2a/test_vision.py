"""The same rewrite on a (tiny) ViT: LayerNorm, GELU and bidirectional attention, LoRA inputs."""
import copy

import torch
from torch import nn

from edgetune.memory import SavedTensorCounter
from edgetune.methods.lora.layer import LoraLinear
from edgetune.s2a.functions import Compression
from edgetune.s2a.modules import LeanActivation, LeanLayerNormModule
from edgetune.s2a.rewriter import rewrite


def tiny_vit_with_lora():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                intermediate_size=64, image_size=32, patch_size=8, num_labels=5,
                                                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    for p in model.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    for path in [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("vit.layers")]:
        parent, _, leaf = path.rpartition(".")
        old = model.get_submodule(path)
        lora = LoraLinear(old, old.in_features, old.out_features, 4, 8.0)
        lora.reset_parameters(g)
        with torch.no_grad():
            lora.lora_B.normal_(0, 0.05, generator=g)
        setattr(model.get_submodule(parent), leaf, lora)
    return model


def _run(model, pixels, labels):
    model.train()
    model.zero_grad(set_to_none=True)
    with SavedTensorCounter(model) as c:
        logits = model(pixel_values=pixels).logits
    nn.functional.cross_entropy(logits, labels).backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return logits.detach(), grads, c.bytes


def test_vit_rewrite_matches_and_saves_less():
    plain = tiny_vit_with_lora()
    lean = copy.deepcopy(plain)
    report = rewrite(lean, Compression(4))
    assert isinstance(lean.vit.layers[0].mlp.activation_fn, LeanActivation)
    assert isinstance(lean.vit.layers[0].layernorm_before, LeanLayerNormModule)
    # the patch convolution is frozen and sees pixels (no gradient): it keeps nothing either way
    assert "vit.embeddings.patch_embeddings.projection" in report.changed["conv_pool"]
    assert report.unknown == []
    g = torch.Generator().manual_seed(2)
    pixels, labels = torch.randn(3, 3, 32, 32, generator=g), torch.tensor([0, 3, 4])
    l0, g0, b0 = _run(plain, pixels, labels)
    l1, g1, b1 = _run(lean, pixels, labels)
    assert torch.allclose(l0, l1, atol=1e-5)
    assert nn.functional.cosine_similarity(g0, g1, dim=0) > 0.995
    assert b1 < b0 / 3
