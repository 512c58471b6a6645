"""The lora and qlora recipes across architectures: what trains, what is saved, what a server sees."""
from __future__ import annotations

import copy

import pytest
import torch

import edgetune
from edgetune.artifact import load_compiled, save_compiled
from edgetune.compiler import compile_model, trainable_parameters
from edgetune.errors import EdgetuneError
from edgetune.methods.lora.layer import LoraLinear
from edgetune.methods.qlora.layer import NF4Linear

from tiny_models import build_tiny_model

ARCHS = ("llama", "qwen2", "gpt2")
RECIPES = ("lora", "qlora")


def _randomize_lora(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLinear):
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)


def _copy_dequantized_base(qlora_model, plain):
    """Give a plain model the NF4-dequantized weights of a qlora model's projections."""
    with torch.no_grad():
        for name, m in qlora_model.named_modules():
            if isinstance(m, LoraLinear):
                plain.get_submodule(name).weight.copy_(m.base.dequantize(torch.float32))


def _peft_logit_diff(model, plain, adapter_dir, vocab) -> float:
    """Export ``model``'s adapter, load it with PEFT over ``plain``, return the max logit difference."""
    from peft import PeftModel

    edgetune.export_adapter(model, adapter_dir)
    peft_model = PeftModel.from_pretrained(plain, str(adapter_dir)).eval()
    ids = _batch(vocab)
    with torch.no_grad():
        return (peft_model(input_ids=ids).logits - model(input_ids=ids).logits).abs().max().item()


def _batch(vocab, b=2, t=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (b, t), generator=g)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("recipe", RECIPES)
def test_only_adapters_train_and_roundtrip(arch, recipe, tiny_tokenizer, tmp_path):
    vocab = len(tiny_tokenizer)
    model = compile_model(build_tiny_model(arch, vocab), recipe, r=8)
    trainable = trainable_parameters(model)
    n_layers, per_layer = 2, 4 if arch == "gpt2" else 7  # gpt2: c_attn, attn.c_proj, c_fc, mlp.c_proj
    assert len(trainable) == 2 * n_layers * per_layer
    assert all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    if recipe == "qlora":
        assert sum(isinstance(m, NF4Linear) for m in model.modules()) == n_layers * per_layer
    _randomize_lora(model)
    ids = _batch(vocab)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = [p.grad for p in trainable.values()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
    # save + load on the meta device reproduces the logits exactly
    save_compiled(model, tiny_tokenizer, tmp_path / "c")
    loaded, _, manifest = load_compiled(tmp_path / "c")
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
    assert torch.equal(ref, got)
    assert set(trainable_parameters(loaded)) == set(trainable)
    # running the rewrite again changes nothing
    from edgetune.methods import get_method
    from edgetune.models.arch import arch_for

    assert get_method(recipe).apply(loaded, loaded.edgetune.config, arch_for(loaded.config), True) == []


def test_unsupported_architecture_lists_supported(tiny_tokenizer):
    from transformers import BertConfig, BertForMaskedLM

    model = BertForMaskedLM(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32))
    with pytest.raises(EdgetuneError, match="unsupported architecture 'bert'.*llama.*qwen2.*gpt2"):
        compile_model(model, "lora")


def test_unknown_target_module_is_named(tiny_llama):
    with pytest.raises(EdgetuneError, match="unknown target module.*c_attn"):
        compile_model(tiny_llama, "lora", target_modules=("q_proj", "c_attn"))


def test_target_subset(tiny_llama):
    model = compile_model(tiny_llama, "lora", target_modules=("q_proj", "v_proj"))
    assert sorted({n.split(".")[-2] for n in trainable_parameters(model)}) == ["q_proj", "v_proj"]


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_export_matches_peft(arch, tiny_tokenizer, tmp_path):
    vocab = len(tiny_tokenizer)
    base = build_tiny_model(arch, vocab)
    plain = copy.deepcopy(base)
    model = compile_model(base, "lora", r=8)
    _randomize_lora(model)
    assert _peft_logit_diff(model, plain, tmp_path / "adapter", vocab) <= 1e-3


def test_qlora_export_matches_peft_over_dequantized_base(tiny_tokenizer, tmp_path):
    """A qlora adapter on a server: PEFT over the NF4-dequantized base gives edgetune's logits."""
    vocab = len(tiny_tokenizer)
    base = build_tiny_model("llama", vocab)
    plain = copy.deepcopy(base)
    model = compile_model(base, "qlora", r=8, double_quant=True)
    _randomize_lora(model)
    _copy_dequantized_base(model, plain)
    assert _peft_logit_diff(model, plain, tmp_path / "adapter", vocab) <= 1e-3


def _train_steps(model, vocab, steps=5, eval_first=False):
    params = list(trainable_parameters(model).values())
    opt = torch.optim.AdamW(params, lr=1e-2)
    if eval_first:
        model.eval()
        with torch.no_grad():
            model(input_ids=_batch(vocab, seed=99))
    model.train()
    losses = []
    for step in range(steps):
        ids = _batch(vocab, seed=step)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, [p.detach().clone() for p in params]


def test_eval_before_training_leaves_qlora_trajectory_unchanged(tiny_tokenizer):
    """The bitsandbytes CPU trap (eval repacks the weight, backward goes wrong) cannot happen here."""
    vocab = len(tiny_tokenizer)
    base = build_tiny_model("llama", vocab)
    a = compile_model(copy.deepcopy(base), "qlora", r=8)
    b = compile_model(copy.deepcopy(base), "qlora", r=8)
    losses_a, params_a = _train_steps(a, vocab)
    losses_b, params_b = _train_steps(b, vocab, eval_first=True)
    assert losses_a == losses_b
    assert all(torch.equal(x, y) for x, y in zip(params_a, params_b))
    assert losses_a[-1] < losses_a[0]


def test_qlora_gradients_match_dense_dequantized_lora(tiny_tokenizer):
    """NF4Linear's hand-written backward equals autograd through the dequantized dense weight."""
    vocab = len(tiny_tokenizer)
    base = build_tiny_model("llama", vocab)
    q = compile_model(copy.deepcopy(base), "qlora", r=8)
    dense_base = copy.deepcopy(base)
    _copy_dequantized_base(q, dense_base)
    d = compile_model(dense_base, "lora", r=8)
    _randomize_lora(q)
    _randomize_lora(d)
    ids = _batch(vocab)
    for model in (q, d):
        model(input_ids=ids, labels=ids).loss.backward()
    gq, gd = trainable_parameters(q), trainable_parameters(d)
    for name in gq:
        torch.testing.assert_close(gq[name].grad, gd[name].grad, rtol=1e-4, atol=1e-6)
