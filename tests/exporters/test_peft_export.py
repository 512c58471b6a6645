"""PEFT export: PeftModel.from_pretrained on a fresh base must reproduce edgetune's LoRA logits."""
from __future__ import annotations

import copy
import json
import re
import warnings

import pytest
import torch

from tiny_models import build_tiny_model
from edgetune.errors import EdgetuneError
from edgetune.exporters.peft import VLLM_RANKS, export_peft, read_peft
from edgetune.methods.lora.layer import LoraLinear
from edgetune.models.arch import arch_for, get_submodule_parent

peft = pytest.importorskip("peft")

VOCAB = 128
R, ALPHA, DROPOUT = 8, 16.0, 0.05


def wrap_with_lora(model, r=R, alpha=ALPHA, seed=1, b_scale=0.05):
    """Replace every projection of every block by a LoraLinear with random, non-zero A and B."""
    spec = arch_for(model.config)
    g = torch.Generator().manual_seed(seed)
    adapters = {}
    for path in spec.target_paths(model, spec.linear_names):
        parent, leaf = get_submodule_parent(model, path)
        base = getattr(parent, leaf)
        w = base.weight
        in_f, out_f = (w.shape[0], w.shape[1]) if spec.transposed_weights else (w.shape[1], w.shape[0])
        lora = LoraLinear(base, in_f, out_f, r=r, alpha=alpha, dropout=DROPOUT)
        lora.reset_parameters(generator=g)
        with torch.no_grad():
            lora.lora_B.copy_(torch.randn(out_f, r, generator=g) * b_scale)
        setattr(parent, leaf, lora)
        adapters[path] = (lora.lora_A.detach().clone(), lora.lora_B.detach().clone())
    return adapters, list(spec.linear_names), spec.transposed_weights


def logits_of(model, ids):
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def load_with_peft(base, adapter_dir):
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = PeftModel.from_pretrained(base, str(adapter_dir))
    peft_warnings = [str(w.message) for w in caught if "peft" in (w.filename or "")]
    assert not peft_warnings, peft_warnings
    pm.eval()
    return pm


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gpt2"])
def test_peft_reproduces_lora_logits(model_type, ids, tmp_path, capsys):
    model = build_tiny_model(model_type, VOCAB)
    fresh = copy.deepcopy(model)
    fresh16 = copy.deepcopy(model)
    base_logits = logits_of(model, ids)
    adapters, targets, transposed = wrap_with_lora(model)
    lora_logits = logits_of(model, ids)
    # The adapter must matter, or a broken export could still "match".
    assert (lora_logits - base_logits).abs().max() > 0.05

    out32 = tmp_path / "fp32"
    out32.mkdir()
    cfg = export_peft(out32, adapters, r=R, alpha=ALPHA, dropout=DROPOUT, target_modules=targets,
                      base_model_name_or_path=f"tiny-{model_type}", fan_in_fan_out=transposed)
    assert cfg["target_modules"] == sorted(targets)
    assert cfg["fan_in_fan_out"] is transposed
    assert json.loads((out32 / "adapter_config.json").read_text()) == cfg
    d32 = (logits_of(load_with_peft(fresh, out32), ids) - lora_logits).abs().max().item()
    assert d32 <= 1e-3

    out16 = tmp_path / "fp16"
    out16.mkdir()
    export_peft(out16, adapters, r=R, alpha=ALPHA, dropout=DROPOUT, target_modules=targets,
                base_model_name_or_path=f"tiny-{model_type}", fan_in_fan_out=transposed, dtype=torch.float16)
    d16 = (logits_of(load_with_peft(fresh16, out16), ids) - lora_logits).abs().max().item()
    assert d16 <= 1e-2
    size32 = (out32 / "adapter_model.safetensors").stat().st_size
    size16 = (out16 / "adapter_model.safetensors").stat().st_size
    assert 0.45 < size16 / size32 < 0.56
    with capsys.disabled():
        print(f"\n[peft parity] {model_type}: fp32 max|Δ|={d32:.2e} fp16 max|Δ|={d16:.2e} "
              f"sizes {size32}/{size16} B")


def test_config_and_keys(tmp_path):
    model = build_tiny_model("llama", VOCAB)
    adapters, targets, _ = wrap_with_lora(model)
    cfg = export_peft(tmp_path, adapters, r=R, alpha=ALPHA, dropout=0.0, target_modules=targets,
                      base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct",
                      extra_metadata={"edgetune_version": "0.1", "steps": 10})
    expected = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": R, "lora_alpha": 16, "bias": "none",
        "inference_mode": True, "use_dora": False, "use_rslora": False, "modules_to_save": None,
        "init_lora_weights": True, "fan_in_fan_out": False,
        "base_model_name_or_path": "HuggingFaceTB/SmolLM2-135M-Instruct",
    }
    assert {k: cfg[k] for k in expected} == expected
    assert cfg["target_modules"] == sorted(targets)

    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    assert len(keys) == 2 * len(adapters)
    assert all(re.fullmatch(r"base_model\.model\.model\.layers\.\d+\.\w+\.\w+\.lora_[AB]\.weight", k) for k in keys)
    assert not any(".default." in k for k in keys)
    assert meta["format"] == "pt" and meta["edgetune_version"] == "0.1" and meta["steps"] == "10"

    cfg2, back = read_peft(tmp_path)
    assert cfg2 == cfg and back.keys() == adapters.keys()
    for path, (a, b) in adapters.items():
        assert torch.equal(back[path][0], a) and torch.equal(back[path][1], b)


@pytest.mark.parametrize("r", [2, 4, 24, 1024])
def test_rank_vllm_cannot_serve_is_refused(r, tmp_path):
    a = {"model.layers.0.self_attn.q_proj": (torch.randn(r, 64), torch.randn(64, r))}
    with pytest.raises(EdgetuneError) as exc:
        export_peft(tmp_path, a, r=r, alpha=16, dropout=0.0, target_modules=["q_proj"],
                    base_model_name_or_path="m")
    assert "\n" not in str(exc.value) and f"r={r}" in str(exc.value)
    assert not any(tmp_path.iterdir())


def test_allowed_ranks_and_bad_input(tmp_path):
    assert VLLM_RANKS == (1, 8, 16, 32, 64, 128, 256, 320, 512)
    ok = {"model.layers.0.self_attn.q_proj": (torch.randn(16, 64), torch.randn(64, 16))}
    export_peft(tmp_path, ok, r=16, alpha=32, dropout=0.0, target_modules=["q_proj"], base_model_name_or_path="m")
    bad_cases = [
        dict(adapters=ok, r=8),  # shapes disagree with r
        dict(adapters={"model.layers.0.self_attn.q_proj": (torch.randn(16, 64), torch.randn(64, 16))},
             target_modules=["v_proj"]),  # module not named by target_modules
        dict(adapters={"base_model.model.model.layers.0.self_attn.q_proj": ok["model.layers.0.self_attn.q_proj"]}),
        dict(adapters={"model.layers.0.self_attn.q_proj": (torch.full((16, 64), 1e6), torch.randn(64, 16))},
             dtype=torch.float16),  # overflows fp16
        dict(adapters={}),
    ]
    for case in bad_cases:
        kw = dict(r=16, alpha=32, dropout=0.0, target_modules=["q_proj"], base_model_name_or_path="m")
        kw.update(case)
        with pytest.raises(EdgetuneError):
            export_peft(tmp_path, **kw)
    with pytest.raises(EdgetuneError):
        export_peft(tmp_path / "missing", ok, r=16, alpha=32, dropout=0.0, target_modules=["q_proj"],
                    base_model_name_or_path="m")


def test_read_peft_refuses_pickle_only(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    (tmp_path / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(EdgetuneError):
        read_peft(tmp_path)
