"""The planner's loss-head workspace against the live bytes of edgetune/s2a/loss.py's forward.

Dense and NF4 (embed_nf4) heads, fp32 and bf16, one or many vocab slices (the logits budget is
shrunk to force slicing at test sizes), batch 1 (rows are a view) and 2 (a reshaped copy), one
or several row chunks, and sizes chosen so that each moment the formula takes the max of is the
peak somewhere: the decoded-slice cap of a coded head, a last slice on another decoder path than
the full ones, the matmul's fp32 cast, W[y] decoded, the end-of-chunk difference. What remains
after the forward is the saved dh (N, C) the activation formula counts; the rest of the peak is
the workspace. The formula leaves out only per-row vectors (running max and sum, target logits,
masks: tens of bytes a row).
"""
from __future__ import annotations

import pytest
import torch

from edgetune import planner
from edgetune.planner import JobSpec, ModelShape, loss_workspace_bytes
from edgetune.s2a import loss as L
from test_planner_workspace import PeakLive


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch,seq,hidden,vocab,coded,budget,rows", [
    (1, 65, 128, 1000, False, None, None),  # one slice: the whole vocabulary
    (2, 33, 128, 1000, False, None, None),  # batch 2: the rows are a copy
    (1, 65, 128, 1000, False, 20000, None),  # 4 slices of 256
    (2, 33, 128, 1000, False, 40000, None),
    (1, 65, 128, 1000, True, None, None),  # NF4 head: the decoder's float32 intermediates
    (1, 300, 64, 3000, True, 20000, None),  # 12 slices, each freed before the next is decoded
    (1, 129, 64, 8192, True, None, None),  # a (8192, 64) slice: bitsandbytes' decoder (>= 2**18 values)
    (2, 65, 128, 4096, True, 600000, None),  # 4 slices of 1171, the last shorter
    (1, 17, 128, 1000, True, 153600, None),  # 16 rows: the decoded slice's cap (300 / 600 rows) binds
    (1, 17, 128, 1000, False, 153600, None),  # ... a dense head has none (the whole vocabulary)
    (1, 17, 64, 7096, True, 524288, None),  # bf16: 4096-row slices on bitsandbytes, the last on the reference
    (1, 65, 1024, 1000, False, 20000, None),  # wide rows: the end-of-chunk difference is the peak
    (1, 65, 512, 1000, False, 76800, None),  # bf16: the matmul's (r, C) result and its fp32 cast
    (1, 449, 448, 1000, True, 20000, None),  # fp32: W[y] decoded from its gathered bytes
    (2, 65, 128, 1000, False, None, 48),  # 3 row chunks: the previous chunk's result still bound
    (2, 65, 128, 1000, True, 40000, 48),
])
def test_loss_workspace_matches_live_bytes(monkeypatch, batch, seq, hidden, vocab, coded, budget, rows, dtype):
    from edgetune.methods.embedding import NF4Embedding, NF4LMHead

    if budget:
        monkeypatch.setattr(L, "LOSS_LOGITS_BYTES", budget)  # vocab_slice reads it, for loss and planner alike
    if rows:
        monkeypatch.setattr(planner, "LOSS_MAX_ROWS", rows)  # the loss takes its chunk as an argument
    torch.manual_seed(0)
    weight = torch.randn(vocab, hidden) * 0.02
    if coded:
        head = NF4LMHead(NF4Embedding.from_weight(weight, 64, True).to(dtype), tied=True)
    else:
        head = torch.nn.Linear(hidden, vocab, bias=False, dtype=dtype).requires_grad_(False)
        head.weight.copy_(weight)
    h = torch.randn(batch, seq, hidden, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, vocab, (batch, seq))
    chunk = {"rows": rows} if rows else {}
    L.chunked_causal_lm_loss(h, head, labels, **chunk)  # warm caches (the NF4 byte table)
    with PeakLive() as live:
        loss = L.chunked_causal_lm_loss(h, head, labels, **chunk)
        kept = live.now()
    r = min(batch * (seq - 1), rows or L.LOSS_MAX_ROWS)
    assert kept == batch * (seq - 1) * hidden * h.element_size() + loss.element_size()  # dh and the loss
    shape = ModelShape("llama", hidden, 4 * hidden, 1, 2, 2, hidden // 2, vocab, 4096, True)
    job = JobSpec("qlora", dtype=str(dtype).removeprefix("torch."), act_bits=4, embed_nf4=coded)
    predicted = loss_workspace_bytes(shape, job, batch, seq, "cpu")
    measured = live.peak - kept
    assert 0 <= measured - predicted <= 64 * r + 1024, (measured, predicted)


def test_coded_slice_cap_matches_the_loss():
    """The planner and the loss agree on a coded head's slice: its decoded rows' bytes."""
    from edgetune.methods.embedding import NF4Embedding

    emb = NF4Embedding.from_weight(torch.randn(512, 128), 64, True)
    assert emb.decoded_row_bytes(torch.bfloat16) == 128 * 2 and emb.decoded_row_bytes(torch.float32) == 128 * 4
    assert L.DenseHead(torch.zeros(4, 128)).decoded_row_bytes(torch.float32) == 0
    # 511 rows of 3072 in bf16 (llama-3.2-3b at 512): the logits alone would allow 24624 rows of a
    # 128256 vocabulary, the decoded slice (48 MiB of 6 KiB rows) 8192
    assert L.vocab_slice(511, 128256) == 24624 and L.vocab_slice(511, 128256, 3072 * 2) == 8192
