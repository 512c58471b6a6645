"""ORT Training vs the torch backend on the default model (qlora): parity, memory, speed, round trip.

    flock /tmp/edgetune-heavy.lock env OMP_NUM_THREADS=2 python benchmarks/ort_vs_torch.py --steps 50

Stages (each backend runs in a fresh process, so its peak RSS is its own):
  1. compile default --recipe qlora (cached in --work; compile's default --act-bits 4), export-training
     (--nf4 op, --act4 auto: NF4MatMul and Act4SiLU custom ops)
  2. torch: the compiled model as `edgetune train` runs it (S2A rewrite), N AdamW steps on
     edgetune/data/instructions.jsonl: losses, step times, VmHWM after loading and at the end
  3. ORT: `train_ort` (what `edgetune train DIR --backend ort` runs) for the same N steps, batches and
     learning-rate schedule in a child process: losses and per-step wall time from its metrics.jsonl,
     VmHWM after the session opened and at the end
  4. round trip: the ORT run exported as PEFT (`export_run`) loads with PeftModel.from_pretrained on
     the fp32 default model; held-out loss before/after on instructions_heldout.jsonl
Prints a table; asserts nothing (timings on a shared machine are noisy).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "edgetune" / "data" / "instructions.jsonl"
HELDOUT = ROOT / "edgetune" / "data" / "instructions_heldout.jsonl"


def _vmhwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def child(args) -> None:
    """One backend in this process: `steps` steps, print JSON with losses, step times and VmHWM."""
    import numpy as np
    import torch

    import edgetune
    from edgetune.training.data import BatchIterator, build_dataset
    from edgetune.training.loop import lr_at

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    work = Path(args.work)
    from transformers import AutoTokenizer

    # the tokenizer from the ORT directory for both (a copy of the compiled one), so the torch
    # process loads its model once and its VmHWM is one model's
    tok = AutoTokenizer.from_pretrained(str(work / "ort" / "tokenizer"))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    it = BatchIterator(build_dataset(DATA, tok, args.seq_len), args.batch, seed=0)
    losses, times = [], []
    base_rss = _vmhwm_mib()
    if args.backend == "torch":
        model, _ = edgetune.load_compiled(work / "compiled")
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=args.lr, eps=1e-8)
        base_rss = _vmhwm_mib()
        for step in range(1, args.steps + 1):
            batch = next(it)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, args.steps, args.lr, max(1, args.steps // 20))
            t = time.perf_counter()
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t)
            losses.append(loss.item())
    else:
        import edgetune.ort.train as ort_train

        opened = {}
        real_open = ort_train.open_session

        def open_and_measure(*a, **k):  # VmHWM once the session (graphs + checkpoint) is loaded
            sess = real_open(*a, **k)
            opened["rss"] = _vmhwm_mib()
            return sess

        ort_train.open_session = open_and_measure
        result = ort_train.train_ort(work / "ort", DATA, work / "ort-run", overwrite=True, steps=args.steps,
                                     batch=args.batch, seq_len=args.seq_len, lr=args.lr, progress=False,
                                     save_every=0, save_interval_s=0)
        base_rss = opened["rss"]
        losses = [m["loss"] for m in result.metrics]
        times = [m["tokens"] / m["tokens_per_s"] for m in result.metrics]
    print("RESULT " + json.dumps({"losses": losses, "times": times, "peak_rss_mib": _vmhwm_mib(),
                                  "loaded_rss_mib": base_rss}))


def _child_cmd(backend: str, steps: int, args) -> list[str]:
    return [sys.executable, __file__, "--child", backend, "--steps", str(steps), "--work", args.work,
            "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--lr", str(args.lr)]


def _result(backend: str, stdout: str, stderr: str) -> dict:
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    raise SystemExit(f"{backend} child failed:\n{stderr[-3000:]}")


def _run_child(backend: str, steps: int, args) -> dict:
    proc = subprocess.run(_child_cmd(backend, steps, args), capture_output=True, text=True)
    return _result(backend, proc.stdout, proc.stderr)


def _run_side_by_side(steps: int, args) -> tuple[dict, dict]:
    """Both backends at once, one thread each (OMP_NUM_THREADS=1): half the wall time on a 2-core
    machine. Losses and each process's VmHWM are unaffected; step times are one-thread times."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {b: subprocess.Popen(_child_cmd(b, steps, args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, env=env) for b in ("torch", "ort")}
    out = {b: p.communicate() for b, p in procs.items()}
    return _result("torch", *out["torch"]), _result("ort", *out["ort"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--work", default="/tmp/edgetune-ort-bench")
    ap.add_argument("--child", choices=["torch", "ort"])
    ap.add_argument("--json", help="also write the measurements to this JSON file")
    ap.add_argument("--model", default="default", help="base model (a tiny HF dir makes a quick dry run)")
    ap.add_argument("--side-by-side", action="store_true",
                    help="run the two backends at the same time, one thread each (step times are 1-thread times)")
    args = ap.parse_args()
    if args.child:
        args.backend = args.child
        return child(args)
    import edgetune
    from edgetune.ort.export import export_training

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if not (work / "compiled").is_dir():
        model, tok = edgetune.load(args.model)
        edgetune.save(edgetune.compile(model, recipe="qlora"), work / "compiled", tok)
    if not (work / "ort").is_dir():
        export_training(work / "compiled", work / "ort", lr=args.lr)
    sizes = json.loads((work / "ort" / "manifest.json").read_text())["sizes"]
    print(f"setup {time.time() - t0:.0f}s", file=sys.stderr)

    partial = {}

    def stage(name, fn, *a):
        """Run a stage; report it at once (and in --json) so a cut-short run still has its numbers."""
        t = time.time()
        r = fn(*a)
        print(f"{name} {time.time() - t:.0f}s: first loss {r['losses'][0]:.6f}, last {r['losses'][-1]:.4f}, "
              f"median step {sorted(r['times'])[len(r['times']) // 2]:.2f}s, VmHWM loaded "
              f"{r['loaded_rss_mib']:.0f} / peak {r['peak_rss_mib']:.0f} MiB", file=sys.stderr, flush=True)
        partial[name] = r
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "partial": partial}, indent=1))
        return r

    if args.side_by_side:
        t = time.time()
        torch_run, ort_run = _run_side_by_side(args.steps, args)
        print(f"side by side {time.time() - t:.0f}s", file=sys.stderr, flush=True)
        stage("torch steps", lambda: torch_run)
        stage("ort steps", lambda: ort_run)
    else:
        torch_run = stage("torch steps", _run_child, "torch", args.steps, args)
        ort_run = stage("ort steps", _run_child, "ort", args.steps, args)
    torch_mem, ort_mem = torch_run, ort_run

    # round trip: the ORT child's run, exported as PEFT, loaded with PEFT
    from edgetune.ort.adapter import export_run

    run = work / "ort-run"
    t_rt = time.time()
    export_run(run, work / "peft", overwrite=True)
    import torch
    from peft import PeftModel


    def heldout_loss(model, tok):
        from edgetune.training.data import build_dataset

        ds = build_dataset(HELDOUT, tok, args.seq_len)
        total, n = 0.0, 0
        with torch.no_grad():
            for i in range(len(ds)):
                b = ds.rows(slice(i, i + 1))
                k = int((b["labels"][:, 1:] != -100).sum())
                total += model(**b).loss.item() * k
                n += k
        return total / n

    base, tok = edgetune.load(args.model)
    before = heldout_loss(base, tok)
    peft_model = PeftModel.from_pretrained(base, str(work / "peft"))
    after = heldout_loss(peft_model, tok)

    print(f"round trip {time.time() - t_rt:.0f}s", file=sys.stderr, flush=True)
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    tl, ol = torch_run["losses"], ort_run["losses"]
    rows = [
        ("first-step loss", f"{tl[0]:.6f}", f"{ol[0]:.6f}", f"rel diff {abs(ol[0] - tl[0]) / tl[0]:.2e} (target 1e-4)"),
        (f"loss after {args.steps} steps", f"{tl[-1]:.4f}", f"{ol[-1]:.4f}",
         f"rel diff {abs(ol[-1] - tl[-1]) / tl[-1]:.2%} (target 2%)"),
        (f"mean loss of last 10 steps", f"{sum(tl[-10:]) / len(tl[-10:]):.4f}", f"{sum(ol[-10:]) / len(ol[-10:]):.4f}", ""),
        ("median step time (s)", f"{med(torch_run['times']):.2f}", f"{med(ort_run['times']):.2f}",
         f"ORT/torch {med(ort_run['times']) / med(torch_run['times']):.2f}x"),
        (f"peak RSS (VmHWM), load + {args.steps} steps (MiB)", f"{torch_mem['peak_rss_mib']:.0f}",
         f"{ort_mem['peak_rss_mib']:.0f}",
         f"ORT/torch {ort_mem['peak_rss_mib'] / torch_mem['peak_rss_mib']:.2f}x (target <= 1)"),
        ("VmHWM after load, before steps (MiB)", f"{torch_mem['loaded_rss_mib']:.0f}",
         f"{ort_mem['loaded_rss_mib']:.0f}", ""),
        ("peak - loaded: what the steps add (MiB)", f"{torch_mem['peak_rss_mib'] - torch_mem['loaded_rss_mib']:.0f}",
         f"{ort_mem['peak_rss_mib'] - ort_mem['loaded_rss_mib']:.0f}", ""),
        ("ORT checkpoint + graphs vs fp32", "", f"{sizes['total'] / 2**20:.1f} MiB",
         f"{sizes['ratio_vs_fp32']:.2f}x of {sizes['fp32_model'] / 2**20:.1f} MiB fp32"),
        ("held-out loss: base -> ORT adapter via PeftModel", f"{before:.4f}", f"{after:.4f}",
         "lowered" if after < before else "NOT lowered"),
    ]
    print(f"\nORT vs torch, {args.model} model, qlora (act-bits 4; ORT: NF4MatMul + Act4SiLU), batch {args.batch} x seq {args.seq_len}, lr {args.lr}, "
          f"{args.steps} steps, " + ("side by side, 1 thread each" if args.side_by_side else
                                   f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')}") + "\n")
    print(f"| {'metric':<48} | {'torch':>10} | {'ORT':>12} | note |")
    print(f"|{'-' * 50}|{'-' * 12}|{'-' * 14}|------|")
    for r in rows:
        print(f"| {r[0]:<48} | {r[1]:>10} | {r[2]:>12} | {r[3]} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "torch": torch_run, "ort": ort_run,
                                               "torch_mem": torch_mem, "ort_mem": ort_mem, "sizes": sizes,
                                               "heldout": {"base": before, "ort_adapter": after}}, indent=1))


if __name__ == "__main__":
    main()
