"""The planner's stored-weight formula against compiled tiny models, per byte (NF4 layout, double quant)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from edgetune.compiler import compile_model
from edgetune.planner import JobSpec, ModelShape, job_for, nf4_bytes, weight_bytes


def _config(kind, vocab=300):
    cls = LlamaConfig if kind == "llama" else Qwen2Config
    # 80 x 48 = 3840 weights: 60 blocks of 64, under 256 blocks (one double-quant scale per tensor)
    return cls(vocab_size=vocab, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=kind == "llama")


def stored_bytes(model) -> tuple[int, int]:
    """(frozen bytes: every buffer and frozen parameter as stored, trainable parameter bytes)."""
    frozen = sum(t.numel() * t.element_size() for t in model.buffers())
    frozen += sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return frozen, trainable


def test_nf4_bytes_by_hand():
    # 4096 x 4096: 8 MiB of codes; 262144 blocks of 64: 1 MiB of fp32 absmax, or with double quant
    # 256 KiB of uint8 codes + 1024 fp32 scales + the 256-entry fp32 code book + the fp32 offset
    n = 4096 * 4096
    assert nf4_bytes(n, 64, False) == n // 2 + 4 * n // 64
    assert nf4_bytes(n, 64, True) == n // 2 + n // 64 + 4 * 1024 + 1024 + 4
    assert nf4_bytes(65, 64, False) == 33 + 8  # odd count padded; a short last block has its own absmax
    assert nf4_bytes(65, 64, True) == 33 + 2 + 4 + 1024 + 4


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
@pytest.mark.parametrize("recipe,double_quant", [("lora", False), ("qlora", False), ("qlora", True)])
def test_weight_bytes_match_the_compiled_model(kind, recipe, double_quant):
    torch.manual_seed(0)
    cfg = _config(kind)
    options = {"double_quant": double_quant} if recipe == "qlora" else {}
    model = compile_model(AutoModelForCausalLM.from_config(cfg), recipe, r=4, act_bits=16, **options)
    job = job_for(model)
    assert job.double_quant == (double_quant if recipe == "qlora" else job.double_quant)
    assert weight_bytes(ModelShape.from_config(cfg), job) == stored_bytes(model)


def test_double_quant_is_the_default():
    assert JobSpec().double_quant
    from edgetune.methods.qlora.config import QLoraConfig

    model = compile_model(AutoModelForCausalLM.from_config(_config("llama")), "qlora", r=4, act_bits=16)
    assert job_for(model).double_quant == QLoraConfig().double_quant  # job_for reads the compiled config


@pytest.mark.parametrize("act_bits", [16, 4])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])  # tied (stored once) and untied (embedding + lm_head)
def test_embed_nf4_bytes_match_the_compiled_model(kind, act_bits):
    """``embed_nf4``: V·C NF4 bytes with the linears' absmax layout per embedding matrix, per byte;
    the saved bytes do not change (the coded rows and slices are decoded, never saved)."""
    from edgetune.memory import saved_bytes_of_step
    from edgetune.planner import saved_activation_bytes

    torch.manual_seed(0)
    cfg = _config(kind)
    cfg.hidden_size, cfg.head_dim = 64, 16  # rows must be whole NF4 blocks of 64
    model = compile_model(AutoModelForCausalLM.from_config(cfg), "qlora", r=4, act_bits=act_bits, embed_nf4=True)
    job, shape = job_for(model), ModelShape.from_config(cfg)
    assert job.embed_nf4 and job.double_quant
    assert weight_bytes(shape, job) == stored_bytes(model)
    dense = weight_bytes(shape, JobSpec("qlora", 4, job.targets, act_bits=act_bits))[0]
    tables = 1 if kind == "llama" else 2
    assert dense - weight_bytes(shape, job)[0] == tables * (cfg.vocab_size * 64 * 4 - nf4_bytes(cfg.vocab_size * 64,
                                                                                                   64, True))
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    model.train()
    measured = saved_bytes_of_step(model, {"input_ids": ids, "labels": ids})
    assert sum(saved_activation_bytes(shape, job, 2, 24).values()) == measured
