"""NF4 (4-bit NormalFloat) weight quantization in bitsandbytes' storage format.

Why this exists: QLoRA (Dettmers et al., 2023, https://arxiv.org/abs/2305.14314) freezes
the base model in NF4 — 16 levels placed at quantiles of N(0, 1), scaled per block of
``blocksize`` consecutive weights by the block's absolute maximum — and trains LoRA adapters
on top. We store exactly what ``bitsandbytes.functional.quantize_4bit(..., quant_type="nf4")``
produces, so a checkpoint quantized here and one quantized by bitsandbytes are byte-for-byte
interchangeable, but we keep the tensors as plain ``torch.Tensor`` s (no ``Params4bit`` /
``QuantState``) and do the matmul ourselves (see ``edgetune.methods.qlora.layer``).

The format, as bitsandbytes 0.50 lays it out (checked bit-exactly by tests/quant/test_nf4.py):

* the weight is flattened row-major and cut into blocks of ``blocksize`` values; the last
  block may be short (it is *not* zero-padded for the absmax);
* ``absmax[b] = max |w|`` over block ``b`` (float32); full blocks are scaled by
  ``w * (1 / absmax)``, the short tail block by ``w / absmax`` (bnb does it that way, and it
  can differ in the last ulp); scaled values are clamped to [-1, 1];
* each scaled value gets the index of the nearest NF4 level; a value exactly halfway between
  two levels takes the *lower* one (``torch.bucketize`` on the midpoints, ``right=False``);
* two 4-bit codes per byte, the FIRST element in the HIGH nibble; an odd element count is
  padded with one scaled 0.0, i.e. code 7, in the last low nibble;
* double quantization (bnb's ``compress_statistics=True``): ``offset = absmax.mean()``, then
  ``absmax - offset`` is quantized with bnb's signed 8-bit "dynamic" code in blocks of 256
  (per-block absmax scale, then bnb's CPU lookup-table rounding to the nearest code — see
  :func:`quantize_absmax_reference`). Dequantized absmax is
  ``code[q] * scale + offset``. Saves ~0.37 bits/weight at blocksize 64.

Dequantization is ``NF4_CODE[q] * absmax`` in float32, then cast to the requested dtype.

bitsandbytes is optional: it is imported lazily inside functions (never at module import),
used as a fast path only where it gives identical results, and everything falls back to the
pure-torch reference when it is missing.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from math import prod
from typing import Optional

import torch

__all__ = [
    "NF4_CODE", "DQ_BLOCKSIZE", "NF4Weight", "dynamic_code",
    "quantize_nf4_reference", "dequantize_nf4_reference",
    "quantize_absmax_reference", "dequantize_absmax_reference",
    "quantize_nf4", "dequantize_nf4", "bnb_available",
]

# The 16 NF4 levels, sorted, exactly bitsandbytes' get_4bit_type("nf4") (float32).
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)  # (16,)

# Decision boundaries: a scaled value x gets code i with bounds[i-1] < x <= bounds[i].
_NF4_BOUNDS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2  # (15,)

DQ_BLOCKSIZE = 256  # bnb's block size for the 8-bit quantization of absmax (double quant)
_PAD_CODE = 7  # index of 0.0: what an odd element count is padded with
_LUT_SIZE = 65536  # bins of bnb's CPU 8-bit quantization lookup table


def _check_blocksize(blocksize: int) -> None:
    if blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
        raise ValueError(f"blocksize must be a power of two in 32..4096, got {blocksize}")


def _num_blocks(numel: int, blocksize: int) -> int:
    return -(-numel // blocksize)


@functools.lru_cache(maxsize=1)
def dynamic_code() -> torch.Tensor:
    """bnb's signed 8-bit dynamic code (``create_dynamic_map()``): 256 sorted float32 values.

    Dynamic exponent + fraction: for exponent i = 0..6 the fraction bins are the midpoints of
    ``linspace(0.1, 1, 2**i + 1)`` scaled by ``10**(i - 6)``, with both signs; plus 0 and 1.
    Rebuilt here without bitsandbytes; tests check it equals bnb's table exactly.
    """
    max_exponent_bits, non_sign_bits = 7, 7
    data: list[float] = []
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        data += (scale * means).tolist()
        data += (-scale * means).tolist()
    data += [0.0, 1.0]
    assert len(data) == 256
    data.sort()
    return torch.tensor(data, dtype=torch.float32)  # (256,)


# --------------------------------------------------------------------------- reference: NF4


def quantize_nf4_reference(w: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-torch NF4 quantization, bit-identical to bnb's ``quantize_4bit(quant_type="nf4")``.

    Returns ``packed`` (uint8, ``ceil(numel / 2)``) and ``absmax`` (float32, ``ceil(numel /
    blocksize)``) for the row-major flattening of ``w`` (any shape, any float dtype).
    """
    _check_blocksize(blocksize)
    flat = w.detach().reshape(-1).float()  # (n,)
    n = flat.numel()
    if n == 0:
        raise ValueError("cannot quantize an empty tensor")
    rem = n % blocksize
    full = n - rem
    head = flat[:full].reshape(-1, blocksize)  # (full / blocksize, blocksize)
    absmax = head.abs().amax(dim=1)  # (full / blocksize,)
    scaled = torch.clamp(head * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1), -1, 1).reshape(-1)
    if rem:
        tail_absmax = flat[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax.reshape(1)])
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail_absmax, -1, 1)])
    codes = torch.bucketize(scaled, _NF4_BOUNDS.to(scaled.device)).to(torch.uint8)  # (n,)
    if n % 2:
        codes = torch.cat([codes, codes.new_full((1,), _PAD_CODE)])
    packed = (codes[0::2] << 4) | codes[1::2]  # (ceil(n / 2),) first element -> high nibble
    return packed.contiguous(), absmax.contiguous()


def _unpack_codes(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """uint8 (ceil(n/2),) -> int64 codes (n,), high nibble first."""
    p = packed.reshape(-1)
    return torch.stack([p >> 4, p & 0x0F], dim=1).reshape(-1)[:numel].long()  # (n,)


@functools.lru_cache(maxsize=8)
def _byte_table(device: str = "cpu") -> torch.Tensor:
    """(256, 2) float32: the two NF4 levels a packed byte decodes to, (high, low) nibble."""
    return torch.stack([NF4_CODE.repeat_interleave(16), NF4_CODE.repeat(16)], dim=1).to(device)


def dequantize_nf4_reference(packed: torch.Tensor, absmax: torch.Tensor, shape, blocksize: int = 64,
                             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of :func:`quantize_nf4_reference`: ``NF4_CODE[q] * absmax`` (float32) cast to dtype."""
    shape = tuple(shape)
    n = prod(shape)
    nb = _num_blocks(n, blocksize)
    # one gather per byte: (nbytes, 2) -> (2 * nbytes,) levels in element order
    values = _byte_table(str(packed.device)).index_select(0, packed.reshape(-1).int()).reshape(-1)
    if values.numel() > n:
        values = values[:n]
    if nb * blocksize > n:
        values = torch.nn.functional.pad(values, (0, nb * blocksize - n))
    out = values.reshape(nb, blocksize) * absmax.float().reshape(nb, 1)  # (blocks, blocksize) float32
    return out.reshape(-1)[:n].reshape(shape).to(dtype)


# --------------------------------------------------------------------- reference: double quant


@functools.lru_cache(maxsize=4)
def _dynamic_lut(device: str = "cpu") -> torch.Tensor:
    """bnb's CPU 8-bit quantizer lookup table: 65536 bins over [-1, 1] -> nearest-code index.

    Bin i stands for ``v_i = -1 + 2i / 65535`` and holds the number of code midpoints strictly
    below ``v_i`` (the code index whose cell contains ``v_i``; a bin exactly on a midpoint takes
    the lower code).
    """
    code = dynamic_code()
    midpoints = 0.5 * (code[:-1] + code[1:])  # (255,)
    i = torch.arange(_LUT_SIZE, dtype=torch.float32)
    v = -1.0 + (2.0 * i) / float(_LUT_SIZE - 1)  # (65536,)
    return torch.searchsorted(midpoints, v, side="left").to(torch.uint8).to(device)


def quantize_absmax_reference(absmax: torch.Tensor, blocksize: int = DQ_BLOCKSIZE):
    """bnb's double quantization of the NF4 absmax (``compress_statistics=True``).

    ``offset = mean(absmax)``; ``x = absmax - offset`` is quantized to bnb's 8-bit dynamic code
    in blocks of ``blocksize`` (256), exactly as bitsandbytes' CPU kernel does it: per block
    ``scale = max|x|``, ``v = clamp(x * (1 / scale), -1, 1)``, then a 65536-bin lookup table,
    ``code_index = LUT[int(((v + 1) * 0.5) * 65535 + 0.5)]`` (all float32). That equals the
    nearest code except for values within ~1.5e-5 of a midpoint, where the LUT bin decides —
    we copy it so the codes are bit-identical with bnb. A block whose scale is 0 gets code 0.

    Returns ``(q uint8 (nb,), scale float32 (ceil(nb/256),), code float32 (256,), offset float32 ())``.
    """
    absmax = absmax.detach().float().reshape(-1)  # (nb,)
    offset = absmax.mean()  # ()
    x = absmax - offset  # (nb,)
    n = x.numel()
    nblocks = _num_blocks(n, blocksize)
    xb = torch.nn.functional.pad(x, (0, nblocks * blocksize - n)).reshape(nblocks, blocksize)  # zero pad: max|x| unchanged
    scale = xb.abs().amax(dim=1)  # (nblocks,)
    v = torch.clamp(xb * (1.0 / scale).unsqueeze(1), -1, 1)  # (nblocks, blocksize)
    bins = (((v + 1.0) * 0.5) * float(_LUT_SIZE - 1) + 0.5).nan_to_num(0.0).to(torch.int64)
    q = _dynamic_lut(str(x.device))[bins]  # (nblocks, blocksize) uint8
    q = torch.where((scale == 0).unsqueeze(1), torch.zeros_like(q), q)
    return q.reshape(-1)[:n].contiguous(), scale, dynamic_code().to(x.device).clone(), offset


def dequantize_absmax_reference(q: torch.Tensor, scale: torch.Tensor, code: torch.Tensor,
                                offset: torch.Tensor, blocksize: int = DQ_BLOCKSIZE) -> torch.Tensor:
    """Inverse of :func:`quantize_absmax_reference`: ``code[q] * scale + offset`` (float32)."""
    n = q.numel()
    nblocks = _num_blocks(n, blocksize)
    values = code.float()[q.reshape(-1).long()]  # (nb,)
    values = torch.nn.functional.pad(values, (0, nblocks * blocksize - n)).reshape(nblocks, blocksize)
    out = (values * scale.float().reshape(nblocks, 1)).reshape(-1)[:n]
    return out + offset.float()


# ------------------------------------------------------------------------------ the container


@dataclass
class NF4Weight:
    """A quantized (out, in) weight as plain tensors, bitsandbytes' NF4 layout.

    Without double quant ``absmax`` is set and the ``absmax_*`` pieces are None; with it,
    ``absmax`` is None and ``absmax_q`` / ``absmax_scale`` / ``absmax_code`` / ``absmax_offset``
    hold the 8-bit quantized statistics.
    """

    packed: torch.Tensor  # (ceil(numel / 2),) uint8, two codes per byte, high nibble first
    shape: tuple[int, ...]  # the original weight shape, (out, in)
    blocksize: int
    absmax: Optional[torch.Tensor] = None  # (ceil(numel / blocksize),) float32
    absmax_q: Optional[torch.Tensor] = None  # (ceil(numel / blocksize),) uint8
    absmax_scale: Optional[torch.Tensor] = None  # (ceil(nblocks / 256),) float32
    absmax_code: Optional[torch.Tensor] = None  # (256,) float32
    absmax_offset: Optional[torch.Tensor] = None  # () float32

    TENSOR_NAMES = ("packed", "absmax", "absmax_q", "absmax_scale", "absmax_code", "absmax_offset")

    @property
    def double_quant(self) -> bool:
        return self.absmax_q is not None

    @property
    def numel(self) -> int:
        return prod(self.shape)

    def block_absmax(self) -> torch.Tensor:
        """The float32 per-block scales, dequantizing them first under double quant."""
        if self.absmax_q is None:
            return self.absmax
        return dequantize_absmax_reference(self.absmax_q, self.absmax_scale, self.absmax_code,
                                           self.absmax_offset)

    def block_absmax_at(self, index: torch.Tensor) -> torch.Tensor:
        """The float32 scales of the blocks ``index`` (any shape) only, bit-identical to
        ``block_absmax()[index]``: lets a caller decode a few rows without the whole absmax."""
        if self.absmax_q is None:
            return self.absmax[index]
        values = self.absmax_code.float()[self.absmax_q[index].long()]
        return values * self.absmax_scale.float()[torch.div(index, DQ_BLOCKSIZE, rounding_mode="floor")] + \
            self.absmax_offset.float()

    def _blocks_per_row(self) -> int:
        if len(self.shape) != 2 or self.shape[1] % self.blocksize:
            raise ValueError(f"rows of {self.shape} are not whole blocks of {self.blocksize}")
        return self.shape[1] // self.blocksize

    def rows(self, start: int, stop: int) -> "NF4Weight":
        """Rows [start, stop) of a (rows, cols) weight whose rows are whole blocks, as a plain-absmax
        NF4Weight (its codes a view)."""
        cols, per = self.shape[1], self._blocks_per_row()
        index = torch.arange(start * per, stop * per, device=self.packed.device)
        return NF4Weight(self.packed[start * cols // 2:stop * cols // 2], (stop - start, cols), self.blocksize,
                         absmax=self.block_absmax_at(index))

    def take_rows(self, index: torch.Tensor) -> "NF4Weight":
        """The rows ``index`` (n,) gathered, as a plain-absmax NF4Weight: only their bytes and scales."""
        cols, per = self.shape[1], self._blocks_per_row()
        index = index.reshape(-1).long()
        packed = self.packed.view(self.shape[0], cols // 2).index_select(0, index)  # (n, cols/2)
        blocks = (index.unsqueeze(1) * per + torch.arange(per, device=index.device)).reshape(-1)  # (n·per,)
        return NF4Weight(packed.reshape(-1), (index.numel(), cols), self.blocksize, absmax=self.block_absmax_at(blocks))

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors by name (only those present)."""
        return {k: getattr(self, k) for k in self.TENSOR_NAMES if getattr(self, k) is not None}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], shape, blocksize: int) -> "NF4Weight":
        return cls(shape=tuple(shape), blocksize=blocksize,
                   **{k: tensors.get(k) for k in cls.TENSOR_NAMES})

    @staticmethod
    def tensor_specs(shape, blocksize: int, double_quant: bool) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of the stored tensors, for allocating empty buffers."""
        n = prod(shape)
        nb = _num_blocks(n, blocksize)
        specs = {"packed": ((-(-n // 2),), torch.uint8)}
        if double_quant:
            specs.update(absmax_q=((nb,), torch.uint8),
                         absmax_scale=((_num_blocks(nb, DQ_BLOCKSIZE),), torch.float32),
                         absmax_code=((256,), torch.float32), absmax_offset=((), torch.float32))
        else:
            specs["absmax"] = ((nb,), torch.float32)
        return specs

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.to_tensors().values())


# --------------------------------------------------------------------------- public entry points


_BNB_DEQUANT_MIN_NUMEL = 1 << 18  # below this, the torch reference dequantizes faster than bnb's kernel


@functools.lru_cache(maxsize=1)
def _bnb_functional():
    try:
        import bitsandbytes.functional as F  # lazy: importing bnb costs ~1 s and may warn
    except Exception:  # pragma: no cover - depends on the environment
        return None
    return F


def bnb_available() -> bool:
    return _bnb_functional() is not None


def _bnb_ok(t: torch.Tensor) -> bool:
    return t.device.type == "cpu" and _bnb_functional() is not None


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = False,
                 use_bnb: Optional[bool] = None) -> NF4Weight:
    """Quantize a weight (out, in) to NF4. ``use_bnb=None``: bitsandbytes if importable (CPU)."""
    _check_blocksize(blocksize)
    w = w.detach()
    shape = tuple(w.shape)
    if use_bnb is None:
        use_bnb = _bnb_ok(w) and w.dtype in (torch.float32, torch.float16, torch.bfloat16)
    if use_bnb:
        F = _bnb_functional()
        packed, state = F.quantize_4bit(w.contiguous(), blocksize=blocksize, quant_type="nf4",
                                        compress_statistics=double_quant)
        packed = packed.reshape(-1).contiguous()
        if not double_quant:
            return NF4Weight(packed, shape, blocksize, absmax=state.absmax.float().contiguous())
        s2 = state.state2
        return NF4Weight(packed, shape, blocksize,
                         absmax_q=state.absmax.reshape(-1).contiguous(),
                         absmax_scale=s2.absmax.float().reshape(-1).contiguous(),
                         absmax_code=s2.code.float().clone(),
                         absmax_offset=state.offset.float().reshape(()).clone())
    packed, absmax = quantize_nf4_reference(w, blocksize)
    if not double_quant:
        return NF4Weight(packed, shape, blocksize, absmax=absmax)
    q, scale, code, offset = quantize_absmax_reference(absmax)
    return NF4Weight(packed, shape, blocksize, absmax_q=q, absmax_scale=scale, absmax_code=code,
                     absmax_offset=offset)


_DECODE_CHUNK = 1 << 20  # values per step of the torch decode: its float32 temporaries stay at 8 MiB


def _dequantize_in_chunks(q: NF4Weight, absmax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The reference decode, whole blocks at a time, written into one ``dtype`` output.

    Bit-identical to :func:`dequantize_nf4_reference` (the same float32 product per value), but
    its float32 levels and products exist for one chunk only: decoding a 7B down_proj into bf16
    in one go would hold 10 bytes per weight (433 MiB) instead of the 2 of its result.
    """
    n, bs = q.numel, q.blocksize
    if n <= _DECODE_CHUNK:
        return dequantize_nf4_reference(q.packed, absmax, q.shape, bs, dtype)
    out = torch.empty(n, dtype=dtype, device=q.packed.device)
    step = _DECODE_CHUNK // bs * bs  # whole blocks: every chunk starts on a byte and a block boundary
    for s in range(0, n, step):
        e = min(n, s + step)
        out[s:e] = dequantize_nf4_reference(q.packed[s // 2:(e + 1) // 2], absmax[s // bs:-(-e // bs)], (e - s,),
                                            bs, dtype)
    return out.view(q.shape)


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype = torch.float32,
                   use_bnb: Optional[bool] = None) -> torch.Tensor:
    """The dense weight (out, in): ``NF4_CODE[code] * absmax`` in float32, then cast to dtype.

    The bnb path asks its CPU kernel for float32 over the flat (even-length) code stream and
    casts here, so the result is bit-identical to the reference for every dtype. By default it
    is used only for weights of at least ``_BNB_DEQUANT_MIN_NUMEL`` values: its OpenMP kernel
    has a fixed cost of milliseconds per call (measured ~4-12 ms on 2 busy cores), far more
    than the pure-torch path needs for a small weight.
    """
    absmax = q.block_absmax()  # (nblocks,) float32
    if use_bnb is None:
        use_bnb = q.numel >= _BNB_DEQUANT_MIN_NUMEL and _bnb_ok(q.packed)
    if not use_bnb:
        return _dequantize_in_chunks(q, absmax, dtype)
    F = _bnb_functional()
    n = q.numel
    packed = q.packed.reshape(-1, 1)  # (nbytes, 1): bnb's own layout
    state = F.QuantState(absmax=absmax.contiguous(), shape=(2 * packed.shape[0],),  # n rounded up to even
                         dtype=torch.float32, blocksize=q.blocksize, quant_type="nf4")
    out = F.dequantize_4bit(packed, quant_state=state)  # (n rounded up to even,) float32
    return out.reshape(-1)[:n].reshape(q.shape).to(dtype)
