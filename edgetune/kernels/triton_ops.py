"""The ``triton`` backend: Triton kernels for the element-wise ops, imported only on first use.

Runs CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests them without a GPU).
Same layouts and rounding as the reference: int8 quantization uses round-to-nearest divisions
(``tl.math.div_rn``) and round-half-to-even, so codes are bit-identical.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .reference import ACT_IDS

BLOCK = 1024


@triton.jit
def _act4_fwd_kernel(x_ptr, y_ptr, p_ptr, b_ptr, n, NB: tl.constexpr, OP: tl.constexpr, BLOCK: tl.constexpr):
    pairs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    e0 = 2 * pairs
    e1 = e0 + 1
    m0 = e0 < n
    m1 = e1 < n
    v0 = tl.load(x_ptr + e0, mask=m0, other=0.0).to(tl.float32)
    v1 = tl.load(x_ptr + e1, mask=m1, other=0.0).to(tl.float32)
    c0 = tl.zeros([BLOCK], dtype=tl.int32)
    c1 = tl.zeros([BLOCK], dtype=tl.int32)
    for i in tl.static_range(NB):
        b = tl.load(b_ptr + i)
        c0 += 1 - (b >= v0).to(tl.int32)  # not (b >= v): a NaN counts every border, as torch.bucketize
        c1 += 1 - (b >= v1).to(tl.int32)
    if OP == 0:
        f0 = v0 / (1.0 + tl.exp(-v0))
        f1 = v1 / (1.0 + tl.exp(-v1))
    elif OP == 1:
        f0 = 0.5 * v0 * (1.0 + tl.math.erf(v0 * 0.7071067811865476))
        f1 = 0.5 * v1 * (1.0 + tl.math.erf(v1 * 0.7071067811865476))
    else:
        u0 = 0.7978845608028654 * (v0 + 0.044715 * v0 * v0 * v0)
        u1 = 0.7978845608028654 * (v1 + 0.044715 * v1 * v1 * v1)
        f0 = 0.5 * v0 * (2.0 - 2.0 / (tl.exp(2.0 * u0) + 1.0))
        f1 = 0.5 * v1 * (2.0 - 2.0 / (tl.exp(2.0 * u1) + 1.0))
    ty = y_ptr.dtype.element_ty
    tl.store(y_ptr + e0, f0.to(ty), mask=m0)
    tl.store(y_ptr + e1, f1.to(ty), mask=m1)
    c1 = tl.where(m1, c1, 0)
    tl.store(p_ptr + pairs, (c0 | (c1 << 4)).to(tl.uint8), mask=m0)


@triton.jit
def _act4_bwd_kernel(g_ptr, p_ptr, lv_ptr, o_ptr, n, BLOCK: tl.constexpr):
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = e < n
    byte = tl.load(p_ptr + (e >> 1), mask=m, other=0).to(tl.int32)
    code = tl.where((e & 1) == 1, byte >> 4, byte & 15)
    lv = tl.load(lv_ptr + code, mask=m, other=0.0)
    g = tl.load(g_ptr + e, mask=m, other=0.0).to(tl.float32)
    tl.store(o_ptr + e, (g * lv).to(o_ptr.dtype.element_ty), mask=m)


@triton.jit
def _pack_nib_kernel(c_ptr, o_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    lo = tl.load(c_ptr + 2 * i, mask=2 * i < n, other=0).to(tl.int32)
    hi = tl.load(c_ptr + 2 * i + 1, mask=2 * i + 1 < n, other=0).to(tl.int32)
    tl.store(o_ptr + i, (lo | (hi << 4)).to(tl.uint8), mask=2 * i < n)


@triton.jit
def _unpack_nib_kernel(p_ptr, o_ptr, n, BLOCK: tl.constexpr):
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = e < n
    byte = tl.load(p_ptr + (e >> 1), mask=m, other=0).to(tl.int32)
    tl.store(o_ptr + e, tl.where((e & 1) == 1, byte >> 4, byte & 15).to(tl.uint8), mask=m)


@triton.jit
def _pack_bits_kernel(m_ptr, o_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for j in tl.static_range(8):
        e = 8 * i + j
        v = tl.load(m_ptr + e, mask=e < n, other=0).to(tl.int32)
        acc |= (v != 0).to(tl.int32) << j
    tl.store(o_ptr + i, acc.to(tl.uint8), mask=8 * i < n)


@triton.jit
def _unpack_bits_kernel(p_ptr, o_ptr, n, BLOCK: tl.constexpr):
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = e < n
    byte = tl.load(p_ptr + (e >> 3), mask=m, other=0).to(tl.int32)
    tl.store(o_ptr + e, ((byte >> (e & 7)) & 1).to(tl.int1), mask=m)


@triton.jit
def _quant8_kernel(x_ptr, noise_ptr, c_ptr, lo_ptr, s_ptr, n, group, HAS_NOISE: tl.constexpr, GP2: tl.constexpr):
    g = tl.program_id(0)
    j = tl.arange(0, GP2)
    base = g.to(tl.int64) * group
    inside = j < group
    x = tl.load(x_ptr + base + j, mask=inside & (base + j < n), other=0.0).to(tl.float32)
    lo = tl.min(tl.where(inside, x, float("inf")), axis=0)
    hi = tl.max(tl.where(inside, x, float("-inf")), axis=0)
    s = tl.math.div_rn(hi - lo, 255.0)
    inv = tl.where(s > 0, tl.math.div_rn(1.0, tl.where(s > 0, s, 1.0)), 0.0)
    v = (x - lo) * inv
    if HAS_NOISE:
        r = tl.load(noise_ptr + base + j, mask=inside, other=0.0)
        q = tl.floor(v + r)
    else:  # round half to even
        f = tl.floor(v)
        d = v - f
        odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
        q = tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, tl.where(odd, f + 1.0, f)))
    q = tl.minimum(tl.maximum(q, 0.0), 255.0)
    tl.store(c_ptr + base + j, q.to(tl.uint8), mask=inside)
    tl.store(lo_ptr + g, lo)
    tl.store(s_ptr + g, s)


@triton.jit
def _dequant8_kernel(c_ptr, lo_ptr, s_ptr, o_ptr, n, group, BLOCK: tl.constexpr):
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = e < n
    g = e // group
    c = tl.load(c_ptr + e, mask=m, other=0).to(tl.float32)
    s = tl.load(s_ptr + g, mask=m, other=0.0)
    lo = tl.load(lo_ptr + g, mask=m, other=0.0)
    t = c * s
    tl.store(o_ptr + e, (t + lo).to(o_ptr.dtype.element_ty), mask=m)


def _grid(n: int, block: int = BLOCK):
    return (max(1, triton.cdiv(n, block)),)


def act4_forward(x: torch.Tensor, borders: torch.Tensor, op: str):
    x = x.contiguous()
    b = borders.to(device=x.device, dtype=torch.float32).contiguous()
    n = x.numel()
    y = torch.empty_like(x)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=x.device)
    if n:
        _act4_fwd_kernel[_grid((n + 1) // 2)](x, y, packed, b, n, NB=b.numel(), OP=ACT_IDS[op], BLOCK=BLOCK)
    return y, packed


def act4_backward(grad: torch.Tensor, packed: torch.Tensor, levels: torch.Tensor):
    g = grad.contiguous()
    lv = levels.to(device=g.device, dtype=g.dtype).float().contiguous()
    out = torch.empty_like(g)
    if g.numel():
        _act4_bwd_kernel[_grid(g.numel())](g, packed.contiguous(), lv, out, g.numel(), BLOCK=BLOCK)
    return out


def pack_nibbles(codes: torch.Tensor):
    c = codes.to(torch.uint8).reshape(-1).contiguous()
    out = torch.empty((c.numel() + 1) // 2, dtype=torch.uint8, device=c.device)
    if c.numel():
        _pack_nib_kernel[_grid(out.numel())](c, out, c.numel(), BLOCK=BLOCK)
    return out


def unpack_nibbles(packed: torch.Tensor, numel: int):
    out = torch.empty(numel, dtype=torch.uint8, device=packed.device)
    if numel:
        _unpack_nib_kernel[_grid(numel)](packed.contiguous(), out, numel, BLOCK=BLOCK)
    return out


def pack_bits(mask: torch.Tensor):
    m = mask.to(torch.bool).reshape(-1).contiguous().view(torch.uint8)
    out = torch.empty((m.numel() + 7) // 8, dtype=torch.uint8, device=m.device)
    if m.numel():
        _pack_bits_kernel[_grid(out.numel())](m, out, m.numel(), BLOCK=BLOCK)
    return out


def unpack_bits(packed: torch.Tensor, numel: int):
    out = torch.empty(numel, dtype=torch.bool, device=packed.device)
    if numel:
        _unpack_bits_kernel[_grid(numel)](packed.contiguous(), out, numel, BLOCK=BLOCK)
    return out


def quantize_int8(x: torch.Tensor, group: int, noise: Optional[torch.Tensor]):
    xf = x.reshape(-1).contiguous()
    if xf.dtype == torch.float64:
        xf = xf.float()
    n = xf.numel()
    g = -(-n // group)
    codes = torch.empty(g, group, dtype=torch.uint8, device=x.device)
    lo = torch.empty(g, 1, dtype=torch.float32, device=x.device)
    scale = torch.empty(g, 1, dtype=torch.float32, device=x.device)
    nz = noise.to(torch.float32).reshape(-1).contiguous() if noise is not None else lo
    if g:
        _quant8_kernel[(g,)](xf, nz, codes, lo, scale, n, group, HAS_NOISE=noise is not None,
                             GP2=triton.next_power_of_2(group))
    return codes, lo, scale


def dequantize_int8(codes, lo, scale, numel: int, dtype: torch.dtype):
    work = torch.float32 if dtype == torch.float64 else dtype
    out = torch.empty(numel, dtype=work, device=codes.device)
    if numel:
        _dequant8_kernel[_grid(numel)](codes.contiguous(), lo.float().contiguous(), scale.float().contiguous(), out,
                                       numel, codes.shape[1], BLOCK=BLOCK)
    return out.to(dtype)


@triton.jit
def _sketch_gather_kernel(t_ptr, c_ptr, w_ptr, in_f, nbytes, gpr, BITS: tl.constexpr, BLOCK: tl.constexpr):
    """One row r, BLOCK columns: W[r, c] = table[r, c·gpr // in, code(r, c)], codes LSB-first per row."""
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = c < in_f
    p = c * BITS
    byte = p >> 3
    row = c_ptr + r * nbytes
    v = tl.load(row + byte, mask=m, other=0).to(tl.int32)
    v1 = tl.load(row + byte + 1, mask=m & (byte + 1 < nbytes), other=0).to(tl.int32)
    code = ((v | (v1 << 8)) >> (p & 7).to(tl.int32)) & ((1 << BITS) - 1)
    g = (c * gpr) // in_f
    val = tl.load(t_ptr + (r * gpr + g) * (1 << BITS) + code, mask=m, other=0.0)
    tl.store(w_ptr + r * in_f + c, val, mask=m)


def sketch_gather(table: torch.Tensor, codes: torch.Tensor, bits: int, in_features: int):
    t = table.contiguous()
    out_f, gpr, k = t.shape
    if k != 1 << bits or codes.shape != (out_f, (in_features * bits + 7) // 8):
        raise ValueError(f"sketch_gather: table {tuple(t.shape)} / codes {tuple(codes.shape)} do not match "
                         f"{bits}-bit codes for {in_features} columns")
    w = torch.empty(out_f, in_features, dtype=t.dtype, device=t.device)
    if w.numel():
        grid = (out_f, triton.cdiv(in_features, BLOCK))
        _sketch_gather_kernel[grid](t, codes.contiguous(), w, in_features, codes.shape[1], gpr, BITS=bits, BLOCK=BLOCK)
    return w
