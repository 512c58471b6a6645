from __future__ import annotations

from dataclasses import dataclass, field

from ...models.arch import LLAMA_LINEARS


def _help(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters on frozen projections: W x + (alpha / r) · B A x."""

    r: int = _help("LoRA rank", default=16)
    alpha: float = _help("LoRA alpha; the update is scaled by alpha / r", default=32.0)
    dropout: float = _help("dropout on the LoRA input during training", default=0.0)
    target_modules: tuple[str, ...] = _help(
        "projection names to adapt (comma separated); 'all' means every linear projection of the decoder blocks",
        default=("all",),
    )
    init_seed: int = _help("seed for the LoRA A initialisation", default=0)

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def resolve_targets(self, linear_names: tuple[str, ...]) -> tuple[str, ...]:
        if tuple(self.target_modules) in (("all",), ("all-linear",)):
            return linear_names
        return tuple(self.target_modules)


__all__ = ["LoraConfig", "LLAMA_LINEARS"]
