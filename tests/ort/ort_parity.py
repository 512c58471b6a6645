"""The two sides of every ORT parity test: N training steps in plain torch and in ORT.

Both use AdamW (torch's semantics, eps 1e-8, no weight decay), a global-norm clip of 1.0 and a
constant learning rate, and return (losses, trainable tensors by name).
"""
from __future__ import annotations

import numpy as np
import torch

from edgetune.ort.export import load_plain
from edgetune.ort.train import adapter_arrays, open_session


class Act4Reference(torch.nn.Module):
    """S2A's own 4-bit derivative-coded nonlinearity (edgetune.s2a.functions.Act4Pointwise)."""

    def __init__(self, op: str):
        super().__init__()
        self.op = op

    def forward(self, x):
        from edgetune.s2a.functions import Act4Pointwise

        return Act4Pointwise.apply(x, self.op)


def swap_act4_reference(model) -> None:
    """Replace every SiLU/GELU module with :class:`Act4Reference`: what the ORT Act4 ops compute."""
    from edgetune.models.arch import get_submodule_parent
    from edgetune.s2a.rewriter import activation_op

    for name, module in list(model.named_modules()):
        op = activation_op(module)
        if op in ("silu", "gelu", "gelu_tanh"):
            parent, leaf = get_submodule_parent(model, name)
            setattr(parent, leaf, Act4Reference(op))


def torch_steps(compiled_dir, batches, lr: float, prepare=None):
    """``prepare(model)`` may swap modules first (e.g. S2A's 4-bit nonlinearities)."""
    model, _, _, _ = load_plain(compiled_dir)
    if prepare is not None:
        prepare(model)
    model.train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(list(params.values()), lr=lr, eps=1e-8, weight_decay=0.0)
    losses = []
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses, {n: p.detach().clone() for n, p in params.items()}


def ort_steps(ort_dir, batches, lr: float):
    sess = open_session(ort_dir)
    sess.module.train()
    sess.optimizer.set_learning_rate(lr)
    losses = []
    for b in batches:
        loss = sess.module(b["input_ids"].numpy(), b["attention_mask"].numpy(), b["labels"].numpy())
        sess.optimizer.step()
        sess.module.lazy_reset_grad()
        losses.append(float(np.asarray(loss).reshape(-1)[0]))
    return losses, {k: torch.from_numpy(np.array(v)) for k, v in adapter_arrays(sess.state, sess.manifest).items()}
