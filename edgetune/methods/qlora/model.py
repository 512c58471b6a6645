"""The `qlora` rewrite: NF4-quantize each target projection, then wrap it in LoRA."""
from __future__ import annotations

from torch import nn

from ...models.arch import ArchSpec, linear_weight
from ..lora.model import wrap_projections
from .config import QLoraConfig


def apply(model: nn.Module, config: QLoraConfig, arch: ArchSpec, materialize: bool = True) -> list[str]:
    from .layer import NF4Linear  # imports bitsandbytes lazily, only when a qlora model is built

    def make_base(old: nn.Module) -> nn.Module:
        weight, bias = linear_weight(old, arch)
        out_features, in_features = weight.shape
        if not materialize:
            return NF4Linear(in_features, out_features, bias is not None, config.blocksize,
                             config.double_quant, device="meta", dtype=weight.dtype)
        return NF4Linear.from_weight(weight.detach(), None if bias is None else bias.detach(),
                                     config.blocksize, config.double_quant)

    changed = wrap_projections(model, config, arch, materialize, make_base)
    if config.embed_nf4:
        from ..embedding import quantize_embeddings

        changed += quantize_embeddings(model, config.blocksize, config.double_quant, materialize)
    return changed
