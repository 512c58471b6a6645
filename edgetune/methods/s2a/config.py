from __future__ import annotations

from dataclasses import dataclass

from ..lora.config import _help


@dataclass(frozen=True)
class S2AConfig:
    """S2A activation modules on a frozen base: parameters whose gradients need little stored input."""

    base: str = _help("frozen base storage: nf4 (4-bit) or dense", default="nf4")
    bias: bool = _help("bias tuning: a trainable bias after every projection and decoder norm", default=True)
    prompt_len: int = _help("low-rank prompt: positions per block that get x + A·B added (0 = off)", default=16)
    prompt_rank: int = _help("rank of each block's low-rank prompt", default=4)
    blocksize: int = _help("NF4 quantization block size (base nf4)", default=64)
    double_quant: bool = _help("NF4 double quantization (base nf4)", default=False)
    init_seed: int = _help("seed for the prompt initialisation", default=0)

    def __post_init__(self):
        if self.base not in ("nf4", "dense"):
            raise ValueError(f"base must be nf4 or dense, got {self.base!r}")
        if self.prompt_len < 0 or self.prompt_rank < 1:
            raise ValueError("prompt_len must be >= 0 and prompt_rank >= 1")
        if not self.bias and self.prompt_len == 0:
            raise ValueError("nothing to train: enable --bias or set --prompt-len > 0")
