"""The s2a lite side branch: exact gradients, exact zero start, training, and an activation-lean backward."""
import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from edgetune.compiler import compile_model
from edgetune.errors import EdgetuneError
from edgetune.memory import SavedTensorCounter
from edgetune.methods.s2a import side as side_mod
from edgetune.methods.s2a.side import SideMLP, pool_channels, side_mlp_reference
from edgetune.s2a.loss import causal_lm_loss
from tiny_models import build_tiny_model

SIDE_ONLY = dict(bias=False, prompt_len=0, side=True, side_dim=16)


def _batch(seed=0, b=2, t=40, vocab=400):
    ids = torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def _llama(layers: int, vocab=400):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg)


def _randomize_side(model, seed=0):
    """Stand-in for training: a non-zero up-projection, so the side changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "s2a_side" in n or "delta_bias" in n or "s2a_prompt.A" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _loss_grads_saved(model, batch):
    model.train()
    model.zero_grad(set_to_none=True)
    with SavedTensorCounter(model, by_shape=True) as counter:
        loss = causal_lm_loss(model, batch)
    loss.backward()
    named = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss.detach()), named, counter


def test_side_mlp_gradcheck_and_reference():
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)
            for s in ((3, 5, 6), (7, 6), (7,), (6, 7), (6,))]
    assert torch.autograd.gradcheck(SideMLP.apply, args)
    out = SideMLP.apply(*args)
    ref = side_mlp_reference(*args)
    assert torch.equal(out, ref)
    go = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(out, args, go)
    want = torch.autograd.grad(ref, args, go)
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-12), float((a - b).abs().max())


def test_pooling_is_a_parameter_free_group_mean():
    h = torch.randn(2, 3, 64)
    p = pool_channels(h, 16)
    mean = h.reshape(2, 3, 16, 4).mean(-1)
    want = mean / mean.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    assert torch.allclose(p, want, atol=1e-6) and not p.requires_grad
    assert pool_channels(torch.randn(2, 3, 48), 32).shape == (2, 3, 32)  # uneven groups: adaptive pooling


@pytest.mark.parametrize("opts", [SIDE_ONLY, dict(SIDE_ONLY, bias=True, prompt_len=4, side_every=2)])
def test_side_gradients_match_plain_autograd_on_a_tiny_model(opts, monkeypatch):
    model = compile_model(build_tiny_model("llama", 400), "s2a", base="dense", act_bits=16, **opts)
    _randomize_side(model)
    batch = _batch()
    l0, g0, _ = _loss_grads_saved(model, batch)
    monkeypatch.setattr(side_mod.SideMLP, "apply", side_mlp_reference)  # the plain-autograd oracle
    l1, g1, _ = _loss_grads_saved(model, batch)
    assert l0 == l1
    assert any("s2a_side.blocks.0.fc1" in n for n in g0)
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-6, rtol=1e-5), (n, float((g0[n] - g1[n]).abs().max()))
        assert float(g0[n].abs().sum()) > 0, n


def test_zero_initialised_side_gives_exactly_the_base_logits():
    base = build_tiny_model("llama", 400)
    ids = _batch()["input_ids"]
    dense = compile_model(copy.deepcopy(base), "s2a", base="dense", act_bits=16, **SIDE_ONLY).eval()
    without = compile_model(copy.deepcopy(base), "s2a", prompt_len=0, act_bits=4).eval()
    with_side = compile_model(copy.deepcopy(base), "s2a", prompt_len=0, side=True, side_dim=16, act_bits=4).eval()
    base.eval()
    with torch.no_grad():
        assert torch.equal(dense(input_ids=ids).logits, base(input_ids=ids).logits)
        assert torch.equal(with_side(input_ids=ids).logits, without(input_ids=ids).logits)
    _randomize_side(dense)
    with torch.no_grad():
        assert not torch.allclose(dense(input_ids=ids).logits, base(input_ids=ids).logits)


def test_side_only_training_lowers_the_loss():
    model = compile_model(build_tiny_model("llama", 400), "s2a", act_bits=4, **SIDE_ONLY)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("s2a_side" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = _batch(t=48)
    losses = []
    for _ in range(8):
        loss, _, _ = _loss_grads_saved(model, batch)
        opt.step()
        losses.append(loss)
    assert losses[-1] < losses[0] - 0.3, losses


def test_trainable_count_matches_the_formula():
    layers, d, every, c = 5, 16, 2, 64
    model = compile_model(_llama(layers), "s2a", act_bits=4, bias=False, prompt_len=0, side=True, side_dim=d,
                          side_every=every)
    blocks = -(-layers // every) + 1  # the chosen block inputs plus the final hidden state
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == blocks * (2 * d * d + 2 * d) + d * c


def test_side_saves_per_token_bytes_independent_of_depth_and_far_below_bias_tuning():
    """The backbone stores nothing for the side: its saved bytes grow by d floats per token per block,
    and nothing of the backbone's own blocks is kept."""
    batch, d = _batch(), 16
    tokens = batch["input_ids"].numel()
    saved = {}
    for layers in (2, 6):
        side = compile_model(_llama(layers), "s2a", act_bits=4, **SIDE_ONLY)
        bias = compile_model(_llama(layers), "s2a", act_bits=4, prompt_len=0)
        both = compile_model(_llama(layers), "s2a", act_bits=4, prompt_len=0, side=True, side_dim=d)
        saved[layers] = [_loss_grads_saved(m, batch)[2].bytes for m in (side, bias, both)]
        # side blocks (layers + 1) save their input u, the up-projection its input s: all (B, T, d) fp32
        assert saved[layers][2] - saved[layers][1] == (layers + 2) * tokens * d * 4
    assert saved[6][0] - saved[2][0] == 4 * tokens * d * 4  # four more blocks: four more u's, nothing else
    assert saved[6][0] < saved[6][1] / 3, saved


def test_side_only_records_no_backbone_graph():
    """With bias and prompts off, autograd records no backbone node: no frozen block runs backward."""
    model = compile_model(_llama(3), "s2a", act_bits=16, base="dense", **SIDE_ONLY)
    _, _, counter = _loss_grads_saved(model, _batch())
    shapes = {s for s, _ in counter.by_shape}
    assert not any(s and s[-1] == 96 for s in shapes)  # no MLP intermediate (B, T, 96) anywhere
    assert not any(len(s) == 4 for s in shapes)  # no attention q/k/v (B, H, T, hd)


def test_side_dim_larger_than_the_hidden_size_is_a_one_line_error():
    with pytest.raises(EdgetuneError, match=r"side_dim must be in \[1, hidden size 64\], got 128"):
        compile_model(build_tiny_model("llama", 400), "s2a", act_bits=4, side=True, side_dim=128)


def test_cached_decoding_matches_the_full_forward():
    """The side is position-wise, so incremental decoding with a KV cache gives the full forward's logits."""
    model = compile_model(build_tiny_model("llama", 400), "s2a", act_bits=4, **SIDE_ONLY).eval()
    _randomize_side(model)
    ids = _batch(t=12)["input_ids"]
    with torch.no_grad():
        full = model(input_ids=ids).logits
        first = model(input_ids=ids[:, :8], use_cache=True)
        step = model(input_ids=ids[:, 8:], past_key_values=first.past_key_values, use_cache=True).logits
    assert torch.allclose(step, full[:, 8:], atol=1e-5)
