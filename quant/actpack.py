"""Compressed forms of saved activations: 4-bit codes, 1-bit masks, 8-bit per-group integers.

The ``*_reference`` functions are the pure-torch implementations: the oracle the C++/CUDA/Triton
kernels are tested against. The public names (``pack_nibbles``, ``quantize_int8_groups``, ...)
keep their signatures and outputs bit for bit but run through the op registry
(:mod:`edgetune.kernels.ops`), which picks the fastest backend built here (``EDGETUNE_BACKEND``
forces one; ``reference`` is always there). Everything works on
flattened tensors so the layout is one simple rule per format:

* **nibbles** — element ``2i`` in the low 4 bits of byte ``i``, element ``2i+1`` in the high 4
  bits; an odd count is padded with a zero nibble. ``ceil(n / 2)`` bytes.
* **bits** — element ``8i + j`` is bit ``j`` (least significant first) of byte ``i``.
  ``ceil(n / 8)`` bytes.
* **int8 groups** — the tensor is cut into groups of ``group`` consecutive elements (the last
  one zero-padded); each group stores ``uint8`` codes ``q = round((x - lo) / scale)`` with its
  own float32 ``lo`` and ``scale = (hi - lo) / 255``. Asymmetric min/max, because the inputs
  it holds (SiLU outputs, norm inputs) are rarely centred. Optional stochastic rounding makes
  the dequantized value unbiased: ``E[dequant(quant(x))] = x``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def pack_nibbles_reference(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in [0, 16), any shape -> uint8 (ceil(n/2),)."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2)  # (n/2, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_nibbles_reference(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """uint8 (ceil(n/2),) -> uint8 codes (n,)."""
    out = torch.stack([packed & 0x0F, packed >> 4], dim=1).reshape(-1)  # (2 * bytes,)
    return out[:numel]


_BIT_WEIGHTS = [1 << j for j in range(8)]


def pack_bits_reference(mask: torch.Tensor) -> torch.Tensor:
    """bool (any shape) -> uint8 (ceil(n/8),), least significant bit first."""
    flat = mask.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=flat.device)
    return (flat.view(-1, 8) * weights).sum(dim=1, dtype=torch.uint8)


def unpack_bits_reference(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """uint8 (ceil(n/8),) -> bool (n,)."""
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(1) & weights) != 0).reshape(-1)[:numel]


@dataclass
class Int8Groups:
    """A tensor stored as 8-bit codes per group of ``group`` elements (see the module docstring)."""

    codes: torch.Tensor  # uint8 (G, group)
    lo: torch.Tensor  # float32 (G, 1)
    scale: torch.Tensor  # float32 (G, 1)
    shape: torch.Size
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.lo, self.scale))

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.codes, self.lo, self.scale


def quantize_int8_groups_reference(x: torch.Tensor, group: int = 64, stochastic: bool = False,
                         generator: torch.Generator | None = None) -> Int8Groups:
    """Per-group asymmetric 8-bit quantization of any float tensor."""
    flat = x.detach().reshape(-1).float()
    pad = (-flat.numel()) % group
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    g = flat.view(-1, group)  # (G, group)
    lo = g.amin(dim=1, keepdim=True)
    hi = g.amax(dim=1, keepdim=True)
    scale = (hi - lo) / 255.0
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    v = (g - lo) * inv  # in [0, 255]
    if stochastic:
        v = torch.floor(v + torch.rand(v.shape, generator=generator, device=v.device, dtype=v.dtype))
    else:
        v = torch.round(v)
    codes = v.clamp_(0, 255).to(torch.uint8)
    return Int8Groups(codes, lo, scale, x.shape, x.dtype)


def dequantize_int8_groups_reference(q: Int8Groups, dtype: torch.dtype | None = None) -> torch.Tensor:
    numel = 1
    for s in q.shape:
        numel *= s
    flat = (q.codes.float() * q.scale + q.lo).reshape(-1)[:numel]
    return flat.view(q.shape).to(dtype or q.dtype)


def int8_groups_nbytes(numel: int, group: int = 64) -> int:
    """Bytes :func:`quantize_int8_groups` stores for ``numel`` elements (codes + lo + scale)."""
    groups = -(-numel // group)
    return groups * group + groups * 8


# --------------------------------------------------------------------------- dispatching entry points
# Same signatures and bit-identical outputs as the references above; the kernels registry is
# imported on first call (not at module import) so importing edgetune stays light.


def _ops():
    from edgetune.kernels import ops

    return ops


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in [0, 16), any shape -> uint8 (ceil(n/2),)."""
    return _ops().pack_nibbles(codes.detach())


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """uint8 (ceil(n/2),) -> uint8 codes (n,)."""
    return _ops().unpack_nibbles(packed.detach(), int(numel))


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool (any shape) -> uint8 (ceil(n/8),), least significant bit first."""
    return _ops().pack_bits(mask.detach())


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """uint8 (ceil(n/8),) -> bool (n,)."""
    return _ops().unpack_bits(packed.detach(), int(numel))


def quantize_int8_groups(x: torch.Tensor, group: int = 64, stochastic: bool = False,
                         generator: torch.Generator | None = None) -> Int8Groups:
    """Per-group asymmetric 8-bit quantization of any float tensor.

    Stochastic rounding draws its uniform noise exactly as the reference does (``torch.rand`` of
    shape (G, group) from ``generator``), so both give the same codes for the same generator state.
    """
    noise = None
    if stochastic:
        groups = -(-x.numel() // group)
        noise = torch.rand((groups, group), generator=generator, device=x.device, dtype=torch.float32)
    codes, lo, scale = _ops().quantize_int8(x.detach(), int(group), noise)
    return Int8Groups(codes, lo, scale, x.shape, x.dtype)


def dequantize_int8_groups(q: Int8Groups, dtype: torch.dtype | None = None) -> torch.Tensor:
    numel = 1
    for s in q.shape:
        numel *= s
    return _ops().dequantize_int8(q.codes, q.lo, q.scale, numel, dtype or q.dtype).view(q.shape)
