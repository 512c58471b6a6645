"""NF4 quantization: bit-exact agreement with bitsandbytes, and the quantization error."""
from __future__ import annotations

import pytest
import torch

from edgetune.quant import nf4

SHAPES = [(577, 33), (64, 576), (3, 5), (1, 1), (7,)]


def _weight(shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * 0.02).to(dtype)


def _sqnr_db(w, w_hat):
    return (20 * torch.log10(w.float().norm() / (w.float() - w_hat.float()).norm())).item()


@pytest.fixture(scope="module")
def F():
    pytest.importorskip("bitsandbytes")
    import bitsandbytes.functional as F

    return F


def test_module_import_does_not_import_bitsandbytes():
    import subprocess
    import sys

    code = "import sys, edgetune.quant.nf4; print('bitsandbytes' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_tables_match_bitsandbytes(F):
    assert torch.equal(nf4.NF4_CODE, F.get_4bit_type("nf4", device="cpu"))
    assert nf4.NF4_CODE.dtype == torch.float32 and nf4.NF4_CODE.shape == (16,)
    assert torch.equal(nf4.dynamic_code(), F.create_dynamic_map())


def test_nibble_order_and_padding(F):
    # element 0 -> high nibble (code 15 for +1.0, 0 for -1.0); odd counts padded with code 7 (0.0)
    x = torch.zeros(65)
    x[0], x[1], x[64] = 1.0, -1.0, 0.5
    packed, absmax = nf4.quantize_nf4_reference(x, 64)
    assert packed.dtype == torch.uint8 and packed.shape == (33,)
    assert packed[0].item() == 0xF0 and packed[1].item() == 0x77 and packed[-1].item() == 0xF7
    assert absmax.tolist() == [1.0, 0.5]
    ref, _ = F.quantize_4bit(x, blocksize=64, quant_type="nf4")
    assert torch.equal(packed, ref.reshape(-1))


def test_ties_go_to_lower_level(F):
    # a value exactly halfway between two levels (after scaling) takes the lower code, like bnb
    mids = (nf4.NF4_CODE[:-1] + nf4.NF4_CODE[1:]) / 2
    x = torch.cat([torch.tensor([1.0]), mids, -mids, torch.zeros(64 - 31)])  # (64,), absmax 1
    packed, _ = nf4.quantize_nf4_reference(x, 64)
    codes = nf4._unpack_codes(packed, 64)
    assert codes[1:16].tolist() == list(range(15))
    ref, _ = F.quantize_4bit(x, blocksize=64, quant_type="nf4")
    assert torch.equal(packed, ref.reshape(-1))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("blocksize", [32, 64, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_quantize_is_bit_exact_with_bnb(F, shape, blocksize, dtype):
    w = _weight(shape, dtype)
    packed, absmax = nf4.quantize_nf4_reference(w, blocksize)
    ref_packed, state = F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4")
    n = w.numel()
    assert packed.shape == (-(-n // 2),) and absmax.shape == (-(-n // blocksize),)
    assert absmax.dtype == torch.float32
    assert torch.equal(packed, ref_packed.reshape(-1))
    assert torch.equal(absmax, state.absmax)


@pytest.mark.parametrize("shape", [(577, 33), (64, 576), (1536, 576), (3, 5)])
@pytest.mark.parametrize("blocksize", [64, 128])
def test_reference_double_quant_is_bit_exact_with_bnb(F, shape, blocksize):
    w = _weight(shape, seed=1)
    packed, absmax = nf4.quantize_nf4_reference(w, blocksize)
    q, scale, code, offset = nf4.quantize_absmax_reference(absmax)
    ref_packed, state = F.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
    assert torch.equal(packed, ref_packed.reshape(-1))
    assert q.dtype == torch.uint8 and q.shape == absmax.shape
    assert scale.dtype == torch.float32 and scale.shape == (-(-absmax.numel() // 256),)
    assert code.shape == (256,) and offset.shape == () and offset.dtype == torch.float32
    assert torch.equal(q, state.absmax)
    assert torch.equal(scale, state.state2.absmax)
    assert torch.equal(code, state.state2.code)
    assert torch.equal(offset, state.offset)
    # the dequantized absmax, and the dequantized weight, equal bnb's
    absmax_hat = nf4.dequantize_absmax_reference(q, scale, code, offset)
    ref_absmax = F.dequantize_blockwise(state.absmax, state.state2) + state.offset
    assert torch.equal(absmax_hat, ref_absmax)
    # the 8-bit code's widest step near ±1 is ~0.014, so the error is below ~0.7% of the block scale
    assert (absmax_hat - absmax).abs().max() <= 0.0075 * scale.max()
    mine = nf4.dequantize_nf4(nf4.quantize_nf4(w, blocksize, double_quant=True, use_bnb=False), use_bnb=False)
    # bnb's C kernel on the flat even-length stream (its odd-width fallback would torch.compile)
    flat_state = F.QuantState(absmax=ref_absmax, shape=(2 * ref_packed.numel(),), dtype=torch.float32,
                              blocksize=blocksize, quant_type="nf4")
    ref_dq = F.dequantize_4bit(ref_packed, quant_state=flat_state)
    assert torch.equal(mine, ref_dq.reshape(-1)[: w.numel()].reshape(shape))


def test_double_quant_lut_rounding_matches_bnb_8bit(F):
    # bnb's CPU 8-bit quantizer rounds through a 65536-bin table, not exact nearest; many values
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(20000, generator=g), torch.rand(7777, generator=g) * 0.05 - 0.02])
    offset = x.mean()
    q, scale, _, off = nf4.quantize_absmax_reference(x)
    ref, state = F.quantize_blockwise(x - offset, blocksize=256)
    assert torch.equal(off, offset)
    assert torch.equal(q, ref) and torch.equal(scale, state.absmax)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(577, 33), (64, 576)])
def test_fast_path_equals_reference(F, shape, double_quant):
    w = _weight(shape, seed=2)
    fast = nf4.quantize_nf4(w, 64, double_quant, use_bnb=True)
    ref = nf4.quantize_nf4(w, 64, double_quant, use_bnb=False)
    assert fast.to_tensors().keys() == ref.to_tensors().keys()
    for name, t in ref.to_tensors().items():
        assert torch.equal(fast.to_tensors()[name], t), name
        assert fast.to_tensors()[name].dtype == t.dtype and fast.to_tensors()[name].shape == t.shape
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        a = nf4.dequantize_nf4(ref, dtype, use_bnb=False)
        b = nf4.dequantize_nf4(ref, dtype, use_bnb=True)
        assert a.shape == shape and a.dtype == dtype
        assert torch.equal(a, b)


@pytest.mark.parametrize("shape", [(64, 576), (577, 34), (3, 6)])
def test_dequantize_reference_vs_bnb(F, shape):
    w = _weight(shape, seed=4)
    ref_packed, state = F.quantize_4bit(w, blocksize=64, quant_type="nf4")
    theirs = F.dequantize_4bit(ref_packed, state)  # (out, in)
    mine = nf4.dequantize_nf4_reference(ref_packed.reshape(-1), state.absmax, shape, 64, torch.float32)
    assert mine.shape == theirs.shape
    assert (mine - theirs).abs().max().item() <= 1e-7  # in fact identical
    assert torch.equal(mine, theirs)


def test_sqnr_on_gaussian_weight():
    # measured: 20.73 dB at blocksize 64 (20.72 dB with double quant) on N(0, 0.02²), 1536x576
    w = _weight((1536, 576), seed=5)
    for dq in (False, True):
        w_hat = nf4.dequantize_nf4(nf4.quantize_nf4(w, 64, dq, use_bnb=False), use_bnb=False)
        assert _sqnr_db(w, w_hat) > 20.5
    # smaller blocks, finer scales, less error
    s32 = _sqnr_db(w, nf4.dequantize_nf4(nf4.quantize_nf4(w, 32, use_bnb=False), use_bnb=False))
    s256 = _sqnr_db(w, nf4.dequantize_nf4(nf4.quantize_nf4(w, 256, use_bnb=False), use_bnb=False))
    assert s32 > 21.0 and 19.9 < s256 < 20.5


def test_reference_only_without_bnb(monkeypatch):
    # the fallback path: pretend bitsandbytes is missing
    monkeypatch.setattr(nf4, "_bnb_functional", lambda: None)
    assert not nf4.bnb_available()
    w = _weight((33, 577), seed=6)
    for dq in (False, True):
        q = nf4.quantize_nf4(w, 64, dq)
        assert q.double_quant == dq
        w_hat = nf4.dequantize_nf4(q)
        assert w_hat.shape == (33, 577) and _sqnr_db(w, w_hat) > 20.0


def test_nf4weight_tensors_roundtrip_and_specs():
    w = _weight((577, 33), seed=7)
    for dq in (False, True):
        q = nf4.quantize_nf4(w, 64, dq)
        tensors = q.to_tensors()
        specs = nf4.NF4Weight.tensor_specs(w.shape, 64, dq)
        assert set(tensors) == set(specs)
        for name, (shape, dtype) in specs.items():
            assert tuple(tensors[name].shape) == shape and tensors[name].dtype == dtype, name
        q2 = nf4.NF4Weight.from_tensors(tensors, w.shape, 64)
        assert torch.equal(nf4.dequantize_nf4(q2), nf4.dequantize_nf4(q))
    # 577*33 = 19041 values: 9521 bytes + 298 float32 scales; double quant: 298 bytes + 2 + 256 + 1 floats
    assert nf4.quantize_nf4(w, 64).nbytes() == 9521 + 298 * 4
    assert nf4.quantize_nf4(w, 64, True).nbytes() == 9521 + 298 + (2 + 256 + 1) * 4


def test_rejects_bad_blocksize():
    with pytest.raises(ValueError):
        nf4.quantize_nf4(torch.randn(4, 64), blocksize=48)


@pytest.mark.parametrize("numel", [64 * 7, 64 * 7 + 5, 64 * 7 + 1])  # whole chunks, a partial block, an odd tail
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_decode_is_bit_identical_to_the_reference(monkeypatch, numel, dtype):
    """The torch path decodes whole blocks at a time into one output (3 blocks per chunk here)."""
    monkeypatch.setattr(nf4, "_DECODE_CHUNK", 3 * 64)
    w = torch.randn(numel, generator=torch.Generator().manual_seed(numel))
    packed, absmax = nf4.quantize_nf4_reference(w, 64)
    q = nf4.NF4Weight(packed, (numel,), 64, absmax=absmax)
    out = nf4.dequantize_nf4(q, dtype=dtype, use_bnb=False)
    assert out.dtype == dtype and out.shape == (numel,)
    assert torch.equal(out, nf4.dequantize_nf4_reference(packed, absmax, (numel,), 64, dtype))
