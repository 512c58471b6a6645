"""The planner's saved-activation formula against what autograd really saves, and the CLI."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from edgetune.cli import main
from edgetune.compiler import compile_model
from edgetune.memory import saved_bytes_of_step
from edgetune.planner import (JobSpec, ModelShape, choose, job_for, plan_for_model, saved_activation_bytes, shape_for,
                               weight_bytes)
from edgetune.profiles import load_profile


def _config(kind, layers=2, heads=4, kv=2):
    cls = LlamaConfig if kind == "llama" else Qwen2Config
    return cls(vocab_size=300, hidden_size=48, intermediate_size=80, num_hidden_layers=layers,
               num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=512,
               tie_word_embeddings=kind == "llama")


@pytest.mark.parametrize("act_bits", [16, 8, 4])
@pytest.mark.parametrize("kind,recipe,targets,batch,seq", [
    ("llama", "lora", ("all",), 2, 16),
    ("llama", "qlora", ("all",), 3, 40),
    ("llama", "lora", ("q_proj", "v_proj"), 2, 24),
    ("llama", "qlora", ("down_proj", "gate_proj"), 1, 33),
    ("qwen2", "lora", ("all",), 2, 20),
])
def test_saved_bytes_formula_matches_autograd(kind, recipe, targets, batch, seq, act_bits):
    torch.manual_seed(0)
    cfg = _config(kind)
    model = compile_model(AutoModelForCausalLM.from_config(cfg), recipe, r=4, target_modules=targets,
                          act_bits=act_bits)
    model.train()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq))
    measured = saved_bytes_of_step(model, {"input_ids": ids, "labels": ids})
    resolved = targets if targets != ("all",) else JobSpec().targets
    predicted = sum(saved_activation_bytes(ModelShape.from_config(cfg), JobSpec(recipe, 4, tuple(resolved),
                                                                                   act_bits=act_bits),
                                           batch, seq).values())
    assert abs(predicted - measured) <= 0.01 * measured, (predicted, measured)  # the issue asks 10%


def test_plan_for_compiled_model_uses_its_profile():
    model = compile_model(AutoModelForCausalLM.from_config(_config("llama")), "qlora", "rpi5-8gb", r=8)
    plan = plan_for_model(model, batch=2, seq_len=64)
    assert plan.device == "rpi5-8gb" and plan.fits and plan.batch == 2


def test_shipped_configs_and_targets():
    nano = load_profile("jetson-orin-nano-8gb")
    shape = shape_for("llama-2-7b")
    assert 6.5e9 < shape.params < 7e9
    plan = choose(shape, JobSpec("qlora", dtype="bfloat16"), nano)
    # fits, but only at a short sequence until 4-bit saved activations (the S2A issue) land
    assert plan.fits and plan.seq_len >= 64 and plan.total_bytes <= plan.budget_bytes
    # qlora stores the base in about a third of lora's bytes
    lora = choose(shape, JobSpec("lora", dtype="bfloat16"), load_profile("jetson-agx-orin-64gb"), 1, 512)
    qlora = choose(shape, JobSpec("qlora", dtype="bfloat16"), load_profile("jetson-agx-orin-64gb"), 1, 512)
    assert qlora.components["weights"] < 0.35 * lora.components["weights"]  # NF4 linears, bf16 embeddings


def test_plan_cli_json_and_does_not_fit(capsys, tmp_path):
    assert main(["plan", "smollm2-135m", "--device", "cpu-16gb", "--json", "--png", str(tmp_path / "p.png")]) == 0
    obj = json.loads(capsys.readouterr().out)
    assert obj["fits"] and {"weights", "trainable", "gradients", "optimizer", "activations"} <= set(obj["components"])
    assert obj["total_bytes"] == sum(obj["components"].values()) <= obj["budget_bytes"]
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"
    code = main(["plan", "llama-3-8b", "--device", "laptop-rtx3050-4gb", "--recipe", "lora", "--json"])
    out, err = capsys.readouterr()
    assert code == 2 and json.loads(out)["fits"] is False
    assert len(err.strip().splitlines()) == 1 and "does not fit" in err


def test_compile_records_plan_and_train_refuses_overflow(capsys, tmp_path, tiny_hf_dir):
    """A job the planner says overflows the compiled device is refused unless --force."""
    profile = tmp_path / "tiny.toml"
    profile.write_text('name = "tiny"\ndescription = "a device with 0.3 GiB"\naccelerator = "cpu"\n'
                       'total_memory_gib = 0.5\nusable_memory_gib = 0.3\ncompute_capability = "none"\n'
                       'dtypes = ["float32"]\ndefault_dtype = "float32"\nmemory_bandwidth_gbps = 10.0\n'
                       'peak_tflops = 0.1\n')
    out = tmp_path / "c"
    assert main(["compile", str(tiny_hf_dir), "--recipe", "lora", "--device", str(profile), "--out", str(out),
                 "--act-bits", "16"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["plan"]["fits"] and manifest["plan"]["device"] == "tiny"
    data = tmp_path / "d.txt"
    data.write_text("hello world, this is a small test text. " * 200)
    capsys.readouterr()
    code = main(["train", str(out), "--data", str(data), "--steps", "1", "--batch", "64", "--seq-len", "256",
                 "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "needs" in err and "--force" in err and len(err.strip().splitlines()) == 1
    assert main(["train", str(out), "--data", str(data), "--steps", "1", "--batch", "64", "--seq-len", "256",
                 "--out", str(tmp_path / "r"), "--force"]) == 0


@pytest.mark.parametrize("act_bits", [16, 4])
def test_s2a_saved_bytes_and_trainable_count_match_the_formula(act_bits):
    torch.manual_seed(0)
    cfg = _config("llama")
    model = compile_model(AutoModelForCausalLM.from_config(cfg), "s2a", act_bits=act_bits)
    model.train()
    ids = torch.randint(0, cfg.vocab_size, (2, 24))
    measured = saved_bytes_of_step(model, {"input_ids": ids, "labels": ids})
    job = job_for(model)
    shape = ModelShape.from_config(cfg)
    predicted = sum(saved_activation_bytes(shape, job, 2, 24).values())
    assert abs(predicted - measured) <= 8, (predicted, measured)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    assert weight_bytes(shape, job)[1] == trainable


def test_out_of_memory_advice_comes_from_the_plan(tmp_path):
    from edgetune.profiles import load_profile
    from edgetune.training.loop import TrainConfig, oom_advice

    profile = tmp_path / "tiny.toml"
    profile.write_text('name = "tiny"\ndescription = "a device with 0.3 GiB"\naccelerator = "cpu"\n'
                       'total_memory_gib = 0.5\nusable_memory_gib = 0.3\ncompute_capability = "none"\n'
                       'dtypes = ["float32"]\ndefault_dtype = "float32"\nmemory_bandwidth_gbps = 10.0\n'
                       'peak_tflops = 0.1\n')
    model = compile_model(AutoModelForCausalLM.from_config(_config("llama")), "lora", load_profile(str(profile)),
                          act_bits=16)
    advice = oom_advice(TrainConfig(steps=1, batch=64, seq_len=256), model)
    assert advice.startswith("the plan agrees") and "--act-bits 4" in advice
    fits = oom_advice(TrainConfig(steps=1, batch=2, seq_len=32), model)
    assert "--batch 1" in fits and "less memory is free" in fits


def test_plan_cli_recipe_options(capsys):
    """--double-quant follows the recipe's compile default; options of another recipe are refused."""
    def plan(*args):
        assert main(["plan", "llama-3.2-1b", "--device", "jetson-orin-nano-8gb", "--batch", "1", "--seq-len", "256",
                     "--json", *args]) == 0
        return json.loads(capsys.readouterr().out)

    dq, plain = plan(), plan("--no-double-quant")
    assert dq["components"]["weights"] < plain["components"]["weights"]
    assert plan("--double-quant")["components"] == dq["components"]  # on by default for qlora
    nf4 = plan("--embed-nf4")
    assert nf4["components"]["weights"] < dq["components"]["weights"]
    side = plan("--recipe", "s2a", "--side", "--side-dim", "32")
    assert side["activations"]["side"] > 0 and "side" not in plan("--recipe", "s2a")["activations"]
    for bad in (["--recipe", "lora", "--embed-nf4"], ["--recipe", "qlora", "--side"], ["--recipe", "s2a", "--no-bias",
                "--prompt-len", "0"], ["--recipe", "s2a", "--side", "--side-dim", "5000"], ["--recipe", "s2a",
                "--embed-nf4"]):
        assert main(["plan", "llama-3.2-1b", *bad]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "edgetune: error" in err, (bad, err)
    assert main(["plan", "vit-b-16", "--embed-nf4"]) == 2 and "no token embedding" in capsys.readouterr().err


def test_double_quant_defaults_follow_the_recipes():
    from edgetune.methods.qlora.config import QLoraConfig
    from edgetune.methods.s2a.config import S2AConfig
    from edgetune.planner import DOUBLE_QUANT_DEFAULT

    assert DOUBLE_QUANT_DEFAULT == {"qlora": QLoraConfig.double_quant, "s2a": S2AConfig.double_quant}
