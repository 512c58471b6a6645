"""CPU backend vs reference for the update-path ops at LLM sizes; GB/s against a memcpy.

    OMP_NUM_THREADS=1 python benchmarks/kernels.py [--threads 1] [--reps 15] [--only nf4]

Activations 4 x 256 x 1536 (act4 pack/unpack, int8 quantize/dequantize), weights 576 x 1536
(sketch gather / scatter-add at 4 bits, 4 groups per row); NF4 x·Wᵀ and dY·W for 1024 tokens on
the default model's four weight shapes (out x in: 576x1536, 1536x576, 576x576, 192x576), against
dequantize-the-whole-weight + one mm; the fused LoRA add (r = 16) on 1024 tokens, 576 -> 1536,
against the plain formula. Backends are
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
    ap.add_argument("--only", default="", help="run only the ops whose name contains this text")
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
    nf4 = []
    for of, inf in ((576, 1536), (1536, 576), (576, 576), (192, 576)):
        wp, wa = quantize_nf4_reference(torch.randn(of, inf, generator=g))
        xt, dyt = torch.randn(1024, inf, generator=g), torch.randn(1024, of, generator=g)
        nf4 += [(f"nf4 x.W^T {of}x{inf} (1024 tok)",
                 (lambda xt=xt, wp=wp, wa=wa, of=of, inf=inf: ops.nf4_matmul(xt, wp, wa, of, inf, 64, False)),
                 wp.numel() + wa.numel() * 4 + xt.numel() * 4 + 1024 * of * 4),
                (f"nf4 dY.W  {of}x{inf} (1024 tok)",
                 (lambda dyt=dyt, wp=wp, wa=wa, of=of, inf=inf: ops.nf4_matmul(dyt, wp, wa, of, inf, 64, True)),
                 wp.numel() + wa.numel() * 4 + dyt.numel() * 4 + 1024 * inf * 4)]
    lx, la, lb = torch.randn(4, 256, 576, generator=g), torch.randn(16, 576, generator=g), torch.randn(1536, 16, generator=g)
    ly = torch.randn(4, 256, 1536, generator=g)
    ldy = torch.randn(4, 256, 1536, generator=g)
    lgx = torch.randn(4, 256, 576, generator=g)
    lh = (lx.reshape(-1, 576) @ la.t())
    cases = [  # name, fn, bytes read + written
        ("act4 pack (silu fwd + codes)", lambda: ops.act4_forward(x, borders, "silu"), n * 4 + n * 4 + n // 2),
        ("act4 unpack (dY * levels[code])", lambda: ops.act4_backward(x, packed, levels), n * 4 + n // 2 + n * 4),
        ("int8 quantize", lambda: ops.quantize_int8(x, 64, None), n * 4 + n + n // 8),
        ("int8 quantize stochastic", lambda: ops.quantize_int8(x, 64, noise), n * 4 + n * 4 + n + n // 8),
        ("int8 dequantize", lambda: ops.dequantize_int8(*q, n, torch.float32), n + n // 8 + n * 4),
        ("sketch gather 4b", lambda: ops.sketch_gather(table, cp, bits, in_f), cp.numel() + out_f * in_f * 4),
        ("sketch scatter-add 4b", lambda: ops.sketch_scatter_add(gw, cp, bits, gpr), out_f * in_f * 4 + cp.numel()),
        *nf4,
        ("lora_add_ 576->1536 r16 (1024 tok)", lambda: ops.lora_add_(ly, lx, la, lb, 0.5),
         ly.numel() * 8 + lx.numel() * 4),
        ("lora_backward (+grad_x) r16", lambda: ops.lora_backward(ldy, lx, lh, la, lb, 0.5, lgx),
         ldy.numel() * 4 + lx.numel() * 4 + lgx.numel() * 8),
        ("silu_mul (SwiGLU fwd)", lambda: ops.silu_mul(x, ly.view_as(x)), n * 12),
        ("silu_mul_backward", lambda: ops.silu_mul_backward(ldy.view_as(x), x, ly.view_as(x)), n * 20),
    ]
    print(f"threads={args.threads} reps={args.reps}  torch {torch.__version__}")
    hdr = f"{'op':<34}{'ref ms':>9}{'cpu ms':>9}{'speedup':>9}{'cpu GB/s':>10}{'copy GB/s':>11}{'% copy':>8}"
    print(hdr)
    print("-" * len(hdr))
    for name, fn, nbytes in cases:
        if args.only not in name:
            continue
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
