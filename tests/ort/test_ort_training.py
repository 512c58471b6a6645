"""ORT Training export + training on a tiny Llama, checked against torch on the same batches."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime.training.api")
pytest.importorskip("onnx")

import edgetune  # noqa: E402
from edgetune.cli import main  # noqa: E402
from edgetune.ort.export import export_training  # noqa: E402
from edgetune.ort.train import adapter_arrays, open_session, train_ort  # noqa: E402
from edgetune.tensors import load_tensors  # noqa: E402
from edgetune.training.data import BatchIterator, build_dataset  # noqa: E402
from ort_parity import ort_steps, swap_act4_reference, torch_steps  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "edgetune" / "data" / "instructions.jsonl"
LR, STEPS, BATCH, SEQ = 3e-3, 3, 2, 32
CASES = [("lora", "op"), ("qlora", "op"), ("qlora", "graph")]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_hf_dir):
    root = tmp_path_factory.mktemp("ort")
    out = {}
    for recipe in ("lora", "qlora"):
        model, tok = edgetune.load(tiny_hf_dir)
        compiled = edgetune.compile(model, recipe=recipe, r=8, alpha=16)
        # lora_B starts at zero; give it values so the adapter's gradients reach every matrix
        with torch.no_grad():
            for name, p in compiled.named_parameters():
                if name.endswith("lora_B"):
                    p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
        edgetune.save(compiled, root / recipe, tok)
        out[recipe] = root / recipe
    for recipe, mode in CASES:
        if recipe == "lora" and mode != "op":
            continue
        # act4="off": plain ONNX nonlinearities, so the graph's gradients are exact (compared with plain torch)
        out[recipe, mode] = export_training(out[recipe], root / f"{recipe}-{mode}.ort", nf4=mode, act4="off").out
    for recipe in ("lora", "qlora"):  # compiled at the default --act-bits 4: SiLU becomes edgetune::Act4SiLU
        out[recipe, "act4"] = export_training(out[recipe], root / f"{recipe}-act4.ort").out
    return out


def _batches(compiled_dir, n):
    _, tok = edgetune.load_compiled(compiled_dir)
    it = BatchIterator(build_dataset(DATA, tok, SEQ), BATCH, seed=0)
    return [next(it) for _ in range(n)]


def _torch_reference(compiled_dir, batches, act4=False):
    """Plain torch autograd (no S2A; with ``act4`` only the nonlinearities are S2A's 4-bit
    derivative-coded ones), AdamW(eps=1e-8), global-norm clip 1.0, constant lr: losses and params."""
    return torch_steps(compiled_dir, batches, LR, swap_act4_reference if act4 else None)


def _ort_steps(ort_dir, batches):
    return ort_steps(ort_dir, batches, LR)


@pytest.mark.parametrize("recipe,mode", CASES)
def test_train_steps_match_torch(exported, recipe, mode):
    batches = _batches(exported[recipe], STEPS)
    # the torch backend as it ships (whatever activation-lean rewrite compile applied): first-step loss
    model, _ = edgetune.load_compiled(exported[recipe])
    with torch.no_grad():
        torch_first = model(**batches[0]).loss.item()
    ref_losses, ref_params = _torch_reference(exported[recipe], batches)
    losses, params = _ort_steps(exported[recipe, mode], batches)
    assert abs(losses[0] - torch_first) <= 1e-4 * abs(torch_first), (losses[0], torch_first)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
    assert set(params) == set(ref_params)
    # three AdamW updates of lr 3e-3 each moved the adapters; ORT's must land where torch's did
    moved = max((ref_params[n] - load_tensors(exported[recipe] / "trainable.safetensors")[n]).abs().max().item()
                for n in ref_params)
    assert moved > 1e-3
    for name in ref_params:
        torch.testing.assert_close(params[name], ref_params[name], rtol=1e-3, atol=5e-5, msg=name)


@pytest.mark.parametrize("recipe", ["lora", "qlora"])
def test_act4_graph_trains_like_torch(exported, recipe):
    """At --act-bits 4 the exported graph saves 4-bit derivative codes (edgetune::Act4SiLU/Act4Grad)
    instead of fp32 x and sigmoid(x); its steps equal torch with S2A's Act4Pointwise in the MLP."""
    import onnx

    ort_dir = exported[recipe, "act4"]
    manifest = json.loads((ort_dir / "manifest.json").read_text())
    assert manifest["act4"] == {"ops": ["silu"], "count": 2, "source_act_bits": 4}
    assert "edgetune::Act4Grad" in manifest["custom_op_library"]["ops"]
    ops = [n.op_type for n in onnx.load(str(ort_dir / "training_model.onnx")).graph.node]
    assert ops.count("Act4SiLU") == 2 and ops.count("Act4Grad") == 2 and "Sigmoid" not in ops
    batches = _batches(exported[recipe], STEPS)
    ref_losses, ref_params = _torch_reference(exported[recipe], batches, act4=True)
    plain_losses, plain_params = _torch_reference(exported[recipe], batches)
    losses, params = _ort_steps(ort_dir, batches)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
    for name in ref_params:
        torch.testing.assert_close(params[name], ref_params[name], rtol=1e-3, atol=5e-5, msg=name)
    # the approximation is real (the steps differ from exact gradients) but small: losses within 0.5%
    assert any(not torch.allclose(params[n], plain_params[n], rtol=1e-3, atol=5e-5) for n in params)
    np.testing.assert_allclose(losses, plain_losses, rtol=5e-3)
    # and the torch backend as it ships (the whole S2A rewrite at 4 bits) lands within 0.5% too
    model, _ = edgetune.load_compiled(exported[recipe])
    model.train()
    params_t = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params_t, lr=LR, eps=1e-8)
    backend = []
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params_t, 1.0)
        opt.step()
        opt.zero_grad()
        backend.append(loss.item())
    assert abs(losses[0] - backend[0]) <= 1e-4 * backend[0]
    np.testing.assert_allclose(losses, backend, rtol=5e-3)


def test_parameter_names_survive_and_base_is_packed(exported):
    compiled = exported["qlora"]
    trainable = load_tensors(compiled / "trainable.safetensors")
    manifest = json.loads((exported["qlora", "op"] / "manifest.json").read_text())
    assert manifest["format"] == "edgetune.ort-training"
    assert manifest["parameters"] == {n: n for n in sorted(trainable)}
    sess = open_session(exported["qlora", "op"])
    for name, value in trainable.items():  # the checkpoint holds them under their torch names, unchanged
        np.testing.assert_array_equal(sess.state.parameters[name].data, value.numpy())
    base = load_tensors(compiled / "base.safetensors")
    packed = [n for n in manifest["frozen"] if n.endswith(".packed")]
    assert len(packed) == 14  # 2 layers x 7 projections, stored as uint8 in the checkpoint
    for name in packed:
        data = sess.state.parameters[name].data
        assert data.dtype == np.uint8
        np.testing.assert_array_equal(data, base[name].numpy())
    sizes = manifest["sizes"]
    assert sizes["total"] == sizes["checkpoint"] + sizes["graphs"] and sizes["fp32_model"] > 0
    # the packed qlora checkpoint is smaller than the fp32 lora one of the same model
    lora = json.loads((exported["lora", "op"] / "manifest.json").read_text())["sizes"]
    assert sizes["checkpoint"] < 0.6 * lora["checkpoint"]


def test_dynamic_batch_and_sequence(exported):
    sess = open_session(exported["qlora", "op"])
    sess.module.eval()
    for b, t in ((1, 7), (3, 19)):
        ids = np.random.default_rng(b).integers(0, 300, (b, t)).astype(np.int64)
        loss = sess.module(ids, np.ones_like(ids), ids)
        model, _ = edgetune.load_compiled(exported["qlora"])
        with torch.no_grad():
            ref = model(input_ids=torch.from_numpy(ids), labels=torch.from_numpy(ids)).loss.item()
        assert abs(float(np.asarray(loss).reshape(-1)[0]) - ref) <= 1e-4 * ref


def test_resume_gives_the_uninterrupted_result(exported, tmp_path):
    opts = dict(batch=BATCH, seq_len=SEQ, lr=LR, progress=False, save_every=2)
    full = train_ort(exported["lora", "op"], DATA, tmp_path / "full", steps=4, **opts)
    part = tmp_path / "part"
    train_ort(exported["lora", "op"], DATA, part, steps=4, **opts)
    # simulate a kill after the step-2 checkpoint: drop what steps 3-4 wrote
    for leftover in ("manifest.json", "trainable.safetensors", "ort_checkpoint"):
        (part / leftover).unlink()
    for ckpt in sorted((part / "checkpoints").iterdir())[1:]:
        import shutil

        shutil.rmtree(ckpt)
    resumed = train_ort(exported["lora", "op"], DATA, part, steps=4, resume=True, **opts)
    assert [m["step"] for m in resumed.metrics] == [1, 2, 3, 4]
    np.testing.assert_allclose([m["loss"] for m in resumed.metrics], [m["loss"] for m in full.metrics], rtol=1e-6)
    a, b = load_tensors(full.run_dir / "trainable.safetensors"), load_tensors(part / "trainable.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7)


def test_cli_round_trip_to_peft_and_onnx(exported, tmp_path, capsys):
    ort_dir = tmp_path / "cli.ort"
    assert main(["export-training", str(exported["qlora"]), "--out", str(ort_dir)]) == 0
    assert "the fp32 model" in capsys.readouterr().out
    run = tmp_path / "run"
    assert main(["ort-train", str(ort_dir), "--data", str(DATA), "--out", str(run), "--steps", "3",
                 "--batch", "2", "--seq-len", "32", "--lr", "3e-3"]) == 0
    assert {"metrics.jsonl", "loss.png", "trainable.safetensors", "manifest.json"} <= {p.name for p in run.iterdir()}
    assert main(["ort-export", str(run), "--out", str(tmp_path / "peft")]) == 0
    assert main(["ort-export", str(run), "--format", "onnx", "--out", str(tmp_path / "model.onnx")]) == 0
    # `edgetune export` dispatches on the run's manifest kind and writes the same files
    assert main(["export", str(run), "--out", str(tmp_path / "peft2")]) == 0
    assert main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "model2.onnx")]) == 0
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp_path / "peft" / name).read_bytes() == (tmp_path / "peft2" / name).read_bytes()
    assert (tmp_path / "model.onnx").read_bytes() == (tmp_path / "model2.onnx").read_bytes()
    capsys.readouterr()
    code = main(["export", str(run), "--format", "sketch", "--out", str(tmp_path / "sk")])
    _one_line_error(code, capsys.readouterr().err, "no sketch tables")
    code = main(["export", str(run), "--format", "bogus", "--out", str(tmp_path / "b")])
    _one_line_error(code, capsys.readouterr().err, "an ORT run exports --format peft, onnx")
    code = main(["export", str(exported["qlora"]), "--format", "onnx", "--out", str(tmp_path / "m.onnx")])
    _one_line_error(code, capsys.readouterr().err, "needs an ORT run")
    # the PEFT adapter on the torch model gives the logits of ORT's inference model
    model, _ = edgetune.open_model(exported["qlora"], adapter=tmp_path / "peft")
    import onnxruntime as ort

    from edgetune.ort.custom_ops import build_library

    so = ort.SessionOptions()
    so.register_custom_ops_library(str(build_library()))
    sess = ort.InferenceSession(str(tmp_path / "model.onnx"), so)
    ids = torch.randint(0, 300, (1, 9), generator=torch.Generator().manual_seed(0))
    logits = sess.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": np.ones((1, 9), np.int64)})[0]
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    torch.testing.assert_close(torch.from_numpy(logits), ref, rtol=1e-4, atol=1e-4)
    trained = load_tensors(run / "trainable.safetensors")
    initial = load_tensors(exported["qlora"] / "trainable.safetensors")
    assert any(not torch.equal(trained[n], initial[n]) for n in trained)


def _one_line_error(code, err, *needles):
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_bad_input_is_one_line(exported, tmp_path, capsys):
    code = main(["ort-train", str(tmp_path / "missing"), "--data", str(DATA), "--out", str(tmp_path / "r")])
    _one_line_error(code, capsys.readouterr().err, "not an edgetune artifact")
    code = main(["ort-train", str(exported["qlora", "op"]), "--data", str(DATA), "--out", str(tmp_path / "r"),
                 "--steps", "1", "--weight-decay", "0.1"])
    _one_line_error(code, capsys.readouterr().err, "--weight-decay 0.0")
    code = main(["export-training", str(exported["lora"]), "--out", str(exported["lora", "op"])])
    _one_line_error(code, capsys.readouterr().err, "already exists")


def test_missing_onnxruntime_names_the_extra(exported, tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    code = main(["export-training", str(exported["lora"]), "--out", str(tmp_path / "x")])
    _one_line_error(code, capsys.readouterr().err, "pip install 'edgetune[ort]'")
    code = main(["ort-train", str(exported["lora", "op"]), "--data", str(DATA), "--out", str(tmp_path / "r")])
    _one_line_error(code, capsys.readouterr().err, "pip install 'edgetune[ort]'")


def test_external_data_forced_on_a_tiny_model_still_trains(exported, tmp_path):
    """With the threshold at 0 every graph keeps its tensors in <graph>.data; training is unchanged."""
    import onnx

    ort_dir = export_training(exported["lora"], tmp_path / "ext.ort", act4="off", external_data_threshold=0).out
    manifest = json.loads((ort_dir / "manifest.json").read_text())
    assert manifest["external_data"]["threshold_bytes"] == 0
    assert "training_model.onnx" in manifest["external_data"]["graphs"]
    for name in manifest["external_data"]["graphs"]:
        assert f"{name}.data" in manifest["files"] and (ort_dir / f"{name}.data").stat().st_size > 0
        model = onnx.load(str(ort_dir / name), load_external_data=False)
        # float tensors are external; integer ones (shape constants) stay inline for ORT's shape inference
        assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
        assert all(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer
                   if t.data_type == onnx.TensorProto.FLOAT and t.HasField("raw_data"))
    assert manifest["sizes"]["graphs"] == sum((ort_dir / f).stat().st_size for f in manifest["files"]
                                              if f.split(".onnx")[0] in ("training_model", "eval_model",
                                                                         "optimizer_model"))
    batches = _batches(exported["lora"], STEPS)
    ref_losses, ref_params = _torch_reference(exported["lora"], batches)
    losses, params = _ort_steps(ort_dir, batches)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
    for name in ref_params:
        torch.testing.assert_close(params[name], ref_params[name], rtol=1e-3, atol=5e-5, msg=name)
    # a run on it writes its final checkpoint through the hidden-folder move, and resumes from it
    run = train_ort(ort_dir, DATA, tmp_path / "run", steps=2, batch=BATCH, seq_len=SEQ, lr=LR, progress=False)
    assert (run.run_dir / "ort_checkpoint").is_file() and not any(p.name.startswith(".ort_checkpoint")
                                                                  for p in run.run_dir.iterdir())
    sess = open_session(ort_dir, run.run_dir / "ort_checkpoint")
    trained = load_tensors(run.run_dir / "trainable.safetensors")
    for name, value in adapter_arrays(sess.state, sess.manifest).items():
        np.testing.assert_array_equal(np.array(value), trained[name].numpy())
