"""The compressed-saving autograd Functions against exact autograd.

Where the saved form is 8-bit, inputs on each group's 255-step grid make it lossless, so
``torch.autograd.gradcheck`` in float64 checks the hand-written backward exactly. The 4-bit
derivative code is approximate by design: its backward is checked to be exactly
levels[code]·dY and close to the true gradient.
"""
import pytest
import torch
import torch.nn.functional as F

from edgetune.s2a.functions import (Act4Pointwise, Compression, LeanGatedProduct, LeanLayerNorm, LeanLoraBranch,
                                    LeanRMSNorm, Relu1Bit, lean_attention)
from edgetune.s2a.loss import ChunkedLinearCrossEntropy, DenseHead, chunked_causal_lm_loss
from edgetune.s2a.tables import table_for
from tiny_models import grid

C8 = Compression(act_bits=8)


def test_chunked_cross_entropy_gradcheck_and_matches_plain():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(11, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(13, 6, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(13, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randint(0, 13, (11,), generator=g)
    y[3] = -100
    every = (True, True, True)
    assert torch.autograd.gradcheck(lambda h, w, b: ChunkedLinearCrossEntropy.apply(h, w, b, y, DenseHead(w), every, 4), (h, w, b))
    plain = F.cross_entropy(h @ w.t() + b, y, ignore_index=-100)
    assert torch.allclose(ChunkedLinearCrossEntropy.apply(h, w, b, y, DenseHead(w), every, 4), plain, atol=1e-12)


@pytest.mark.parametrize("head_trains", [False, True])
def test_vocab_sliced_online_softmax_across_many_slices(monkeypatch, head_trains):
    """Slices of 5 of a 37-row head and row chunks of 4: the online max/sum-exp and the
    flash-style dh accumulation (head frozen) or the two-pass form (head trains) are exact."""
    import edgetune.s2a.loss as loss_mod

    monkeypatch.setattr(loss_mod, "MIN_VOCAB_SLICE", 1)
    monkeypatch.setattr(loss_mod, "LOSS_LOGITS_BYTES", 4 * 4 * 5)  # 4 rows x 5 vocab fp32 logits
    assert loss_mod.vocab_slice(4, 37) == 5
    g = torch.Generator().manual_seed(2)
    h = (3 * torch.randn(10, 6, dtype=torch.float64, generator=g)).requires_grad_()
    w = torch.randn(37, 6, dtype=torch.float64, generator=g).requires_grad_(head_trains)
    b = torch.randn(37, dtype=torch.float64, generator=g).requires_grad_(head_trains)
    y = torch.tensor([0, 36, 5, 4, 9, -100, 35, 10, 11, 20])  # slice edges, both ends, one ignored
    grads = (True, head_trains, head_trains)
    fn = lambda h, w, b: ChunkedLinearCrossEntropy.apply(h, w, b, y, DenseHead(w), grads, 4)
    plain = F.cross_entropy(h @ w.t() + b, y, ignore_index=-100)
    assert torch.allclose(fn(h, w, b), plain, atol=1e-12)
    assert torch.autograd.gradcheck(fn, (h, w, b))


def test_chunked_causal_lm_loss_scales_upstream_grad_and_skips_grads_in_eval():
    """The gradient is taken in forward for a unit upstream gradient: a scaled loss must scale it."""
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 9, 6, dtype=torch.float64, generator=g, requires_grad=True)  # (B, T, C)
    head = torch.nn.Linear(6, 17, bias=False).double().requires_grad_(False)
    labels = torch.randint(0, 17, (2, 9), generator=g)
    labels[0, :4] = -100
    ref_h = hidden.detach().clone().requires_grad_()
    ref = F.cross_entropy((ref_h[:, :-1] @ head.weight.t()).reshape(-1, 17), labels[:, 1:].reshape(-1))
    (2.5 * ref).backward()
    loss = chunked_causal_lm_loss(hidden, head, labels, rows=5)
    (2.5 * loss).backward()
    assert torch.allclose(loss, ref, atol=1e-12)
    assert torch.allclose(hidden.grad, ref_h.grad, atol=1e-12)
    with torch.no_grad():  # eval: same value, no gradient work, nothing saved
        assert torch.allclose(chunked_causal_lm_loss(hidden, head, labels, rows=5), ref, atol=1e-12)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        chunked_causal_lm_loss(hidden, head, labels, rows=5)
    assert [tuple(t.shape) for t in saved] == [(16, 6)]  # only dh: no logits, labels or hidden states


def test_rmsnorm_gradcheck():
    x = grid((3, 64))
    w = torch.randn(64, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: LeanRMSNorm.apply(x, w, 1e-6, C8), (x, w))


def test_layernorm_gradcheck():
    x = grid((2, 64), seed=1)
    w = torch.randn(64, dtype=torch.float64, requires_grad=True)
    b = torch.randn(64, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: LeanLayerNorm.apply(x, w, b, 1e-5, C8), (x, w, b))
    assert torch.allclose(LeanLayerNorm.apply(x, w, b, 1e-5, C8), F.layer_norm(x, (64,), w, b, 1e-5))


def test_branches_sharing_an_input_dequantize_it_once(monkeypatch):
    """q/k/v-style branches on one x: one 8-bit copy saved, one dequantization in backward, and
    each branch's gradients equal those of a branch run alone."""
    import edgetune.s2a.functions as fn

    x = grid((2, 5, 64))
    g = torch.Generator().manual_seed(3)
    weights = [(torch.randn(4, 64, dtype=torch.float64, generator=g).requires_grad_(),
                torch.randn(n, 4, dtype=torch.float64, generator=g).requires_grad_()) for n in (8, 3, 3)]
    alone = []
    for A, B in weights:
        LeanLoraBranch.apply(x, A, B, 2.0, C8).square().sum().backward()
        alone.append((A.grad.clone(), B.grad.clone(), x.grad.clone()))
        A.grad = B.grad = x.grad = None
    calls = []
    real = fn._load_int8
    monkeypatch.setattr(fn, "_load_int8", lambda *a: calls.append(1) or real(*a))
    sum(LeanLoraBranch.apply(x, A, B, 2.0, C8).square().sum() for A, B in weights).backward()
    assert len(calls) == 1
    for (A, B), (dA, dB, _) in zip(weights, alone):
        assert torch.equal(A.grad, dA) and torch.equal(B.grad, dB)
    assert torch.allclose(x.grad, sum(dx for _, _, dx in alone), atol=1e-12)


def test_lora_branch_gradcheck():
    x = grid((2, 3, 64), seed=2)
    A = torch.randn(4, 64, dtype=torch.float64, requires_grad=True)
    B = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, A, B: LeanLoraBranch.apply(x, A, B, 2.0, C8), (x, A, B))
    y = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)  # the frozen projection's output
    assert torch.autograd.gradcheck(lambda x, A, B, y: LeanLoraBranch.apply(x, A, B, 2.0, C8, y), (x, A, B, y))
    assert torch.allclose(LeanLoraBranch.apply(x, A, B, 2.0, C8, y), y + 2.0 * (x @ A.t()) @ B.t())


def test_gated_product_8bit_gradcheck():
    g, u = grid((2, 64), seed=3, lo=-2.0), grid((2, 64), seed=4)
    assert torch.autograd.gradcheck(lambda g, u: LeanGatedProduct.apply(g, u, "silu", C8), (g, u))


def test_relu_1bit_gradcheck():
    x = torch.randn(37, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    x = (x + 0.1 * x.sign()).requires_grad_()  # away from the kink
    assert torch.autograd.gradcheck(Relu1Bit.apply, (x,))


@pytest.mark.parametrize("op", ["silu", "gelu", "gelu_tanh"])
def test_act4_backward_is_the_table_and_close_to_exact(op):
    x = torch.randn(4097, generator=torch.Generator().manual_seed(6), requires_grad=True)
    dy = torch.randn(4097, generator=torch.Generator().manual_seed(7))
    Act4Pointwise.apply(x, op).backward(dy)
    t = table_for(op, 4)
    assert torch.equal(x.grad, dy * t.levels[t.encode(x).long()])
    x2 = x.detach().clone().requires_grad_()
    {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda v: F.gelu(v, approximate="tanh")}[op](x2).backward(dy)
    assert F.cosine_similarity(x.grad, x2.grad, dim=0) > 0.995


def test_gated_product_code4_layout_is_close():
    g = torch.randn(3, 100, generator=torch.Generator().manual_seed(8), requires_grad=True)
    u = torch.randn(3, 100, generator=torch.Generator().manual_seed(9), requires_grad=True)
    dy = torch.randn(3, 100, generator=torch.Generator().manual_seed(10))
    LeanGatedProduct.apply(g, u, "silu", Compression(4, gate_code4=True)).backward(dy)
    g2, u2 = g.detach().clone().requires_grad_(), u.detach().clone().requires_grad_()
    (F.silu(g2) * u2).backward(dy)
    assert F.cosine_similarity(g.grad.flatten(), g2.grad.flatten(), dim=0) > 0.99
    assert F.cosine_similarity(u.grad.flatten(), u2.grad.flatten(), dim=0) > 0.9999


@pytest.mark.parametrize("masked", [False, True])
def test_attention_matches_sdpa_with_gqa(masked):
    gen = torch.Generator().manual_seed(11)
    q = torch.randn(2, 4, 9, 16, generator=gen, requires_grad=True)
    k = torch.randn(2, 2, 9, 16, generator=gen, requires_grad=True)
    v = torch.randn(2, 2, 9, 16, generator=gen, requires_grad=True)
    dy = torch.randn(2, 9, 4, 16, generator=gen)  # the output is (B, T, H, D)
    mask = None
    if masked:  # causal plus two padded key positions in the first row
        keep = torch.ones(9, 9).tril().bool().expand(2, 1, 9, 9).clone()
        keep[0, :, :, :2] = False
        keep[0, :, :2, :2] = True
        mask = keep
    out = lean_attention(q, k, v, mask, not masked, None, 2, C8)
    out.backward(dy)
    refs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(refs[0], refs[1].repeat_interleave(2, 1), refs[2].repeat_interleave(2, 1),
                                         attn_mask=mask, is_causal=not masked).transpose(1, 2)
    ref.backward(dy)
    assert torch.allclose(out, ref, atol=1e-5)
    for t, r in zip((q, k, v), refs):
        assert F.cosine_similarity(t.grad.flatten(), r.grad.flatten(), dim=0) > 0.9995
        assert (t.grad - r.grad).norm() / r.grad.norm() < 0.03


def test_sketch_layer_keeps_its_input_in_8_bits():
    from edgetune.methods.sketchtune.layer import SketchLinear

    g = torch.Generator().manual_seed(12)
    layer = SketchLinear.from_sketch(torch.randint(0, 16, (24, 70), generator=g),
                                     torch.randn(24, 2, 16, generator=g).half().float(), 4)
    x = torch.randn(3, 5, 70, generator=g, requires_grad=True)
    dy = torch.randn(3, 5, 24, generator=g)
    layer(x).backward(dy)
    exact = layer.table.grad.clone()
    layer.table.grad = None
    layer.compression = C8
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    y.backward(dy)
    assert all(t.dtype != torch.float32 or t.numel() <= 24 * 2 * 16 for t in saved if t is not None)  # no fp x
    assert F.cosine_similarity(layer.table.grad.flatten(), exact.flatten(), dim=0) > 0.9999


def test_vocab_slice_bounds_the_logits_and_a_coded_heads_decoded_slice():
    from edgetune.s2a.loss import LOSS_LOGITS_BYTES, vocab_slice

    assert vocab_slice(1020, 49152) == LOSS_LOGITS_BYTES // (4 * 1020)  # logits (rows, vs) fp32 <= 48 MiB
    assert vocab_slice(4, 49152) == 49152  # few rows, dense head: one slice (a view, nothing decoded)
    assert vocab_slice(4, 128256, 3072 * 2) == LOSS_LOGITS_BYTES // (3072 * 2)  # an NF4 head: decoded bf16 rows
    assert vocab_slice(1, 100, 10**9) == 100  # never below MIN_VOCAB_SLICE rows, never above the vocabulary
