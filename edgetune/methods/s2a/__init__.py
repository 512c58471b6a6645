"""`s2a`: S2A activation modules (bias tuning, low-rank prompts, a lite side branch) on a frozen fp or NF4 base.

S2A (arXiv 2503.08154) picks trainable structures whose gradients need little stored input;
with the activation-lean rewrite (``--act-bits``) on top, backward keeps almost nothing.
"""
from .. import Method, register_method
from .config import S2AConfig
from .model import apply

METHOD = register_method(Method(
    "s2a", S2AConfig, apply,
    "S2A activation modules: bias tuning, low-rank prompts, lite side branch on a frozen NF4/dense base (tiny gradients' inputs)",
))

__all__ = ["S2AConfig", "METHOD"]
