"""Dense k-bit packing: bit-exact round trips, the documented layout, and the sizes it promises."""
from __future__ import annotations

import pytest
import torch

from edgetune.quant.bitpack import pack_codes, pack_codes_reference, packed_size, unpack_codes

AWKWARD = (1, 2, 3, 5, 7, 8, 9, 13, 17, 63, 577)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", AWKWARD)
def test_roundtrip_and_reference(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 1 << bits, (3, n), generator=g, dtype=torch.int64)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, packed_size(n, bits))
    assert torch.equal(packed, pack_codes_reference(codes, bits))
    assert torch.equal(unpack_codes(packed, bits, n, dtype=torch.int64), codes)


@pytest.mark.parametrize("bits", (2, 3, 4))
def test_leading_dims_and_extremes(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (2, 3, 4, 11), generator=g).to(torch.uint8)
    codes[0, 0, 0] = (1 << bits) - 1  # all ones: no bit may leak into the neighbour
    codes[0, 0, 1] = 0
    packed = pack_codes(codes, bits)
    assert packed.shape == (2, 3, 4, packed_size(11, bits))
    assert torch.equal(unpack_codes(packed, bits, 11), codes)
    # every row is packed on its own
    assert torch.equal(packed[1, 2, 3], pack_codes(codes[1, 2, 3], bits))


def test_dense_sizes():
    assert packed_size(576, 3) == 216  # 3 bits really take 3 bits
    assert packed_size(576, 2) == 144
    assert packed_size(576, 4) == 288
    assert packed_size(1536, 3) == 576
    assert packed_size(5, 3) == 2


def test_layout_is_lsb_first():
    assert pack_codes(torch.tensor([1, 2]), 4).tolist() == [0x21]  # first code in the LOW nibble
    assert pack_codes(torch.tensor([1, 2, 3, 0]), 2).tolist() == [0b00111001]
    # 3-bit: codes 0b101, 0b011, 0b111 -> stream bits 101 110 111 (LSB first) -> bytes 0xDD, 0x01
    assert pack_codes(torch.tensor([5, 3, 7]), 3).tolist() == [0b11011101, 0b00000001]


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        pack_codes(torch.tensor([8]), 3)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        pack_codes(torch.tensor([-1]), 2)
    with pytest.raises(ValueError, match="bits"):
        pack_codes(torch.tensor([1]), 9)
    with pytest.raises(TypeError):
        pack_codes(torch.tensor([1.0]), 4)
    with pytest.raises(ValueError, match="does not hold"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 3, 9)


def test_empty_rows():
    packed = pack_codes(torch.zeros(2, 0, dtype=torch.int64), 3)
    assert packed.shape == (2, 0)
    assert unpack_codes(packed, 3, 0).shape == (2, 0)
