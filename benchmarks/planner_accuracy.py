"""Planner accuracy on the real default model: predicted vs measured saved bytes and peak RSS.

Prints a table; asserts nothing. For each configuration a FRESH process loads a compiled
artifact (meta-device load, no fp32 copy), records its RSS after imports (the interpreter
baseline), runs training steps, and reports the saved-for-backward bytes of the first step
(saved-tensor hooks over unique storages, parameters excluded) and its peak RSS (VmHWM).

    python benchmarks/planner_accuracy.py            # lora + qlora, act-bits 16 and 4, 2x128 and 4x256
    python benchmarks/planner_accuracy.py --quick    # one small configuration
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def vm_hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def matmul_gflops(n: int = 1024, reps: int = 5) -> float:
    """This process's fp32 matmul rate (GFLOP/s, median of ``reps`` n x n x n products).

    The CPU profile's peak is a datasheet-style figure for a whole laptop CPU; a shared core of
    this machine gets a fraction of it, and the step also runs non-matmul work. Timing the
    matmul on the spot separates the two: ``step_flops / rate`` is what the step would take if it
    were only its matmuls at the rate this process really gets.
    """
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up (oneDNN/BLAS kernel selection)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / sorted(times)[reps // 2] / 1e9


def worker(compiled: str, batch: int, seq: int, steps: int) -> None:
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import edgetune
    from edgetune.memory import SavedTensorCounter
    from edgetune.planner import plan_for_model
    from edgetune.s2a.loss import causal_lm_loss

    baseline = rss_bytes()
    model, tok = edgetune.load_compiled(compiled)
    plan = plan_for_model(model, batch, seq)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=g)
    model.train()
    saved = None
    t0 = time.perf_counter()
    for step in range(steps):
        if step == 0:
            with SavedTensorCounter(model) as counter:
                loss = causal_lm_loss(model, {"input_ids": ids, "labels": ids})
            saved = counter.bytes
        else:
            loss = causal_lm_loss(model, {"input_ids": ids, "labels": ids})
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del loss
    step_s = (time.perf_counter() - t0) / steps
    rate = matmul_gflops()
    print(json.dumps({"gflops": rate, "flops_step_s": plan.step_flops / (rate * 1e9),"baseline": baseline, "peak": vm_hwm_bytes(), "saved": saved, "step_s": step_s,
                      "pred_saved": plan.components["activations"], "pred_total": plan.total_bytes,
                      "pred_step_s": plan.step_time_s}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--worker", nargs=4, metavar=("DIR", "BATCH", "SEQ", "STEPS"))
    args = ap.parse_args()
    if args.worker:
        worker(args.worker[0], int(args.worker[1]), int(args.worker[2]), int(args.worker[3]))
        return

    import edgetune

    recipes = [("qlora", 4)] if args.quick else [(r, b) for r in ("lora", "qlora") for b in (16, 4)]
    sizes = [(1, 64)] if args.quick else [(2, 128), (4, 256)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for recipe, bits in recipes:
            name = f"{recipe}@{bits}"
            model, tok = edgetune.load("default")
            edgetune.save(edgetune.compile(model, recipe, "cpu-16gb", act_bits=bits), Path(tmp) / name, tok)
            del model
            for batch, seq in sizes:
                out = subprocess.run([sys.executable, __file__, "--worker", str(Path(tmp) / name), str(batch),
                                      str(seq), str(args.steps)], capture_output=True, text=True, check=True)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                measured_peak = r["peak"] - r["baseline"]
                rows.append((name, f"{batch}x{seq}", r["pred_saved"], r["saved"], r["pred_total"], measured_peak,
                             r["pred_step_s"], r["step_s"], r["gflops"], r["flops_step_s"]))
    mib = 2**20
    print(f"load average {os.getloadavg()[0]:.1f} (2 cores); peak = VmHWM - RSS after imports, fresh process")
    print("step pred: the profile's peak rate; at matmul rate: the plan's FLOPs at the fp32 matmul rate measured "
          "in the same process")
    print("| recipe@act-bits | batch x seq | saved pred MiB | saved meas MiB | err | peak pred MiB | peak meas MiB | err "
          "| step pred s | matmul GFLOP/s | step at matmul rate s | step meas s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for recipe, size, ps, ms, pp, mp, pt, mt, rate, ft in rows:
        print(f"| {recipe} | {size} | {ps / mib:.1f} | {ms / mib:.1f} | {100 * (ps - ms) / ms:+.1f}% | {pp / mib:.0f} "
              f"| {mp / mib:.0f} | {100 * (pp - mp) / mp:+.1f}% | {pt:.2f} | {rate:.0f} | {ft:.2f} | {mt:.2f} |")


if __name__ == "__main__":
    main()
