"""edgetune ``qlora`` vs PEFT + bitsandbytes QLoRA: step time, saved activations, peak RSS, gradients.

    python benchmarks/peer_qlora.py                 # batch 4 x 256, 1 warmup + 5 measured steps each
    python benchmarks/peer_qlora.py --quick         # batch 1 x 64, 2 steps: a smoke run
    python benchmarks/peer_qlora.py --profile       # also a torch.profiler top-ops table per side

Prints tables and asserts nothing.

The setting, identical on both sides: the default model (SmolLM2-135M-Instruct via
``edgetune.load("default")``, fp32), LoRA r=16, alpha=32, dropout 0 on all seven projections of
every decoder block (q, k, v, o, gate, up, down); embeddings, the (tied) lm_head and the norms stay
fp32 and frozen. The base projections are NF4, blocksize 64, no double quantization (edgetune's
default; ``--double-quant`` turns it on for both), fp32 compute, CPU. The batch is the first
``--batch`` rows of the shipped ``edgetune/data/instructions.jsonl`` packed by ``build_dataset`` at
``--seq-len``. A step is ``zero_grad`` + forward with labels + backward + AdamW step (lr 1e-4) over
the LoRA parameters. No gradient checkpointing on either side (PEFT's
``prepare_model_for_kbit_training`` is not used: it would switch checkpointing on).

The PEFT side: a copy of the same fp32 model whose 7 × L decoder-block ``nn.Linear`` modules are
replaced by ``bitsandbytes.nn.Linear4bit(quant_type="nf4", compute_dtype=torch.float32,
compress_statistics=False)`` holding the same fp32 weight, quantized by moving the module to the
CPU (``Params4bit._quantize``, i.e. ``bnb.functional.quantize_4bit``, blocksize 64); the model is
marked ``is_loaded_in_4bit = True`` (what transformers' bnb quantizer sets) so that
``peft.get_peft_model(LoraConfig(r=16, lora_alpha=32, lora_dropout=0, target_modules=[7 names],
task_type="CAUSAL_LM"))`` wraps them in PEFT's ``lora.bnb.Linear4bit``. ``BitsAndBytesConfig``
via ``from_pretrained`` is not used: the base comes from ``edgetune.load`` (a GGUF), not a HF dir.
The bnb model never runs an eval / no-grad forward, and both models are put in train mode before
the first forward: in eval mode a ``Linear4bit`` whose input needs no grad (layer 0's q/k/v/gate/up)
repacks its weight for the bf16 ``gemv_4bit`` CPU kernel (see shared/notes/PITFALLS.md).

What is measured, all in one process unless stated:

* **Gradients.** Both models get identical LoRA weights (edgetune's A, copied into PEFT's
  ``lora_A.default``; B set to the same small N(0, 0.01²) values on both so dL/dA is non-trivial).
  One forward + backward on the batch; cosine similarity and relative L2 difference of all LoRA
  gradients concatenated in module order. The NF4 codes and absmax of every projection are
  compared too (edgetune quantizes bit-identically to bnb, so they should be equal).
* **Saved activations.** During that same forward, ``torch.autograd.graph.saved_tensors_hooks``
  records every tensor saved for backward; unique storages (by ``untyped_storage().data_ptr()``)
  are summed, skipping ``nn.Parameter`` s and anything sharing storage with a model parameter or
  buffer. A per-autograd-node breakdown comes from walking the graph from the loss and reading
  each node's ``_saved_*`` tensors (a storage held by several nodes is counted for the first met).
  Not seen by the hooks: tensors a custom ``autograd.Function`` keeps on ``ctx`` as plain
  attributes — bnb's ``MatMul4Bit`` keeps the packed weight that way, edgetune's ``_NF4Matmul``
  keeps its ``NF4Weight``; both are frozen weights, not activations.
* **Step time.** After one warmup step each, ``--steps`` measured steps per side, interleaved with
  the order alternating per round (E P, P E, E P, ...) so load drift from other jobs hits both
  alike. Median per side, the ratio of the medians edgetune / PEFT, and the paired ratio (median
  over rounds of edgetune's step / PEFT's step in the same round). Timings on a shared machine are
  noisy; the load average is printed before and after. Under load from other jobs, two OpenMP
  threads on two cores were slower than one here (47–100 s vs 32–55 s a step at 4 × 256), so
  ``--threads 1`` gives steadier numbers on a busy machine.
* **Peak RSS.** Each side in a FRESH subprocess (this script with ``--worker edgetune|peft``):
  it imports, loads the model, builds its side, collects garbage and ``malloc_trim`` s (so freed
  fp32 weights do not count as in use), resets VmHWM (``/proc/self/clear_refs`` = 5), runs
  ``--worker-steps`` steps and reports JSON: RSS after imports / after load / after build, VmHWM
  (= ``ru_maxrss``, which the reset clears as well) over the training steps, and the whole-process
  peak, the larger of ``ru_maxrss`` before the reset and after the steps (it is the GGUF model load
  when loading peaks higher than training). Workers are started through ``/bin/sh -c '"$@"'``,
  which forks: Linux carries ``ru_maxrss`` across fork + exec, so a worker exec'd directly from
  this process would report this process's (two-model) peak as its own.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import warnings  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

import common  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA = 16, 32
SIDES = ("edgetune", "peft")
LABEL = {"edgetune": "edgetune qlora", "peft": "PEFT + bnb QLoRA"}


# ----------------------------------------------------------------------------------- building


def load_base():
    import edgetune

    model, tokenizer = edgetune.load("default")
    return model, tokenizer


def build_edgetune(model: nn.Module, double_quant: bool) -> nn.Module:
    import edgetune

    model = edgetune.compile(model, "qlora", "cpu-16gb", r=R, alpha=ALPHA, dropout=0.0,
                             target_modules=tuple(TARGETS), blocksize=64, double_quant=double_quant)
    model.train()
    return model


def build_peft(model: nn.Module, double_quant: bool) -> nn.Module:
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    n = 0
    for name, module in list(model.named_modules()):
        for leaf in TARGETS:
            old = getattr(module, leaf, None)
            if not isinstance(old, nn.Linear) or ".layers." not in f".{name}.":
                continue
            new = bnb.nn.Linear4bit(old.in_features, old.out_features, bias=old.bias is not None,
                                    compute_dtype=torch.float32, compress_statistics=double_quant,
                                    quant_type="nf4", device="meta")
            new.weight = bnb.nn.Params4bit(old.weight.data.detach().clone(), requires_grad=False, blocksize=64,
                                           compress_statistics=double_quant, quant_type="nf4", module=new)
            if old.bias is not None:
                new.bias = nn.Parameter(old.bias.data.detach().clone(), requires_grad=False)
            new = new.to("cpu")  # quantizes here (Params4bit.to -> _quantize)
            if not new.weight.bnb_quantized:
                raise SystemExit(f"{name}.{leaf}: bitsandbytes did not quantize the weight")
            setattr(module, leaf, new)
            n += 1
    model.is_loaded_in_4bit = True  # what transformers' bnb quantizer sets; PEFT dispatches on it
    cfg = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS, bias="none",
                     task_type="CAUSAL_LM")
    pm = get_peft_model(model, cfg)
    pm.train()
    pm.n_quantized = n
    return pm


def build_side(side: str, model: nn.Module, double_quant: bool) -> nn.Module:
    return build_edgetune(model, double_quant) if side == "edgetune" else build_peft(model, double_quant)


# ----------------------------------------------------------------------------------- LoRA pairing


def lora_pairs(et: nn.Module, pm: nn.Module) -> list[tuple[str, tuple[nn.Parameter, nn.Parameter], tuple[nn.Parameter, nn.Parameter]]]:
    """(module path, (edgetune A, B), (PEFT A, B)) for every adapted projection, in model order."""
    from edgetune.methods.lora.layer import LoraLinear

    peft_modules = dict(pm.base_model.model.named_modules())
    pairs = []
    for path, m in et.named_modules():
        if isinstance(m, LoraLinear):
            pl = peft_modules[path]
            pairs.append((path, (m.lora_A, m.lora_B), (pl.lora_A["default"].weight, pl.lora_B["default"].weight)))
    return pairs


def sync_lora(pairs, seed: int = 1234) -> None:
    """PEFT's A := edgetune's A; both B := the same small random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, (ea, eb), (pa, pb) in pairs:
            assert ea.shape == pa.shape and eb.shape == pb.shape, (ea.shape, pa.shape, eb.shape, pb.shape)
            pa.copy_(ea)
            b = torch.randn(eb.shape, generator=gen) * 0.01
            eb.copy_(b)
            pb.copy_(b)


def nf4_codes_identical(et: nn.Module, pm: nn.Module) -> tuple[int, int]:
    """(projections whose packed codes and absmax match bit for bit, projections compared)."""
    from edgetune.methods.lora.layer import LoraLinear

    peft_modules = dict(pm.base_model.model.named_modules())
    same = total = 0
    for path, m in et.named_modules():
        if not isinstance(m, LoraLinear):
            continue
        mine = m.base.nf4_weight()
        theirs = peft_modules[path].get_base_layer().weight
        qs = theirs.quant_state
        total += 1
        ok = torch.equal(mine.packed.reshape(-1), theirs.data.reshape(-1).view(torch.uint8))
        if mine.double_quant:
            ok = ok and torch.equal(mine.absmax_q.reshape(-1), qs.absmax.reshape(-1))
            ok = ok and torch.equal(mine.absmax_scale.reshape(-1), qs.state2.absmax.float().reshape(-1))
        else:
            ok = ok and torch.equal(mine.absmax.reshape(-1), qs.absmax.float().reshape(-1))
        same += bool(ok)
    return same, total


# ----------------------------------------------------------------------------------- measurements


def forward_backward_recorded(model: nn.Module, batch) -> dict:
    """One forward (saved tensors recorded) + backward; grads stay on the parameters."""
    model.zero_grad(set_to_none=True)
    rec = common.SavedTensors(common.frozen_storage_ptrs(model))
    with rec.record():
        loss = model(**batch).loss
    by_node = common.saved_bytes_by_node(loss.grad_fn, rec.exclude)
    loss.backward()
    return {"loss": float(loss.detach()), "saved_bytes": rec.nbytes, "n_storages": len(rec.storages),
            "n_packed": rec.n_packed, "n_excluded": rec.n_excluded, "by_node": dict(by_node)}


def grad_agreement(pairs) -> dict:
    ge = torch.cat([g.grad.reshape(-1) for _, (a, b), _ in pairs for g in (a, b)]).double()
    gp = torch.cat([g.grad.reshape(-1) for _, _, (a, b) in pairs for g in (a, b)]).double()
    ga_e = torch.cat([a.grad.reshape(-1) for _, (a, _), _ in pairs]).double()
    ga_p = torch.cat([a.grad.reshape(-1) for _, _, (a, _) in pairs]).double()
    cos = torch.nn.functional.cosine_similarity(ge, gp, dim=0).item()
    cos_a = torch.nn.functional.cosine_similarity(ga_e, ga_p, dim=0).item()
    rel = ((ge - gp).norm() / gp.norm()).item()
    return {"cosine": cos, "cosine_A": cos_a, "rel_l2": rel, "norm_edgetune": ge.norm().item(),
            "norm_peft": gp.norm().item(), "n": ge.numel()}


def profile_step(model, batch, opt, top: int) -> str:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        common.train_step(model, batch, opt)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=48)


# ----------------------------------------------------------------------------------- worker


def worker(side: str, args) -> None:
    import edgetune  # noqa: F401  (imports part of the baseline)
    if side == "peft":
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
    else:
        import edgetune.methods.qlora.layer  # noqa: F401  (imports bitsandbytes)
    out = {"side": side, "rss_after_imports": common.rss_mib()}
    model, tokenizer = load_base()
    batch = common.real_batch(tokenizer, args.batch, args.seq_len)
    common.release_memory()
    out["rss_after_load"] = common.rss_mib()
    out["maxrss_after_load"] = common.maxrss_mib()
    model = build_side(side, model, args.double_quant)
    opt = common.lora_optimizer(model)
    common.release_memory()
    out["rss_after_build"] = common.rss_mib()
    out["vmhwm_before_reset"] = common.vmhwm_mib()  # the peak of imports + load + build
    out["maxrss_before_reset"] = common.maxrss_mib()  # clear_refs resets ru_maxrss too (same hiwater mark)
    out["vmhwm_reset"] = common.reset_peak_rss()
    times, losses = [], []
    for _ in range(args.worker_steps):
        dt, loss = common.timed(common.train_step, model, batch, opt)
        times.append(dt)
        losses.append(loss)
    out.update(step_s=times, losses=losses, vmhwm_train=common.vmhwm_mib(), maxrss_train=common.maxrss_mib(),
               rss_end=common.rss_mib())
    out["maxrss"] = max(out["maxrss_before_reset"], out["maxrss_train"])  # whole-process peak
    out["vmhwm_process"] = max(out["vmhwm_before_reset"] or 0, out["vmhwm_train"] or 0)
    print("WORKER_JSON " + json.dumps(out), flush=True)


def run_worker(side: str, args) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", side, "--batch", str(args.batch),
           "--seq-len", str(args.seq_len), "--worker-steps", str(args.worker_steps)]
    if args.double_quant:
        cmd.append("--double-quant")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    # Through a shell that forks: Linux carries ru_maxrss across fork + exec, so a worker exec'd
    # straight from this (large) process would report this process's peak as its own.
    cmd = ["/bin/sh", "-c", '"$@"; exit $?', "sh"] + cmd
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    for line in proc.stdout.splitlines():
        if line.startswith("WORKER_JSON "):
            res = json.loads(line[len("WORKER_JSON "):])
            res["wall_s"] = wall
            return res
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
    return {"side": side, "error": f"worker exited {proc.returncode}:\n{tail}", "wall_s": wall}


# ----------------------------------------------------------------------------------- main


def fmt(x, spec=".1f", missing="n/a") -> str:
    return missing if x is None else format(x, spec)


def main(args) -> None:
    t_start = time.perf_counter()
    load_before = common.loadavg()
    print(f"# edgetune qlora vs PEFT + bitsandbytes QLoRA — SmolLM2-135M, batch {args.batch} x {args.seq_len}, "
          f"fp32, CPU, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"load average at start: {load_before}", flush=True)

    model, tokenizer = load_base()
    batch = common.real_batch(tokenizer, args.batch, args.seq_len)
    n_target = int((batch["labels"][:, 1:] != -100).sum())
    print(f"batch: first {args.batch} packed rows of {common.SHIPPED_DATA.name}, {n_target} loss targets", flush=True)

    peft_base = copy.deepcopy(model)
    et = build_edgetune(model, args.double_quant)
    pm = build_peft(peft_base, args.double_quant)
    del model, peft_base
    common.release_memory()
    pairs = lora_pairs(et, pm)
    n_et = sum(p.numel() for p in et.parameters() if p.requires_grad)
    n_pm = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    same, total = nf4_codes_identical(et, pm)
    print(f"LoRA params: edgetune {n_et:,}, PEFT {n_pm:,} ({len(pairs)} adapted projections, "
          f"{pm.n_quantized} bnb Linear4bit); NF4 codes + absmax identical: {same}/{total}", flush=True)

    # --- gradients and saved activations (one recorded forward + backward per side, not timed)
    sync_lora(pairs)
    rec = {"edgetune": forward_backward_recorded(et, batch), "peft": forward_backward_recorded(pm, batch)}
    agree = grad_agreement(pairs)
    et.zero_grad(set_to_none=True)
    pm.zero_grad(set_to_none=True)
    print(f"loss at identical LoRA weights: edgetune {rec['edgetune']['loss']:.6f}, PEFT {rec['peft']['loss']:.6f}; "
          f"grad cosine {agree['cosine']:.8f} (A only {agree['cosine_A']:.8f}), rel L2 diff {agree['rel_l2']:.2e}, "
          f"|g| {agree['norm_edgetune']:.4g} vs {agree['norm_peft']:.4g}", flush=True)

    # --- interleaved timing
    models = {"edgetune": et, "peft": pm}
    opts = {s: common.lora_optimizer(m) for s, m in models.items()}
    times = {s: [] for s in SIDES}
    warm = {}
    for s in SIDES:
        warm[s], _ = common.timed(common.train_step, models[s], batch, opts[s])
    for i in range(args.steps):
        order = SIDES if i % 2 == 0 else SIDES[::-1]
        for s in order:
            dt, _ = common.timed(common.train_step, models[s], batch, opts[s])
            times[s].append(dt)
        print(f"round {i + 1}/{args.steps}: " + ", ".join(f"{s} {times[s][-1]:.3f}s" for s in order), flush=True)
    med = {s: common.median(times[s]) for s in SIDES}
    paired = [e / p for e, p in zip(times["edgetune"], times["peft"])]  # per round: both ran back to back
    load_after_timing = common.loadavg()

    profiles = {}
    if args.profile:
        for s in SIDES:
            profiles[s] = profile_step(models[s], batch, opts[s], args.profile_top)

    del et, pm, models, opts, pairs
    common.release_memory()

    # --- peak RSS, each side in a fresh process (one at a time: they would fight over the CPUs)
    workers = {}
    if not args.no_workers:
        for s in SIDES:
            print(f"worker {s}: fresh process ...", flush=True)
            workers[s] = run_worker(s, args)
            if "error" in workers[s]:
                print(workers[s]["error"], flush=True)

    # --- report
    print()
    print(f"## Results (batch {args.batch} x {args.seq_len}, {args.steps} measured steps each after 1 warmup)")
    print()
    print("| config | median step s | ratio | paired ratio | saved-activation MiB | peak RSS MiB (train) | peak − built MiB "
          "| RSS built MiB | ru_maxrss MiB | grad cosine |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for s in SIDES:
        w = workers.get(s, {})
        ok = w and "error" not in w
        peak = w.get("vmhwm_train") if ok else None
        built = w.get("rss_after_build") if ok else None
        delta = None if peak is None or built is None else peak - built
        ratio = med["edgetune"] / med["peft"] if s == "edgetune" else 1.0
        cos = f"{agree['cosine']:.6f}" if s == "edgetune" else "(reference)"
        pr = f"{common.median(paired):.2f} [{min(paired):.2f}–{max(paired):.2f}]" if s == "edgetune" else "1.00"
        print(f"| {LABEL[s]} | {med[s]:.3f} | {ratio:.2f} | {pr} | {rec[s]['saved_bytes'] / common.MIB:.1f} | {fmt(peak)} "
              f"| {fmt(delta)} | {fmt(built)} | {fmt(w.get('maxrss') if ok else None)} | {cos} |")
    print()
    print("ratio = edgetune median / PEFT median (below 1: edgetune faster); paired ratio = median [min–max] over "
          "rounds of edgetune step / PEFT step of the same round, the estimate least moved by load drift. peak RSS (train) = VmHWM over the "
          f"worker's {args.worker_steps} steps after a reset; peak − built = that minus RSS of the built model "
          "(after gc + malloc_trim); ru_maxrss = whole-process peak, including the GGUF model load.")
    print()
    print("step times s: " + "; ".join(f"{s} warmup {warm[s]:.3f}, measured " + ", ".join(f"{t:.3f}" for t in times[s])
                                       for s in SIDES))
    for s in SIDES:
        w = workers.get(s)
        if w and "error" not in w:
            print(f"worker {s}: RSS after imports {fmt(w['rss_after_imports'])}, after load {fmt(w['rss_after_load'])} "
                  f"(peak so far: VmHWM {fmt(w['vmhwm_before_reset'])}, ru_maxrss {fmt(w['maxrss_after_load'])}), after build {fmt(w['rss_after_build'])}, "
                  f"train peak VmHWM {fmt(w['vmhwm_train'])} / ru_maxrss {fmt(w['maxrss_train'])}, end {fmt(w['rss_end'])} MiB; steps "
                  + ", ".join(f"{t:.2f}" for t in w["step_s"]) + f" s; wall {w['wall_s']:.0f} s")

    print()
    print("### Saved-for-backward bytes by autograd node (MiB; graph walk from the loss)")
    print()
    names = sorted(set(rec["edgetune"]["by_node"]) | set(rec["peft"]["by_node"]),
                   key=lambda n: -max(rec["edgetune"]["by_node"].get(n, 0), rec["peft"]["by_node"].get(n, 0)))
    print("| autograd node | edgetune | PEFT |")
    print("|---|---|---|")
    for n in names:
        print(f"| {n} | {rec['edgetune']['by_node'].get(n, 0) / common.MIB:.1f} | {rec['peft']['by_node'].get(n, 0) / common.MIB:.1f} |")
    print("| **graph-walk total** | " + " | ".join(f"{sum(rec[s]['by_node'].values()) / common.MIB:.1f}" for s in SIDES) + " |")
    print("| **hook total** | " + " | ".join(f"{rec[s]['saved_bytes'] / common.MIB:.1f}" for s in SIDES) + " |")
    print()
    print("hooks: " + "; ".join(f"{s} {rec[s]['n_packed']} tensors packed, {rec[s]['n_excluded']} parameters/buffers "
                                 f"skipped, {rec[s]['n_storages']} unique storages" for s in SIDES))

    for s, table in profiles.items():
        print()
        print(f"### torch.profiler, one {LABEL[s]} step (top {args.profile_top} ops by self CPU time)")
        print()
        print("```")
        print(table)
        print("```")

    print()
    print(f"load average: start {load_before}; after timing {load_after_timing}; end {common.loadavg()}")
    print(f"wall time {time.perf_counter() - t_start:.0f} s")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=None, help="measured steps per side (default 5; --quick: 2)")
    ap.add_argument("--batch", type=int, default=None, help="rows per batch (default 4; --quick: 1)")
    ap.add_argument("--seq-len", type=int, default=None, help="tokens per row (default 256; --quick: 64)")
    ap.add_argument("--quick", action="store_true", help="smoke run: batch 1 x 64, 2 steps")
    ap.add_argument("--worker-steps", type=int, default=None, help="steps in each RSS worker (default 3; --quick: 2)")
    ap.add_argument("--double-quant", action="store_true", help="NF4 double quantization on both sides")
    ap.add_argument("--profile", action="store_true", help="torch.profiler table of one step per side")
    ap.add_argument("--profile-top", type=int, default=15)
    ap.add_argument("--no-workers", action="store_true", help="skip the fresh-process peak-RSS runs")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    quick = args.quick
    args.steps = args.steps if args.steps is not None else (2 if quick else 5)
    args.batch = args.batch if args.batch is not None else (1 if quick else 4)
    args.seq_len = args.seq_len if args.seq_len is not None else (64 if quick else 256)
    args.worker_steps = args.worker_steps if args.worker_steps is not None else (2 if quick else 3)
    return args


if __name__ == "__main__":
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft 0.21 on transformers 5
    _args = parse_args()
    if _args.threads:
        torch.set_num_threads(_args.threads)
    if _args.worker:
        worker(_args.worker, _args)
    else:
        main(_args)
