"""Measure what a training step saves for backward, the quantity activation memory is made of.

Saved tensors are seen through ``torch.autograd.graph.saved_tensors_hooks`` and counted once per
storage; parameters and buffers of the model are excluded (they are resident anyway). This is
the ground truth the planner's formulas are tested against.
"""
from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from .s2a.loss import causal_lm_loss


class SavedTensorCounter:
    """Context manager: total unique bytes saved for backward, excluding the model's own tensors."""

    def __init__(self, model: nn.Module | None = None, by_shape: bool = False):
        self._exclude = set()
        if model is not None:
            for t in list(model.parameters()) + list(model.buffers()):
                if t.device.type != "meta":
                    self._exclude.add(t.untyped_storage().data_ptr())
        self._seen: dict[int, int] = {}
        self.by_shape: dict[tuple, int] | None = defaultdict(int) if by_shape else None
        self._ctx = None

    def _pack(self, t: torch.Tensor):
        if isinstance(t, nn.Parameter) or t.device.type == "meta":
            return t
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self._exclude and ptr not in self._seen:
            self._seen[ptr] = storage.nbytes()
            if self.by_shape is not None:
                self.by_shape[(tuple(t.shape), str(t.dtype).removeprefix("torch."))] += storage.nbytes()
        return t

    def __enter__(self):
        self._ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)
        self._ctx.__enter__()
        return self

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())


def saved_bytes_of_step(model: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Bytes saved for backward by one forward pass of ``model`` on ``batch`` (then freed)."""
    with SavedTensorCounter(model) as counter:
        loss = causal_lm_loss(model, batch)
    del loss
    return counter.bytes
