"""Every command's happy path and error paths, on a tiny random Llama (seconds, not minutes)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edgetune.cli import main

DATA = Path(__file__).resolve().parents[2] / "edgetune" / "data"


def run(capsys, *args):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def compiled_dirs(tmp_path_factory, tiny_hf_dir):
    """A lora and a qlora artifact of the tiny model, compiled once for the module."""
    root = tmp_path_factory.mktemp("compiled")
    out = {}
    for recipe in ("lora", "qlora"):
        assert main(["compile", str(tiny_hf_dir), "--recipe", recipe, "--out", str(root / recipe), "--r", "8"]) == 0
        out[recipe] = root / recipe
    return out


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, compiled_dirs):
    run_dir = tmp_path_factory.mktemp("runs") / "qlora-run"
    code = main(["train", str(compiled_dirs["qlora"]), "--data", str(DATA / "instructions.jsonl"),
                 "--steps", "6", "--batch", "2", "--seq-len", "32", "--lr", "3e-3", "--out", str(run_dir),
                 "--save-every", "3"])
    assert code == 0
    return run_dir


def test_compile_writes_a_verified_artifact(compiled_dirs):
    for recipe, path in compiled_dirs.items():
        manifest = json.loads((path / "manifest.json").read_text())
        assert manifest["format"] == "edgetune.compiled"
        assert manifest["recipe"] == recipe and manifest["recipe_config"]["r"] == 8
        assert manifest["device"]["name"] == "cpu-16gb"
        assert manifest["source"]["sha256"] and len(manifest["source"]["sha256"]) == 64
        assert set(manifest["files"]) >= {"base.safetensors", "trainable.safetensors", "config.json"}
        # only LoRA parameters train: 2 layers x 7 projections x (A, B)
        assert len(manifest["trainable"]) == 28
        assert all(".lora_A" in n or ".lora_B" in n for n in manifest["trainable"])


def test_qlora_artifact_stores_packed_nf4(compiled_dirs):
    from safetensors import safe_open

    with safe_open(str(compiled_dirs["qlora"] / "base.safetensors"), "pt") as f:
        keys = list(f.keys())
        packed = [k for k in keys if k.endswith(".packed")]
        assert len(packed) == 14
        assert all(f.get_tensor(k).dtype == torch.uint8 for k in packed)
        assert not any(k.endswith("q_proj.base.weight") for k in keys)


def test_train_writes_metrics_plot_and_checkpoints(trained_run):
    lines = [json.loads(x) for x in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 7))
    assert all({"step", "loss", "lr", "tokens_per_s"} <= set(m) for m in lines)
    assert (trained_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (trained_run / "trainable.safetensors").is_file()
    assert (trained_run / "checkpoints" / "step-00000003").is_dir()
    assert json.loads((trained_run / "manifest.json").read_text())["format"] == "edgetune.run"


def test_train_lowers_loss_on_tiny_model(tmp_path, compiled_dirs):
    import edgetune

    result = edgetune.train(compiled_dirs["lora"], DATA / "instructions.jsonl", tmp_path / "r", steps=25, batch=4,
                            seq_len=32, lr=1e-2, progress=False)
    first = sum(m["loss"] for m in result.metrics[:5]) / 5
    last = sum(m["loss"] for m in result.metrics[-5:]) / 5
    assert last < first - 0.05, (first, last)


def test_eval_json_and_adapter_change_the_loss(capsys, tiny_hf_dir, trained_run, tmp_path):
    heldout = DATA / "instructions_heldout.jsonl"
    code, out, _ = run(capsys, "eval", tiny_hf_dir, "--data", heldout, "--seq-len", "32", "--json")
    assert code == 0
    base = json.loads(out)
    assert set(base) >= {"loss", "ppl", "tokens"} and base["tokens"] > 0
    code, out, _ = run(capsys, "eval", trained_run, "--data", heldout, "--seq-len", "32", "--json")
    tuned = json.loads(out)
    assert code == 0 and tuned["tokens"] == base["tokens"]
    assert tuned["loss"] < base["loss"]
    # the exported adapter applied to the plain base reproduces the run (NF4 base vs fp32: close, not equal)
    code, _, _ = run(capsys, "export", trained_run, "--format", "peft", "--out", tmp_path / "adapter")
    assert code == 0
    code, out, _ = run(capsys, "eval", tiny_hf_dir, "--adapter", tmp_path / "adapter", "--data", heldout,
                       "--seq-len", "32", "--json")
    assert code == 0
    assert abs(json.loads(out)["loss"] - tuned["loss"]) < 0.05 * tuned["loss"]


def test_export_peft_and_gguf(capsys, trained_run, tmp_path):
    code, out, _ = run(capsys, "export", trained_run, "--format", "peft", "--out", tmp_path / "peft")
    assert code == 0 and "wrote peft adapter" in out
    assert {"adapter_config.json", "adapter_model.safetensors", "manifest.json"} <= {
        p.name for p in (tmp_path / "peft").iterdir()}
    code, _, _ = run(capsys, "export", trained_run, "--format", "gguf", "--out", tmp_path / "a.gguf")
    assert code == 0 and (tmp_path / "a.gguf").read_bytes()[:4] == b"GGUF"
    code, _, err = run(capsys, "export", trained_run, "--format", "onnx-nope", "--out", tmp_path / "x")
    assert_one_line_error(code, err, "unknown adapter format")


def test_generate_runs(capsys, trained_run):
    code, out, _ = run(capsys, "generate", trained_run, "--prompt", "What is water?", "--max-new-tokens", "5")
    code2, out2, _ = run(capsys, "generate", trained_run, "--prompt", "What is water?", "--max-new-tokens", "5")
    assert code == code2 == 0
    assert out == out2  # greedy decoding is deterministic


def test_devices(capsys):
    code, out, _ = run(capsys, "devices", "--json")
    assert code == 0
    names = {d["name"] for d in json.loads(out)}
    assert {"jetson-orin-nano-8gb", "jetson-orin-nx-16gb", "jetson-agx-orin-64gb", "laptop-rtx4060-8gb",
            "laptop-rtx3050-4gb", "cpu-16gb"} <= names
    code, out, _ = run(capsys, "devices")
    assert code == 0 and "jetson-orin-nano-8gb" in out


# ----------------------------------------------------------------------------- error paths


def test_missing_model(capsys, tmp_path):
    code, _, err = run(capsys, "compile", tmp_path / "nope", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "no such model")
    assert not (tmp_path / "o").exists()


def test_corrupt_models(capsys, tmp_path, tiny_hf_dir):
    bad_gguf = tmp_path / "bad.gguf"
    bad_gguf.write_bytes(b"GGUF" + os.urandom(64))
    code, _, err = run(capsys, "compile", bad_gguf, "--out", tmp_path / "o1")
    assert_one_line_error(code, err, "cannot load model")
    bad_dir = tmp_path / "bad-hf"
    shutil.copytree(tiny_hf_dir, bad_dir)
    (bad_dir / "config.json").write_text("{not json")
    code, _, err = run(capsys, "compile", bad_dir, "--out", tmp_path / "o2")
    assert_one_line_error(code, err, "cannot load model")
    truncated = tmp_path / "trunc-hf"
    truncated.mkdir()
    for f in Path(tiny_hf_dir).iterdir():
        data = f.read_bytes()
        (truncated / f.name).write_bytes(data[: len(data) // 2] if f.suffix == ".safetensors" else data)
    code, _, err = run(capsys, "compile", truncated, "--out", tmp_path / "o3")
    assert_one_line_error(code, err, "cannot load model")
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text("{}")
    code, _, err = run(capsys, "compile", no_weights, "--out", tmp_path / "o4")
    assert_one_line_error(code, err, "no safetensors weights")
    assert not any((tmp_path / n).exists() for n in ("o1", "o2", "o3", "o4"))


def test_unknown_recipe_and_device(capsys, tiny_hf_dir, tmp_path):
    code, _, err = run(capsys, "compile", tiny_hf_dir, "--recipe", "nope", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "unknown recipe 'nope'", "qlora")
    code, _, err = run(capsys, "compile", tiny_hf_dir, "--device", "toaster", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "unknown device 'toaster'", "cpu-16gb")
    code, _, err = run(capsys, "compile", tiny_hf_dir, "--recipe", "lora", "--blocksize", "64", "--out", tmp_path / "o")
    assert_one_line_error(code, err, "--blocksize")


def test_malformed_jsonl_names_file_and_line(capsys, compiled_dirs, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n{"text": "also fine"}\n{"text": broken\n')
    code, _, err = run(capsys, "train", compiled_dirs["lora"], "--data", data, "--steps", "1", "--out", tmp_path / "r")
    assert_one_line_error(code, err, f"{data}:3")
    assert not (tmp_path / "r").exists()


def test_empty_dataset(capsys, compiled_dirs, tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("\n\n")
    code, _, err = run(capsys, "train", compiled_dirs["lora"], "--data", data, "--steps", "1", "--out", tmp_path / "r")
    assert_one_line_error(code, err, "no training examples")


def test_existing_output_needs_overwrite(capsys, tiny_hf_dir, compiled_dirs, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, _, err = run(capsys, "compile", tiny_hf_dir, "--out", out)
    assert_one_line_error(code, err, "already exists", "--overwrite")
    assert (out / "keep.txt").read_text() == "precious"
    code, _, err = run(capsys, "train", compiled_dirs["lora"], "--data", DATA / "instructions.jsonl", "--steps", "1",
                       "--out", out)
    assert_one_line_error(code, err, "already exists")
    code, _, _ = run(capsys, "compile", tiny_hf_dir, "--recipe", "lora", "--out", out, "--overwrite")
    assert code == 0 and not (out / "keep.txt").exists() and (out / "manifest.json").is_file()


def test_seq_len_beyond_context(capsys, compiled_dirs, tmp_path):
    code, _, err = run(capsys, "train", compiled_dirs["lora"], "--data", DATA / "instructions.jsonl",
                       "--seq-len", "5000", "--steps", "1", "--out", tmp_path / "r")
    assert_one_line_error(code, err, "--seq-len 5000", "256")


def test_corrupted_artifact_is_refused(capsys, compiled_dirs, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(compiled_dirs["lora"], copy)
    with open(copy / "trainable.safetensors", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\xff" * 8)
    code, _, err = run(capsys, "train", copy, "--data", DATA / "instructions.jsonl", "--steps", "1",
                       "--out", tmp_path / "r")
    assert_one_line_error(code, err, "trainable.safetensors", "checksum mismatch")


def test_entry_point_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "edgetune", "compile", str(tmp_path / "missing"), "--out",
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "no such model" in proc.stderr
