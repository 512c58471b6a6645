"""NF4 embeddings (``embed_nf4``): row and slice decoding, the coded LM head, and the qlora recipe with them."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from edgetune.artifact import load_compiled, save_compiled
from edgetune.compiler import compile_model, trainable_parameters
from edgetune.errors import EdgetuneError
from edgetune.methods.embedding import NF4Embedding, NF4LMHead
from edgetune.quant import nf4
from edgetune.s2a.loss import causal_lm_loss

from tiny_models import build_tiny_model


@pytest.fixture(params=[False, True], ids=["absmax32", "double_quant"])
def double_quant(request):
    return request.param


def _weight(v=300, c=128, seed=0):
    return torch.randn(v, c, generator=torch.Generator().manual_seed(seed))


def test_block_absmax_at_is_bit_identical(double_quant):
    q = nf4.quantize_nf4(_weight(), 64, double_quant)
    index = torch.tensor([[0, 599], [257, 3]])
    assert torch.equal(q.block_absmax_at(index), q.block_absmax()[index])


def test_rows_and_slices_decode_exactly(double_quant):
    w = _weight()
    emb = NF4Embedding.from_weight(w, 64, double_quant)
    dense = nf4.dequantize_nf4(nf4.quantize_nf4(w, 64, double_quant))  # (V, C)
    ids = torch.tensor([[5, 0, 299], [17, 17, 160]])
    assert torch.equal(emb(ids), dense[ids])
    assert torch.equal(emb.slice(33, 290), dense[33:290])
    assert (emb(ids) - w[ids]).abs().max() < 0.35 * w.abs().max()  # and it is a quantization of w


def test_head_forward_and_backward_match_the_dense_decoded_weight(monkeypatch):
    import edgetune.methods.embedding as emb_mod

    monkeypatch.setattr(emb_mod, "HEAD_SLICE_BYTES", 4 * 128 * 70)  # 70 rows per slice: several slices
    w = _weight()
    emb = NF4Embedding.from_weight(w, 64, True)
    head = NF4LMHead(emb, tied=True)
    dense = emb.dequantize()
    h = torch.randn(3, 5, 128, requires_grad=True)
    ref_h = h.detach().clone().requires_grad_()
    out, ref = head(h), ref_h @ dense.t()
    assert torch.allclose(out, ref, atol=1e-5)
    out.square().sum().backward()
    ref.square().sum().backward()
    assert (h.grad - ref_h.grad).abs().max() <= 1e-5 * ref_h.grad.abs().max()
    assert list(head.state_dict()) == []  # tied: the buffers belong to the input embedding only


def test_hidden_size_not_a_multiple_of_the_block_is_refused():
    with pytest.raises(EdgetuneError, match="multiple of the NF4 block size"):
        NF4Embedding(10, 96, blocksize=64)


def _dense_reference(model, compiled):
    """``model`` (plain, same seed) with the compiled model's decoded embedding / head weights."""
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(compiled.get_input_embeddings().dequantize())
        head = compiled.get_output_embeddings()
        if not head.tied:
            model.get_output_embeddings().weight.copy_(head.weight_slices().dequantize())
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # tied and untied embeddings
@pytest.mark.parametrize("act_bits", [16, 4])
def test_qlora_with_nf4_embeddings_trains_like_the_decoded_dense_model(arch, act_bits, tiny_tokenizer, tmp_path):
    vocab = len(tiny_tokenizer)
    compiled = compile_model(build_tiny_model(arch, vocab), "qlora", r=4, embed_nf4=True, act_bits=act_bits)
    assert isinstance(compiled.get_input_embeddings(), NF4Embedding)
    assert compiled.get_output_embeddings().tied == (arch == "llama")
    reference = compile_model(build_tiny_model(arch, vocab), "qlora", r=4, act_bits=act_bits)
    _dense_reference(reference, compiled)
    for (n, p), (n2, p2) in zip(trainable_parameters(compiled).items(), trainable_parameters(reference).items()):
        assert n == n2
        with torch.no_grad():
            p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(n)))
            p2.copy_(p)
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "labels": ids}
    losses = []
    for m in (compiled, reference):
        m.train()
        loss = causal_lm_loss(m, batch)
        loss.backward()
        losses.append(loss.detach())
    assert torch.allclose(losses[0], losses[1], atol=1e-5)
    for (n, p), p2 in zip(trainable_parameters(compiled).items(), trainable_parameters(reference).values()):
        assert torch.allclose(p.grad, p2.grad, rtol=1e-4, atol=1e-6), n
    # the artifact stores the NF4 bytes only, and loads back to the same logits
    out = save_compiled(compiled, tiny_tokenizer, tmp_path / "c")
    loaded, _, manifest = load_compiled(out)
    assert not any("embed_tokens.weight" in k or k == "lm_head.weight" for k in loaded.state_dict())
    compiled.eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, compiled(input_ids=ids).logits)
        assert torch.allclose(compiled(input_ids=ids).logits, reference.eval()(input_ids=ids).logits, atol=1e-4)
