"""S2A activation-lean rewrite vs PEFT LoRA: saved-activation bytes, step time, gradients, peak RSS.

    python benchmarks/s2a_memory.py                    # batch 4 x 256, 1 warmup + 3 interleaved steps
    python benchmarks/s2a_memory.py --rss              # also peak RSS per configuration, fresh processes
    python benchmarks/s2a_memory.py --quick            # batch 1 x 64: a smoke run

Setting: the default model (SmolLM2-135M-Instruct, fp32, CPU), the first ``--batch`` packed rows
of the shipped instruction data at ``--seq-len``; LoRA r=16, alpha=32 on all seven projections for
every LoRA configuration. Configurations:

* ``peft-lora``     PEFT LoRA on the fp32 base (the peer);
* ``peft-lora+gc``  the same with gradient checkpointing (non-reentrant);
* ``qlora@16/8/4``  edgetune qlora with ``--act-bits`` 16 (no rewrite), 8 and 4;
* ``qlora@4+code4`` act-bits 4 with the SwiGLU gate kept as a 4-bit derivative code (``--act-gate-code4``);
* ``s2a``           the ``s2a`` recipe (frozen NF4 base, bias + low-rank prompt), act-bits 4, if present.

Saved bytes: unique storages seen by ``saved_tensors_hooks`` during one forward, parameters and
buffers excluded (``benchmarks/common.py``). Under gradient checkpointing the hooks see only what
the checkpoint frames keep outside their recomputed regions, so that column is a lower bound and the
fresh-process peak RSS is the honest comparison there. Gradients: cosine similarity of all LoRA
gradients of ``qlora@8`` and ``qlora@4`` against ``qlora@16`` on the same batch and adapter (B set to
small random values so dA is non-trivial). Step time: zero_grad + forward + backward + AdamW, after
one warmup step each, configurations interleaved round-robin with the order rotating per round;
medians and the ratio to PEFT LoRA's median. Prints tables; asserts nothing.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from common import (MIB, SavedTensors, frozen_storage_ptrs, loadavg, median, real_batch,  # noqa: E402
                    release_memory, reset_peak_rss, vmhwm_mib)

warnings.filterwarnings("ignore")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = ["peft-lora", "peft-lora+gc", "qlora@16", "qlora@8", "qlora@4", "qlora@4+code4", "s2a"]


def build(name: str, base: nn.Module) -> nn.Module | None:
    import edgetune
    from edgetune.methods import all_methods

    model = copy.deepcopy(base)
    if name.startswith("peft"):
        from peft import LoraConfig, get_peft_model

        pm = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LORA_TARGETS,
                                              task_type="CAUSAL_LM"))
        if name.endswith("+gc"):
            pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return pm
    if name == "s2a":
        if "s2a" not in {m.name for m in all_methods()}:
            return None
        return edgetune.compile(model, "s2a", act_bits=4)
    recipe, bits = name.split("@")
    code4 = bits.endswith("+code4")
    return edgetune.compile(model, recipe, act_bits=int(bits.removesuffix("+code4")), act_gate_code4=code4)


def lora_tensors(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """LoRA A/B parameters in a name order shared by PEFT and edgetune models."""
    out = []
    for n, p in model.named_parameters():
        if p.requires_grad:
            key = n.replace("base_model.model.", "").replace(".default", "")
            out.append((key, p))
    return sorted(out)


def sync_adapters(models: dict[str, nn.Module], seed: int = 1234) -> None:
    """Same A everywhere (the first model's); B = N(0, 0.01²) from one seed, so dA is non-trivial."""
    ref = dict(lora_tensors(next(iter(models.values()))))
    for model in models.values():
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for key, p in lora_tensors(model):
                if "lora_A" in key and key in ref:
                    p.copy_(ref[key])
                elif "lora_B" in key:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.01)


def loss_of(model: nn.Module, batch) -> torch.Tensor:
    from edgetune.s2a.loss import causal_lm_loss

    return causal_lm_loss(model, batch)


def saved_and_grads(model: nn.Module, batch) -> tuple[int, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    rec = SavedTensors(frozen_storage_ptrs(model))
    with rec.record():
        loss = loss_of(model, batch)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for _, p in lora_tensors(model) if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return rec.nbytes, grads


def step(model, batch, opt) -> float:
    opt.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    loss_of(model, batch).backward()
    opt.step()
    return time.perf_counter() - t0


def worker(name: str, args) -> None:
    """Peak RSS of training ``name`` in this fresh process (JSON on stdout)."""
    import edgetune

    torch.set_num_threads(args.threads)
    base, tok = edgetune.load("default")
    batch = real_batch(tok, args.batch, args.seq_len)
    model = build(name, base)
    del base
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    release_memory()
    reset_peak_rss()
    before = vmhwm_mib()
    for _ in range(2):
        step(model, batch, opt)
    print(json.dumps({"config": name, "rss_before_mib": before, "peak_rss_mib": vmhwm_mib()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--rss", action="store_true", help="peak RSS per configuration in fresh processes")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.batch, args.seq_len, args.steps = 1, 64, 1
    if args.worker:
        return worker(args.worker, args)
    import edgetune

    torch.set_num_threads(args.threads)
    print(f"batch {args.batch} x {args.seq_len}, threads {args.threads}, load {loadavg()}")
    base, tok = edgetune.load("default")
    batch = real_batch(tok, args.batch, args.seq_len)
    models = {}
    for name in args.configs.split(","):
        m = build(name, base)
        if m is not None:
            m.train()
            models[name] = m
    del base
    sync_adapters({k: v for k, v in models.items() if k != "s2a"})

    saved, grads = {}, {}
    for name, m in models.items():
        saved[name], grads[name] = saved_and_grads(m, batch)
    times = {name: [] for name in models}
    opts = {name: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4) for name, m in models.items()}
    names = list(models)
    for name in names:  # warmup
        step(models[name], batch, opts[name])
    for r in range(args.steps):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            times[name].append(step(models[name], batch, opts[name]))
    peer = "peft-lora"
    print(f"\n{'config':14} {'saved MiB':>10} {'vs PEFT':>8} {'vs PEFT+gc':>10} {'step s':>8} {'vs PEFT':>8} {'grad cos vs @16':>16}")
    for name in names:
        cos = ""
        if name.startswith("qlora@") and "qlora@16" in grads and name != "qlora@16":
            cos = f"{float(torch.nn.functional.cosine_similarity(grads[name].double(), grads['qlora@16'].double(), dim=0)):.5f}"
        ratio = saved[name] / saved[peer] if peer in saved else float("nan")
        ratio_gc = saved[name] / saved["peft-lora+gc"] if "peft-lora+gc" in saved else float("nan")
        t = median(times[name])
        tr = t / median(times[peer]) if peer in times else float("nan")
        print(f"{name:14} {saved[name] / MIB:10.1f} {ratio:8.3f} {ratio_gc:10.3f} {t:8.2f} {tr:8.3f} {cos:>16}")
    print(f"load after: {loadavg()}")
    if args.rss:
        print(f"\n{'config':14} {'peak RSS MiB':>12} (fresh process, 2 steps)")
        for name in names:
            cmd = ["/bin/sh", "-c", '"$@"', "sh", sys.executable, __file__, "--worker", name,
                   "--batch", str(args.batch), "--seq-len", str(args.seq_len), "--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            line = [l for l in out.stdout.splitlines() if l.startswith("{")]
            print(f"{name:14} {json.loads(line[-1])['peak_rss_mib']:12.0f}" if line else f"{name:14} failed: {out.stderr[-300:]}")


if __name__ == "__main__":
    main()
