"""The planner's predicted peak against the measured peak RSS of a few training steps in a fresh process.

The worker (this file run as a script) imports everything a step uses, records its RSS (the
interpreter + torch + transformers + edgetune baseline, which the plan does not count), builds a
small random Llama, compiles it, runs a few AdamW steps and prints VmHWM. The size is chosen so
that saved activations and their transients are most of the peak (about 0.4-0.6 GiB), well above
the tens of MiB that allocator and thread-pool noise move it by.

Printed for a run: ``python tests/test_planner_peak.py lora 16`` (one JSON line).
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

TOLERANCE = 0.25  # measured here: see test_predicted_peak_matches_measured_rss's docstring
SIZE = {"batch": 4, "seq": 512}


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def worker(recipe: str, act_bits: int, steps: int = 2) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from edgetune.compiler import compile_model
    from edgetune.planner import OVERHEAD, plan_for_model
    from edgetune.s2a.loss import causal_lm_loss

    torch.set_num_threads(1)
    # Warm-up: a micro model of the same recipe loads what the first step loads lazily (bitsandbytes,
    # edgetune's C++ ops, oneDNN kernels: 120-170 MiB of code measured here), which is runtime, not the job.
    micro = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    m = compile_model(AutoModelForCausalLM.from_config(micro), recipe, "cpu-16gb", r=4, act_bits=act_bits).train()
    causal_lm_loss(m, {"input_ids": torch.ones(1, 8, dtype=torch.long), "labels": torch.ones(1, 8, dtype=torch.long)}
                   ).backward()
    del m
    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        pass
    baseline = _status("VmRSS")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                      tie_word_embeddings=True)
    model = compile_model(AutoModelForCausalLM.from_config(cfg), recipe, "cpu-16gb", r=8, act_bits=act_bits)
    model.train()
    b, t = SIZE["batch"], SIZE["seq"]
    plan = plan_for_model(model, b, t)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, cfg.vocab_size, (b, t), generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        loss = causal_lm_loss(model, {"input_ids": ids, "labels": ids})
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        del loss
    fixed = OVERHEAD["cpu"][0]  # the plan's fixed runtime term, which the warm-up put into the baseline
    return {"measured": _status("VmHWM") - baseline, "predicted": plan.total_bytes - fixed,
            "activations": plan.components["activations"], "baseline": baseline}


CONFIGS = (("lora", 16), ("qlora", 4))


def test_predicted_peak_matches_measured_rss():
    """Predicted peak (less the plan's fixed runtime term) within TOLERANCE of VmHWM minus the warm baseline.

    Both configurations run at once, each in its own fresh process (RSS is per process). Measured
    on this 2-core machine with the transient fraction at 0.72: lora@16 414 vs 354 MiB (+17%),
    qlora@4 231 vs 179 MiB (+29%), lora@4 +4%, qlora@16 +17%; the fraction was then refitted to
    0.55 on these four and the default model's eight (benchmarks/planner_accuracy.py), which puts
    them at about +8%, +11%, -10% and +8%. Earlier runtimes measured up to a quarter off, so the
    tolerance is 25%. Dropping any one large term still fails: the saved activations are 45%
    of the lora@16 peak and the transients 27%.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parents[1]
    procs = [subprocess.Popen([sys.executable, __file__, recipe, str(bits)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=root) for recipe, bits in CONFIGS]
    results = []
    for (recipe, bits), proc in zip(CONFIGS, procs):
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-2000:]
        r = json.loads(out.strip().splitlines()[-1])
        results.append((recipe, bits, r, (r["predicted"] - r["measured"]) / r["measured"]))
    for recipe, bits, r, e in results:
        assert abs(e) <= TOLERANCE, (recipe, bits, r, f"{100 * e:+.1f}%")
        assert r["activations"] > 0.1 * r["measured"]  # the size keeps activations a large part of the peak


if __name__ == "__main__":
    print(json.dumps(worker(sys.argv[1], int(sys.argv[2]))))
