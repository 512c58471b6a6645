from __future__ import annotations

from dataclasses import dataclass

from ..lora.config import LoraConfig, _help


@dataclass(frozen=True)
class QLoraConfig(LoraConfig):
    """LoRA over a frozen NF4 base (bitsandbytes' format: blocksize 64, double quant by default, as QLoRA).

    Double quantization stores the per-block absmax in 8 bits (0.127 instead of 0.5 extra bits per
    weight: 0.28 GiB on Llama-2-7B) for a per-call decode of 1/64 of the weight's values.
    """

    blocksize: int = _help("NF4 quantization block size", default=64)
    double_quant: bool = _help("also quantize the per-block absmax values to 8 bits (QLoRA's double quantization)",
                               default=True)
    embed_nf4: bool = _help("store the frozen input embedding (and an untied LM head) in NF4 as well", default=False)

    def __post_init__(self):
        super().__post_init__()
        if self.blocksize not in (32, 64, 128, 256, 512, 1024, 2048, 4096):
            raise ValueError(f"blocksize must be a power of two in 32..4096, got {self.blocksize}")
