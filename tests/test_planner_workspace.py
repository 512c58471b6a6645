"""Workspaces the planner adds at the peak, against the bytes a live-storage tracker sees.

:class:`PeakLive` is a ``TorchDispatchMode`` that records every storage an op creates (not views
of its inputs) and drops it once a weak reference says it was freed; its peak is the largest sum
of live created storages at an op boundary. That is what an allocator must hold at once, the
planner's quantity, on any device (the same ops run on CUDA). First: the NF4 decoder, whose
float32 intermediates are alive while a qlora projection (or an NF4 head slice) is decoded.
"""
from __future__ import annotations

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_flatten
from torch.utils._python_dispatch import TorchDispatchMode

from edgetune.planner import NF4_BNB_MIN_NUMEL, nf4_decode_bytes


class PeakLive(TorchDispatchMode):
    """Peak bytes of the storages created inside the mode that are alive at once."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for key in [k for k, (ref, _) in self.live.items() if ref.expired()]:
            del self.live[key]
        inputs = {StorageWeakRef(t.untyped_storage()).cdata for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ref = StorageWeakRef(storage)
                if ref.cdata not in self.live and ref.cdata not in inputs:
                    self.live[ref.cdata] = (ref, storage.nbytes())
        self.peak = max(self.peak, self.now())
        return out

    def now(self) -> int:
        return sum(n for ref, n in self.live.values() if not ref.expired())


def test_tracker_sees_temporaries_and_frees():
    x = torch.randn(1000)
    with PeakLive() as m:
        y = (x * 2).sum()  # a 4000-byte temporary, freed; a 4-byte result kept
        kept = m.now()
    assert m.peak >= 4004 and kept == 4 and y.numel() == 1


def _decode_peaks(layer, x):
    """(forward peak, backward peak, y) of an NF4Linear under the tracker."""
    with PeakLive() as fwd:
        y = layer(x)
    with PeakLive() as bwd:
        y.backward(torch.ones_like(y))
    return fwd.peak, bwd.peak, y


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("out_f,in_f", [(96, 64), (512, 512), (1024, 768)])  # torch reference; bitsandbytes
def test_nf4_decode_peak(out_f, in_f, dtype, double_quant):
    """dequantize_nf4's peak in forward and backward of an NF4Linear on the CPU: float32 levels (and,
    on the reference path, their product with the absmax) plus the cast, per byte; the absmax
    decoded to float32 under double quantization only."""
    from edgetune.methods.qlora.layer import NF4Linear
    from edgetune.quant.nf4 import dequantize_nf4

    torch.manual_seed(0)
    layer = NF4Linear.from_weight(torch.randn(out_f, in_f), None, 64, double_quant).to(dtype)
    dequantize_nf4(layer.nf4_weight(), dtype=dtype)  # warm the decoder's cached byte table
    n, a = out_f * in_f, torch.empty(0, dtype=dtype).element_size()
    assert (n >= NF4_BNB_MIN_NUMEL) == (out_f == in_f == 512 or out_f == 1024)
    expected = nf4_decode_bytes(n, a, "cpu", 64, double_quant)
    x = torch.randn(3, in_f, dtype=dtype, requires_grad=True)
    fwd, bwd, y = _decode_peaks(layer, x)
    assert expected <= fwd <= expected + y.numel() * a, (fwd, expected)  # + y itself
    assert expected <= bwd <= expected + (y.numel() + x.numel()) * a, (bwd, expected)  # + grad_y, grad_x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_f,in_f", [
    (32, 64),  # 2048 values: one call of the reference (at most one chunk)
    (31, 65),  # 2015: one call, its last block padded (2048 float32 levels and products)
    (96, 64),  # 6144: chunks of 3968 (62 whole blocks of the 4000-value chunk) and 2176
    (95, 65),  # 6175: odd, its last block padded
    (400, 64),  # 25600: six full chunks and a short one
])
def test_nf4_chunked_decode_peak(monkeypatch, out_f, in_f, dtype):
    """The torch path every CUDA tensor takes, run here on the CPU with bitsandbytes switched off
    and the chunk shrunk (the same ops, so the same live bytes): a tensor of more than
    _DECODE_CHUNK values is decoded into one preallocated output, whole blocks at a time."""
    from edgetune import planner
    from edgetune.methods.qlora.layer import NF4Linear
    from edgetune.quant import nf4

    monkeypatch.setattr(nf4, "_bnb_ok", lambda t: False)  # as on CUDA: never bitsandbytes
    monkeypatch.setattr(nf4, "_DECODE_CHUNK", 4000)
    monkeypatch.setattr(planner, "NF4_DECODE_CHUNK", 4000)
    torch.manual_seed(0)
    layer = NF4Linear.from_weight(torch.randn(out_f, in_f), None, 64, True).to(dtype)
    q = layer.nf4_weight()
    w = nf4.dequantize_nf4(q, dtype=dtype)  # warms the byte table; bit-identical to the one-call reference
    assert torch.equal(w, nf4.dequantize_nf4_reference(q.packed, q.block_absmax(), q.shape, 64, dtype))
    n, a = out_f * in_f, torch.empty(0, dtype=dtype).element_size()
    expected = nf4_decode_bytes(n, a, "cuda")
    x = torch.randn(3, in_f, dtype=dtype, requires_grad=True)
    fwd, bwd, y = _decode_peaks(layer, x)
    assert expected <= fwd <= expected + y.numel() * a, (fwd, expected)
    assert expected <= bwd <= expected + (y.numel() + x.numel()) * a, (bwd, expected)


def test_nf4_constants_match_the_runtime():
    from edgetune.methods import embedding
    from edgetune.quant import nf4
    from edgetune.planner import NF4_DECODE_CHUNK, NF4_HEAD_SLICE_BYTES

    assert NF4_BNB_MIN_NUMEL == nf4._BNB_DEQUANT_MIN_NUMEL
    assert NF4_DECODE_CHUNK == nf4._DECODE_CHUNK
    assert NF4_HEAD_SLICE_BYTES == embedding.HEAD_SLICE_BYTES
