"""The planner's loss-head workspace against the live bytes of edgetune/s2a/loss.py's forward.

Dense and NF4 (embed_nf4) heads, fp32 and bf16, one or many vocab slices (the logits budget is
shrunk to force slicing at test sizes), batch 1 (rows are a view) and 2 (a reshaped copy), and
a slice large enough for bitsandbytes' decoder. What remains after the forward is the saved
dh (N, C) the activation formula counts; the rest of the peak is the workspace. The formula
leaves out only per-row vectors (running max and sum, target logits, masks: tens of bytes a row).
"""
from __future__ import annotations

import pytest
import torch

from edgetune.planner import JobSpec, ModelShape, loss_workspace_bytes
from edgetune.s2a import loss as L
from test_planner_workspace import PeakLive


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,seq,hidden,vocab,coded,budget", [
    (1, 65, 128, 1000, False, None),  # one slice: the whole vocabulary
    (2, 33, 128, 1000, False, None),  # batch 2: the rows are a copy
    (1, 65, 128, 1000, False, 20000),  # 4 slices of 256
    (2, 33, 128, 1000, False, 40000),
    (1, 65, 128, 1000, True, None),  # NF4 head: the decoder's float32 intermediates
    (1, 300, 64, 3000, True, 20000),  # 12 slices: a slice decoded while the previous is bound
    (1, 129, 64, 8192, True, None),  # a (8192, 64) slice: bitsandbytes' decoder (>= 2**18 values)
    (2, 65, 128, 4096, True, 600000),  # 4 slices of 1171, the last shorter
])
def test_loss_workspace_matches_live_bytes(monkeypatch, batch, seq, hidden, vocab, coded, budget, dtype):
    from edgetune.methods.embedding import NF4Embedding, NF4LMHead

    if budget:
        monkeypatch.setattr(L, "LOSS_LOGITS_BYTES", budget)  # vocab_slice reads it, for loss and planner alike
    torch.manual_seed(0)
    weight = torch.randn(vocab, hidden) * 0.02
    if coded:
        head = NF4LMHead(NF4Embedding.from_weight(weight, 64, True).to(dtype), tied=True)
    else:
        head = torch.nn.Linear(hidden, vocab, bias=False, dtype=dtype).requires_grad_(False)
        head.weight.copy_(weight)
    h = torch.randn(batch, seq, hidden, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, seq))
    L.chunked_causal_lm_loss(h, head, labels)  # warm caches (the NF4 byte table)
    with PeakLive() as live:
        loss = L.chunked_causal_lm_loss(h, head, labels)
        kept = live.now()
    rows = min(batch * (seq - 1), L.LOSS_MAX_ROWS)
    assert kept == batch * (seq - 1) * hidden * h.element_size() + loss.element_size()  # dh and the loss
    shape = ModelShape("llama", hidden, 4 * hidden, 1, 2, 2, hidden // 2, vocab, 4096, True)
    job = JobSpec("qlora", dtype=str(dtype).removeprefix("torch."), act_bits=4, embed_nf4=coded)
    predicted = loss_workspace_bytes(shape, job, batch, seq, "cpu")
    measured = live.peak - kept
    assert 0 <= measured - predicted <= 64 * rows + 1024, (measured, predicted)
