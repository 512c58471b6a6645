"""The sketchtune recipe: the table-gradient Function, and the recipe across llama / qwen2 / gpt2."""
from __future__ import annotations

import pytest
import torch

import edgetune.methods.sketchtune  # noqa: F401  (registers the recipe)
from edgetune.artifact import load_compiled, save_compiled
from edgetune.compiler import compile_model, trainable_parameters
from edgetune.errors import EdgetuneError
from edgetune.methods import get_method
from edgetune.methods.sketchtune.config import SketchTuneConfig
from edgetune.methods.sketchtune.layer import SketchLinear, sketch_linear
from edgetune.models.arch import arch_for
from edgetune.quant.bitpack import pack_codes
from edgetune.quant.sketch import sketch_weight

from tiny_models import build_tiny_model

ARCHS = ("llama", "qwen2", "gpt2")
FAST = {"calib_samples": 32, "calib_seq_len": 16}  # 512 calibration tokens keep the tiny-model tests quick


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models are all per-op overhead: on a shared 2-core machine one intra-op thread runs
    these tests about 10x faster than two (measured: 6 training steps 0.25 s vs 3 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _explicit(x, table, codes_unpacked, bias=None):
    """The oracle: autograd through an explicit gather of the dense weight."""
    w = sketch_weight(codes_unpacked, table, dtype=table.dtype)
    y = x @ w.t()
    return y if bias is None else y + bias


@pytest.mark.parametrize("bits,gpr,in_f", [(2, 1, 13), (3, 4, 12), (4, 2, 10), (3, 3, 11)])
def test_table_gradients_match_autograd_through_gather(bits, gpr, in_f):
    g = torch.Generator().manual_seed(bits * 10 + gpr)
    out_f, K = 7, 1 << bits
    codes = torch.randint(0, K, (out_f, in_f), generator=g)
    packed = pack_codes(codes, bits)
    table = torch.randn(out_f, gpr, K, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(2, 3, in_f, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(out_f, generator=g, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, t: sketch_linear(a, t, packed, bits, bias), (x, table))
    y = sketch_linear(x, table, packed, bits, bias)
    y_ref = _explicit(x, table, codes, bias)
    torch.testing.assert_close(y, y_ref)
    dy = torch.randn(y.shape, generator=g, dtype=torch.float64)
    gx, gt = torch.autograd.grad(y, (x, table), dy)
    gx_ref, gt_ref = torch.autograd.grad(y_ref, (x, table), dy)
    torch.testing.assert_close(gx, gx_ref)
    torch.testing.assert_close(gt, gt_ref)


def test_only_input_and_table_are_saved():
    """Backward keeps x (and the table parameter), never a dense weight."""
    layer = SketchLinear.from_sketch(torch.randint(0, 16, (24, 40)), torch.randn(24, 2, 16).half().float(), 4)
    x = torch.randn(3, 40, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert [tuple(t.shape) for t in saved if t is not None] == [(3, 40), (24, 2, 16)]
    assert saved[0] is x and saved[1] is layer.table
    y.sum().backward()
    assert layer.table.grad is not None and x.grad is not None
    # a frozen table: nothing of the input is kept
    layer.table.requires_grad_(False)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    assert all(t is None or t is layer.table for t in saved)


def test_layer_basics():
    codes = torch.randint(0, 8, (5, 9))
    table = torch.randn(5, 3, 8).half().float()
    layer = SketchLinear.from_sketch(codes, table, 3, bias=torch.randn(5))
    assert layer.codes.dtype == torch.uint8 and layer.codes.shape == (5, 4)  # 9 codes x 3 bits = 27 bits -> 4 bytes
    assert torch.equal(layer.unpacked_codes().long(), codes)
    assert torch.equal(layer.dense_weight(), sketch_weight(codes, table))
    assert layer.table_init.dtype == torch.float16 and torch.equal(layer.table_init.float(), table)
    layer.to(torch.bfloat16)
    assert layer.table.dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    assert layer.table_init.dtype == torch.float16 and layer.codes.dtype == torch.uint8
    empty = SketchLinear(9, 5, 3, 3, bias=True, device="meta")
    assert {k: tuple(v.shape) for k, v in empty.state_dict().items()} == \
           {k: tuple(v.shape) for k, v in layer.state_dict().items()}


def _compiled(arch, tokenizer, **options):
    model = build_tiny_model(arch, len(tokenizer))
    model.edgetune_tokenizer = tokenizer
    return compile_model(model, "sketchtune", **{**FAST, **options})


def _batch(vocab, b=2, t=12, seed=0):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ARCHS)
def test_recipe_trains_tables_only_and_roundtrips(arch, tiny_tokenizer, tmp_path):
    vocab = len(tiny_tokenizer)
    plain = build_tiny_model(arch, vocab)
    ids = _batch(vocab)
    with torch.no_grad():
        ref = plain(input_ids=ids).logits
    model = _compiled(arch, tiny_tokenizer)
    cfg = model.edgetune.config
    layers = {n: m for n, m in model.named_modules() if isinstance(m, SketchLinear)}
    per_layer = 4 if arch == "gpt2" else 7
    assert len(layers) == 2 * per_layer == len(model.edgetune.rewritten)
    trainable = trainable_parameters(model)
    assert set(trainable) == {n + ".table" for n in layers}
    rows = sum(m.out_features for m in layers.values())
    assert sum(p.numel() for p in trainable.values()) == rows * cfg.groups_per_row * (1 << cfg.bits)
    assert not any(isinstance(m, torch.nn.Linear) for n, m in model.named_modules() if n in layers)
    with torch.no_grad():
        got = model(input_ids=ids).logits
    assert (got - ref).norm() / ref.norm() < 0.1  # a 4-bit sketch stays close to the dense model

    # save + load on the meta device reproduces the logits exactly
    save_compiled(model, tiny_tokenizer, tmp_path / "c")
    loaded, _, _ = load_compiled(tmp_path / "c")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, got)
    assert set(trainable_parameters(loaded)) == set(trainable)
    assert get_method("sketchtune").apply(loaded, cfg, arch_for(loaded.config), True) == []

    # a few steps of training lower the loss and change only the tables
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith(".table")}
    opt = torch.optim.AdamW(trainable.values(), lr=1e-2)
    model.train()
    losses = []
    for step in range(6):
        batch = _batch(vocab, seed=step % 2)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        assert all(p.grad is None for n, p in model.named_parameters() if n not in trainable)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())


def test_bits_and_groups_options(tiny_tokenizer):
    model = _compiled("llama", tiny_tokenizer, bits=3, groups_per_row=2)
    layer = model.model.layers[0].mlp.down_proj
    assert (layer.bits, layer.groups_per_row, tuple(layer.table.shape)) == (3, 2, (64, 2, 8))
    assert layer.codes.shape == (64, 96 * 3 // 8)  # dense 3-bit packing
    n = sum(p.numel() for p in trainable_parameters(model).values())
    rows = 2 * (64 + 32 + 32 + 64 + 96 + 96 + 64)
    assert n == rows * 2 * 8


def test_train_norms_and_target_subset(tiny_tokenizer):
    model = _compiled("llama", tiny_tokenizer, target_modules=("q_proj", "down_proj"), train_norms=True)
    names = set(trainable_parameters(model))
    assert {n.rsplit(".", 2)[-2] for n in names if n.endswith(".table")} == {"q_proj", "down_proj"}
    assert "model.norm.weight" in names and "model.layers.1.input_layernorm.weight" in names
    assert isinstance(model.model.layers[0].self_attn.k_proj, torch.nn.Linear)


def test_eval_before_training_changes_nothing(tiny_tokenizer):
    import copy

    a = _compiled("llama", tiny_tokenizer)
    b = copy.deepcopy(a)
    vocab = len(tiny_tokenizer)
    with torch.no_grad():
        b(input_ids=_batch(vocab, seed=5))
    for model in (a, b):
        model.train()
        ids = _batch(vocab)
        model(input_ids=ids, labels=ids).loss.backward()
    for (na, pa), (nb, pb) in zip(trainable_parameters(a).items(), trainable_parameters(b).items()):
        assert na == nb and torch.equal(pa.grad, pb.grad)


def test_needs_a_tokenizer(tiny_tokenizer):
    model = build_tiny_model("llama", len(tiny_tokenizer))
    with pytest.raises(EdgetuneError, match="tokenizer"):
        compile_model(model, "sketchtune")


def test_too_little_calibration_text_says_how_much_is_needed(tiny_tokenizer, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("A short paragraph of calibration text.\n")
    model = build_tiny_model("llama", len(tiny_tokenizer))
    model.edgetune_tokenizer = tiny_tokenizer
    with pytest.raises(EdgetuneError, match=r"needs 16,384 tokens \(128 samples x 128 tokens\)") as info:
        compile_model(model, "sketchtune", calib=str(calib))
    assert "\n" not in str(info.value)


def test_calibration_longer_than_the_context_is_refused(tiny_tokenizer):
    model = build_tiny_model("gpt2", len(tiny_tokenizer))
    model.edgetune_tokenizer = tiny_tokenizer
    with pytest.raises(EdgetuneError, match="beyond the model's context of 256"):
        compile_model(model, "sketchtune", calib_seq_len=512, calib_samples=2)


def test_config_validation():
    for bad in ({"bits": 5}, {"groups_per_row": 3}, {"calib_samples": 0}, {"damp": 0.0}):
        with pytest.raises(ValueError):
            SketchTuneConfig(**bad)
    with pytest.raises(EdgetuneError, match="bad sketchtune option"):
        compile_model(build_tiny_model("llama", 50), "sketchtune", bits=7)


def test_calibration_reads_every_training_format(tiny_tokenizer, tmp_path):
    """--calib takes what `train --data` takes: chat, Alpaca and text JSONL, and plain .txt."""
    import json

    from edgetune.methods.sketchtune.model import calibration_ids
    from edgetune.training.data import build_dataset

    sentence = "Edge devices fine-tune small language models with little memory. "
    files = {
        "chat.jsonl": [{"messages": [{"role": "user", "content": sentence}, {"role": "assistant", "content": sentence}]}],
        "alpaca.jsonl": [{"instruction": sentence, "input": "", "output": sentence}],
        "text.jsonl": [{"text": sentence * 2}],
    }
    cfg = SketchTuneConfig(calib_samples=6, calib_seq_len=8)
    for name, rows in files.items():
        path = tmp_path / name
        path.write_text("\n".join(json.dumps(r) for r in rows * 10) + "\n")
        ids = calibration_ids(tiny_tokenizer, SketchTuneConfig(calib=str(path), calib_samples=6, calib_seq_len=8))
        packed = build_dataset(path, tiny_tokenizer, 8).input_ids
        assert ids.shape == (6, 8)
        # rows spread evenly over the whole file, not its start
        assert len(packed) > 12 and torch.equal(ids, packed[torch.arange(6) * len(packed) // 6])
    (tmp_path / "plain.txt").write_text((sentence + "\n\n") * 20)
    assert calibration_ids(tiny_tokenizer, SketchTuneConfig(calib=str(tmp_path / "plain.txt"), calib_samples=6,
                                                            calib_seq_len=8)).shape == (6, 8)
    assert cfg.calib is None


def test_default_calibration_is_the_shipped_training_text(tiny_tokenizer):
    """128 sequences of 128 tokens by default, from instructions.jsonl + calib.txt, never the held-out file."""
    from edgetune.methods.sketchtune.model import calibration_ids, shipped_calib

    names = [p.name for p in shipped_calib()]
    assert names == ["instructions.jsonl", "calib.txt"] and all(p.is_file() for p in shipped_calib())
    cfg = SketchTuneConfig()
    assert (cfg.calib_samples, cfg.calib_seq_len) == (128, 128)
    ids = calibration_ids(tiny_tokenizer, cfg)
    assert ids.shape == (128, 128) and len({tuple(r.tolist()) for r in ids}) == 128


@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize("in_f,gpr", [(13, 1), (12, 4), (7, 2), (64, 8)])
def test_gather_index_fast_unpack_matches_reference(bits, in_f, gpr):
    from edgetune.methods.sketchtune.layer import gather_index
    from edgetune.quant.sketch import group_index

    codes = torch.randint(0, 1 << bits, (5, in_f), generator=torch.Generator().manual_seed(in_f + bits))
    index = gather_index(pack_codes(codes, bits), bits, in_f, gpr)
    assert index.dtype == torch.int64 and index.shape == (5, in_f)
    assert torch.equal(index, codes + group_index(in_f, gpr) * (1 << bits))
