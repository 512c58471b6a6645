"""SketchTune through the command line on a tiny Llama: compile, train, export --format sketch, merge."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from edgetune.cli import main

DATA = Path(__file__).resolve().parents[2] / "edgetune" / "data"
FAST = ["--calib-samples", "16", "--calib-seq-len", "32"]  # 512 calibration tokens: the tiny model needs no more


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code, err, *needles):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def _logits(model, vocab):
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.fixture(scope="module")
def sketch_run(tmp_path_factory, tiny_hf_dir):
    """compile (3-bit, GPR=2) -> train 4 steps -> export --format sketch, all through `main`."""
    root = tmp_path_factory.mktemp("sketch-cli")
    compiled, run_dir, delta = root / "compiled", root / "run", root / "delta"
    assert main(["compile", str(tiny_hf_dir), "--recipe", "sketchtune", "--bits", "3", "--groups-per-row", "2",
                 "--calib", str(DATA / "instructions.jsonl"), *FAST, "--out", str(compiled)]) == 0
    assert main(["train", str(compiled), "--data", str(DATA / "instructions.jsonl"), "--steps", "4", "--batch", "2",
                 "--seq-len", "32", "--lr", "1e-2", "--out", str(run_dir)]) == 0
    assert main(["export", str(run_dir), "--format", "sketch", "--out", str(delta)]) == 0
    return compiled, run_dir, delta


def test_compiled_artifact_stores_packed_codes_and_fp16_tables(sketch_run):
    from edgetune.tensors import load_tensors

    compiled, _, _ = sketch_run
    manifest = json.loads((compiled / "manifest.json").read_text())
    assert manifest["recipe"] == "sketchtune" and manifest["recipe_config"]["bits"] == 3
    base = load_tensors(compiled / "base.safetensors")
    codes = base["model.layers.0.mlp.down_proj.codes"]  # (64 rows, 96 inputs x 3 bits / 8 = 36 bytes)
    assert codes.dtype == torch.uint8 and tuple(codes.shape) == (64, 36)
    assert base["model.layers.0.mlp.down_proj.table_init"].dtype == torch.float16
    assert not any(k.endswith(".weight") and "proj" in k for k in base)  # no dense projection is stored
    trainable = load_tensors(compiled / "trainable.safetensors")
    assert set(trainable) == {k.replace(".codes", ".table") for k in base if k.endswith(".codes")}
    rows = 2 * (64 + 32 + 32 + 64 + 96 + 96 + 64)  # q k v o gate up down, two blocks
    assert sum(t.numel() for t in trainable.values()) == rows * 2 * 8


def test_export_writes_deltas_with_the_base_sha(sketch_run):
    from edgetune.exporters.sketch import read_sketch_delta
    from edgetune.manifest import read_manifest

    compiled, run_dir, delta = sketch_run
    manifest = read_manifest(delta, "sketch-delta")
    base_sha = json.loads((compiled / "manifest.json").read_text())["source"]["sha256"]
    assert manifest["base_sha256"] == base_sha and manifest["adapter_format"] == "sketch"
    info, tensors = read_sketch_delta(delta)
    assert info["base_sha256"] == base_sha and info["bits"] == 3 and len(tensors) == 14
    assert all(t.dtype == torch.float16 for t in tensors.values())
    assert sum(int(torch.count_nonzero(t)) for t in tensors.values()) > 0.5 * sum(t.numel() for t in tensors.values())


def test_merge_round_trip(sketch_run, tmp_path, capsys, tiny_tokenizer):
    """Dense merge == the trained sketch model (plain transformers load); sketched merge == it too."""
    from transformers import AutoModelForCausalLM

    import edgetune

    compiled, run_dir, delta = sketch_run
    trained, _, _ = edgetune.load_run(run_dir)
    vocab = len(tiny_tokenizer)
    want = _logits(trained, vocab)
    before = _logits(edgetune.load_compiled(compiled)[0], vocab)

    code, out, _ = run(capsys, "merge", compiled, delta, "--out", tmp_path / "dense", "--dense")
    assert code == 0 and "dense Hugging Face model" in out
    dense = AutoModelForCausalLM.from_pretrained(str(tmp_path / "dense")).eval()
    got = _logits(dense, vocab)
    # the deltas travel in fp16: the merged model is the trained one up to that rounding
    assert (got - want).abs().max() < 1e-3 * (want - before).abs().max() + 1e-4
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)

    code, _, _ = run(capsys, "merge", compiled, delta, "--out", tmp_path / "sketched")
    assert code == 0
    merged, _ = edgetune.load_compiled(tmp_path / "sketched")
    torch.testing.assert_close(_logits(merged, vocab), got, rtol=1e-3, atol=1e-3)
    # the merged tables are the merged artifact's initial tables: its own delta starts at zero
    code, _, _ = run(capsys, "export", tmp_path / "sketched", "--format", "sketch", "--out", tmp_path / "d0")
    from edgetune.exporters.sketch import read_sketch_delta

    assert code == 0 and all(torch.count_nonzero(t) == 0 for t in read_sketch_delta(tmp_path / "d0")[1].values())
    # the dense merge of the merged artifact with a zero delta is the same model
    code, _, _ = run(capsys, "merge", tmp_path / "sketched", tmp_path / "d0", "--out", tmp_path / "dense2",
                     "--dense", "--dtype", "float16")
    dense16 = AutoModelForCausalLM.from_pretrained(str(tmp_path / "dense2"))
    assert code == 0 and dense16.dtype == torch.float16


def test_eval_with_a_sketch_adapter(sketch_run, capsys):
    compiled, run_dir, delta = sketch_run
    heldout = DATA / "instructions_heldout.jsonl"
    results = {}
    for name, args in {"base": [compiled], "adapter": [compiled, "--adapter", delta], "run": [run_dir]}.items():
        code, out, _ = run(capsys, "eval", *args, "--data", heldout, "--seq-len", "32", "--json")
        assert code == 0
        results[name] = json.loads(out)["loss"]
    assert results["adapter"] == pytest.approx(results["run"], rel=1e-3)
    assert results["adapter"] != pytest.approx(results["base"], rel=1e-4)


def test_merge_refuses_another_base_and_bad_input(sketch_run, tmp_path, capsys, tiny_tokenizer):
    from tiny_models import build_tiny_model

    compiled, run_dir, delta = sketch_run
    other_dir = tmp_path / "other-hf"
    build_tiny_model("llama", len(tiny_tokenizer), seed=3).save_pretrained(other_dir)
    tiny_tokenizer.save_pretrained(other_dir)
    assert main(["compile", str(other_dir), "--recipe", "sketchtune", "--bits", "3", "--groups-per-row", "2",
                 *FAST, "--calib", str(DATA / "instructions.jsonl"), "--out", str(tmp_path / "other")]) == 0
    capsys.readouterr()
    code, _, err = run(capsys, "merge", tmp_path / "other", delta, "--out", tmp_path / "m")
    one_line_error(code, err, "different base")
    assert not (tmp_path / "m").exists()
    code, _, err = run(capsys, "eval", tmp_path / "other", "--adapter", delta, "--data",
                       DATA / "instructions_heldout.jsonl")
    one_line_error(code, err, "different base")
    code, _, err = run(capsys, "merge", compiled, run_dir, "--out", tmp_path / "m")  # a run is not an adapter
    one_line_error(code, err, "merge does not know adapters of kind 'run'")
    code, _, err = run(capsys, "merge", compiled, tmp_path / "nothing", "--out", tmp_path / "m")
    one_line_error(code, err, "not an adapter directory")
    (delta / "sketch_delta.safetensors").write_bytes(b"corrupt" + (delta / "sketch_delta.safetensors").read_bytes())
    code, _, err = run(capsys, "merge", compiled, delta, "--out", tmp_path / "m")
    one_line_error(code, err, "checksum mismatch")


def test_compile_errors_are_one_line(tiny_hf_dir, tmp_path, capsys):
    small = tmp_path / "small.jsonl"
    small.write_text('{"text": "Too little calibration text."}\n')
    code, _, err = run(capsys, "compile", tiny_hf_dir, "--recipe", "sketchtune", "--calib", small,
                       "--out", tmp_path / "c")
    one_line_error(code, err, "needs 16,384 tokens (128 samples x 128 tokens)")
    code, _, err = run(capsys, "compile", tiny_hf_dir, "--recipe", "sketchtune", "--bits", "5",
                       "--out", tmp_path / "c")
    one_line_error(code, err, "bits must be 2, 3 or 4")
    code, _, err = run(capsys, "compile", tiny_hf_dir, "--recipe", "lora", "--bits", "4", "--out", tmp_path / "c")
    one_line_error(code, err, "has no option(s) --bits")
    assert not (tmp_path / "c").exists()


def test_export_sketch_of_a_lora_run_is_refused(tiny_hf_dir, tmp_path, capsys):
    assert main(["compile", str(tiny_hf_dir), "--recipe", "lora", "--r", "4", "--out", str(tmp_path / "l")]) == 0
    capsys.readouterr()
    code, _, err = run(capsys, "export", tmp_path / "l", "--format", "sketch", "--out", tmp_path / "d")
    one_line_error(code, err, "no sketch tables")
