"""A causal-LM cross-entropy that never keeps vocabulary-sized tensors, for dense or coded heads.

The plain head saves the full (N, V) log-probs (192 MiB on SmolLM2 at 4 × 256; 14% of PEFT
LoRA's saved bytes). Here forward walks over the vocabulary in slices with an online softmax
(the running max / sum-exp of FlashAttention, with the head's rows as the "values"):

    lse = m + log z,   dh = (Σ_s exp(l_s − m) W_s) / z − W[y],   both in one pass over the slices.

The loss is the last node of the graph and its upstream gradient is a scalar, so the gradient
is known in forward already: forward stores dh (N, C) — the same bytes as the hidden states a
recomputing backward would need — and backward only scales it. No second logits matmul is ever
made (it would be the largest matmul of a small LM's step, about 9% of SmolLM2-135M's on the
CPU); Liger's fused linear cross-entropy does the same.

Why vocabulary slices and not row chunks: what is alive at once is a (rows, vs) logits slice with
vs sized from a byte budget, so the transient is 48 MiB whatever the vocabulary (128k-token
Llama-3 heads included), and a head stored coded (:class:`~edgetune.methods.embedding.NF4Embedding`,
``embed_nf4``) decodes each slice once per step instead of materialising its whole weight.
Under ``torch.no_grad`` (eval) no gradient is computed. A head that trains itself (rare: the
adapters live in the decoder) needs the final lse for its own gradient, so it takes a second pass.
"""
from __future__ import annotations

import torch
from torch import nn

IGNORE_INDEX = -100
LOSS_MAX_ROWS = 4096  # rows per chunk: the (rows, C) fp32 accumulators stay small (a coded head decodes per chunk)
LOSS_LOGITS_BYTES = 48 * 2**20  # fp32 logits alive at once: (rows, vs) with vs = this / (4 rows)
MIN_VOCAB_SLICE = 256


def vocab_slice(rows: int, vocab: int, decoded_row_bytes: int = 0) -> int:
    """Head rows per slice for a chunk of ``rows`` hidden states (shared with the planner).

    The fp32 logits slice (rows, vs) is held to LOSS_LOGITS_BYTES; so is a coded head's decoded
    slice (vs, C) of ``decoded_row_bytes`` per row (with few rows the logits alone would let it
    decode nearly the whole vocabulary at once).
    """
    vs = max(MIN_VOCAB_SLICE, LOSS_LOGITS_BYTES // (4 * max(rows, 1)))
    if decoded_row_bytes:
        vs = min(vs, max(MIN_VOCAB_SLICE, LOSS_LOGITS_BYTES // decoded_row_bytes))
    return min(vocab, vs)


class DenseHead:
    """A dense head weight (V, C) seen through the interface coded heads implement."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        self.vocab = weight.shape[0]

    def decoded_row_bytes(self, dtype: torch.dtype) -> int:  # slices are views: nothing is decoded
        return 0

    def slice(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:  # (stop-start, C), a view
        return self.weight[start:stop].to(dtype)

    def rows(self, index: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:  # (n, C)
        return self.weight.index_select(0, index).to(dtype)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """mean over valid rows of CE(h Wᵀ + b, y); h (N, C), W (V, C), y (N,) with −100 ignored.

    ``head`` gives W slice by slice (:class:`DenseHead` over ``weight``, or a coded head, whose
    ``weight`` argument is then None). ``grads`` says which of (hidden, weight, bias) need a
    gradient; forward computes those for a unit upstream gradient and saves them (dh (N, C) in
    h's dtype; dW (V, C) and db (V,) only when the head itself trains). ``rows`` bounds the rows
    per chunk (tests use small values to exercise the chunking).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, head, grads: tuple[bool, bool, bool], rows: int = LOSS_MAX_ROWS):
        n = hidden.shape[0]
        valid = labels != IGNORE_INDEX  # (N,)
        count = max(int(valid.sum()), 1)
        acc = torch.promote_types(hidden.dtype, torch.float32)
        want_h, want_w, want_b = grads[0], grads[1] and weight is not None, grads[2] and bias is not None
        dh = torch.empty_like(hidden) if want_h else None  # (N, C)
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None  # (V, C)
        db = torch.zeros(head.vocab, dtype=acc, device=hidden.device) if want_b else None  # (V,)
        total = hidden.new_zeros((), dtype=acc)
        for s in range(0, n, rows):
            h, y, ok = hidden[s:s + rows], labels[s:s + rows].clamp_min(0), valid[s:s + rows]  # (r, C), (r,), (r,)
            weights = (ok.to(acc) / count).unsqueeze(1)  # (r, 1): ignored rows get no gradient
            if want_w or want_b:
                lse, tgt, _ = _online_pass(h, head, bias, y, acc, want_acc=False)
                dh_c = _second_pass(h, head, bias, y, lse, weights, dw, db, want_h, s)
            else:
                lse, tgt, dh_c = _online_pass(h, head, bias, y, acc, want_acc=want_h)
                if want_h:
                    dh_c = (dh_c - head.rows(y, acc)).mul_(weights)  # softmax·W − W[y], (r, C)
            total = total + ((lse - tgt) * ok).sum()
            if want_h:
                dh[s:s + rows] = dh_c.to(hidden.dtype)
        ctx.dtypes = (weight.dtype if weight is not None else None, bias.dtype if bias is not None else None)
        ctx.has = (want_h, want_w, want_b)
        ctx.save_for_backward(*(g for g in (dh, dw, db) if g is not None))
        return total / count

    @staticmethod
    def backward(ctx, grad):
        saved = iter(ctx.saved_tensors)
        dh, dw, db = (next(saved) if has else None for has in ctx.has)
        w_dtype, b_dtype = ctx.dtypes
        dh = None if dh is None else dh * grad.to(dh.dtype)
        dw = None if dw is None else (dw * grad.to(dw.dtype)).to(w_dtype)
        db = None if db is None else (db * grad.to(db.dtype)).to(b_dtype)
        return dh, dw, db, None, None, None, None


def _slice_logits(h, w, bias, start, stop, acc) -> torch.Tensor:
    out = h @ w.t()  # (r, vs)
    if bias is not None:
        out = out + bias[start:stop]
    return out.to(acc)


def _online_pass(h, head, bias, y, acc, want_acc: bool):
    """One pass over the vocabulary: (lse (r,), target logit (r,), Σ softmax·W (r, C) or None)."""
    r = h.shape[0]
    vs = vocab_slice(r, head.vocab, head.decoded_row_bytes(h.dtype))
    m = torch.full((r,), float("-inf"), dtype=acc, device=h.device)  # running max
    z = torch.zeros(r, dtype=acc, device=h.device)  # running Σ exp(l − m)
    tgt = torch.zeros(r, dtype=acc, device=h.device)
    out = torch.zeros(h.shape, dtype=acc, device=h.device) if want_acc else None  # (r, C)
    for start in range(0, head.vocab, vs):
        stop = min(start + vs, head.vocab)
        w = head.slice(start, stop, h.dtype)  # (vs, C)
        logits = _slice_logits(h, w, bias, start, stop, acc)  # (r, vs) fp32
        inside = (y >= start) & (y < stop)
        tgt += torch.where(inside, logits.gather(1, (y - start).clamp(0, stop - start - 1).unsqueeze(1)).squeeze(1), 0)
        m_new = torch.maximum(m, logits.amax(1))
        scale = torch.exp(m - m_new)  # (r,): 0 on the first slice
        p = logits.sub_(m_new.unsqueeze(1)).exp_()  # (r, vs) unnormalised softmax, in the logits' buffer
        z = z * scale + p.sum(1)
        if want_acc:
            out.mul_(scale.unsqueeze(1)).add_((p.to(w.dtype) @ w).to(acc))
        m = m_new
        del w, logits, p  # freed before the next slice is decoded and multiplied
    lse = m + z.log()
    if want_acc:
        out.div_(z.unsqueeze(1))
    return lse, tgt, out


def _second_pass(h, head, bias, y, lse, weights, dw, db, want_h: bool, row0: int):
    """With the final lse known: dlogits = (softmax − onehot)·weights per slice, into dh, dW and db."""
    r = h.shape[0]
    vs = vocab_slice(r, head.vocab, head.decoded_row_bytes(h.dtype))
    dh = torch.zeros(h.shape, dtype=lse.dtype, device=h.device) if want_h else None  # (r, C)
    for start in range(0, head.vocab, vs):
        stop = min(start + vs, head.vocab)
        w = head.slice(start, stop, h.dtype)  # (vs, C)
        p = _slice_logits(h, w, bias, start, stop, lse.dtype).sub_(lse.unsqueeze(1)).exp_()  # (r, vs) softmax
        inside = ((y >= start) & (y < stop)).nonzero().squeeze(1)
        p[inside, y[inside] - start] -= 1.0
        p.mul_(weights)
        if want_h:
            dh += (p.to(w.dtype) @ w).to(dh.dtype)
        if dw is not None:
            dw[start:stop] += p.t() @ h.to(dw.dtype)
        if db is not None:
            db[start:stop] += p.sum(0)
        del w, p
    return dh


def head_source(head: nn.Module):
    """(weight tensor or None, bias or None, slice source) of an output-embedding module."""
    if hasattr(head, "weight_slices"):  # a coded (frozen) head: edgetune.methods.embedding
        return None, getattr(head, "bias", None), head.weight_slices()
    return head.weight, head.bias, DenseHead(head.weight)


def chunked_causal_lm_loss(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor,
                           rows: int = LOSS_MAX_ROWS) -> torch.Tensor:
    """Causal-LM loss from the final hidden states (B, T, C): position t predicts labels[t + 1]."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B·(T-1), C)
    y = labels[:, 1:].reshape(-1)  # (B·(T-1),)
    weight, bias, source = head_source(head)
    on = torch.is_grad_enabled()
    grads = (on and h.requires_grad, on and weight is not None and weight.requires_grad,
             on and bias is not None and bias.requires_grad)
    return ChunkedLinearCrossEntropy.apply(h, weight, bias, y, source, grads, rows)


def causal_lm_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """The training loss of ``model`` on ``batch`` (input_ids, attention_mask, labels).

    Models rewritten with a chunked loss head (``model.edgetune_loss_chunk`` set by the S2A
    rewrite: the rows per chunk) run the decoder and the chunked cross-entropy; every other model
    runs its own HF forward. Both give the same mean cross-entropy over shifted, non-ignored labels.
    """
    rows = getattr(model, "edgetune_loss_chunk", None)
    if not rows:
        return model(**batch).loss
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = model.base_model(**inputs).last_hidden_state  # (B, T, C)
    return chunked_causal_lm_loss(hidden, model.get_output_embeddings(), batch["labels"], rows)
