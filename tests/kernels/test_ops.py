"""Every op on every backend available here: opcheck, and parity with the reference.

Parity is bit-exact for packing, quantization codes and gathers; float outputs use
dtype-aware tolerances. Inputs are fresh random tensors of awkward sizes (not multiples of any
block size) and the allocator is poisoned before each run, so a kernel that leaves part of its
output unwritten fails.
"""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from edgetune.kernels import ops, reference as R, registry
from edgetune.quant.bitpack import pack_codes
from edgetune.quant.nf4 import quantize_nf4_reference


def _backends():
    out = ["reference"]
    if registry.status("cpu")[0]:
        out.append("cpu")
    if importlib.util.find_spec("triton") is not None and os.environ.get("TRITON_INTERPRET") == "1":
        out.append("triton")
    if torch.cuda.is_available():
        out += [b for b in ("cuda", "triton") if registry.status(b)[0] and b not in out]
    return out


BACKENDS = _backends()
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: (2e-6, 2e-6), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2),
       torch.float64: (1e-12, 1e-12)}


def _device(backend):
    return "cuda" if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()) else "cpu"


def _skip_missing(backend, op):
    if backend not in ops.IMPLS[op]:
        pytest.skip(f"{backend} has no {op}")


def _poison(*nbytes, device="cpu"):
    """Allocate, fill with 0xFF and free blocks of the output sizes, so fresh outputs start as garbage."""
    keep = [torch.full((max(n, 1),), 255, dtype=torch.uint8, device=device) for n in nbytes for _ in range(2)]
    del keep


def _run(backend, fn, *args, poison=()):
    _poison(*poison, device=_device(backend))
    with registry.use_backend(backend):
        out = fn(*args)
    assert registry.last_backend[fn._name.split("::")[-1]] == backend
    return out


def _equal_or_ulp(backend, a, b, dtype):
    """Bit-exact, except bfloat16 from the Triton *interpreter*, whose numpy fp32->bf16 cast truncates
    (compiled Triton rounds to nearest even, as torch does): there, one bf16 ulp."""
    if backend == "triton" and dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        torch.testing.assert_close(a, b, rtol=2 ** -7, atol=1e-30)
    else:
        assert torch.equal(a, b)


def _close(a, b, dtype):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))


def _rand(gen, *shape, dtype=torch.float32, scale=3.0):
    return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(DEVICE)


def _table(gen):
    borders = torch.sort(torch.randn(15, generator=gen) * 2).values
    return borders.to(DEVICE), torch.randn(16, generator=gen).to(DEVICE)


# ----------------------------------------------------------------------------- parity


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op", ["silu", "gelu", "gelu_tanh"])
def test_act4_forward_backward(backend, dtype, op, gen):
    shape = (3, 7, 67)  # odd element count: the last nibble is padding
    x = _rand(gen, *shape, dtype=dtype)
    borders, levels = _table(gen)
    y, packed = _run(backend, ops.act4_forward, x, borders, op, poison=(x.numel() * x.element_size(), x.numel() // 2 + 1))
    y_ref, packed_ref = R.act4_forward(x, borders, op)
    assert packed.shape == packed_ref.shape and torch.equal(packed, packed_ref)
    _close(y, y_ref, dtype)
    g = _rand(gen, *shape, dtype=dtype, scale=1.0)
    dx = _run(backend, ops.act4_backward, g, packed_ref, levels, poison=(g.numel() * g.element_size(),))
    assert dx.dtype == dtype
    _equal_or_ulp(backend, dx, R.act4_backward(g, packed_ref, levels), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1, 2, 1001, 4099])
def test_nibbles_and_bits(backend, n, gen):
    codes = torch.randint(0, 16, (n,), generator=gen, dtype=torch.uint8).to(DEVICE)
    packed = _run(backend, ops.pack_nibbles, codes, poison=(n,))
    assert torch.equal(packed, R.pack_nibbles(codes))
    assert torch.equal(_run(backend, ops.unpack_nibbles, packed, n, poison=(n,)), codes)
    mask = (torch.rand(n, generator=gen) > 0.5).to(DEVICE)
    bits = _run(backend, ops.pack_bits, mask, poison=(n,))
    assert torch.equal(bits, R.pack_bits(mask))
    assert torch.equal(_run(backend, ops.unpack_bits, bits, n, poison=(n,)), mask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("group", [64, 37])
def test_int8_groups(backend, dtype, group, gen):
    n = 3 * 331  # not a multiple of the group: the tail group is zero-padded
    x = _rand(gen, n, dtype=dtype) + 1.5
    x[5] = x[6]  # ties and a constant group
    x[:group] = 0.25
    G = -(-n // group)
    out = _run(backend, ops.quantize_int8, x, group, None, poison=(G * group, G * 4, G * 4))
    for a, b in zip(out, R.quantize_int8(x, group, None)):
        assert a.shape == b.shape and torch.equal(a, b)
    noise = torch.rand(G, group, generator=gen).to(DEVICE)
    sto = _run(backend, ops.quantize_int8, x, group, noise)
    for a, b in zip(sto, R.quantize_int8(x, group, noise)):
        assert torch.equal(a, b)
    codes, lo, scale = out
    deq = _run(backend, ops.dequantize_int8, codes, lo, scale, n, dtype, poison=(n * 8,))
    assert deq.dtype == dtype
    _equal_or_ulp(backend, deq, R.dequantize_int8(codes, lo, scale, n, dtype), dtype)
    # the quantization error is at most half a step (nearest) or one step (stochastic)
    step = scale.repeat_interleave(group).reshape(-1)[:n]
    err = (deq.double() - x.double()).abs()
    assert bool((err <= step.double() * 0.5 + TOL[dtype][1] * x.double().abs().max() + 1e-6).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_matmul(backend, dtype, gen):
    _skip_missing(backend, "nf4_matmul")
    out_f, in_f = 45, 70  # 3150 weights: the last NF4 block of 64 is short
    w = torch.randn(out_f, in_f, generator=gen)
    packed, absmax = quantize_nf4_reference(w, 64)
    packed, absmax = packed.to(DEVICE), absmax.to(DEVICE)
    x = _rand(gen, 2, 5, in_f, dtype=dtype, scale=1.0)
    dy = _rand(gen, 2, 5, out_f, dtype=dtype, scale=1.0)
    y = _run(backend, ops.nf4_matmul, x, packed, absmax, out_f, in_f, 64, False, poison=(x.numel() * 4,))
    gx = _run(backend, ops.nf4_matmul, dy, packed, absmax, out_f, in_f, 64, True)
    rtol, atol = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 5e-2)}[dtype]
    torch.testing.assert_close(y, R.nf4_matmul(x, packed, absmax, out_f, in_f, 64, False), rtol=rtol, atol=atol)
    torch.testing.assert_close(gx, R.nf4_matmul(dy, packed, absmax, out_f, in_f, 64, True), rtol=rtol, atol=atol)
    assert y.shape == (2, 5, out_f) and gx.shape == (2, 5, in_f)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_sketch_gather_scatter(backend, bits, gen):
    _skip_missing(backend, "sketch_gather")
    out_f, in_f, gpr = 13, 71, 3  # groups of unequal size, 3-bit codes straddle bytes
    codes = torch.randint(0, 1 << bits, (out_f, in_f), generator=gen)
    cp = pack_codes(codes, bits).to(DEVICE)
    table = _rand(gen, out_f, gpr, 1 << bits, scale=1.0)
    w = _run(backend, ops.sketch_gather, table, cp, bits, in_f, poison=(out_f * in_f * 4,))
    assert torch.equal(w, R.sketch_gather(table, cp, bits, in_f))
    if backend not in ops.IMPLS["sketch_scatter_add"]:
        return  # triton: the gather only
    gw = _rand(gen, out_f, in_f, scale=1.0)
    gt = _run(backend, ops.sketch_scatter_add, gw, cp, bits, gpr)
    torch.testing.assert_close(gt, R.sketch_scatter_add(gw, cp, bits, gpr), rtol=1e-5, atol=1e-5)
    dy, x = _rand(gen, 2, 9, out_f, scale=1.0), _rand(gen, 2, 9, in_f, scale=1.0)
    gt2 = _run(backend, ops.sketch_grad_table, dy, x, cp, bits, gpr)
    torch.testing.assert_close(gt2, R.sketch_grad_table(dy, x, cp, bits, gpr), rtol=1e-5, atol=1e-5)
    # the oracle itself: each bucket is the sum of the grad_W entries with that group and code
    g = torch.arange(in_f) * gpr // in_f
    r, k = 4, int(codes[4, 10])
    sel = (g == g[10]) & (codes[4] == k)
    assert torch.allclose(gt[r, g[10], k].cpu(), gw[r].cpu()[sel].sum(), atol=1e-5)


# ----------------------------------------------------------------------------- opcheck


def _opcheck_cases(gen):
    x = _rand(gen, 5, 13, scale=2.0)
    borders, levels = _table(gen)
    w = torch.randn(9, 70, generator=gen)
    packed, absmax = quantize_nf4_reference(w, 64)
    packed, absmax = packed.to(DEVICE), absmax.to(DEVICE)
    cp = pack_codes(torch.randint(0, 8, (6, 11), generator=gen), 3).to(DEVICE)
    return {
        "act4_forward": (x, borders, "silu"),
        "act4_backward": (x, R.act4_forward(x, borders, "silu")[1], levels),
        "pack_nibbles": (torch.randint(0, 16, (65,), generator=gen, dtype=torch.uint8).to(DEVICE),),
        "unpack_nibbles": (torch.randint(0, 256, (33,), generator=gen, dtype=torch.uint8).to(DEVICE), 65),
        "pack_bits": ((x > 0),),
        "unpack_bits": (torch.randint(0, 256, (9,), generator=gen, dtype=torch.uint8).to(DEVICE), 65),
        "quantize_int8": (x, 64, torch.rand(2, 64, generator=gen).to(DEVICE)),
        "dequantize_int8": (*R.quantize_int8(x, 64, None), 65, torch.float32),
        "nf4_matmul": (_rand(gen, 3, 70), packed, absmax, 9, 70, 64, False),
        "sketch_gather": (_rand(gen, 6, 2, 8), cp, 3, 11),
        "sketch_scatter_add": (_rand(gen, 6, 11), cp, 3, 2),
        "sketch_grad_table": (_rand(gen, 4, 6), _rand(gen, 4, 11), cp, 3, 2),
        "lora_add_": (_rand(gen, 2, 3, 6), _rand(gen, 2, 3, 11), _rand(gen, 4, 11), _rand(gen, 6, 4), 0.5),
        "lora_backward": (_rand(gen, 6, 6), _rand(gen, 6, 11), _rand(gen, 6, 4), _rand(gen, 4, 11), _rand(gen, 6, 4),
                          0.5, _rand(gen, 6, 11)),
        "silu_mul": (_rand(gen, 3, 13), _rand(gen, 3, 13)),
        "silu_mul_backward": (_rand(gen, 3, 13), _rand(gen, 3, 13), _rand(gen, 3, 13)),
    }


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(ops.ALL_OPS))
def test_opcheck(backend, name, gen):
    _skip_missing(backend, name)
    args = _opcheck_cases(gen)[name]
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    with registry.use_backend(backend):
        torch.library.opcheck(ops.ALL_OPS[name], args, test_utils=tests)
    assert registry.last_backend[name] == backend


# ------------------------------------------------------------- vector paths and edge values


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("nb", [15, 7])
def test_act4_codes_edge_values(backend, nb, gen):
    """Values equal to a border, ±inf, ±0 and NaN get torch.bucketize's codes; fewer than 15 borders."""
    borders = torch.sort(torch.randn(nb, generator=gen) * 2).values
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0])
    x = torch.cat([borders, special, torch.randn(1000 - nb, generator=gen) * 3])  # 1005 values, odd
    x = x[torch.randperm(x.numel(), generator=gen)].to(DEVICE)
    _, packed = _run(backend, ops.act4_forward, x, borders.to(DEVICE), "silu", poison=(x.numel(),))
    assert torch.equal(packed, R.act4_forward(x, borders.to(DEVICE), "silu")[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group", [32, 128])
def test_int8_llm_size(backend, group, gen):
    """A (2, 37, 1536) float32 activation: the full-group vector path, nearest and stochastic."""
    x = _rand(gen, 2, 37, 1536, scale=1.0) * torch.linspace(0.01, 10, 1536).to(DEVICE)
    G = -(-x.numel() // group)
    noise = torch.rand(G, group, generator=gen).to(DEVICE)
    for nz in (None, noise):
        got = _run(backend, ops.quantize_int8, x, group, nz, poison=(G * group, G * 4, G * 4))
        for a, b in zip(got, R.quantize_int8(x, group, nz)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nf4_matmul_multi_tile_odd_rows(backend, dtype, gen):
    """Several row and column tiles; in_features odd, so rows start mid-byte and mid-block."""
    _skip_missing(backend, "nf4_matmul")
    out_f, in_f = 131, 4101
    w = torch.randn(out_f, in_f, generator=gen)
    packed, absmax = quantize_nf4_reference(w, 64)
    packed, absmax = packed.to(DEVICE), absmax.to(DEVICE)
    x = _rand(gen, 9, in_f, dtype=dtype, scale=1.0)
    dy = _rand(gen, 9, out_f, dtype=dtype, scale=1.0)
    rtol, atol = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (2e-2, 1e-1)}[dtype]
    y = _run(backend, ops.nf4_matmul, x, packed, absmax, out_f, in_f, 64, False, poison=(9 * out_f * 4,))
    torch.testing.assert_close(y, R.nf4_matmul(x, packed, absmax, out_f, in_f, 64, False), rtol=rtol, atol=atol)
    gx = _run(backend, ops.nf4_matmul, dy, packed, absmax, out_f, in_f, 64, True, poison=(9 * in_f * 4,))
    torch.testing.assert_close(gx, R.nf4_matmul(dy, packed, absmax, out_f, in_f, 64, True), rtol=rtol, atol=atol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_add_and_backward(backend, dtype, gen):
    """y += s·(xAᵀ)Bᵀ in y's own buffer; dA, dB and grad_x agree with autograd of the formula."""
    _skip_missing(backend, "lora_add_")
    n_in, n_out, r, s = 37, 29, 5, 0.75
    x = _rand(gen, 3, 7, n_in, dtype=dtype, scale=1.0)
    A = _rand(gen, r, n_in, scale=0.3)
    B = _rand(gen, n_out, r, scale=0.3)
    base = _rand(gen, 3, 7, n_out, dtype=dtype, scale=1.0)
    y = base.clone()
    ptr = y.data_ptr()
    h = _run(backend, ops.lora_add_, y, x, A, B, s)
    assert y.data_ptr() == ptr and h.shape == (21, r) and h.dtype == torch.float32
    xa, Aa, Ba = x.float().requires_grad_(), A.clone().requires_grad_(), B.clone().requires_grad_()
    want = base.float() + s * (xa @ Aa.t()) @ Ba.t()
    rtol, atol = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 3e-2)}[dtype]
    torch.testing.assert_close(y.float(), want.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(h, (x.float() @ A.t()).reshape(21, r), rtol=rtol, atol=atol)
    dy = _rand(gen, 3, 7, n_out, dtype=dtype, scale=1.0)
    want.backward(dy.float())
    gx = _rand(gen, 3, 7, n_in, dtype=dtype, scale=1.0)
    gx0 = gx.clone()
    dA, dB = _run(backend, ops.lora_backward, dy, x, h, A, B, s, gx)
    torch.testing.assert_close(dA, Aa.grad, rtol=rtol, atol=atol * 4)
    torch.testing.assert_close(dB, Ba.grad, rtol=rtol, atol=atol * 4)
    torch.testing.assert_close(gx.float(), gx0.float() + xa.grad, rtol=rtol, atol=atol * 4)
    dA2, dB2 = _run(backend, ops.lora_backward, dy, x, h, A, B, s, None)  # no grad_x: dA, dB only
    assert torch.equal(dA2, dA) and torch.equal(dB2, dB)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bits", [3, 4])
def test_sketch_gather_wide_rows(backend, bits, gen):
    """Rows wider than one kernel block (1024 columns), 5 unequal groups."""
    _skip_missing(backend, "sketch_gather")
    out_f, in_f, gpr = 6, 2501, 5
    cp = pack_codes(torch.randint(0, 1 << bits, (out_f, in_f), generator=gen), bits).to(DEVICE)
    table = _rand(gen, out_f, gpr, 1 << bits, scale=1.0)
    w = _run(backend, ops.sketch_gather, table, cp, bits, in_f, poison=(out_f * in_f * 4,))
    assert torch.equal(w, R.sketch_gather(table, cp, bits, in_f))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 7, 8, 4099])  # the scalar tail alone, one vector, both, many grains
def test_silu_mul_and_backward(backend, dtype, n, gen):
    """silu(g)·u and (dY·u·silu′(g), dY·silu(g)) against aten's silu / silu_backward, over the whole
    range the clamped exp sees (|g| up to 120), with NaN propagated and outputs poisoned first."""
    _skip_missing(backend, "silu_mul")
    g = _rand(gen, n, dtype=dtype, scale=4.0)
    g[: n // 3] *= 30.0  # |g| to ~120: the exp clamps at 88
    if n > 4:
        g[3] = float("nan")
    u, dy = _rand(gen, n, dtype=dtype), _rand(gen, n, dtype=dtype)
    h = _run(backend, ops.silu_mul, g, u, poison=(4 * n,))
    dg, du = _run(backend, ops.silu_mul_backward, dy, g, u, poison=(4 * n, 4 * n))
    want_h, (want_dg, want_du) = R.silu_mul(g, u), R.silu_mul_backward(dy, g, u)
    rtol, atol = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (1.6e-2, 1e-2)}[dtype]
    for got, want in ((h, want_h), (dg, want_dg), (du, want_du)):
        assert got.dtype == dtype and got.shape == g.shape
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol, equal_nan=True)
