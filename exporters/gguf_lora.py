"""Write (and read back) a llama.cpp GGUF LoRA adapter, loadable with ``llama-cli --lora`` or
llama-cpp-python's ``lora_path`` on top of the base model's GGUF.

What llama.cpp expects, matching what its own ``convert_lora_to_gguf.py`` writes:

* metadata ``general.architecture`` equal to the base GGUF's, ``general.type = "adapter"``,
  ``adapter.type = "lora"`` and ``adapter.lora.alpha`` (float32);
* for every adapted projection two tensors, ``<base tensor name>.lora_a`` holding A as a numpy
  (r, in) array (GGUF lists it as [in, r]) and ``.lora_b`` holding B as (out, r) (GGUF [r, out]).

llama.cpp's HF→GGUF converter permutes the rows of Llama's ``q_proj`` and ``k_proj`` weights, undoing
the half-split rotary layout of the HF checkpoints (``LlamaModel.permute`` in
``convert_hf_to_gguf.py``; transformers' GGUF loader reverses it in ``LlamaTensorProcessor``). The base
GGUF therefore has permuted q/k rows, and the LoRA delta B·A must be permuted the same way. A row
permutation of B·A is a row permutation of B alone, so ``lora_b`` of ``attn_q``/``attn_k`` is
permuted and ``lora_a`` is left as it is (this is what ``LoraTorchTensor`` does inside
``convert_lora_to_gguf.py``). Only the architectures that go through ``LlamaModel`` in the converter
(llama, and mistral, which is written as ``llama``) are permuted; qwen2 and gpt2 are not.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from edgetune.errors import ArtifactError, EdgetuneError, MissingDependency
from edgetune.fsutil import atomic_file

# HF model_type -> llama.cpp's general.architecture for the base GGUF.
GGUF_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "gpt2": "gpt2"}
# Architectures whose q/k rows llama.cpp's converter permutes.
PERMUTED_ARCHS = frozenset({"llama"})

_LLAMA_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GPT2_NAMES = {
    "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down",
}
_PATTERNS = {
    "llama": (re.compile(r"^model\.layers\.(\d+)\.(.+)$"), _LLAMA_NAMES),
    "qwen2": (re.compile(r"^model\.layers\.(\d+)\.(.+)$"), _LLAMA_NAMES),
    "gpt2": (re.compile(r"^transformer\.h\.(\d+)\.(.+)$"), _GPT2_NAMES),
}

_NP_DTYPES = {"f16": np.float16, "f32": np.float32}


def llama_cpp_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The row permutation llama.cpp's converter applies to q/k weights (rows = dim 0)."""
    out = w.shape[0]
    if out % (2 * n_head):
        raise EdgetuneError(f"cannot permute {out} rows into {n_head} rotary heads")
    return w.reshape(n_head, 2, out // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama_cpp_unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of :func:`llama_cpp_permute` (what transformers does when it loads a GGUF)."""
    out = w.shape[0]
    if out % (2 * n_head):
        raise EdgetuneError(f"cannot un-permute {out} rows from {n_head} rotary heads")
    return w.reshape(n_head, out // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _config_dict(model_config: Any) -> dict:
    if isinstance(model_config, Mapping):
        return dict(model_config)
    if hasattr(model_config, "to_dict"):
        return model_config.to_dict()
    raise EdgetuneError("model_config must be the base model's config (a dict or a transformers config)")


def gguf_arch(model_type: str | None) -> str:
    try:
        return GGUF_ARCH[model_type]
    except KeyError:
        raise EdgetuneError(
            f"no GGUF LoRA export for architecture {model_type!r}; supported: {', '.join(GGUF_ARCH)}"
        ) from None


def gguf_tensor_name(module_path: str, model_type: str) -> str:
    """The base GGUF tensor a HF module path becomes, e.g. ``blk.0.attn_q.weight``."""
    arch = gguf_arch(model_type)
    pattern, names = _PATTERNS[arch]
    m = pattern.match(module_path)
    if not m or m.group(2) not in names:
        raise EdgetuneError(
            f"module {module_path!r} has no GGUF tensor in a {model_type} model "
            f"(adaptable: {', '.join(names)})"
        )
    return f"blk.{int(m.group(1))}.{names[m.group(2)]}.weight"


def export_gguf_lora(path: str | os.PathLike, adapters: Mapping[str, tuple[torch.Tensor, torch.Tensor]], *,
                     alpha: float, model_config: Mapping | Any, dtype: str = "f16",
                     provenance: Mapping[str, str] | None = None) -> dict:
    """Write ``adapters`` ({HF module path: (lora_A (r, in), lora_B (out, r))}) as a GGUF LoRA file.

    ``model_config`` is the base model's config (``config.to_dict()`` or the config itself): its
    ``model_type`` picks the GGUF architecture and tensor names, and for Llama its head counts drive
    the q/k permutation. ``dtype`` is ``"f16"`` (what llama.cpp's converter writes) or ``"f32"``.
    ``provenance`` (e.g. ``{"base_sha256": ..., "recipe": ...}``) is written as ``edgetune.*`` string
    keys: a single-file adapter has no manifest beside it, so the file carries what the server needs
    to refuse it on the wrong base. The file is replaced atomically. Returns the metadata written.
    """
    cfg = _config_dict(model_config)
    model_type = cfg.get("model_type")
    arch = gguf_arch(model_type)
    if dtype not in _NP_DTYPES:
        raise EdgetuneError(f"GGUF LoRA dtype must be 'f16' or 'f32', got {dtype!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        raise EdgetuneError(f"lora_alpha must be a positive number, got {alpha!r}")
    if not adapters:
        raise EdgetuneError("no LoRA adapters to export")

    n_head = n_kv_head = None
    if arch in PERMUTED_ARCHS:
        n_head = cfg.get("num_attention_heads")
        n_kv_head = cfg.get("num_key_value_heads") or n_head
        if not n_head:
            raise EdgetuneError("model_config lacks num_attention_heads, needed to lay out q/k for llama.cpp")

    np_dtype = _NP_DTYPES[dtype]
    tensors: list[tuple[str, np.ndarray]] = []
    seen: set[str] = set()
    for module_path, pair in adapters.items():
        name = gguf_tensor_name(module_path, model_type)
        if name in seen:
            raise EdgetuneError(f"two adapters map to the GGUF tensor {name}")
        seen.add(name)
        a, b = pair
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise EdgetuneError(
                f"adapter {module_path} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                "expected (r, in) and (out, r)"
            )
        a = a.detach().to("cpu", torch.float32)
        b = b.detach().to("cpu", torch.float32)
        if arch in PERMUTED_ARCHS:
            if ".attn_q." in name:
                b = llama_cpp_permute(b, n_head)
            elif ".attn_k." in name:
                b = llama_cpp_permute(b, n_kv_head)
        for suffix, t in ((".lora_a", a), (".lora_b", b)):
            arr = np.ascontiguousarray(t.numpy().astype(np_dtype))
            if not np.isfinite(arr).all():
                raise EdgetuneError(f"adapter {module_path}{suffix} has values that are not finite in {dtype}")
            tensors.append((name + suffix, arr))

    try:
        import gguf
    except ImportError:
        raise MissingDependency("GGUF export needs the gguf package: pip install gguf") from None

    metadata = {
        "general.architecture": arch,
        "general.type": "adapter",
        "adapter.type": "lora",
        "adapter.lora.alpha": float(alpha),
        **{f"edgetune.{k}": str(v) for k, v in (provenance or {}).items()},
    }
    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)  # writes general.architecture itself
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
        for key, value in metadata.items():
            if key.startswith("edgetune."):
                writer.add_string(key, value)
        for name, arr in tensors:
            writer.add_tensor(name, arr)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return metadata


def read_gguf_lora(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read a GGUF file back: ``(metadata, {tensor name: tensor})``.

    Metadata values are decoded to Python scalars/strings/lists; the ``GGUF.*`` header fields are
    left out. Tensors come back in numpy order (``lora_a`` as (r, in)), in their stored dtype, exactly
    as written (q/k ``lora_b`` rows still in llama.cpp's permuted order).
    """
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"GGUF file {p} does not exist")
    try:
        import gguf
    except ImportError:
        raise MissingDependency("reading GGUF needs the gguf package: pip install gguf") from None
    try:
        reader = gguf.GGUFReader(str(p))
    except (ValueError, OSError) as exc:
        raise ArtifactError(f"cannot read GGUF file {p}: {exc}") from None
    metadata: dict[str, Any] = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        metadata[name] = field.contents()
    tensors: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        if t.tensor_type not in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32):
            raise ArtifactError(f"{p}: tensor {t.name} is {t.tensor_type.name}; only F16/F32 adapters are read")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        tensors[t.name] = torch.from_numpy(np.array(t.data).reshape(shape))
    return metadata, tensors
