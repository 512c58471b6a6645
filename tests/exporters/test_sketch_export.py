"""Sketch deltas (table − table_init, fp16) and dense merging into plain transformers models."""
from __future__ import annotations

import copy
import json

import pytest
import torch

import edgetune.methods.sketchtune  # noqa: F401  (registers the recipe)
from edgetune.artifact import load_compiled, save_compiled
from edgetune.compiler import compile_model, trainable_parameters
from edgetune.errors import ArtifactError, EdgetuneError
from edgetune.exporters.sketch import (DELTA_CONFIG, DELTA_WEIGHTS, dense_model, dense_state_dict, export_sketch_delta,
                                       load_sketch_delta, merge_sketch_delta, read_sketch_delta, save_dense_pretrained,
                                       sketch_fingerprint)
from edgetune.models.loader import ModelSource

from tiny_models import build_tiny_model


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models are all per-op overhead: one intra-op thread is far faster on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _compiled(arch, tokenizer, **options):
    model = build_tiny_model(arch, len(tokenizer))
    model.edgetune_tokenizer = tokenizer
    model.edgetune_source = ModelSource("hf-dir", "/nowhere", "ab" * 32, "tiny")
    return compile_model(model, "sketchtune", **{"calib_samples": 32, "calib_seq_len": 16, **options})


def _train(model, vocab, steps=3):
    opt = torch.optim.AdamW(trainable_parameters(model).values(), lr=1e-2)
    model.train()
    for step in range(steps):
        ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(step))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def _ids(vocab):
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(42))


@pytest.fixture(scope="module")
def trained(tiny_tokenizer, tmp_path_factory):
    """A compiled tiny llama saved untrained, then trained a few steps: (model, compiled dir)."""
    model = _compiled("llama", tiny_tokenizer)
    directory = tmp_path_factory.mktemp("sketch") / "compiled"
    save_compiled(model, tiny_tokenizer, directory)
    _train(model, len(tiny_tokenizer))
    return model, directory


def test_delta_roundtrip(trained, tiny_tokenizer, tmp_path):
    model, compiled_dir = trained
    out = export_sketch_delta(tmp_path / "delta", model)
    info = json.loads((out / DELTA_CONFIG).read_text())
    assert info["base_sha256"] == "ab" * 32 and info["bits"] == 4 and info["groups_per_row"] == 4
    assert info["sketch_sha256"] == sketch_fingerprint(model)
    _, tensors = read_sketch_delta(out)
    assert len(tensors) == 14 and all(t.dtype == torch.float16 for t in tensors.values())
    size = (out / DELTA_WEIGHTS).stat().st_size
    assert size < 1.1 * sum(p.numel() * 2 for p in trainable_parameters(model).values()) + 4096

    fresh, _, _ = load_compiled(compiled_dir)
    vocab = len(tiny_tokenizer)
    with torch.no_grad():
        before = fresh(input_ids=_ids(vocab)).logits
    assert load_sketch_delta(out, fresh) == info["modules"]
    with torch.no_grad():
        want = model(input_ids=_ids(vocab)).logits
        got = fresh(input_ids=_ids(vocab)).logits
    assert (got - want).abs().max() < 1e-3 * (want - before).abs().max() + 1e-4  # fp16 rounding of the deltas
    for name, m in fresh.named_modules():
        if hasattr(m, "table_init"):
            delta = model.get_submodule(name).table.detach() - m.table_init.float()
            torch.testing.assert_close(m.table.detach(), m.table_init.float() + delta.half().float())


def test_untrained_delta_is_zero(tiny_tokenizer, tmp_path):
    model = _compiled("gpt2", tiny_tokenizer)
    _, tensors = read_sketch_delta(export_sketch_delta(tmp_path / "d", model))
    assert all(torch.count_nonzero(t) == 0 for t in tensors.values())


def test_refuses_other_base_and_other_sketch(trained, tiny_tokenizer, tmp_path):
    model, compiled_dir = trained
    out = export_sketch_delta(tmp_path / "delta", model, base_sha256="cd" * 32)
    fresh, _, _ = load_compiled(compiled_dir)
    with pytest.raises(ArtifactError, match="different base"):
        load_sketch_delta(out, fresh)
    load_sketch_delta(out, fresh, force=True)

    other = _compiled("llama", tiny_tokenizer, calib_samples=24)  # same shapes, another calibration
    good = export_sketch_delta(tmp_path / "good", model)
    with pytest.raises(ArtifactError, match="different sketch"):
        load_sketch_delta(good, other)
    wrong_shape = _compiled("llama", tiny_tokenizer, groups_per_row=2)
    with pytest.raises(ArtifactError, match="shape"):
        load_sketch_delta(good, wrong_shape, force=True)


def test_broken_delta_directories(tmp_path, trained):
    model, _ = trained
    with pytest.raises(ArtifactError, match="not a sketch delta"):
        read_sketch_delta(tmp_path)
    out = export_sketch_delta(tmp_path / "d", model)
    info = json.loads((out / DELTA_CONFIG).read_text())
    info["modules"].append("model.layers.9.mlp.up_proj")
    (out / DELTA_CONFIG).write_text(json.dumps(info))
    with pytest.raises(ArtifactError, match="do not match"):
        read_sketch_delta(out)
    with pytest.raises(EdgetuneError, match="no sketch tables"):
        export_sketch_delta(tmp_path / "e", build_tiny_model("llama", 50))


@pytest.mark.parametrize("arch,embed_nf4", [("llama", False), ("qwen2", False), ("gpt2", False),
                                            ("llama", True), ("qwen2", True)])  # NF4 embeddings: tied, untied
def test_dense_state_dict_loads_into_plain_transformers(arch, embed_nf4, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    vocab = len(tiny_tokenizer)
    model = _compiled(arch, tiny_tokenizer, embed_nf4=embed_nf4)
    _train(model, vocab, steps=2)
    state = dense_state_dict(model)
    plain = build_tiny_model(arch, vocab, seed=1)
    plain.load_state_dict(state, strict=True)
    with torch.no_grad():
        want = model(input_ids=_ids(vocab)).logits
        torch.testing.assert_close(plain(input_ids=_ids(vocab)).logits, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(dense_model(model)(input_ids=_ids(vocab)).logits, want, rtol=1e-5, atol=1e-5)
    save_dense_pretrained(model, tmp_path / "dense", tiny_tokenizer)
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "dense")).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=_ids(vocab)).logits, want, rtol=1e-5, atol=1e-5)


def test_merge_applies_the_delta_first(trained, tiny_tokenizer, tmp_path):
    model, compiled_dir = trained
    out = export_sketch_delta(tmp_path / "delta", model)
    fresh, _, _ = load_compiled(compiled_dir)
    state = merge_sketch_delta(fresh, out)
    want = dense_state_dict(model)
    key = "model.layers.0.mlp.down_proj.weight"
    assert state[key].shape == (64, 96)
    torch.testing.assert_close(state[key], want[key], atol=1e-3, rtol=0)


def test_trained_norms_travel_with_the_delta(tiny_tokenizer, tmp_path):
    model = _compiled("llama", tiny_tokenizer, train_norms=True)
    fresh = copy.deepcopy(model)
    _train(model, len(tiny_tokenizer), steps=2)
    out = export_sketch_delta(tmp_path / "delta", model)
    info = json.loads((out / DELTA_CONFIG).read_text())
    assert "model.norm.weight" in info["trained_parameters"]
    load_sketch_delta(out, fresh)
    torch.testing.assert_close(fresh.model.norm.weight, model.model.norm.weight)


def test_default_model_4bit_gpr1_delta_is_at_most_6_mb(tmp_path):
    """The delta's size depends only on shapes: build SmolLM2-135M's sketch layers empty (from the
    shipped config), fill the tables, export, and weigh the file (the issue's limit: 6 MB)."""
    from importlib import resources

    from transformers import AutoConfig, AutoModelForCausalLM

    from edgetune.methods import get_method
    from edgetune.methods.sketchtune.config import SketchTuneConfig
    from edgetune.models.arch import arch_for

    path = resources.files("edgetune.configs") / "smollm2-135m.json"
    data = json.loads(path.read_text())
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.requires_grad_(False)
    get_method("sketchtune").apply(model, SketchTuneConfig(bits=4, groups_per_row=1), arch_for(config), False)
    layers = {n: m for n, m in model.named_modules() if hasattr(m, "table_init")}
    for m in layers.values():
        m.codes = torch.zeros(m.codes.shape, dtype=torch.uint8)
        m.table_init = torch.zeros(m.table_init.shape, dtype=torch.float16)
        m.table = torch.nn.Parameter(torch.full(m.table.shape, 1e-3))
    rows = sum(m.out_features for m in layers.values())
    assert len(layers) == 30 * 7 and rows == 30 * (576 + 192 + 192 + 576 + 1536 + 1536 + 576)
    out = export_sketch_delta(tmp_path / "d", model, base_sha256="0" * 64)
    size = sum(f.stat().st_size for f in out.iterdir())
    assert rows * 16 * 2 <= size <= 6_000_000, size  # 155,520 rows x 16 entries x 2 bytes + header ~ 5.01 MB
