"""The activation-lean rewrite on tiny models: exact forward, close gradients, idempotent, reported."""
import copy

import pytest
import torch
from torch import nn

from edgetune.artifact import load_compiled, save_compiled
from edgetune.compiler import compile_model
from edgetune.memory import SavedTensorCounter
from edgetune.s2a.functions import Compression
from edgetune.s2a.loss import causal_lm_loss
from edgetune.s2a.modules import LeanActivation, LeanGatedMLP, LeanLayerNormModule, LeanRMSNormModule
from edgetune.s2a.rewriter import rewrite
from tiny_models import build_tiny_model


def _no_dropout(model):
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
    return model


def _batch(seed=0, b=2, t=40):
    ids = torch.randint(0, 400, (b, t), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _loss_and_grads(model, batch):
    model.train()
    model.zero_grad(set_to_none=True)
    with SavedTensorCounter(model) as counter:
        loss = causal_lm_loss(model, batch)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
    return float(loss), grads, counter.bytes


@pytest.mark.parametrize("kind", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("act_bits", [8, 4])
def test_lean_lora_matches_plain_lora(kind, act_bits):
    base = _no_dropout(build_tiny_model(kind, 400))
    plain = compile_model(copy.deepcopy(base), "lora", r=4, act_bits=16)
    with torch.no_grad():
        for n, p in plain.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(len(n)))
    lean = copy.deepcopy(plain)
    report = rewrite(lean, Compression(act_bits))
    assert report.total > 0 and report.unknown == []
    batch = _batch()
    l0, g0, b0 = _loss_and_grads(plain, batch)
    l1, g1, b1 = _loss_and_grads(lean, batch)
    assert abs(l0 - l1) < 1e-5  # forward is exact
    assert torch.nn.functional.cosine_similarity(g0.double(), g1.double(), dim=0) > 0.999
    assert b1 < b0 / 3


def test_every_compressed_op_is_in_place():
    gpt2 = rewrite(build_tiny_model("gpt2", 400), Compression(4))
    llama_model = build_tiny_model("llama", 400)
    llama = rewrite(llama_model, Compression(4))
    assert set(llama.changed) == {"norms", "gated_mlp", "attention", "loss_head"}  # no LoRA: nothing there
    assert isinstance(llama_model.model.layers[0].mlp, LeanGatedMLP)
    assert isinstance(llama_model.model.norm, LeanRMSNormModule)
    assert llama_model.config._attn_implementation == "edgetune_lean"
    assert {"norms", "activations", "attention", "loss_head"} <= set(gpt2.changed)


def test_gpt2_nonlinearity_and_layernorm_are_replaced():
    model = build_tiny_model("gpt2", 400)
    rewrite(model, Compression(4))
    assert isinstance(model.transformer.h[0].mlp.act, LeanActivation)
    assert model.transformer.h[0].mlp.act.op == "gelu_tanh"
    assert isinstance(model.transformer.h[0].ln_1, LeanLayerNormModule)


def test_rewrite_is_idempotent_and_16_is_a_no_op():
    model = compile_model(build_tiny_model("llama", 400), "qlora", r=4, act_bits=4)
    before = str(model)
    again = rewrite(model, Compression(4))
    assert again.total == 0 and str(model) == before
    untouched = build_tiny_model("llama", 400)
    text = str(untouched)
    assert rewrite(untouched, Compression(16)).total == 0 and str(untouched) == text


class Mystery(nn.Module):
    def forward(self, x):
        return torch.tanh(x)


def test_unknown_modules_are_left_alone_and_reported():
    model = build_tiny_model("llama", 400)
    model.model.layers[1].mystery = Mystery()
    report = rewrite(model, Compression(8))
    assert ("model.layers.1.mystery", "Mystery") in report.unknown
    assert isinstance(model.model.layers[1].mystery, Mystery)


def test_relu_saves_one_bit():
    model = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 4))
    model[0].weight.requires_grad_(False)
    report = rewrite(model, Compression(4), passes=("activations",))
    assert report.changed == {"activations": ["1"]}
    x = torch.randn(16, 8)
    with SavedTensorCounter(model) as c:
        y = model(x)
    y.sum().backward()
    assert c.bytes == 16 * 64 // 8 + 16 * 64 * 4  # the 1-bit mask, plus the last Linear's fp32 input


def test_artifact_round_trip_keeps_the_rewrite(tmp_path, tiny_tokenizer):
    model = compile_model(build_tiny_model("llama", len(tiny_tokenizer)), "qlora", r=4, act_bits=4)
    batch = {k: v % len(tiny_tokenizer) for k, v in _batch().items()}
    loss0, grads0, saved0 = _loss_and_grads(model, batch)
    save_compiled(model, tiny_tokenizer, tmp_path / "c")
    loaded, _, manifest = load_compiled(tmp_path / "c")
    assert manifest["s2a"]["act_bits"] == 4 and manifest["rewrite_report"]["changed"]
    loss1, grads1, saved1 = _loss_and_grads(loaded, batch)
    assert loss1 == loss0 and torch.equal(grads0, grads1) and saved1 == saved0


def test_s2a_recipe_trains_and_saves_little():
    base = build_tiny_model("llama", 400)
    model = compile_model(copy.deepcopy(base), "s2a", act_bits=4)
    lora = compile_model(copy.deepcopy(base), "lora", r=4, act_bits=16)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("delta_bias" in n for n in names) and any("s2a_prompt" in n for n in names)
    batch = _batch(t=48)
    _, _, saved_lora = _loss_and_grads(lora, batch)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss, _, saved = _loss_and_grads(model, batch)
        opt.step()
        losses.append(loss)
    assert losses[-1] < losses[0] - 0.05
    assert saved < saved_lora / 5


def test_padded_batches_match_and_stay_finite():
    base = build_tiny_model("llama", 400)
    plain = compile_model(copy.deepcopy(base), "lora", r=4, act_bits=16)
    lean = compile_model(copy.deepcopy(base), "lora", r=4, act_bits=4)
    lean.load_state_dict(plain.state_dict())
    batch = _batch(seed=3, t=20)
    batch["attention_mask"][1, 12:] = 0  # right padding
    batch["attention_mask"][0, :5] = 0  # left padding
    batch["labels"] = batch["labels"].masked_fill(batch["attention_mask"] == 0, -100)
    l0, g0, _ = _loss_and_grads(plain, batch)
    l1, g1, _ = _loss_and_grads(lean, batch)
    assert abs(l0 - l1) < 1e-5 and bool(torch.isfinite(g1).all())
    assert (g1 - g0).norm() / g0.norm() < 0.01
