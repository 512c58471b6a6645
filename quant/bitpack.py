"""Dense bit packing of k-bit codes (k = 1..8) into uint8, along the last dimension.

Why a dense stream: a 3-bit sketch packed at 4 bits (what SketchTune's public kernels do) wastes
a quarter of the base; here 3-bit codes take exactly 3 bits each, so a row of ``n`` codes takes
``ceil(n * k / 8)`` bytes whatever ``k`` is.

The layout is a little-endian bit stream per row (everything before the last dimension is kept
as is): code ``i`` occupies stream bits ``[k*i, k*i + k)``, with its least significant bit first,
and byte ``j`` holds stream bits ``[8j, 8j + 8)`` with stream bit ``8j`` as the byte's bit 0.
For ``k = 4`` that means the first code of a pair is in the LOW nibble (unlike bitsandbytes'
NF4, which puts it in the high nibble); for ``k = 2`` the first code is in bits 0-1. Unused bits
of the last byte of a row are zero. Rows are padded independently, so row ``r`` of the packed
tensor is ``pack(codes[r])``: a kernel can address any row without knowing the others.

How it is vectorised: eight k-bit codes are exactly ``k`` bytes, so codes are processed in
chunks of eight: a chunk becomes one int64 (``sum code_i << (k*i)``, at most 64 bits) whose
``k`` low bytes are the packed bytes. For ``k`` in (1, 2, 4, 8) a byte holds a whole number of
codes and a cheaper shift-and-or path gives the same bytes. Both are pure torch and exact; the
tests check that every path round-trips and agrees with a bit-by-bit reference.
"""
from __future__ import annotations

import torch

__all__ = ["packed_size", "pack_codes", "unpack_codes", "pack_codes_reference"]


def _check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an integer in 1..8, got {bits!r}")
    return bits


def packed_size(n: int, bits: int) -> int:
    """Bytes that ``n`` codes of ``bits`` bits take: ``ceil(n * bits / 8)``."""
    _check_bits(bits)
    return (int(n) * bits + 7) // 8


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``(..., n)`` with values in ``[0, 2**bits)`` into uint8 ``(..., ceil(n*bits/8))``.

    Values are checked: a code that does not fit in ``bits`` bits raises ``ValueError`` rather
    than silently corrupting its neighbours.
    """
    bits = _check_bits(bits)
    if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
        raise TypeError(f"codes must be an integer tensor, got {codes.dtype}")
    if codes.dim() == 0:
        raise ValueError("codes must have at least one dimension")
    n = codes.shape[-1]
    lead = codes.shape[:-1]
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= (1 << bits)):
        raise ValueError(f"codes must lie in [0, {1 << bits}) for {bits}-bit packing")
    nbytes = packed_size(n, bits)
    if n == 0:
        return torch.zeros(*lead, 0, dtype=torch.uint8, device=codes.device)
    if 8 % bits == 0:  # whole codes per byte
        per = 8 // bits
        pad = (-n) % per
        c = codes.to(torch.uint8)
        if pad:
            c = torch.nn.functional.pad(c, (0, pad))
        c = c.reshape(*lead, -1, per)  # (..., nbytes, per)
        out = torch.zeros(c.shape[:-1], dtype=torch.uint8, device=codes.device)
        for i in range(per):
            out |= c[..., i] << (bits * i)
        return out
    pad = (-n) % 8
    c = codes.to(torch.int64)
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    c = c.reshape(*lead, -1, 8)  # (..., chunks, 8 codes)
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits  # (8,)
    word = (c << shifts).sum(-1)  # (..., chunks): the chunk's 8*bits bits; codes are disjoint so sum == or
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8  # (bits,)
    out = ((word.unsqueeze(-1) >> byte_shifts) & 0xFF).to(torch.uint8)  # (..., chunks, bits)
    return out.reshape(*lead, -1)[..., :nbytes].contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, n: int, dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """The inverse of :func:`pack_codes`: uint8 ``(..., ceil(n*bits/8))`` → codes ``(..., n)`` in ``dtype``."""
    bits = _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed codes must be uint8, got {packed.dtype}")
    n = int(n)
    if packed.dim() == 0 or packed.shape[-1] != packed_size(n, bits):
        raise ValueError(f"packed tensor of shape {tuple(packed.shape)} does not hold {n} codes of {bits} bits "
                         f"(expected last dimension {packed_size(n, bits)})")
    lead = packed.shape[:-1]
    if n == 0:
        return torch.zeros(*lead, 0, dtype=dtype, device=packed.device)
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        per = 8 // bits
        parts = [(packed >> (bits * i)) & mask for i in range(per)]  # each (..., nbytes)
        codes = torch.stack(parts, dim=-1).reshape(*lead, -1)  # (..., nbytes * per)
        return codes[..., :n].to(dtype)
    chunks = -(-n // 8)
    pad = chunks * bits - packed.shape[-1]
    p = packed.to(torch.int64)
    if pad:
        p = torch.nn.functional.pad(p, (0, pad))
    p = p.reshape(*lead, chunks, bits)  # (..., chunks, bits bytes)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    word = (p << byte_shifts).sum(-1)  # (..., chunks)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    codes = (word.unsqueeze(-1) >> shifts) & mask  # (..., chunks, 8)
    return codes.reshape(*lead, -1)[..., :n].to(dtype)


def pack_codes_reference(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Bit-by-bit packing of a 2-D tensor (slow, obviously right): the oracle for :func:`pack_codes`."""
    bits = _check_bits(bits)
    rows, n = codes.shape
    out = torch.zeros(rows, packed_size(n, bits), dtype=torch.uint8)
    values = codes.tolist()
    for r in range(rows):
        row = [0] * out.shape[1]
        for i, v in enumerate(values[r]):
            for b in range(bits):
                if (v >> b) & 1:
                    pos = i * bits + b
                    row[pos // 8] |= 1 << (pos % 8)
        out[r] = torch.tensor(row, dtype=torch.uint8)
    return out
