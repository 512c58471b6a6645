"""A chunked causal-LM cross-entropy that never keeps vocabulary-sized tensors for backward.

The plain head saves the full (N, V) log-probs (192 MiB on SmolLM2 at 4 × 256; 14% of PEFT
LoRA's saved bytes). Here forward walks over row chunks, computing each chunk's logits, its
log-sum-exp and the target logit, and keeps only the final hidden states (N, C) and one float
per row. Backward recomputes each chunk's logits from them: dlogits = softmax − onehot, and
dh = dlogits · W. The idea of cut cross-entropy / Liger's fused linear CE, in plain torch.
"""
from __future__ import annotations

import torch
from torch import nn

IGNORE_INDEX = -100


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """mean over valid rows of CE(h Wᵀ + b, y); h (N, C), W (V, C), y (N,) with −100 ignored."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk: int):
        n = hidden.shape[0]
        valid = labels != IGNORE_INDEX
        count = int(valid.sum())
        acc = torch.promote_types(hidden.dtype, torch.float32)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        total = hidden.new_zeros((), dtype=acc)
        for s in range(0, n, chunk):
            logits = _logits(hidden[s:s + chunk], weight, bias)  # (c, V) fp32
            lse[s:s + chunk] = torch.logsumexp(logits, dim=-1)
            y = labels[s:s + chunk]
            ok = valid[s:s + chunk]
            target = logits.gather(1, y.clamp_min(0).unsqueeze(1)).squeeze(1)
            total = total + ((lse[s:s + chunk] - target) * ok).sum()
        ctx.save_for_backward(hidden, weight, bias if bias is not None else torch.empty(0), labels, lse)
        ctx.chunk, ctx.count, ctx.has_bias = chunk, count, bias is not None
        return total / max(count, 1)

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, labels, lse = ctx.saved_tensors
        bias = bias if ctx.has_bias else None
        acc = lse.dtype
        scale = grad.to(acc) / max(ctx.count, 1)
        dh = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if ctx.needs_input_grad[1] else None
        db = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if ctx.needs_input_grad[2] else None
        for s in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[s:s + ctx.chunk]
            y = labels[s:s + ctx.chunk]
            ok = (y != IGNORE_INDEX).unsqueeze(1)
            p = torch.exp(_logits(h, weight, bias) - lse[s:s + ctx.chunk].unsqueeze(1))  # (c, V)
            p.scatter_add_(1, y.clamp_min(0).unsqueeze(1), -torch.ones_like(p[:, :1]))
            p = p * ok * scale
            if dh is not None:
                dh[s:s + ctx.chunk] = (p.to(weight.dtype) @ weight).to(hidden.dtype)
            if dw is not None:
                dw += p.t() @ h.to(acc)
            if db is not None:
                db += p.sum(0)
        return (dh, None if dw is None else dw.to(weight.dtype), None if db is None else db.to(weight.dtype),
                None, None)


def _logits(h: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    out = h @ weight.t()
    if bias is not None:
        out = out + bias
    return out.to(torch.promote_types(out.dtype, torch.float32))


def chunked_causal_lm_loss(hidden: torch.Tensor, head: nn.Linear, labels: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """Causal-LM loss from the final hidden states (B, T, C): position t predicts labels[t + 1]."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])  # (B·(T-1), C)
    y = labels[:, 1:].reshape(-1)  # (B·(T-1),)
    return ChunkedLinearCrossEntropy.apply(h, head.weight, head.bias, y, chunk)


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
