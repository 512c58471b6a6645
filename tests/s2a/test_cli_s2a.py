"""`compile --act-bits`, `inspect` and training through the CLI on a tiny model."""
import json

from edgetune.cli import main


def test_compile_inspect_and_train(tmp_path, tiny_hf_dir, capsys):
    out = tmp_path / "c"
    assert main(["compile", str(tiny_hf_dir), "--recipe", "qlora", "--r", "4", "--act-bits", "4",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["s2a"]["act_bits"] == 4
    assert {"norms", "gated_mlp", "attention", "lora_inputs", "loss_head"} <= set(summary["changed"])
    before = sum(v[0] for v in summary["per_token_per_layer"].values())
    after = sum(v[1] for v in summary["per_token_per_layer"].values())
    assert after < before / 3
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "replaced:" in text and "less)" in text
    data = tmp_path / "d.txt"
    data.write_text("Edge devices fine-tune small language models with little memory. " * 120)
    assert main(["train", str(out), "--data", str(data), "--steps", "12", "--batch", "2", "--seq-len", "32",
                 "--lr", "3e-3", "--out", str(tmp_path / "run")]) == 0
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses[-1] < losses[0]


def test_inspect_bad_dir_is_one_line(tmp_path, capsys):
    assert main(["inspect", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "manifest" in err


def test_bad_act_bits_is_refused(tmp_path, tiny_hf_dir, capsys):
    assert main(["compile", str(tiny_hf_dir), "--act-bits", "3", "--out", str(tmp_path / "c")]) == 2
