"""`lora`: the base stays in its dtype and frozen; low-rank adapters train."""
from .. import Method, register_method
from .config import LoraConfig
from .layer import LoraLinear
from .model import apply

METHOD = register_method(Method("lora", LoraConfig, apply, "frozen dense base + LoRA adapters"))

__all__ = ["LoraConfig", "LoraLinear", "METHOD"]
