from __future__ import annotations

from dataclasses import dataclass

from ..lora.config import _help


@dataclass(frozen=True)
class S2AConfig:
    """S2A activation modules on a frozen base: parameters whose gradients need little stored input.

    Defaults chosen by measurement (``benchmarks/s2a_quality.py --seq-len 64``: default model, NF4,
    act-bits 4, 100 steps at 4 x 64, lr 1e-3; held-out loss, base 2.9268; saved MiB of one forward at
    4 x 256). Numbers are in the docstring of that benchmark; the default is bias + a 16 x 4 prompt, side off:

    * bias only 2.2007 (190k trainable, 193.5 MiB); bias + prompt 2.1988 (261k, 194.1 MiB); a 32 x 8
      prompt 2.1977 (336k, 194.1 MiB): no gain over 16 x 4, so the prompt stays 16 x 4; bias +
      prompt + side 2.1919 (556k, 202.1 MiB): the side buys 0.3% for +4% saved bytes, 2.1x the trainable
      parameters and no dense merge, so it is off by default;
    * side only 2.7933 (295k, 10.9 MiB): 18x fewer saved bytes than bias tuning, for the tightest devices,
      but far weaker in 100 steps at this learning rate.
    """

    base: str = _help("frozen base storage: nf4 (4-bit) or dense", default="nf4")
    bias: bool = _help("bias tuning: a trainable bias after every projection and decoder norm", default=True)
    prompt_len: int = _help("low-rank prompt: positions per block that get x + A·B added (0 = off)", default=16)
    prompt_rank: int = _help("rank of each block's low-rank prompt", default=4)
    blocksize: int = _help("NF4 quantization block size (base nf4)", default=64)
    double_quant: bool = _help("NF4 double quantization (base nf4)", default=False)
    side: bool = _help("lite side branch: a width-side_dim network fed by pooled block inputs, added before the final norm",
                       default=False)
    side_dim: int = _help("width of the side branch (hidden channels are average-pooled down to it)", default=64)
    side_every: int = _help("the side branch reads every k-th block's input (1 = every block)", default=1)
    init_seed: int = _help("seed for the prompt and side-branch initialisation", default=0)

    def __post_init__(self):
        if self.base not in ("nf4", "dense"):
            raise ValueError(f"base must be nf4 or dense, got {self.base!r}")
        if self.prompt_len < 0 or self.prompt_rank < 1:
            raise ValueError("prompt_len must be >= 0 and prompt_rank >= 1")
        if self.side_dim < 1 or self.side_every < 1:
            raise ValueError("side_dim and side_every must be >= 1")
        if not self.bias and self.prompt_len == 0 and not self.side:
            raise ValueError("nothing to train: enable --bias or --side, or set --prompt-len > 0")
