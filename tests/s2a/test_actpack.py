"""Bit-exact round trips of the saved-activation formats (edgetune.quant.actpack)."""
import pytest
import torch

from edgetune.quant.actpack import (dequantize_int8_groups, int8_groups_nbytes, pack_bits, pack_nibbles,
                                    quantize_int8_groups, unpack_bits, unpack_nibbles)


@pytest.mark.parametrize("n", [1, 2, 7, 64, 1001])
def test_nibbles_round_trip_and_layout(n):
    codes = torch.randint(0, 16, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(n))
    packed = pack_nibbles(codes)
    assert packed.numel() == (n + 1) // 2
    assert torch.equal(unpack_nibbles(packed, n), codes)
    assert int(packed[0]) & 0x0F == int(codes[0])  # element 0 in the low nibble
    if n > 1:
        assert int(packed[0]) >> 4 == int(codes[1])


@pytest.mark.parametrize("n", [1, 8, 9, 333])
def test_bits_round_trip_and_layout(n):
    mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) > 0.5
    packed = pack_bits(mask)
    assert packed.numel() == (n + 7) // 8
    assert torch.equal(unpack_bits(packed, n), mask)
    assert int(packed[0]) & 1 == int(mask[0])  # least significant bit first


@pytest.mark.parametrize("shape", [(3, 5, 64), (7, 13), (1,)])
def test_int8_groups_error_bound_and_size(shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3
    q = quantize_int8_groups(x, 64)
    back = dequantize_int8_groups(q)
    assert back.shape == x.shape
    flat = torch.nn.functional.pad(x.reshape(-1), (0, (-x.numel()) % 64)).view(-1, 64)
    half_step = ((flat.amax(1) - flat.amin(1)) / 255 / 2).repeat_interleave(64)[: x.numel()]
    assert bool(((back - x).abs().reshape(-1) <= half_step + 1e-6).all())
    assert q.nbytes == int8_groups_nbytes(x.numel(), 64)


def test_int8_stochastic_rounding_is_unbiased():
    x = torch.linspace(-1, 1, 64).repeat(2000, 1)  # 2000 independent quantizations of one group
    g = torch.Generator().manual_seed(0)
    back = dequantize_int8_groups(quantize_int8_groups(x, 64, stochastic=True, generator=g))
    nearest = dequantize_int8_groups(quantize_int8_groups(x[:1], 64))
    bias_sr = (back.mean(0) - x[0]).abs().max()
    bias_rn = (nearest[0] - x[0]).abs().max()
    assert bias_sr < bias_rn / 4  # averaging removes the rounding error that nearest keeps


def test_int8_grid_values_are_exact():
    # values on the 255-step grid of each group come back bit-exactly (used by the gradchecks)
    k = torch.randint(0, 256, (4, 64), generator=torch.Generator().manual_seed(1))
    k[:, 0], k[:, 1] = 0, 255
    x = -1 + k.float() / 128
    assert torch.equal(dequantize_int8_groups(quantize_int8_groups(x, 64)), x)
