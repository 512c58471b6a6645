"""Write (and read back) a LoRA adapter in the PEFT format that PEFT, vLLM and llama.cpp's converter load.

The directory holds ``adapter_config.json`` and ``adapter_model.safetensors``. Tensor keys are
``base_model.model.<module path>.lora_A.weight`` (r, in) and ``.lora_B.weight`` (out, r), with no
adapter name in them, which is how ``PeftModel.save_pretrained`` writes the default adapter.

The config carries only keys that every recent PEFT ``LoraConfig`` knows, so loading it warns about
nothing (an unknown key makes PEFT warn, and older PEFT versions, such as the one a vLLM server
ships, would drop it with a warning too).
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Mapping

import torch

from edgetune.errors import ArtifactError, EdgetuneError
from edgetune.fsutil import atomic_file

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
KEY_PREFIX = "base_model.model."

# vLLM's --max-lora-rank accepts only these ranks (its default is 16).
VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)

_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}

_KEY_RE = re.compile(r"^(?P<path>.+)\.lora_(?P<which>[AB])(?:\.(?P<name>[^.]+))?\.weight$")


def _check_rank(r: int) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r not in VLLM_RANKS:
        raise EdgetuneError(
            f"LoRA rank r={r!r} cannot be served by vLLM; use one of {', '.join(map(str, VLLM_RANKS))}"
        )


def _matches_target(path: str, target_modules: list[str]) -> bool:
    # PEFT's rule for a list of names: the module path equals the name or ends with "." + name.
    return any(path == t or path.endswith("." + t) for t in target_modules)


def _validate(adapters: Mapping[str, tuple[torch.Tensor, torch.Tensor]], r: int, alpha: float,
              dropout: float, target_modules: list[str], dtype) -> None:
    _check_rank(r)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha) or alpha <= 0:
        raise EdgetuneError(f"lora_alpha must be a positive number, got {alpha!r}")
    if not isinstance(dropout, (int, float)) or not 0.0 <= float(dropout) < 1.0:
        raise EdgetuneError(f"lora_dropout must be in [0, 1), got {dropout!r}")
    if dtype not in _DTYPES:
        raise EdgetuneError(f"unsupported adapter dtype {dtype}; use torch.float32, torch.float16 or torch.bfloat16")
    if not target_modules or not all(isinstance(t, str) and t for t in target_modules):
        raise EdgetuneError("target_modules must be a non-empty list of module names")
    if not adapters:
        raise EdgetuneError("no LoRA adapters to export")
    for path, pair in adapters.items():
        if not isinstance(path, str) or not path or path.startswith(KEY_PREFIX) or ".lora_" in path:
            raise EdgetuneError(f"adapter key {path!r} must be a plain module path such as model.layers.0.self_attn.q_proj")
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise EdgetuneError(f"adapter {path} must be a (lora_A, lora_B) pair")
        a, b = pair
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
            raise EdgetuneError(
                f"adapter {path} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}; "
                f"expected (r={r}, in) and (out, r={r})"
            )
        if not _matches_target(path, target_modules):
            raise EdgetuneError(f"adapter {path} is not named by target_modules {sorted(target_modules)}")


def _as_str_metadata(extra: Mapping | None) -> dict[str, str]:
    meta = {"format": "pt"}
    for k, v in (extra or {}).items():
        if k == "format":
            raise EdgetuneError("extra_metadata may not set 'format' (safetensors reserves it)")
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    return meta


def build_config(*, r: int, alpha: float, dropout: float, target_modules: list[str],
                 base_model_name_or_path: str, fan_in_fan_out: bool = False) -> dict:
    """The ``adapter_config.json`` contents (a plain dict, JSON-serialisable)."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": int(r),
        "lora_alpha": float(alpha) if not float(alpha).is_integer() else int(alpha),
        "lora_dropout": float(dropout),
        "target_modules": sorted(set(target_modules)),
        "bias": "none",
        "fan_in_fan_out": bool(fan_in_fan_out),
        "base_model_name_or_path": base_model_name_or_path,
        "inference_mode": True,
        "use_dora": False,
        "use_rslora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def export_peft(out_dir: str | os.PathLike, adapters: Mapping[str, tuple[torch.Tensor, torch.Tensor]], *,
                r: int, alpha: float, dropout: float, target_modules: list[str],
                base_model_name_or_path: str, fan_in_fan_out: bool = False, dtype=torch.float32,
                extra_metadata: dict | None = None) -> dict:
    """Write a PEFT LoRA adapter into the existing directory ``out_dir``; return the config dict.

    ``adapters`` maps a Hugging Face module path (``model.layers.0.self_attn.q_proj``) to
    ``(lora_A (r, in), lora_B (out, r))``. ``target_modules`` must name exactly the projections
    that were adapted in *every* block of the base model: PEFT wraps every module they match and
    warns about (and zero-fills) any it finds no weights for. GPT-2's ``Conv1D`` needs
    ``fan_in_fan_out=True``; the tensors keep the same (r, in)/(out, r) layout either way.
    ``dtype=torch.float16`` halves the file. ``extra_metadata`` goes into the safetensors header
    (values that are not strings are stored as JSON), never into the config, so PEFT and vLLM
    still load the config unchanged. Each file is replaced atomically.
    """
    out = Path(out_dir)
    if not out.is_dir():
        raise EdgetuneError(f"adapter output directory {out} does not exist")
    if not isinstance(base_model_name_or_path, str) or not base_model_name_or_path:
        raise EdgetuneError("base_model_name_or_path must name the base model (a hub id or a path)")
    _validate(adapters, r, alpha, dropout, target_modules, dtype)

    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for path, (a, b) in adapters.items():
        for which, t in (("A", a), ("B", b)):
            t = t.detach().to(device="cpu", dtype=dtype).contiguous()
            if not torch.isfinite(t).all():
                raise EdgetuneError(
                    f"adapter {path} lora_{which} has values that are not finite in {_DTYPES[dtype]}"
                    + (" (export in float32 instead)" if dtype != torch.float32 else "")
                )
            tensors[f"{KEY_PREFIX}{path}.lora_{which}.weight"] = t

    config = build_config(r=r, alpha=alpha, dropout=dropout, target_modules=list(target_modules),
                          base_model_name_or_path=base_model_name_or_path, fan_in_fan_out=fan_in_fan_out)
    metadata = _as_str_metadata(extra_metadata)

    with atomic_file(out / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    with atomic_file(out / CONFIG_NAME) as tmp:
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return config


def read_peft(adapter_dir: str | os.PathLike) -> tuple[dict, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Read a PEFT LoRA directory back: ``(config, {module path: (lora_A, lora_B)})``.

    Only ``adapter_model.safetensors`` is read (never a pickled ``.bin``). Keys with an adapter name
    (``.lora_A.default.weight``) are accepted too. Tensors keep their stored dtype.
    """
    d = Path(adapter_dir)
    cfg_path, weights_path = d / CONFIG_NAME, d / WEIGHTS_NAME
    if not cfg_path.is_file():
        raise ArtifactError(f"{d} is not a PEFT adapter: {CONFIG_NAME} is missing")
    if not weights_path.is_file():
        raise ArtifactError(f"{d} has no {WEIGHTS_NAME} (only safetensors adapters are read)")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as exc:
        raise ArtifactError(f"cannot read {cfg_path}: {exc}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise ArtifactError(f"{cfg_path} is not a LoRA adapter config (peft_type must be LORA)")

    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(weights_path), device="cpu")
    except (SafetensorError, OSError) as exc:
        raise ArtifactError(f"cannot read {weights_path}: {exc}") from None

    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in state.items():
        m = _KEY_RE.match(key[len(KEY_PREFIX):] if key.startswith(KEY_PREFIX) else key)
        if not key.startswith(KEY_PREFIX) or not m:
            raise ArtifactError(f"{weights_path} holds an unexpected tensor {key!r}")
        parts.setdefault(m["path"], {})[m["which"]] = t
    adapters: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for path, p in parts.items():
        if set(p) != {"A", "B"}:
            raise ArtifactError(f"{weights_path}: {path} has lora_{'A' if 'A' in p else 'B'} but not its pair")
        adapters[path] = (p["A"], p["B"])
    return config, adapters
