"""Autograd Functions that save only compressed activations for backward.

Each Function computes its forward exactly and hands ``ctx.save_for_backward`` nothing but
compressed tensors (4-bit codes, 1-bit masks, 8-bit groups) plus tiny per-row statistics, so
``torch.autograd.graph.saved_tensors_hooks`` sees exactly what is kept. Shapes and Python
constants go on ctx; no full-precision tensor does.

The compression formats live in :mod:`edgetune.quant.actpack`; the derivative tables in
:mod:`edgetune.s2a.tables`.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from edgetune.quant.actpack import (Int8Groups, dequantize_int8_groups, pack_bits, pack_nibbles,
                                    quantize_int8_groups, unpack_bits, unpack_nibbles)

from .tables import BACKWARDS, FORWARDS, table_for


@dataclass(frozen=True)
class Compression:
    """How saved activations are stored: ``act_bits`` 8 or 4 (16 means "not rewritten").

    ``gate_code4``: in a gated unit f(g)·u, keep a 4-bit derivative code of g plus 8-bit f(g)
    instead of 8-bit g (see :class:`LeanGatedProduct` for why that is off by default).
    """

    act_bits: int = 4
    group: int = 64
    stochastic: bool = False
    gate_code4: bool = False


# --------------------------------------------------------------------------- int8 save helpers
# One input often feeds several ops (q/k/v share the normalised hidden state; gate/up share
# theirs; o_proj reads a view of the attention output). Quantizing it once and saving the same
# codes from every consumer keeps one copy, as autograd itself does for a shared fp tensor. A
# contiguous tensor is keyed by its storage, offset and size, so views of it hit the same entry;
# the entry checks the version counter (shared by views) and drops itself when its tensor is freed.
_INT8_CACHE: dict[tuple, tuple] = {}
_LAST_SHARED: list = []  # [key, codes, dequantized]: see load_int8_shared


def _drop(key: tuple) -> None:
    _INT8_CACHE.pop(key, None)


def _cache_key(x: torch.Tensor) -> tuple:
    if x.is_contiguous():
        return ("storage", x.untyped_storage().data_ptr(), x.storage_offset(), x.numel(), x.dtype)
    return ("object", id(x))


def int8_shared(x: torch.Tensor, comp: Compression) -> Int8Groups:
    _LAST_SHARED.clear()  # a forward again: the last backward's dequantized input is of no more use
    key = _cache_key(x)
    hit = _INT8_CACHE.get(key)
    if hit is not None:
        ref, version, group, stochastic, q = hit
        if ref() is not None and version == x._version and group == comp.group and stochastic == comp.stochastic:
            return q if q.shape == x.shape else Int8Groups(q.codes, q.lo, q.scale, x.shape, q.dtype)
    q = quantize_int8_groups(x, comp.group, comp.stochastic)
    _INT8_CACHE[key] = (weakref.ref(x), x._version, comp.group, comp.stochastic, q)
    weakref.finalize(x, _drop, key)
    return q


def _save_int8(q: Int8Groups) -> tuple[torch.Tensor, ...]:
    return q.codes, q.lo, q.scale


def _load_int8(codes, lo, scale, shape, dtype) -> torch.Tensor:
    return dequantize_int8_groups(Int8Groups(codes, lo, scale, shape, dtype))


# The backward of q, k and v (gate and up; o_proj and the attention) dequantize the same shared
# codes one right after another: the last dequantized shared input is kept for the next reader.
# The entry holds its codes, so their storage can't be freed and reused under the same address;
# it is replaced by the next shared input and dropped by the next forward (:func:`int8_shared`).


def load_int8_shared(codes, lo, scale, shape, dtype) -> torch.Tensor:
    """:func:`_load_int8` of codes saved by several consumers (:func:`int8_shared`). Read-only result."""
    key = (codes.data_ptr(), codes._version, math.prod(shape), dtype)  # readers may see other shapes (views)
    if _LAST_SHARED and _LAST_SHARED[0] == key:
        return _LAST_SHARED[2].view(shape)
    x = _load_int8(codes, lo, scale, shape, dtype)
    _LAST_SHARED[:] = [key, codes, x]
    return x


def _sum_to(grad: torch.Tensor, features: int) -> torch.Tensor:
    return grad.reshape(-1, features).sum(0)


def _acc(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype: float32, or float64 for float64 inputs (gradcheck)."""
    return torch.promote_types(dtype, torch.float32)


# --------------------------------------------------------------------------- pointwise nonlinearities


class Act4Pointwise(torch.autograd.Function):
    """y = f(x) saving a 4-bit derivative code of x; backward = levels[code] · dY."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, op: str):
        table = table_for(op, 4)
        ctx.save_for_backward(pack_nibbles(table.encode(x)))
        ctx.op, ctx.shape, ctx.numel = op, x.shape, x.numel()
        return FORWARDS[op](x)

    @staticmethod
    def backward(ctx, grad):
        (packed,) = ctx.saved_tensors
        codes = unpack_nibbles(packed, ctx.numel).view(ctx.shape)
        return grad * table_for(ctx.op, 4).derivative(codes, grad.dtype), None


class Int8Pointwise(torch.autograd.Function):
    """y = f(x) saving x in 8-bit groups; backward = f′(x̂) · dY with the exact derivative."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, op: str, comp: Compression):
        ctx.save_for_backward(*_save_int8(int8_shared(x, comp)))
        ctx.op, ctx.shape, ctx.dtype = op, x.shape, x.dtype
        return FORWARDS[op](x)

    @staticmethod
    def backward(ctx, grad):
        x = _load_int8(*ctx.saved_tensors, ctx.shape, _acc(grad.dtype))
        return BACKWARDS[ctx.op](grad.to(x.dtype), x).to(grad.dtype), None, None


class Relu1Bit(torch.autograd.Function):
    """y = max(x, 0) saving one bit per element: ReLU's derivative is exactly the mask."""

    @staticmethod
    def forward(ctx, x: torch.Tensor):
        mask = x > 0
        ctx.save_for_backward(pack_bits(mask))
        ctx.shape, ctx.numel = x.shape, x.numel()
        return x * mask

    @staticmethod
    def backward(ctx, grad):
        (packed,) = ctx.saved_tensors
        return grad * unpack_bits(packed, ctx.numel).view(ctx.shape).to(grad.dtype)


def lean_pointwise(x: torch.Tensor, op: str, comp: Compression) -> torch.Tensor:
    if op == "relu":
        return Relu1Bit.apply(x)
    if comp.act_bits == 4:
        return Act4Pointwise.apply(x, op)
    return Int8Pointwise.apply(x, op, comp)


# --------------------------------------------------------------------------- gated unit (SwiGLU)


class LeanGatedProduct(torch.autograd.Function):
    """h = f(g) · u, the gated unit of SwiGLU-style MLPs.

    Backward needs f′(g)·u for dg and, unlike a lone nonlinearity, f(g) itself for du. So a 4-bit
    derivative code of g is not enough here: it needs an 8-bit f(g) beside it. Two layouts:

    * default: g and u in 8 bits, f(ĝ) and f′(ĝ) recomputed exactly — 2 B per element;
    * ``gate_code4``: 4-bit code of g, 8-bit u and f(g) — 2.5 B per element.

    Against 12 B for fp32 g, f(g), u. On the default model the default layout is both smaller
    and more accurate (LoRA-gradient cosine 1.000 against 0.985 for the code, batch 1 × 64;
    ``benchmarks/s2a_memory.py``), so the 4-bit code is used for lone nonlinearities (GELU in
    GPT-2/ViT, where f′ is all backward needs) and is an option here.
    """

    @staticmethod
    def forward(ctx, g: torch.Tensor, u: torch.Tensor, op: str, comp: Compression):
        qu = int8_shared(u, comp)
        ctx.op, ctx.comp, ctx.shape, ctx.numel = op, comp, g.shape, g.numel()
        if comp.gate_code4:
            act = FORWARDS[op](g)
            codes = pack_nibbles(table_for(op, 4).encode(g))
            ctx.save_for_backward(codes, *_save_int8(qu), *_save_int8(quantize_int8_groups(act, comp.group, comp.stochastic)))
            return act * u
        ctx.save_for_backward(*_save_int8(int8_shared(g, comp)), *_save_int8(qu))
        return gated(g, u, op)

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        shape, dtype = ctx.shape, grad.dtype
        if ctx.comp.gate_code4:
            codes = unpack_nibbles(saved[0], ctx.numel).view(shape)
            u = _load_int8(*saved[1:4], shape, dtype)
            act = _load_int8(*saved[4:7], shape, dtype)
            dact = table_for(ctx.op, 4).derivative(codes, dtype)
            return grad * u * dact, grad * act, None, None
        g = _load_int8(*saved[0:3], shape, _acc(dtype))  # (..., F)
        u = _load_int8(*saved[3:6], shape, g.dtype)  # fresh: the products below may reuse its buffer
        if ctx.op == "silu":  # dY·u·silu′(ĝ) and dY·silu(ĝ) in one pass (the registry's silu_mul_backward)
            from edgetune.kernels.ops import silu_mul_backward

            dg, du = silu_mul_backward(grad.to(g.dtype), g, u)
            return dg.to(dtype), du.to(dtype), None, None
        dg = BACKWARDS[ctx.op](u.mul_(grad), g)  # dY·u·f′(ĝ), fused
        du = FORWARDS[ctx.op](g).mul_(grad).to(dtype)  # dY·f(ĝ)
        return dg.to(dtype), du, None, None


def gated(g: torch.Tensor, u: torch.Tensor, op: str) -> torch.Tensor:
    """f(g) · u; SiLU through the registry's one-pass ``silu_mul`` (aten's CPU sigmoid is slow)."""
    if op == "silu" and g.dtype == u.dtype and g.shape == u.shape:
        from edgetune.kernels.ops import silu_mul

        return silu_mul(g, u)
    return FORWARDS[op](g) * u


# --------------------------------------------------------------------------- norms


class LeanRMSNorm(torch.autograd.Function):
    """y = w · x / rms(x), computed in fp32 like transformers' Llama/Qwen2 RMSNorm.

    Saves x in 8-bit groups plus the exact per-row 1/rms; backward
    dx = r · (gw − n · mean(gw · n)) with n = x̂ · r, gw = dY · w.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, comp: Compression):
        h = x.to(_acc(x.dtype))
        rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        y = weight * (h * rstd).to(x.dtype)
        ctx.save_for_backward(*_save_int8(int8_shared(x, comp)), rstd, weight)
        ctx.shape = x.shape
        return y

    @staticmethod
    def backward(ctx, grad):
        codes, lo, scale, rstd, weight = ctx.saved_tensors
        acc = rstd.dtype
        n = _load_int8(codes, lo, scale, ctx.shape, acc).mul_(rstd)  # (..., C), in the fresh buffer
        dw = _sum_to(grad.to(acc) * n, n.shape[-1]).to(weight.dtype) if ctx.needs_input_grad[1] else None
        gw = grad.to(acc) * weight.to(acc)  # (..., C)
        dot = torch.linalg.vecdot(gw, n).unsqueeze(-1).div_(n.shape[-1])  # mean(gw · n), no (..., C) temporary
        dx = gw.sub_(n.mul_(dot)).mul_(rstd)  # r · (gw − n · mean(gw · n)), in gw's buffer
        return dx.to(grad.dtype), dw, None, None


class LeanLayerNorm(torch.autograd.Function):
    """LayerNorm saving x in 8-bit groups plus the exact per-row mean and 1/std."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight, bias, eps: float, comp: Compression):
        h = x.to(_acc(x.dtype))
        mean = h.mean(-1, keepdim=True)
        rstd = torch.rsqrt((h - mean).pow(2).mean(-1, keepdim=True) + eps)
        n = ((h - mean) * rstd).to(x.dtype)
        y = n if weight is None else n * weight
        y = y if bias is None else y + bias
        ctx.save_for_backward(*_save_int8(int8_shared(x, comp)), mean, rstd, weight)
        ctx.shape, ctx.has_weight = x.shape, weight is not None
        return y

    @staticmethod
    def backward(ctx, grad):
        codes, lo, scale, mean, rstd, weight = ctx.saved_tensors
        acc = rstd.dtype
        n = (_load_int8(codes, lo, scale, ctx.shape, acc) - mean) * rstd
        g = grad.to(acc)
        gw = g * weight.to(acc) if ctx.has_weight else g
        dx = rstd * (gw - gw.mean(-1, keepdim=True) - n * (gw * n).mean(-1, keepdim=True))
        c = n.shape[-1]
        dw = _sum_to(g * n, c).to(grad.dtype) if ctx.needs_input_grad[1] else None
        db = _sum_to(g, c).to(grad.dtype) if ctx.needs_input_grad[2] else None
        return dx.to(grad.dtype), dw, db, None, None


# --------------------------------------------------------------------------- LoRA branch


class LeanLoraBranch(torch.autograd.Function):
    """y + scaling · (x Aᵀ) Bᵀ saving x in 8-bit groups (for dA) and the small x Aᵀ (for dB).

    x (..., in), y (..., out) the frozen projection's output, A (r, in), B (out, r).
    dA = s·(dY·B)ᵀ x̂ needs x; dx = s·dY·B·A and dB = s·dYᵀ (xAᵀ) do not. The update is added
    into y's buffer by the registry's ``lora_add_`` (one ``addmm_``, scaling as its alpha), so no
    (..., out) tensor is made for the branch, its scaling or the sum; ``y=None`` returns the
    branch alone.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, scaling: float, comp: Compression,
                y: torch.Tensor | None = None):
        ctx.shape, ctx.scaling = x.shape, scaling
        q = int8_shared(x, comp)
        if y is None:
            h = x.to(A.dtype).reshape(-1, x.shape[-1]) @ A.t()  # (N, r)
            out = (h @ B.t()).mul_(scaling).view(*x.shape[:-1], B.shape[0])
        else:  # the registry's fused op: y += s·(x Aᵀ) Bᵀ in y's own buffer (one addmm_)
            from edgetune.kernels.ops import lora_add_

            # A leaf (a test's y) or a view (F.linear with a bias returns one) is not written in place.
            inplace = y._base is None and not (y.is_leaf and y.requires_grad)
            out = y if inplace else y.clone()
            h = lora_add_(out, x, A, B, scaling)  # (N, r)
            if inplace:
                ctx.mark_dirty(y)
        ctx.save_for_backward(*_save_int8(q), h, A, B)
        return out

    @staticmethod
    def backward(ctx, grad):
        codes, lo, scale, h, A, B = ctx.saved_tensors
        s, r = ctx.scaling, h.shape[-1]
        g2 = grad.reshape(-1, grad.shape[-1]).to(B.dtype)  # (N, out)
        dh = (g2 @ B).mul_(s)  # (N, r) = s · dY · B
        dA = dB = dx = None
        if ctx.needs_input_grad[1]:
            x = load_int8_shared(codes, lo, scale, ctx.shape, A.dtype)
            dA = dh.t() @ x.reshape(-1, x.shape[-1])
        if ctx.needs_input_grad[2]:
            dB = (g2.t() @ h.reshape(-1, r)).mul_(s)
        if ctx.needs_input_grad[0]:
            dx = (dh @ A).view(ctx.shape).to(grad.dtype)
        dy = grad if len(ctx.needs_input_grad) > 5 and ctx.needs_input_grad[5] else None
        return dx, dA, dB, None, None, dy


# --------------------------------------------------------------------------- attention


class LeanCpuAttention(torch.autograd.Function):
    """Flash attention on the CPU keeping q, k, v and the output in 8 bits, plus the log-sum-exp.

    Forward and backward are torch's own flash kernels for the CPU, so no T×T probability tensor
    exists beyond one tile, and backward recomputes it from q, k and the log-sum-exp. k and v are
    saved before the GQA head expansion (B, H_kv, T, D).
    """

    @staticmethod
    def forward(ctx, q, k, v, mask, is_causal: bool, scale, n_rep: int, comp: Compression):
        ke, ve = (k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)) if n_rep > 1 else (k, v)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, ke, ve, 0.0, is_causal, attn_mask=mask, scale=scale)
        out_t = out.transpose(1, 2).contiguous()  # (B, T, H, D): the layout o_proj reads (same codes)
        saved = [quantize_int8_groups(t, comp.group, comp.stochastic) for t in (q, k, v)] + [int8_shared(out_t, comp)]
        ctx.save_for_backward(*[t for s in saved for t in _save_int8(s)], lse,
                              mask if mask is not None else torch.empty(0))
        ctx.meta = (q.shape, k.shape, out_t.shape, q.dtype, is_causal, scale, n_rep, mask is not None)
        return out_t

    @staticmethod
    def backward(ctx, grad):
        qs, ks, out_shape, dtype, is_causal, scale, n_rep, has_mask = ctx.meta
        t = ctx.saved_tensors
        q = _load_int8(*t[0:3], qs, dtype)
        k = _load_int8(*t[3:6], ks, dtype)
        v = _load_int8(*t[6:9], ks, dtype)
        out = load_int8_shared(*t[9:12], out_shape, dtype).transpose(1, 2).contiguous()  # (B, H, T, D)
        lse, mask = t[12], (t[13] if has_mask else None)
        if n_rep > 1:
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        grad = grad.transpose(1, 2).contiguous()  # (B, T, H, D) -> (B, H, T, D)
        dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad, q, k, v, out, lse, 0.0, is_causal, attn_mask=mask, scale=scale)
        if n_rep > 1:
            b, h, s, d = dk.shape
            dk = dk.view(b, h // n_rep, n_rep, s, d).sum(2)
            dv = dv.view(b, h // n_rep, n_rep, s, d).sum(2)
        return dq, dk, dv, None, None, None, None, None


def lean_attention(q, k, v, mask, is_causal: bool, scale, n_rep: int, comp: Compression, dropout: float = 0.0):
    """(B, H, T, D) q, k, v -> (B, T, H, D) output; compressed saves on the CPU, torch's SDPA elsewhere.

    On CUDA, SDPA's flash / memory-efficient kernels already keep only q, k, v, out and the
    log-sum-exp (no T×T tensor); they are used as they are there.
    """
    if q.device.type != "cpu" or dropout > 0 or q.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        if n_rep > 1:
            k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal,
                                             scale=scale)
        return out.transpose(1, 2).contiguous()
    if mask is not None and mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~mask, float("-inf"))
    return LeanCpuAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), mask, is_causal, scale, n_rep, comp)
