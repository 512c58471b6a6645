"""Frozen NF4 embedding matrices: the input embedding and the LM head, decoded only where used.

Why: a QLoRA base keeps its embedding in 16 bits, and on models with large vocabularies that
is a large part of what is left. Llama-3.2-3B ties a 128256 × 3072 embedding: 0.73 GiB in
bf16, a third of its NF4 base, and more than its saved activations at 1 × 1024 under S2A. The
embedding is frozen in every edgetune recipe, so it can be stored like the frozen projections
(``embed_nf4``): bitsandbytes' NF4 layout, the recipe's blocksize and double quantization.

Every row of a (V, C) matrix with C a multiple of the block size is a whole number of blocks,
so rows decode independently:

* the input embedding (:class:`NF4Embedding`) decodes the rows of the looked-up token ids;
* the LM head (:class:`NF4LMHead`, sharing the embedding's buffers when the model ties them)
  decodes slices of rows: :mod:`edgetune.s2a.loss` walks the vocabulary slice by slice, and
  the plain forward (eval, generation) concatenates per-slice logits. Neither ever holds the
  dense (V, C) weight.

Nothing here trains and nothing is saved for backward but the hidden-state gradient path's own
(the head's matmul re-decodes its slice in backward, like :class:`NF4Linear`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..errors import EdgetuneError
from .qlora.layer import NF4Storage, nf4_linear
from edgetune.quant.nf4 import dequantize_nf4

HEAD_SLICE_BYTES = 64 * 2**20  # plain-forward head: decoded rows alive at once (fp32 worth)


class NF4Embedding(NF4Storage):
    """``nn.Embedding``'s lookup over an NF4 (V, C) weight. Also the row/slice source of a tied head."""

    def __init__(self, num_embeddings: int, embedding_dim: int, blocksize: int = 64, double_quant: bool = True,
                 padding_idx: Optional[int] = None, device=None, dtype: Optional[torch.dtype] = torch.float32):
        super().__init__()
        if embedding_dim % blocksize:
            raise EdgetuneError(f"embed_nf4 needs the hidden size ({embedding_dim}) to be a multiple of the "
                                f"NF4 block size ({blocksize}), so that rows decode on their own")
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self._init_nf4((num_embeddings, embedding_dim), blocksize, double_quant, device, dtype)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, blocksize: int = 64, double_quant: bool = True,
                    padding_idx: Optional[int] = None) -> "NF4Embedding":
        v, c = weight.shape
        module = cls(v, c, blocksize, double_quant, padding_idx, device="meta", dtype=weight.dtype)
        module._quantize_into(weight)
        return module

    @property
    def vocab(self) -> int:
        return self.num_embeddings

    def rows(self, index: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The decoded rows ``index`` (n,) -> (n, C): gathers their bytes and block scales only."""
        return dequantize_nf4(self.nf4_weight().take_rows(index), dtype=dtype or self.compute_dtype)

    def slice(self, start: int, stop: int, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The decoded rows [start, stop) -> (stop - start, C)."""
        return dequantize_nf4(self.nf4_weight().rows(start, stop), dtype=dtype or self.compute_dtype)

    def weight_slices(self) -> "NF4Embedding":
        return self

    def decoded_row_bytes(self, dtype: torch.dtype) -> int:
        """Bytes of one decoded row: the loss head bounds its decoded slice by this."""
        return self.embedding_dim * torch.empty((), dtype=dtype).element_size()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, C)
        return self.rows(ids).view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, blocksize={self.blocksize}, "
                f"double_quant={self.double_quant}, dtype={self.compute_dtype}")


class NF4LMHead(nn.Module):
    """``logits = h · decode(W)ᵀ (+ b)`` over an :class:`NF4Embedding`'s rows.

    A tied head keeps a plain reference to the input embedding (not a submodule: its buffers are
    stored once, and the state dict has no alias to re-tie); an untied one owns its own
    ``table``. The loss head reads it through :meth:`weight_slices`.
    """

    def __init__(self, source: NF4Embedding, tied: bool, bias: Optional[torch.Tensor] = None):
        super().__init__()
        if tied:
            object.__setattr__(self, "_source", source)
        else:
            self.table = source
        self.tied = tied
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def weight_slices(self) -> NF4Embedding:
        return self._source if self.tied else self.table

    @property
    def out_features(self) -> int:
        return self.weight_slices().num_embeddings

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (..., C) -> (..., V)
        src = self.weight_slices()
        rows = max(1, HEAD_SLICE_BYTES // (4 * src.embedding_dim))
        q = src.nf4_weight()
        parts = [nf4_linear(h, q.rows(s, min(s + rows, src.num_embeddings)),
                            None if self.bias is None else self.bias[s:s + rows])
                 for s in range(0, src.num_embeddings, rows)]
        return torch.cat(parts, dim=-1)


def quantize_embeddings(model: nn.Module, blocksize: int, double_quant: bool, materialize: bool) -> list[str]:
    """Swap the input embedding (and the LM head, tied or not) for NF4 ones; idempotent.

    With ``materialize=False`` (loading an artifact) the modules are built empty on the meta
    device, with the same tying, and the saved buffers are assigned later.
    """
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if isinstance(emb, NF4Embedding) or not isinstance(emb, nn.Embedding):
        return []
    tied = head is not None and getattr(head, "weight", None) is emb.weight

    def coded(weight: torch.Tensor, padding_idx=None) -> NF4Embedding:
        if materialize:
            return NF4Embedding.from_weight(weight, blocksize, double_quant, padding_idx)
        v, c = weight.shape
        return NF4Embedding(v, c, blocksize, double_quant, padding_idx, device="meta", dtype=weight.dtype)

    new_emb = coded(emb.weight, emb.padding_idx)
    model.set_input_embeddings(new_emb)
    changed = ["<input embedding>"]
    if head is not None:
        source = new_emb if tied else coded(head.weight)
        model.set_output_embeddings(NF4LMHead(source, tied, getattr(head, "bias", None)))
        changed.append("<lm head>")
    return changed


def dense_embedding_state(model: nn.Module, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """The plain transformers entries (``…embed_tokens.weight``, ``lm_head.weight``; one tensor
    when tied, as a tied state dict has) of a model's NF4 embeddings, decoded; empty if it has
    none. Used when merging to a dense model."""
    decoded, out = {}, {}
    for path, m in model.named_modules():
        if isinstance(m, NF4Embedding) and not path.endswith(".table"):
            decoded[id(m)] = out[f"{path}.weight"] = m.dequantize(dtype)
    for path, m in model.named_modules():
        if isinstance(m, NF4LMHead):
            src = m.weight_slices()
            out[f"{path}.weight"] = decoded[id(src)] if m.tied else src.dequantize(dtype)
    return out


def is_nf4_embedding_key(model: nn.Module, key: str) -> bool:
    """Whether a state-dict key is one of an NF4 embedding's quantization buffers."""
    path, _, leaf = key.rpartition(".")
    try:
        return isinstance(model.get_submodule(path), NF4Embedding)
    except AttributeError:
        return False
