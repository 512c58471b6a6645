"""Held-out loss and perplexity, and greedy generation: the before/after checks of a run."""
from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def evaluate_loss(model: nn.Module, dataset, batch_size: int = 4) -> dict:
    """Token-weighted mean cross-entropy over every label token of ``dataset`` (a TokenDataset)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(dataset.input_ids), batch_size):
        ids = dataset.input_ids[i:i + batch_size].to(device)  # (B, T)
        mask = dataset.attention_mask[i:i + batch_size].to(device)  # (B, T)
        labels = dataset.labels[i:i + batch_size].to(device)  # (B, T)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # (B, T-1, V)
        target = labels[:, 1:]  # (B, T-1)
        total += nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                             ignore_index=-100, reduction="sum").item()
        count += int((target != -100).sum())
    model.train(was_training)
    loss = total / max(count, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "tokens": count}


@torch.no_grad()
def generate_text(model: nn.Module, tokenizer, prompt: str, max_new_tokens: int = 48) -> str:
    """Greedy continuation; a chat model gets the prompt as a user turn of its chat template."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = prompt
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids.to(device)  # (1, T)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    model.train(was_training)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
