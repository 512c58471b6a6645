from __future__ import annotations

from dataclasses import dataclass

from ..lora.config import LoraConfig, _help


@dataclass(frozen=True)
class QLoraConfig(LoraConfig):
    """LoRA over a frozen NF4 base (bitsandbytes' format: blocksize 64, optional double quant)."""

    blocksize: int = _help("NF4 quantization block size", default=64)
    double_quant: bool = _help("also quantize the per-block absmax values to 8 bits", default=False)

    def __post_init__(self):
        super().__post_init__()
        if self.blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise ValueError(f"blocksize must be a power of two in 32..4096, got {self.blocksize}")
