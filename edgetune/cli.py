"""The `edgetune` command line: click commands only, each a thin call into ``edgetune.api``.

Errors in the user's input arrive as :class:`EdgetuneError` and leave as one line on stderr with
exit code 2, never as a traceback.
"""
from __future__ import annotations

import dataclasses
import json
import sys
import typing
from importlib import resources
from pathlib import Path

import click

from .errors import EdgetuneError

# --------------------------------------------------------------------------- option generation


def _field_type(f: dataclasses.Field):
    hint = f.type if not isinstance(f.type, str) else f.type
    text = str(hint)
    if "tuple" in text:
        return "csv"
    if "bool" in text:
        return bool
    if "int" in text and "float" not in text:
        return int
    if "float" in text:
        return float
    return str


def dataclass_options(classes: typing.Iterable[type], skip: tuple[str, ...] = ()):
    """click options for the fields of config dataclasses (deduplicated by name, help from metadata)."""
    seen: dict[str, dataclasses.Field] = {}
    for cls in classes:
        for f in dataclasses.fields(cls):
            if f.name not in skip:
                seen.setdefault(f.name, f)

    def decorate(func):
        for name, f in reversed(list(seen.items())):
            flag = "--" + name.replace("_", "-")
            kind = _field_type(f)
            help_text = f.metadata.get("help", "")
            if kind is bool:
                func = click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=help_text)(func)
            elif kind == "csv":
                func = click.option(flag, name, default=None, help=help_text + " [comma separated]")(func)
            else:
                func = click.option(flag, name, type=kind, default=None, help=help_text)(func)
        return func

    decorate.fields = seen
    return decorate


def _given(fields: dict[str, dataclasses.Field], values: dict) -> dict:
    """Only the options the user typed, converted to the dataclass field types."""
    out = {}
    for name, f in fields.items():
        v = values.get(name)
        if v is None:
            continue
        out[name] = tuple(x.strip() for x in v.split(",") if x.strip()) if _field_type(f) == "csv" else v
    return out


def _recipe_configs():
    from .methods import all_methods

    return [m.config_cls for m in all_methods()]


def _train_config():
    from .training.loop import TrainConfig

    return TrainConfig


recipe_options = dataclass_options(_recipe_configs())
train_options = dataclass_options([_train_config()])


def _echo_json(obj) -> None:
    click.echo(json.dumps(obj, indent=None))


# --------------------------------------------------------------------------- commands


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="edgetune")
def cli():
    """Compile a model for a device, fine-tune it locally, and export a small adapter."""


@cli.command("compile")
@click.argument("model")
@click.option("--recipe", default="qlora", show_default=True, help="fine-tuning recipe (see `edgetune recipes`)")
@click.option("--device", default="cpu-16gb", show_default=True, help="device profile name or TOML file")
@click.option("--out", required=True, type=click.Path(), help="artifact directory to write")
@click.option("--overwrite", is_flag=True, help="replace --out if it exists")
@click.option("--act-bits", type=click.Choice(["16", "8", "4"]), default="4", show_default=True,
              help="S2A: bits for what backward keeps (4: 4-bit derivative codes for nonlinearities, 8-bit "
                   "norm/attention/LoRA inputs; 8: all 8-bit; 16: no activation rewrite)")
@click.option("--act-stochastic", is_flag=True, help="S2A: stochastic rounding for the 8-bit saved inputs")
@click.option("--act-gate-code4", is_flag=True,
              help="S2A: keep the SwiGLU gate as a 4-bit derivative code (+ 8-bit SiLU output) instead of 8 bits")
@recipe_options
def compile_cmd(model, recipe, device, out, overwrite, act_bits, act_stochastic, act_gate_code4, **options):
    """Rewrite MODEL (HF dir, .gguf or 'default') for a recipe and device; write an artifact dir."""
    from . import api
    from .fsutil import check_output_path
    from .methods import get_method
    from .profiles import load_profile

    method = get_method(recipe)
    profile = load_profile(device)
    check_output_path(out, overwrite)
    given = _given(recipe_options.fields, options)
    own = {f.name for f in dataclasses.fields(method.config_cls)}
    foreign = sorted(set(given) - own)
    if foreign:
        raise EdgetuneError(f"recipe {recipe!r} has no option(s) "
                            f"{', '.join('--' + n.replace('_', '-') for n in foreign)}")
    m, tok = api.load(model)
    compiled = api.compile(m, recipe, profile, act_bits=int(act_bits), act_stochastic=act_stochastic,
                           act_gate_code4=act_gate_code4, **given)
    api.save(compiled, out, tok, overwrite=overwrite)
    n_train = sum(p.numel() for p in compiled.parameters() if p.requires_grad)
    lean = compiled.edgetune.report
    click.echo(f"compiled {model} with {recipe} for {profile.name}: {len(compiled.edgetune.rewritten)} "
               f"projections rewritten, act-bits {act_bits} ({lean.total} activation ops rewritten), "
               f"{n_train:,} trainable parameters -> {out}")


@cli.command("train")
@click.argument("compiled", type=click.Path())
@click.option("--data", required=True, type=click.Path(), help="training data (.jsonl or .txt; for an image model, a directory with one sub-folder of images per class)")
@click.option("--out", required=True, type=click.Path(), help="run directory to write")
@click.option("--overwrite", is_flag=True, help="replace --out if it exists")
@click.option("--resume", is_flag=True, help="continue the run in --out from its newest valid checkpoint")
@click.option("--force", is_flag=True, help="train even if the planner says it does not fit the device")
@click.option("--backend", type=click.Choice(["torch", "ort"]), default="torch", show_default=True,
              help="torch on a compiled directory, or ONNX Runtime Training on a directory from export-training")
@train_options
def train_cmd(compiled, data, out, overwrite, resume, force, backend, **options):
    """Fine-tune a COMPILED artifact directory on --data."""
    from . import api

    given = _given(train_options.fields, options)
    if backend == "ort":
        from .ort.train import train_ort

        result = train_ort(compiled, data, out, overwrite=overwrite, resume=resume, **given)
    else:
        result = api.train(compiled, data, out, overwrite=overwrite, resume=resume, force=force, **given)
    click.echo(f"trained {result.steps} steps: loss {result.first_loss:.4f} -> {result.last_loss:.4f}; run in {out}")


@cli.command("export")
@click.argument("run", type=click.Path())
@click.option("--format", "fmt", default="peft", show_default=True,
              help="peft | gguf | sketch (sketchtune table deltas) | s2a (S2A biases and prompts); "
                   "sketch and s2a adapters go to `edgetune merge`; an ORT run also: onnx (inference model)")
@click.option("--out", required=True, type=click.Path(),
              help="adapter directory (peft, sketch, s2a) or .gguf / .onnx file")
@click.option("--dtype", default="float32", show_default=True, help="float32 | float16 (sketch deltas are float16)")
@click.option("--overwrite", is_flag=True, help="replace --out if it exists")
def export_cmd(run, fmt, out, dtype, overwrite):
    """Export the adapter of a RUN (or compiled dir) for a server."""
    from . import api

    path = api.export_adapter(run, out, format=fmt, dtype=dtype, overwrite=overwrite)
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
    click.echo(f"wrote {fmt} adapter ({size / 2**20:.2f} MiB) to {out}")


def _load_eval_data(path, tokenizer, seq_len, model):
    from .api import check_seq_len
    from .training.data import build_dataset

    check_seq_len(model, seq_len)
    return build_dataset(path, tokenizer, seq_len)


@cli.command("eval")
@click.argument("target")
@click.option("--data", required=True, type=click.Path(), help="held-out data (.jsonl or .txt)")
@click.option("--adapter", type=click.Path(), default=None, help="PEFT adapter directory to apply")
@click.option("--seq-len", default=256, show_default=True, type=int)
@click.option("--batch", default=4, show_default=True, type=int)
@click.option("--force", is_flag=True, help="apply an adapter trained on a different base")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
def eval_cmd(target, data, adapter, seq_len, batch, force, as_json):
    """Held-out loss and perplexity of TARGET (model, compiled dir or run)."""
    from . import api
    from .evaluate import evaluate_loss

    model, tok = api.open_model(target, adapter, force=force)
    result = evaluate_loss(model, _load_eval_data(data, tok, seq_len, model), batch)
    if as_json:
        _echo_json(result)
    else:
        click.echo(f"loss {result['loss']:.4f}  ppl {result['ppl']:.2f}  tokens {result['tokens']}")


@cli.command("generate")
@click.argument("target")
@click.option("--prompt", required=True, help="the user's prompt")
@click.option("--adapter", type=click.Path(), default=None, help="PEFT adapter directory to apply")
@click.option("--max-new-tokens", default=48, show_default=True, type=int)
@click.option("--force", is_flag=True, help="apply an adapter trained on a different base")
def generate_cmd(target, prompt, adapter, max_new_tokens, force):
    """Greedy answer of TARGET (model, compiled dir or run) to --prompt."""
    from . import api
    from .evaluate import generate_text

    model, tok = api.open_model(target, adapter, force=force)
    click.echo(generate_text(model, tok, prompt, max_new_tokens))


@cli.command("devices")
@click.option("--json", "as_json", is_flag=True, help="print a JSON list")
def devices_cmd(as_json):
    """The built-in device profiles."""
    from .profiles import builtin_profiles

    profiles = builtin_profiles()
    if as_json:
        _echo_json([p.to_dict() for p in profiles.values()])
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "accelerator", "usable / total GiB", "compute", "dtypes", "GB/s", "TFLOP/s")
    for p in profiles.values():
        table.add_row(p.name, p.accelerator, f"{p.usable_memory_gib:g} / {p.total_memory_gib:g}",
                      p.compute_capability, ",".join(p.dtypes), f"{p.memory_bandwidth_gbps:g}", f"{p.peak_tflops:g}")
    Console(width=120).print(table)


@cli.command("plan")
@click.argument("model")
@click.option("--device", default="cpu-16gb", show_default=True, help="device profile name or TOML file")
@click.option("--recipe", default=None,
              help="lora | qlora | s2a | sketchtune; ResNet: full | norm (default: qlora, ResNet: norm)")
@click.option("--r", "rank", default=16, show_default=True, type=int, help="LoRA rank")
@click.option("--act-bits", type=click.Choice(["16", "8", "4"]), default="4", show_default=True,
              help="S2A saved-activation bits, as for compile")
@click.option("--bits", type=click.Choice(["2", "3", "4"]), default="4", show_default=True,
              help="sketchtune: bits per code")
@click.option("--groups-per-row", type=click.Choice(["1", "2", "4", "8"]), default="4", show_default=True,
              help="sketchtune: column groups (tables) per output row")
@click.option("--double-quant/--no-double-quant", default=None,
              help="NF4 double quantization of the absmax values (default: the recipe's, on for qlora)")
@click.option("--embed-nf4", is_flag=True, help="qlora/sketchtune: store the frozen embedding (and an untied "
                                                "lm_head) in NF4")
@click.option("--side/--no-side", default=None, help="s2a: the lite side branch (default: the recipe's, off)")
@click.option("--side-dim", type=int, default=None, help="s2a: width of the side branch")
@click.option("--side-every", type=int, default=None, help="s2a: the side reads every k-th block's input")
@click.option("--bias/--no-bias", "s2a_bias", default=None, help="s2a: bias tuning (default: the recipe's, on)")
@click.option("--prompt-len", type=int, default=None, help="s2a: low-rank prompt positions per block (0 = off)")
@click.option("--seq-len", default=None, type=int, help="sequence length (default: the largest that fits)")
@click.option("--batch", default=None, type=int, help="batch size (default: the largest that fits)")
@click.option("--dtype", default=None, help="compute dtype (default: the profile's)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object")
@click.option("--png", type=click.Path(), default=None, help="write the breakdown as a bar chart")
def plan_cmd(model, device, recipe, rank, act_bits, bits, groups_per_row, double_quant, embed_nf4, side, side_dim,
             side_every, s2a_bias, prompt_len, seq_len, batch, dtype, as_json, png):
    """Will MODEL fine-tune on DEVICE? Memory breakdown, and the batch/seq-len that fit."""
    from .planner import RECIPES, ResNetShape, choose, format_bytes, job_from_options, shape_for
    from .profiles import load_profile

    shape = shape_for(model)
    resnet = isinstance(shape, ResNetShape)
    recipe = recipe or ("norm" if resnet else "qlora")
    known = ("full", "norm") if resnet else RECIPES
    if recipe not in known:
        raise EdgetuneError(f"the planner knows recipes {', '.join(known)} for {model}, not {recipe!r}")
    profile = load_profile(device)
    job = job_from_options(recipe, rank=rank, dtype=dtype or profile.default_dtype, act_bits=int(act_bits),
                           bits=int(bits), groups_per_row=int(groups_per_row), double_quant=double_quant,
                           embed_nf4=embed_nf4, side=side, side_dim=side_dim, side_every=side_every,
                           bias=s2a_bias, prompt_len=prompt_len, hidden=getattr(shape, "hidden", None))
    plan = choose(shape, job, profile, batch, seq_len)
    if png:
        from .plots import plot_plan

        plot_plan(plan, png, title=f"{model} · {recipe} · {profile.name}")
    size = (f"batch {plan.batch} · images {plan.image_size}²" if plan.image_size
            else f"batch {plan.batch} x seq {plan.seq_len}")
    if as_json:
        _echo_json(plan.to_dict())
    else:
        from rich.console import Console
        from rich.table import Table

        table = Table("component", "bytes", title=f"{model} · {recipe} · act-bits {act_bits} on {profile.name} · {size}")
        for name, n in plan.components.items():
            table.add_row(name, format_bytes(n))
        for name, n in plan.activations.items():
            table.add_row(f"  activations: {name}", format_bytes(n))
        table.add_row("[bold]total", f"[bold]{format_bytes(plan.total_bytes)}")
        table.add_row("usable on device", format_bytes(plan.budget_bytes))
        Console(width=100).print(table)
        click.echo(f"estimated step time on {profile.name}: {plan.step_time_s:.2f} s")
    if not plan.fits:
        raise EdgetuneError(f"does not fit: needs {format_bytes(plan.total_bytes)} of "
                            f"{format_bytes(plan.budget_bytes)} at {size}; {plan.suggestion}")


@cli.command("recipes")
def recipes_cmd():
    """The registered fine-tuning recipes and their options."""
    from .methods import all_methods

    for m in all_methods():
        fields = ", ".join(f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(m.config_cls))
        click.echo(f"{m.name:8s} {m.summary}  [{fields}]")


def shipped_data(name: str) -> Path:
    return Path(str(resources.files("edgetune.data") / name))


@cli.command("quickstart")
@click.option("--model", default="default", show_default=True, help="base model")
@click.option("--recipe", default="qlora", show_default=True)
@click.option("--device", default="cpu-16gb", show_default=True)
@click.option("--out", default="edgetune-quickstart", show_default=True, type=click.Path(),
              help="workspace for the compiled dir, run and adapter")
@click.option("--steps", default=30, show_default=True, type=int)
@click.option("--batch", default=4, show_default=True, type=int)
@click.option("--seq-len", default=128, show_default=True, type=int)
@click.option("--lr", default=1e-3, show_default=True, type=float)
@click.option("--prompt", default="How many grams are in a kilogram?", show_default=True)
@click.option("--overwrite", is_flag=True, help="replace --out if it exists")
def quickstart_cmd(model, recipe, device, out, steps, batch, seq_len, lr, prompt, overwrite):
    """The main job: compile, evaluate, fine-tune on shipped data, export, evaluate again."""
    from . import api
    from .evaluate import evaluate_loss, generate_text
    from .fsutil import atomic_dir
    from .profiles import load_profile

    profile = load_profile(device)
    train_file, heldout_file = shipped_data("instructions.jsonl"), shipped_data("instructions_heldout.jsonl")
    with atomic_dir(out, overwrite) as work:
        click.echo(f"[1/5] loading {model} and compiling with {recipe} for {profile.name}")
        m, tok = api.load(model)
        compiled = api.compile(m, recipe, profile)
        api.save(compiled, work / "compiled", tok)
        heldout = _load_eval_data(heldout_file, tok, seq_len, compiled)
        before = evaluate_loss(compiled, heldout, batch)
        answer_before = generate_text(compiled, tok, prompt)
        click.echo(f"[2/5] held-out loss before: {before['loss']:.4f} (ppl {before['ppl']:.2f})")
        click.echo(f"[3/5] fine-tuning {steps} steps on {train_file.name} (batch {batch} x {seq_len})")
        result = api.train(work / "compiled", train_file, work / "run", steps=steps, batch=batch,
                           seq_len=seq_len, lr=lr)
        trained, tok, _ = api.load_run(work / "run")
        after = evaluate_loss(trained, heldout, batch)
        answer_after = generate_text(trained, tok, prompt)
        api.export_adapter(trained, work / "adapter", format="peft")
    click.echo(f"[4/5] exported PEFT adapter to {Path(out) / 'adapter'}; run in {Path(out) / 'run'}")
    click.echo("[5/5] results")
    click.echo(f"  train loss     {result.first_loss:.4f} -> {result.last_loss:.4f}")
    click.echo(f"  held-out loss  {before['loss']:.4f} -> {after['loss']:.4f}  "
               f"({100 * (after['loss'] - before['loss']) / before['loss']:+.1f}%)")
    click.echo(f"  prompt         {prompt}")
    click.echo(f"  answer before  {answer_before}")
    click.echo(f"  answer after   {answer_after}")


# --------------------------------------------------------------------------- command plug-ins


def _register_command_modules() -> None:
    """Add the commands of every module in ``edgetune.commands`` (each has ``register(cli)``).

    Feature areas (SketchTune merge, ORT Training, kernels, fleet) keep their commands next to
    their code's owner instead of growing this file; a module must import only light things at
    top level, so `edgetune --help` stays fast.
    """
    import importlib
    import pkgutil

    from . import commands

    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        importlib.import_module(f"{commands.__name__}.{info.name}").register(cli)


_register_command_modules()


# --------------------------------------------------------------------------- entry point


def main(argv: list[str] | None = None) -> int:
    try:
        cli.main(args=argv, prog_name="edgetune", standalone_mode=False)
    except EdgetuneError as exc:
        click.echo(f"edgetune: error: {exc}", err=True)
        return getattr(exc, "exit_code", 2)  # 2; 130 for a run interrupted after its checkpoint
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("edgetune: aborted", err=True)
        return 130
    except KeyboardInterrupt:
        click.echo("edgetune: interrupted", err=True)
        return 130
    except MemoryError:
        click.echo("edgetune: error: out of memory; lower --batch or --seq-len", err=True)
        return 2
    return 0


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":  # pragma: no cover
    entry()
