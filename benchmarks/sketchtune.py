"""SketchTune on the default model: construction time, size, perplexity, and a short fine-tune vs PEFT LoRA.

    python benchmarks/sketchtune.py baselines                    # fp32 and NF4 round-to-nearest
    python benchmarks/sketchtune.py sketch --bits 4 --gpr 4      # build one sketch (minutes), evaluate it
    python benchmarks/sketchtune.py finetune --steps 30          # sketch tables vs PEFT LoRA r=16
    python benchmarks/sketchtune.py table                        # print everything measured so far
    python benchmarks/sketchtune.py all                          # all of the above in one go (slow)

Each part appends its numbers to a JSON file (``--results``, default
``/tmp/edgetune-sketchtune-bench.json``) so parts can run in separate processes and ``table``
prints them together. Prints tables and asserts nothing. Run it niced on a shared machine.

What is measured:

* **Perplexity** (token-weighted over label tokens, ``edgetune.evaluate.evaluate_loss``) on three
  texts, packed into rows of 256 tokens: ``heldout-chat`` — ``edgetune/data/instructions_heldout.jsonl``
  rendered with the chat template, loss on the assistant tokens only; ``heldout-prose`` — the same
  file's answers as plain text (calib.txt-style prose the sketch never saw); ``calib`` —
  ``edgetune/data/calib.txt`` itself, which the sketches were calibrated on (in-sample for them).
* **Models**: the fp32 base; NF4 round-to-nearest (``quantize_nf4`` / ``dequantize_nf4``, blocksize
  64, every decoder linear, no calibration); sketches at the given bits / groups per row.
* **Size**: bytes of the decoder-linear weights as stored (fp16 reference: 2 bytes per weight;
  NF4: packed codes + fp32 absmax; sketch: packed codes + fp16 tables; ``table_init`` and the
  trainable copy of the tables are not counted twice) and of the whole model's tensors.
* **Construction time**: wall time of ``edgetune.compile(..., recipe="sketchtune")``, calibration
  included (the machine's load average is printed with it: timings on a shared machine are noisy).
* **Fine-tune**: the same batches (``edgetune/data/instructions.jsonl``, batch 4 x 128, packed,
  fixed order) for both sides, AdamW, constant lr after 3 warm-up steps, no weight decay, grad
  clip 1.0: the 4-bit GPR=4 sketch's tables vs PEFT LoRA r=16, alpha 32, all seven projections on
  the fp32 base, and vs edgetune's ``qlora`` (the same LoRA over an NF4 base). Each side at a few
  learning rates (``--sketch-lr``, ``--lora-lr``, ``--qlora-lr``). Held-out chat loss before and
  after, median step time, trainable parameters.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "edgetune" / "data"
DEFAULT_RESULTS = Path(tempfile.gettempdir()) / "edgetune-sketchtune-bench.json"
SEQ_LEN = 256


def loadavg() -> str:
    try:
        return "%.2f" % os.getloadavg()[0]
    except OSError:
        return "n/a"


# --------------------------------------------------------------------------------------- results


def read_results(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def write_result(path: Path, key: str, value: dict) -> None:
    data = read_results(path)
    data[key] = value
    path.write_text(json.dumps(data, indent=2))


# --------------------------------------------------------------------------------------- evaluation


def eval_sets(tokenizer) -> dict:
    from edgetune.training.data import build_dataset

    prose = Path(tempfile.mkdtemp()) / "heldout_prose.jsonl"
    with open(DATA / "instructions_heldout.jsonl") as f, open(prose, "w") as out:
        for line in f:
            if line.strip():
                out.write(json.dumps({"text": json.loads(line)["output"]}) + "\n")
    return {
        "heldout-chat": build_dataset(DATA / "instructions_heldout.jsonl", tokenizer, SEQ_LEN),
        "heldout-prose": build_dataset(prose, tokenizer, SEQ_LEN),
        "calib": build_dataset(DATA / "calib.txt", tokenizer, SEQ_LEN),
    }


def perplexities(model, sets) -> dict:
    from edgetune.evaluate import evaluate_loss

    return {name: evaluate_loss(model, ds, batch_size=4)["ppl"] for name, ds in sets.items()}


def decoder_linears(model):
    from edgetune.models.arch import arch_for

    arch = arch_for(model.config)
    return arch, arch.target_paths(model, arch.linear_names)


def tensor_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        total += t.numel() * t.element_size()
    return total


# --------------------------------------------------------------------------------------- parts


def part_baselines(args) -> None:
    import edgetune
    from edgetune.models.arch import linear_weight
    from edgetune.quant.nf4 import dequantize_nf4, quantize_nf4

    model, tok = edgetune.load("default")
    sets = eval_sets(tok)
    arch, paths = decoder_linears(model)
    n_weights = sum(linear_weight(model.get_submodule(p), arch)[0].numel() for p in paths)
    t0 = time.perf_counter()
    fp32 = perplexities(model, sets)
    write_result(args.results, "fp32", {"ppl": fp32, "linear_bytes": 2 * n_weights, "note": "fp16 size",
                                        "model_bytes": tensor_bytes(model) // 2, "eval_s": time.perf_counter() - t0})
    print("fp32", fp32, flush=True)
    nf4_bytes = 0
    with torch.no_grad():
        for p in paths:
            m = model.get_submodule(p)
            q = quantize_nf4(m.weight.detach(), 64)
            nf4_bytes += sum(t.numel() * t.element_size() for t in q.to_tensors().values() if t is not None)
            m.weight.copy_(dequantize_nf4(q, dtype=m.weight.dtype))
    nf4 = perplexities(model, sets)
    other = tensor_bytes(model) // 2 - 2 * n_weights  # the rest of the model at fp16
    write_result(args.results, "nf4", {"ppl": nf4, "linear_bytes": nf4_bytes, "model_bytes": other + nf4_bytes})
    print("nf4", nf4, flush=True)


def part_sketch(args) -> None:
    import edgetune
    import edgetune.methods.sketchtune  # noqa: F401
    from edgetune.artifact import save_compiled
    from edgetune.exporters.sketch import sketch_layers

    model, tok = edgetune.load("default")
    sets = eval_sets(tok)
    options = {"bits": args.bits, "groups_per_row": args.gpr}
    if args.exponent is not None:
        options["exponent"] = args.exponent
    if args.damp is not None:
        options["damp"] = args.damp
    if args.calib is not None:
        options["calib"] = str(args.calib)
    if args.calib_seq_len is not None:
        options["calib_seq_len"] = args.calib_seq_len
    if args.embed_nf4:
        options["embed_nf4"] = True
    before = loadavg()
    t0 = time.perf_counter()
    compiled = edgetune.compile(model, "sketchtune", **options)
    seconds = time.perf_counter() - t0
    layers = sketch_layers(compiled)
    code_bytes = sum(m.codes.numel() for m in layers.values())
    table_bytes = sum(m.table_init.numel() * 2 for m in layers.values())
    from edgetune.methods.embedding import is_nf4_embedding_key

    # the rest at fp16, except NF4 embedding buffers (--embed-nf4), counted as stored
    dense_other = sum(t.numel() * (t.element_size() if is_nf4_embedding_key(compiled, n) else 2)
                      for n, t in compiled.state_dict().items() if not any(n.startswith(p + ".") for p in layers))
    # dense tied embeddings appear twice in the state dict (a tied NF4 head stores nothing of its own)
    if getattr(compiled.config, "tie_word_embeddings", False) and not args.embed_nf4:
        dense_other -= compiled.get_input_embeddings().weight.numel() * 2
    n_weights = sum(m.in_features * m.out_features for m in layers.values())
    trainable = sum(p.numel() for p in compiled.parameters() if p.requires_grad)
    ppl = perplexities(compiled, sets)
    key = f"sketch-{args.bits}b-gpr{args.gpr}" + (f"-p{args.exponent:g}" if args.exponent is not None else "") + \
        (f"-d{args.damp:g}" if args.damp is not None else "") + \
        (f"-calib:{Path(args.calib).stem}" if args.calib is not None else "") + \
        (f"x{args.calib_seq_len}" if args.calib_seq_len is not None else "") + ("-embnf4" if args.embed_nf4 else "")
    stats = compiled.edgetune_sketch_stats
    from edgetune.exporters.sketch import export_sketch_delta

    delta_dir = export_sketch_delta(Path(tempfile.mkdtemp()) / "delta", compiled)  # the adapter's size (fp16 deltas)
    delta_bytes = sum(f.stat().st_size for f in delta_dir.iterdir())
    write_result(args.results, key, {
        "ppl": ppl, "construct_s": seconds, "load_before": before, "load_after": loadavg(),
        "linear_bytes": code_bytes + table_bytes, "code_bytes": code_bytes, "table_bytes": table_bytes,
        "model_bytes": dense_other + code_bytes + table_bytes, "bits_per_weight": 8 * (code_bytes + table_bytes) / n_weights,
        "trainable": trainable, "calib_tokens": stats["calib_tokens"], "delta_bytes": delta_bytes,
        "mean_rel_hessian_error": statistics.mean(g["rel_hessian_error"] for g in stats["groups"]),
    })
    print(key, f"{seconds:.0f} s", ppl, flush=True)
    if args.save:
        save_compiled(compiled, tok, args.save, overwrite=True)
        print("saved", args.save)


def _batches(tok, steps, batch, seq_len):
    from edgetune.training.data import build_dataset

    ds = build_dataset(DATA / "instructions.jsonl", tok, seq_len)
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))
    out = []
    for s in range(steps):
        idx = [int(order[(s * batch + j) % len(ds)]) for j in range(batch)]
        out.append(ds.rows(idx))
    return out


def _finetune(model, batches, lr, heldout, warmup=3) -> dict:
    from edgetune.evaluate import evaluate_loss

    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    before = evaluate_loss(model, heldout)["loss"]
    model.train()
    times, losses = [], []
    for step, b in enumerate(batches):
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / warmup)
        t = time.perf_counter()
        loss = model(**b).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        losses.append(float(loss.detach()))
    after = evaluate_loss(model, heldout)["loss"]
    model.eval()
    return {"heldout_before": before, "heldout_after": after, "step_s": statistics.median(times[1:] or times),
            "train_first": losses[0], "train_last": statistics.mean(losses[-3:]), "lr": lr,
            "trainable": sum(p.numel() for p in params), "steps": len(batches)}


def part_finetune(args) -> None:
    import edgetune
    import edgetune.methods.sketchtune  # noqa: F401
    from edgetune.artifact import load_compiled
    from edgetune.training.data import build_dataset

    if not args.compiled or not Path(args.compiled).is_dir():
        raise SystemExit("finetune needs --compiled DIR (from `sketch --bits 4 --gpr 4 --save DIR`)")
    sketch, tok, _ = load_compiled(args.compiled)
    heldout = build_dataset(DATA / "instructions_heldout.jsonl", tok, SEQ_LEN)
    batches = _batches(tok, args.steps, args.batch, args.seq_len)
    if args.sketch_norms:  # the recipe's --train-norms: also the RMSNorm weights
        from edgetune.methods.sketchtune.model import _is_norm

        for module in sketch.modules():
            if _is_norm(module):
                for p in module.parameters(recurse=False):
                    p.requires_grad_(True)
    init = {n: p.detach().clone() for n, p in sketch.named_parameters() if p.requires_grad}
    for lr in args.sketch_lr:
        with torch.no_grad():
            for n, p in sketch.named_parameters():
                if n in init:
                    p.copy_(init[n])
        r = _finetune(sketch, batches, lr, heldout)
        write_result(args.results, f"finetune-sketch{'+norms' if args.sketch_norms else ''}-lr{lr:g}", r)
        print("sketch", r, flush=True)
    del sketch
    from peft import LoraConfig, get_peft_model

    for lr in args.lora_lr:
        base, _ = edgetune.load("default")
        model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                "gate_proj", "up_proj", "down_proj"]))
        r = _finetune(model, batches, lr, heldout)
        write_result(args.results, f"finetune-lora-lr{lr:g}", r)
        print("lora", r, flush=True)
        del model, base
    for lr in args.qlora_lr:  # edgetune's qlora recipe: NF4 base (blocksize 64) + LoRA r=16, alpha 32, all projections
        base, _ = edgetune.load("default")
        model = edgetune.compile(base, "qlora", r=16, alpha=32.0)
        r = _finetune(model, batches, lr, heldout)
        write_result(args.results, f"finetune-qlora-lr{lr:g}", r)
        print("qlora", r, flush=True)
        del model, base


def part_steptime(args) -> None:
    """Median step time of the sketch tables vs PEFT LoRA r=16, interleaved A B A B in one process."""
    import edgetune
    from edgetune.artifact import load_compiled
    from peft import LoraConfig, get_peft_model

    sketch, tok, _ = load_compiled(args.compiled)
    base, _ = edgetune.load("default")
    lora = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="CAUSAL_LM",
                                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                           "gate_proj", "up_proj", "down_proj"]))
    batches = _batches(tok, args.timing_steps, args.batch, args.seq_len)
    sides = {"sketch": sketch, "lora": lora}
    opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-5) for k, m in sides.items()}
    times = {k: [] for k in sides}
    for step, b in enumerate(batches):
        for name, model in sides.items():
            model.train()
            t = time.perf_counter()
            model(**b).loss.backward()
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v[1:]) for k, v in times.items()}
    r = {"sketch_s": med["sketch"], "lora_s": med["lora"], "ratio": med["sketch"] / med["lora"],
         "steps": len(batches), "threads": torch.get_num_threads(), "batch": args.batch, "seq_len": args.seq_len}
    write_result(args.results, "steptime", r)
    print("steptime", r, flush=True)


def _mib(b) -> str:
    return f"{b / 2**20:.1f}"


def part_table(args) -> None:
    data = read_results(args.results)
    if not data:
        print(f"no results in {args.results}")
        return
    print(f"\nResults from {args.results}\n")
    print(f"{'model':28s} {'ppl chat':>9s} {'ppl prose':>9s} {'ppl calib*':>10s} {'linears MiB':>11s} "
          f"{'model MiB':>9s} {'vs fp16':>7s} {'bits/w':>6s} {'build s':>8s} {'trainable':>10s} {'delta MB':>8s}")
    fp16_model = data.get("fp32", {}).get("model_bytes")
    for key, r in data.items():
        if key.startswith("finetune") or key == "steptime":
            continue
        ppl = r["ppl"]
        bpw = r.get("bits_per_weight")
        bpw_s = f"{bpw:.2f}" if bpw else ("16" if key == "fp32" else "4.5")
        build_s = f"{r['construct_s']:.0f}" if "construct_s" in r else "-"
        train_s = f"{r['trainable']:,}" if "trainable" in r else "-"
        delta_s = f"{r['delta_bytes'] / 1e6:.2f}" if "delta_bytes" in r else "-"
        ratio_s = f"{r['model_bytes'] / fp16_model:.3f}" if fp16_model else "-"
        print(f"{key:28s} {ppl['heldout-chat']:9.3f} {ppl['heldout-prose']:9.3f} {ppl['calib']:10.3f} "
              f"{_mib(r['linear_bytes']):>11s} {_mib(r['model_bytes']):>9s} {ratio_s:>7s} {bpw_s:>6s} {build_s:>8s} {train_s:>10s} "
              f"{delta_s:>8s}")
    print("  * calib.txt is part of the sketches' default calibration (in-sample for them); fp32 sizes are fp16 "
          "sizes")
    ft = {k: v for k, v in data.items() if k.startswith("finetune")}
    if "steptime" in data:
        r = data["steptime"]
        print(f"\nstep time, interleaved, {r['steps']} steps each, batch {r['batch']} x {r['seq_len']}, "
              f"{r['threads']} thread(s): sketch {r['sketch_s']:.2f} s, PEFT LoRA r=16 {r['lora_s']:.2f} s, "
              f"ratio {r['ratio']:.2f}")
    if ft:
        print(f"\n{'fine-tune':26s} {'lr':>7s} {'steps':>5s} {'trainable':>10s} {'held-out before':>15s} "
              f"{'after':>7s} {'train first→last':>17s} {'step s':>7s}")
        for key, r in ft.items():
            print(f"{key:26s} {r['lr']:7.0e} {r['steps']:5d} {r['trainable']:10,d} {r['heldout_before']:15.4f} "
                  f"{r['heldout_after']:7.4f} {r['train_first']:8.3f}→{r['train_last']:<8.3f} {r['step_s']:7.2f}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=["baselines", "sketch", "finetune", "steptime", "table", "all"])
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--gpr", type=int, default=4)
    parser.add_argument("--exponent", type=float, default=None)
    parser.add_argument("--damp", type=float, default=None)
    parser.add_argument("--calib", type=Path, default=None, help="calibration text (default: the shipped calib.txt)")
    parser.add_argument("--calib-seq-len", type=int, default=None)
    parser.add_argument("--embed-nf4", action="store_true", help="sketch: also store the embedding in NF4")
    parser.add_argument("--save", type=Path, default=None, help="save the compiled sketch here")
    parser.add_argument("--compiled", type=Path, default=None, help="compiled 4-bit sketch for finetune")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--sketch-lr", type=float, nargs="*", default=[1e-4, 3e-4])
    parser.add_argument("--lora-lr", type=float, nargs="*", default=[3e-4, 1e-3])
    parser.add_argument("--qlora-lr", type=float, nargs="*", default=[1e-3])
    parser.add_argument("--sketch-norms", action="store_true", help="finetune: also train the norm weights")
    parser.add_argument("--timing-steps", type=int, default=9, help="steptime: interleaved steps per side")
    args = parser.parse_args(argv)
    os.environ.setdefault("EDGETUNE_PROGRESS", "1")
    print(f"load average {loadavg()} on {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads", flush=True)
    if args.part == "all":
        part_baselines(args)
        save = args.save or Path(tempfile.mkdtemp()) / "sketch-4b-gpr4"
        for bits in (4, 3, 2):
            part_sketch(argparse.Namespace(**{**vars(args), "bits": bits, "gpr": 4,
                                              "save": save if bits == 4 else None}))
        part_finetune(argparse.Namespace(**{**vars(args), "compiled": save}))
        part_steptime(argparse.Namespace(**{**vars(args), "compiled": save}))
    elif args.part == "baselines":
        part_baselines(args)
    elif args.part == "sketch":
        part_sketch(args)
    elif args.part == "finetune":
        part_finetune(args)
    elif args.part == "steptime":
        part_steptime(args)
    part_table(args)


if __name__ == "__main__":
    sys.exit(main())
