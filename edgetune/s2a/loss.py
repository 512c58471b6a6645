"""A chunked causal-LM cross-entropy that never keeps vocabulary-sized tensors for backward.

The plain head saves the full (N, V) log-probs (192 MiB on SmolLM2 at 4 × 256; 14% of PEFT
LoRA's saved bytes). Here forward walks over row chunks: each chunk's logits (c, V) live only
inside the loop. The loss is the last node of the graph and its upstream gradient is a scalar,
so the chunk's gradient is known in forward already: dlogits = (softmax − onehot) / count, and
dh = dlogits · W. Forward stores that dh (N, C) — the same bytes as the hidden states a
recomputing backward would need — and backward only scales it by the upstream gradient.

Why in forward and not recomputed in backward: recomputing costs one more (N × C × V) matmul,
the largest single matmul of a small LM's step (about 9% of SmolLM2-135M's step on the CPU).
With the gradient taken in forward, the head costs what the plain head costs — one logits
matmul and one dh matmul — without its (N, V) tensors. (Liger's fused linear cross-entropy does
the same.) Under ``torch.no_grad`` (eval) no gradient is computed.
"""
from __future__ import annotations

import torch
from torch import nn

IGNORE_INDEX = -100


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """mean over valid rows of CE(h Wᵀ + b, y); h (N, C), W (V, C), y (N,) with −100 ignored.

    ``grads`` says which of (hidden, weight, bias) need a gradient; forward computes those
    gradients for a unit upstream gradient and saves them (dh (N, C) in h's dtype; dW (V, C) and
    db (V,) only when the head itself trains).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk: int, grads: tuple[bool, bool, bool]):
        n = hidden.shape[0]
        valid = labels != IGNORE_INDEX  # (N,)
        count = max(int(valid.sum()), 1)
        acc = torch.promote_types(hidden.dtype, torch.float32)
        want_h, want_w, want_b = grads[0], grads[1], grads[2] and bias is not None
        dh = torch.empty_like(hidden) if want_h else None  # (N, C)
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None  # (V, C)
        db = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if want_b else None  # (V,)
        total = hidden.new_zeros((), dtype=acc)
        for s in range(0, n, chunk):
            h = hidden[s:s + chunk]  # (c, C)
            y = labels[s:s + chunk].clamp_min(0).unsqueeze(1)  # (c, 1)
            ok = valid[s:s + chunk]  # (c,)
            logits = _logits(h, weight, bias)  # (c, V) fp32
            lse = torch.logsumexp(logits, dim=-1)  # (c,)
            total = total + ((lse - logits.gather(1, y).squeeze(1)) * ok).sum()
            if not (want_h or want_w or want_b):
                continue
            p = logits.sub_(lse.unsqueeze(1)).exp_()  # (c, V) softmax, in the logits' buffer
            p.scatter_add_(1, y, -torch.ones_like(p[:, :1]))  # softmax − onehot
            p.mul_((ok.to(acc) / count).unsqueeze(1))  # ignored rows get no gradient
            if want_h:
                dh[s:s + chunk] = (p.to(weight.dtype) @ weight).to(hidden.dtype)
            if want_w:
                dw += p.t() @ h.to(acc)
            if want_b:
                db += p.sum(0)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
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
        return dh, dw, db, None, None, None


def _logits(h: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    out = h @ weight.t()
    if bias is not None:
        out = out + bias
    return out.to(torch.promote_types(out.dtype, torch.float32))


def chunked_causal_lm_loss(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Causal-LM loss from the final hidden states (B, T, C): position t predicts labels[t + 1]."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B·(T-1), C)
    y = labels[:, 1:].reshape(-1)  # (B·(T-1),)
    on = torch.is_grad_enabled()
    grads = (on and h.requires_grad, on and head.weight.requires_grad,
             on and head.bias is not None and head.bias.requires_grad)
    return ChunkedLinearCrossEntropy.apply(h, head.weight, head.bias, y, chunk, grads)


def causal_lm_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """The training loss of ``model`` on ``batch`` (input_ids, attention_mask, labels).

    Models rewritten with a chunked loss head (``model.edgetune_loss_chunk`` set by the S2A
    rewrite) run the decoder and the chunked cross-entropy; every other model runs its own HF
    forward. Both give the same mean cross-entropy over shifted, non-ignored labels.
    """
    chunk = getattr(model, "edgetune_loss_chunk", None)
    if not chunk:
        return model(**batch).loss
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    hidden = model.base_model(**inputs).last_hidden_state  # (B, T, C)
    return chunked_causal_lm_loss(hidden, model.get_output_embeddings(), batch["labels"], chunk)
