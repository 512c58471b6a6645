"""`qlora`: frozen NF4 base weights with LoRA adapters; the NF4 matmul owns its autograd."""
from .. import Method, register_method
from .config import QLoraConfig
from .model import apply

METHOD = register_method(Method("qlora", QLoraConfig, apply, "frozen NF4 base + LoRA adapters"))

__all__ = ["QLoraConfig", "METHOD"]
