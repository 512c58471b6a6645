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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_f,in_f", [(96, 64), (512, 512), (1024, 768)])  # torch reference; bitsandbytes
def test_nf4_decode_peak(out_f, in_f, dtype):
    """dequantize_nf4's peak in forward and backward of an NF4Linear: float32 levels (and, on the
    reference path, their product with the absmax) plus the cast, per byte."""
    from edgetune.methods.qlora.layer import NF4Linear
    from edgetune.quant.nf4 import dequantize_nf4

    torch.manual_seed(0)
    layer = NF4Linear.from_weight(torch.randn(out_f, in_f), None, 64, True).to(dtype)
    dequantize_nf4(layer.nf4_weight(), dtype=dtype)  # warm the decoder's cached byte table
    n, a = out_f * in_f, torch.empty(0, dtype=dtype).element_size()
    assert (n >= NF4_BNB_MIN_NUMEL) == (out_f == in_f == 512 or out_f == 1024)
    expected = nf4_decode_bytes(n, a, "cpu")
    x = torch.randn(3, in_f, dtype=dtype, requires_grad=True)
    with PeakLive() as fwd:
        y = layer(x)
    with PeakLive() as bwd:
        y.backward(torch.ones_like(y))
    out_bytes = y.numel() * a
    assert expected <= fwd.peak <= expected + out_bytes, (fwd.peak, expected)  # + y itself
    assert expected <= bwd.peak <= expected + x.numel() * a * 2, (bwd.peak, expected)  # + grad_x
    assert nf4_decode_bytes(n, a, "cuda") == n * (8 + (a if a != 4 else 0)) + 4 * -(-n // 64)  # reference on CUDA


def test_nf4_constants_match_the_runtime():
    from edgetune.quant import nf4

    assert NF4_BNB_MIN_NUMEL == nf4._BNB_DEQUANT_MIN_NUMEL
