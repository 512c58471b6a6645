#!/usr/bin/env bash
# GPU check for edgetune's kernels (<= 8 min on one GPU): build the CUDA extension, run the CUDA
# and Triton parity tests, time each op against the reference and the device's copy bandwidth.
#   bash benchmarks/gpu_check.sh            (from the repo root, in the venv, with a CUDA torch)
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device / CPU torch')"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$(python -c 'import torch;m,n=torch.cuda.get_device_capability();print(f"{m}.{n}")')}"
echo "== build (arch ${TORCH_CUDA_ARCH_LIST})"
EDGETUNE_BUILD_STRICT=1 MAX_JOBS="${MAX_JOBS:-8}" timeout 300 python setup.py build_ext --inplace 2>&1 | tail -3
edgetune doctor
echo "== parity + opcheck (cuda, triton, reference on the GPU)"
timeout 180 python -m pytest -q tests/kernels -x
echo "== timings"
timeout 120 python - <<'PY'
import torch, statistics
from edgetune.kernels import ops, registry, reference as R
from edgetune.quant.bitpack import pack_codes
from edgetune.quant.nf4 import quantize_nf4_reference
d = "cuda"
def t(fn, reps=20):
    fn(); torch.cuda.synchronize(); out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize(); out.append(a.elapsed_time(b) / 1e3)
    return statistics.median(out)
x = torch.randn(4, 256, 1536, device=d); n = x.numel()
bo = torch.sort(torch.randn(15, device=d)).values; lv = torch.randn(16, device=d)
_, pk = R.act4_forward(x, bo, "silu"); q = R.quantize_int8(x, 64, None)
cp = pack_codes(torch.randint(0, 16, (576, 1536)), 4).to(d); tab = torch.randn(576, 4, 16, device=d); gw = torch.randn(576, 1536, device=d)
wp, wa = [t_.to(d) for t_ in quantize_nf4_reference(torch.randn(576, 1536))]; xt = torch.randn(1024, 1536, device=d)
cases = [("act4 pack", lambda: ops.act4_forward(x, bo, "silu"), 8.5 * n), ("act4 unpack", lambda: ops.act4_backward(x, pk, lv), 8.5 * n),
         ("int8 quantize", lambda: ops.quantize_int8(x, 64, None), 5.125 * n), ("int8 dequantize", lambda: ops.dequantize_int8(*q, n, torch.float32), 5.125 * n),
         ("sketch gather", lambda: ops.sketch_gather(tab, cp, 4, 1536), 4.5 * 576 * 1536), ("sketch scatter-add", lambda: ops.sketch_scatter_add(gw, cp, 4, 4), 4.5 * 576 * 1536),
         ("nf4 x.W^T", lambda: ops.nf4_matmul(xt, wp, wa, 576, 1536, 64, False), wp.numel() + xt.numel() * 4)]
la, lb, ly = torch.randn(16, 1536, device=d), torch.randn(576, 16, device=d), torch.randn(1024, 576, device=d)
cases += [("lora_add_", lambda: ops.lora_add_(ly, xt, la, lb, 2.0), 2 * ly.numel() * 4 + xt.numel() * 4)]
print(f"{'op':<20}" + "".join(f"{b + ' ms':>14}" for b in ("reference", "cuda", "triton")) + f"{'best GB/s':>11}{'copy GB/s':>11}")
for name, fn, nbytes in cases:
    row, best = [], None
    for b in ("reference", "cuda", "triton"):
        try:
            with registry.use_backend(b):
                s = t(fn); row.append(f"{s * 1e3:14.3f}"); best = s if b != "reference" and (best is None or s < best) else best
        except Exception as e:
            row.append(f"{'n/a':>14}")
    src = torch.empty(int(nbytes) // 2, dtype=torch.uint8, device=d); dst = torch.empty_like(src)
    c = t(lambda: dst.copy_(src))
    print(f"{name:<20}" + "".join(row) + f"{(nbytes / best / 1e9 if best else 0):11.1f}{(2 * src.numel() / c / 1e9):11.1f}")
PY
