"""Device profiles: what a target device offers (memory, dtypes, bandwidth, compute).

Profiles ship as ``devices/*.toml`` (installed as ``edgetune.devices``). A user can also pass a
path to their own TOML file. Every field is validated, and a bad one is named in the error.

``cuda_context_mib`` is the one optional field: the memory the CUDA context and the cuBLAS/cuDNN
handles take that ``usable_memory_gib`` does not already exclude. The planner adds it to the plan.
Omitted, it is 512 on a CUDA profile (see ``edgetune/planner.py`` OVERHEAD for where 512 comes
from) and 0 on a CPU one. Every shipped CUDA profile sets it to 0, because its reserve
(total − usable) is chosen to hold the context: counting it in both places double-counted it.
"""
from __future__ import annotations

import dataclasses
import os
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import EdgetuneError

DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    accelerator: str  # "cpu" or "cuda"
    total_memory_gib: float
    usable_memory_gib: float
    compute_capability: str
    dtypes: tuple[str, ...]
    default_dtype: str
    memory_bandwidth_gbps: float
    peak_tflops: float
    cuda_context_mib: float = 0.0  # optional in the TOML; see the module docstring

    @property
    def usable_bytes(self) -> int:
        return int(self.usable_memory_gib * 2**30)

    @property
    def cuda_context_bytes(self) -> int:
        return int(self.cuda_context_mib * 2**20)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["dtypes"] = list(self.dtypes)
        return d


_NUMBER_FIELDS = ("total_memory_gib", "usable_memory_gib", "memory_bandwidth_gbps", "peak_tflops")
_OPTIONAL = {"cuda_context_mib"}  # fields with a default (which depends on the accelerator)
DEFAULT_CUDA_CONTEXT_MIB = 512.0


def parse_profile(data: dict, origin: str) -> DeviceProfile:
    """Validate a decoded TOML table; ``origin`` names the file in errors."""
    if not isinstance(data, dict):
        raise EdgetuneError(f"{origin}: a device profile must be a TOML table")
    values = {}
    for f in dataclasses.fields(DeviceProfile):
        if f.name in data:
            values[f.name] = data[f.name]
        elif f.name not in _OPTIONAL:
            raise EdgetuneError(f"{origin}: missing field {f.name!r}")
    extra = sorted(set(data) - set(values))
    if extra:
        raise EdgetuneError(f"{origin}: unknown field(s) {', '.join(extra)}")
    for key in ("name", "description", "accelerator", "compute_capability", "default_dtype"):
        if not isinstance(values[key], str) or not values[key]:
            raise EdgetuneError(f"{origin}: field {key!r} must be a non-empty string")
    for key in _NUMBER_FIELDS:
        v = values[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0 < v < 1e6):
            raise EdgetuneError(f"{origin}: field {key!r} must be a positive number, got {v!r}")
        values[key] = float(v)
    if values["usable_memory_gib"] > values["total_memory_gib"]:
        raise EdgetuneError(f"{origin}: field 'usable_memory_gib' exceeds 'total_memory_gib'")
    if values["accelerator"] not in ("cpu", "cuda"):
        raise EdgetuneError(f"{origin}: field 'accelerator' must be 'cpu' or 'cuda'")
    cuda = values["accelerator"] == "cuda"
    ctx = values.get("cuda_context_mib", DEFAULT_CUDA_CONTEXT_MIB if cuda else 0.0)
    if isinstance(ctx, bool) or not isinstance(ctx, (int, float)) or not 0 <= ctx < values["total_memory_gib"] * 1024:
        raise EdgetuneError(f"{origin}: field 'cuda_context_mib' must be a number of MiB from 0 to below the "
                            f"total memory, got {ctx!r}")
    if ctx and not cuda:
        raise EdgetuneError(f"{origin}: field 'cuda_context_mib' must be 0 on a cpu profile (no CUDA context)")
    if ctx / 1024 >= values["usable_memory_gib"]:
        raise EdgetuneError(f"{origin}: field 'cuda_context_mib' leaves no usable memory")
    values["cuda_context_mib"] = float(ctx)
    dtypes = values["dtypes"]
    if not isinstance(dtypes, list) or not dtypes or any(d not in DTYPES for d in dtypes):
        raise EdgetuneError(f"{origin}: field 'dtypes' must be a non-empty list of {', '.join(DTYPES)}")
    values["dtypes"] = tuple(dtypes)
    if values["default_dtype"] not in dtypes:
        raise EdgetuneError(f"{origin}: field 'default_dtype' must be one of the profile's dtypes")
    return DeviceProfile(**values)


def _load_toml(path: Path, origin: str) -> dict:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError, OSError) as exc:  # TOMLDecodeError and UnicodeDecodeError are ValueErrors
        raise EdgetuneError(f"{origin}: invalid TOML ({exc})") from None


def builtin_profiles() -> dict[str, DeviceProfile]:
    out = {}
    for entry in sorted(resources.files("edgetune.devices").iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".toml"):
            profile = parse_profile(tomllib.loads(entry.read_text(encoding="utf-8")), entry.name)
            out[profile.name] = profile
    return out


def load_profile(name_or_path: str) -> DeviceProfile:
    """A built-in profile by name, or a user's TOML file by path."""
    profiles = builtin_profiles()
    if name_or_path in profiles:
        return profiles[name_or_path]
    path = Path(name_or_path)
    if path.suffix == ".toml" or os.path.exists(path):  # os.path: False, not OSError, for a too-long name
        if not os.path.isfile(path):
            raise EdgetuneError(f"no such device profile file: {path}")
        return parse_profile(_load_toml(path, str(path)), str(path))
    raise EdgetuneError(f"unknown device {name_or_path!r}; available: {', '.join(profiles)}")
