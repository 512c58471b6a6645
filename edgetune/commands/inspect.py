"""`edgetune inspect DIR`: what the S2A rewrite changed in a compiled artifact, and what it saves.

Reads only ``manifest.json`` and ``config.json`` (no weights): the rewrite report recorded at
compile time, and the planner's saved-bytes formula evaluated for the artifact's recipe at
``--act-bits 16`` (before) and at its own setting (after), per token and per decoder block.
"""
from __future__ import annotations

import json
from pathlib import Path

import click


def rewrite_summary(directory: str | Path, seq_len: int = 256) -> dict:
    from ..errors import ArtifactError
    from ..manifest import read_manifest
    from ..planner import ModelShape, saved_activation_bytes

    directory = Path(directory)
    manifest = read_manifest(directory, "compiled")
    try:
        cfg = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{directory}/config.json: unreadable ({exc})") from None
    report = manifest.get("rewrite_report") or {"changed": {}, "unknown": []}
    s2a = manifest.get("s2a", {"act_bits": 16})
    out = {"recipe": manifest.get("recipe"), "s2a": s2a, "changed": report["changed"],
           "unknown": report["unknown"], "per_token_per_layer": None}
    job = _job(manifest, cfg)
    if job is None:
        return out
    from transformers import AutoConfig

    shape = ModelShape.from_config(AutoConfig.from_pretrained(str(directory)))
    import dataclasses

    before = saved_activation_bytes(shape, dataclasses.replace(job, act_bits=16), 1, seq_len)
    after = saved_activation_bytes(shape, job, 1, seq_len)
    per = seq_len * shape.layers
    out["per_token_per_layer"] = {k: [before[k] / per, after[k] / per] for k in before}
    out["seq_len"] = seq_len
    return out


def _job(manifest: dict, cfg: dict):
    from ..planner import JobSpec, LLAMA_PROJ

    if cfg.get("model_type") not in ("llama", "qwen2", "mistral"):
        return None
    rc, s2a = manifest.get("recipe_config", {}), manifest.get("s2a", {})
    bits, code4 = s2a.get("act_bits", 16), s2a.get("gate_code4", False)
    recipe = manifest.get("recipe")
    if recipe in ("lora", "qlora"):
        targets = tuple(rc.get("target_modules", ["all"]))
        targets = LLAMA_PROJ if targets in (("all",), ("all-linear",)) else targets
        return JobSpec(recipe, rc.get("r", 16), targets, rc.get("blocksize", 64), rc.get("double_quant", False),
                       manifest.get("dtype", "float32"), bits, code4)
    if recipe == "s2a":
        return JobSpec("s2a", 0, LLAMA_PROJ, rc.get("blocksize", 64), rc.get("double_quant", False),
                       manifest.get("dtype", "float32"), bits, code4, rc.get("bias", True),
                       (rc.get("prompt_len", 16), rc.get("prompt_rank", 4)), rc.get("base", "nf4") == "nf4")
    return None


def _print(summary: dict) -> None:
    s2a = summary["s2a"]
    click.echo(f"recipe {summary['recipe']}, act-bits {s2a.get('act_bits', 16)}"
               + (f" (groups of {s2a.get('group', 64)}, {'stochastic' if s2a.get('stochastic') else 'nearest'}"
                  f" rounding{', gate as 4-bit code' if s2a.get('gate_code4') else ''})"
                  if s2a.get("act_bits", 16) != 16 else " (no activation rewrite)"))
    click.echo("replaced:")
    if not summary["changed"]:
        click.echo("  nothing")
    for name, paths in summary["changed"].items():
        click.echo(f"  {name:12} {len(paths):4d}  e.g. {paths[0]}")
    click.echo("left untouched (unknown to every pass): "
               + (", ".join(f"{p} ({t})" for p, t in summary["unknown"]) or "none"))
    per = summary["per_token_per_layer"]
    if per is None:
        click.echo("saved bytes: no planner formula for this recipe / architecture")
        return
    click.echo(f"estimated saved bytes per token per decoder block (planner formula, seq-len {summary['seq_len']}):")
    click.echo(f"  {'':12} {'before':>9} {'after':>9}")
    for k, (b, a) in per.items():
        click.echo(f"  {k:12} {b:9.0f} {a:9.0f}")
    tb, ta = sum(v[0] for v in per.values()), sum(v[1] for v in per.values())
    click.echo(f"  {'total':12} {tb:9.0f} {ta:9.0f}   ({tb / max(ta, 1e-9):.1f}x less)")


def register(cli: click.Group) -> None:
    @cli.command("inspect")
    @click.argument("directory", type=click.Path())
    @click.option("--seq-len", default=256, show_default=True, type=int, help="sequence length for the estimate")
    @click.option("--json", "as_json", is_flag=True, help="print one JSON object")
    def inspect_cmd(directory, seq_len, as_json):
        """Print the S2A rewrite report of a compiled artifact DIR."""
        summary = rewrite_summary(directory, seq_len)
        if as_json:
            click.echo(json.dumps(summary))
        else:
            _print(summary)
