"""CPU backend vs reference for the update-path ops at LLM sizes; GB/s against a memcpy.

    OMP_NUM_THREADS=1 python benchmarks/kernels.py [--threads 1] [--reps 15]

Activations 4 x 256 x 1536 (act4 pack/unpack, int8 quantize/dequantize), weights 576 x 1536
(sketch gather / scatter-add at 4 bits, 4 groups per row; NF4 x·Wᵀ for 1024 tokens). Backends are
timed interleaved (A B A B ...) in one process; medians. "bytes" is what the op must read plus
write; "copy GB/s" is a torch copy of that many bytes (read + write) measured the same way.
Prints a table; asserts nothing.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from edgetune.kernels import ops, reference as R, registry
from edgetune.quant.bitpack import pack_codes
from edgetune.quant.nf4 import quantize_nf4_reference


def _time(fn, reps):
    fn()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not registry.status("cpu")[0]:
        raise SystemExit(f"cpu backend unavailable: {registry.status('cpu')[1]}")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 256, 1536, generator=g)
    n = x.numel()
    borders = torch.sort(torch.randn(15, generator=g)).values
    levels = torch.randn(16, generator=g)
    _, packed = R.act4_forward(x, borders, "silu")
    q = R.quantize_int8(x, 64, None)
    noise = torch.rand(n // 64, 64, generator=g)
    out_f, in_f, gpr, bits = 576, 1536, 4, 4
    cp = pack_codes(torch.randint(0, 16, (out_f, in_f), generator=g), bits)
    table = torch.randn(out_f, gpr, 16, generator=g)
    gw = torch.randn(out_f, in_f, generator=g)
    wp, wa = quantize_nf4_reference(torch.randn(out_f, in_f, generator=g))
    xt = torch.randn(1024, in_f, generator=g)
    cases = [  # name, fn, bytes read + written
        ("act4 pack (silu fwd + codes)", lambda: ops.act4_forward(x, borders, "silu"), n * 4 + n * 4 + n // 2),
        ("act4 unpack (dY * levels[code])", lambda: ops.act4_backward(x, packed, levels), n * 4 + n // 2 + n * 4),
        ("int8 quantize", lambda: ops.quantize_int8(x, 64, None), n * 4 + n + n // 8),
        ("int8 quantize stochastic", lambda: ops.quantize_int8(x, 64, noise), n * 4 + n * 4 + n + n // 8),
        ("int8 dequantize", lambda: ops.dequantize_int8(*q, n, torch.float32), n + n // 8 + n * 4),
        ("sketch gather 4b", lambda: ops.sketch_gather(table, cp, bits, in_f), cp.numel() + out_f * in_f * 4),
        ("sketch scatter-add 4b", lambda: ops.sketch_scatter_add(gw, cp, bits, gpr), out_f * in_f * 4 + cp.numel()),
        ("nf4 x.W^T (1024 tok)", lambda: ops.nf4_matmul(xt, wp, wa, out_f, in_f, 64, False), wp.numel() + xt.numel() * 4),
    ]
    print(f"threads={args.threads} reps={args.reps}  torch {torch.__version__}")
    hdr = f"{'op':<34}{'ref ms':>9}{'cpu ms':>9}{'speedup':>9}{'cpu GB/s':>10}{'copy GB/s':>11}{'% copy':>8}"
    print(hdr)
    print("-" * len(hdr))
    for name, fn, nbytes in cases:
        times = {"reference": [], "cpu": []}
        for _ in range(3):  # interleave
            for b in ("reference", "cpu"):
                with registry.use_backend(b):
                    times[b] += _time(fn, max(1, args.reps // 3))
        src = torch.empty(nbytes // 2, dtype=torch.uint8)
        dst = torch.empty_like(src)
        tcopy = statistics.median(_time(lambda: dst.copy_(src), args.reps))
        tr, tc = statistics.median(times["reference"]), statistics.median(times["cpu"])
        gbs, cgbs = nbytes / tc / 1e9, 2 * (nbytes // 2) / tcopy / 1e9
        print(f"{name:<34}{tr * 1e3:9.2f}{tc * 1e3:9.2f}{tr / tc:8.1f}x{gbs:10.2f}{cgbs:11.2f}{100 * gbs / cgbs:7.0f}%")


if __name__ == "__main__":
    main()
