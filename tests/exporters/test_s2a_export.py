"""S2A adapters: export, reload, and the dense merge that folds biases into plain transformers."""
import pytest
import torch

from edgetune.artifact import save_compiled
from edgetune.compiler import compile_model
from edgetune.errors import ArtifactError, EdgetuneError
from edgetune.exporters.s2a import dense_s2a_model, export_s2a, load_s2a, merge_s2a_artifact
from tiny_models import build_tiny_model


def _trained_s2a(vocab, prompt_len=0, seed=0):
    model = compile_model(build_tiny_model("llama", vocab), "s2a", prompt_len=prompt_len, act_bits=4)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # stand-in for training: every S2A tensor non-zero
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def test_dense_merge_matches_the_s2a_model_in_plain_transformers(tmp_path, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    model = _trained_s2a(len(tiny_tokenizer))
    save_compiled(model, tiny_tokenizer, tmp_path / "base")
    export_s2a(tmp_path / "adapter", model)
    merge_s2a_artifact(tmp_path / "base", tmp_path / "adapter", tmp_path / "dense", dense=True)
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "dense"))
    assert plain.config.attention_bias and plain.config.mlp_bias
    ids = torch.randint(0, len(tiny_tokenizer), (2, 20), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = plain(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4), float((got - want).abs().max())


def test_adapter_round_trip_and_base_check(tmp_path, tiny_tokenizer):
    model = _trained_s2a(len(tiny_tokenizer), prompt_len=4)
    export_s2a(tmp_path / "adapter", model)
    fresh = compile_model(build_tiny_model("llama", len(tiny_tokenizer)), "s2a", prompt_len=4, act_bits=4)
    load_s2a(tmp_path / "adapter", fresh)
    for (n, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), n
    other = compile_model(build_tiny_model("llama", len(tiny_tokenizer)), "s2a", prompt_len=8, act_bits=4)
    with pytest.raises(ArtifactError, match=r"has shape \(4, 4\), expected \(8, 4\)"):
        load_s2a(tmp_path / "adapter", other)


def test_a_trained_prompt_is_not_folded(tiny_tokenizer):
    with pytest.raises(EdgetuneError, match="cannot be folded"):
        dense_s2a_model(_trained_s2a(len(tiny_tokenizer), prompt_len=4))


def test_cli_export_and_merge(tmp_path, tiny_hf_dir, capsys):
    from transformers import AutoModelForCausalLM

    from edgetune.cli import main

    compiled, run = tmp_path / "c", tmp_path / "run"
    assert main(["compile", str(tiny_hf_dir), "--recipe", "s2a", "--prompt-len", "0", "--out", str(compiled)]) == 0
    data = tmp_path / "d.txt"
    data.write_text("Edge devices fine-tune small language models with little memory. " * 60)
    assert main(["train", str(compiled), "--data", str(data), "--steps", "3", "--batch", "2", "--seq-len", "32",
                 "--lr", "1e-2", "--out", str(run)]) == 0
    assert main(["export", str(run), "--format", "s2a", "--out", str(tmp_path / "a")]) == 0
    assert main(["merge", str(compiled), str(tmp_path / "a"), "--dense", "--out", str(tmp_path / "dense")]) == 0
    dense = AutoModelForCausalLM.from_pretrained(str(tmp_path / "dense"))
    assert float(dense.model.layers[0].self_attn.q_proj.bias.abs().sum()) > 0  # the trained biases are in
    capsys.readouterr()
    assert main(["export", str(run), "--format", "peft", "--out", str(tmp_path / "p")]) == 2
    assert "no LoRA adapter" in capsys.readouterr().err


def _trained_side(vocab, seed=0, **opts):
    model = compile_model(build_tiny_model("llama", vocab), "s2a", side=True, side_dim=16, act_bits=4, **opts)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def test_side_branch_round_trip_is_bit_exact(tmp_path, tiny_tokenizer):
    model = _trained_side(len(tiny_tokenizer), prompt_len=4, side_every=2)
    export_s2a(tmp_path / "adapter", model)
    fresh = compile_model(build_tiny_model("llama", len(tiny_tokenizer)), "s2a", prompt_len=4, side=True,
                          side_dim=16, side_every=2, act_bits=4)
    load_s2a(tmp_path / "adapter", fresh)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any("s2a_side.up" in n for n in names)
    for (n, a), (_, b) in zip(model.named_parameters(), fresh.named_parameters()):
        assert torch.equal(a, b), n
    ids = torch.randint(0, len(tiny_tokenizer), (2, 20), generator=torch.Generator().manual_seed(1))
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, fresh(input_ids=ids).logits)
    narrow = compile_model(build_tiny_model("llama", len(tiny_tokenizer)), "s2a", prompt_len=4, side=True,
                           side_dim=8, side_every=2, act_bits=4)
    with pytest.raises(ArtifactError, match="expected"):
        load_s2a(tmp_path / "adapter", narrow)


def test_a_trained_side_branch_is_not_folded_but_an_untrained_one_is_dropped(tiny_tokenizer):
    with pytest.raises(EdgetuneError, match="side branch is a separate network and cannot be folded"):
        dense_s2a_model(_trained_side(len(tiny_tokenizer), prompt_len=0))
    model = _trained_side(len(tiny_tokenizer), prompt_len=0)
    with torch.no_grad():
        model.model.s2a_side.up.weight.zero_()  # the side contributes exactly nothing
    plain = dense_s2a_model(model)
    ids = torch.randint(0, len(tiny_tokenizer), (2, 20), generator=torch.Generator().manual_seed(2))
    model.eval()
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-4)


def test_cli_side_branch_compile_train_export_and_refused_dense_merge(tmp_path, tiny_hf_dir, capsys):
    from edgetune.cli import main

    compiled, run = tmp_path / "c", tmp_path / "run"
    assert main(["compile", str(tiny_hf_dir), "--recipe", "s2a", "--no-bias", "--prompt-len", "0", "--side",
                 "--side-dim", "16", "--side-every", "2", "--out", str(compiled)]) == 0
    data = tmp_path / "d.txt"
    data.write_text("Edge devices fine-tune small language models with little memory. " * 60)
    assert main(["train", str(compiled), "--data", str(data), "--steps", "3", "--batch", "2", "--seq-len", "32",
                 "--lr", "1e-2", "--out", str(run)]) == 0
    assert main(["export", str(run), "--format", "s2a", "--out", str(tmp_path / "a")]) == 0
    assert main(["merge", str(compiled), str(tmp_path / "a"), "--out", str(tmp_path / "m")]) == 0
    capsys.readouterr()
    assert main(["merge", str(compiled), str(tmp_path / "a"), "--dense", "--out", str(tmp_path / "dense")]) == 2
    err = capsys.readouterr().err.strip()
    assert "side branch" in err and "cannot be folded" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "dense").exists()
