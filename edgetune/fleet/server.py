"""The fleet server's round state, without Flower: global adapter, admission checks, outputs.

The server never loads the model: the global adapter starts as the compiled artifact's
``trainable.safetensors`` (LoRA A at its seeded initialisation, B = 0), and each round's
aggregate is written as a PEFT adapter directory exactly like ``edgetune export --format peft``
(``adapter_config.json``, ``adapter_model.safetensors``, an edgetune ``manifest.json`` of kind
``adapter`` carrying the base's sha256).

Output layout (``--out OUT``)::

    OUT/round-001/ … OUT/round-R/   the aggregated adapter after each round (PEFT)
    OUT/adapter/                     the newest of them (replaced atomically every round)
    OUT/rounds.jsonl                 one record per round: clients, counts, bytes, rejections
    OUT/fleet.json                   status ("running", "finished" or "failed") and a summary
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import EdgetuneError
from ..fsutil import atomic_dir, atomic_file
from ..manifest import read_manifest, write_manifest
from .aggregate import aggregate, split_lora

STATUS_FILE, ROUNDS_FILE, LATEST = "fleet.json", "rounds.jsonl", "adapter"


def tensor_bytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def layout_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of the sorted names, shapes and dtypes: both ends must agree before unpacking."""
    import hashlib

    text = ";".join(f"{k}:{tuple(t.shape)}:{t.dtype}" for k, t in sorted(tensors.items()))
    return hashlib.sha256(text.encode()).hexdigest()


def pack(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """All tensors as one flat float32 vector in sorted-name order.

    On the wire this is a single Flower ``Array``: its per-array metadata is paid once, not once
    per LoRA matrix (which costs ~25% on a small adapter), so a reply is the adapter's bytes plus
    well under 1%.
    """
    return torch.cat([tensors[k].detach().reshape(-1).to(torch.float32).cpu() for k in sorted(tensors)])


def unpack(flat: torch.Tensor, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`pack` with the names, shapes and dtypes of ``like``."""
    total = sum(t.numel() for t in like.values())
    if flat.dim() != 1 or flat.numel() != total:
        raise ValueError(f"packed adapter has {flat.numel()} values, expected {total}")
    out, offset = {}, 0
    for k in sorted(like):
        n = like[k].numel()
        out[k] = flat[offset:offset + n].reshape(like[k].shape).to(like[k].dtype).clone()
        offset += n
    return out


@dataclass
class ClientUpdate:
    """What one client sent back for a round."""

    node_id: int
    tensors: dict[str, torch.Tensor]
    num_examples: int
    base_sha256: str | None
    bytes_sent: int = 0
    metrics: dict = field(default_factory=dict)


@dataclass
class BaseInfo:
    path: Path
    sha256: str | None
    name: str
    recipe: str
    r: int
    alpha: float
    dropout: float
    model_type: str
    initial: dict[str, torch.Tensor]

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def read_base(base_dir: str | os.PathLike) -> BaseInfo:
    """The compiled artifact the fleet trains on (verified by its manifest's hashes)."""
    from ..artifact import TRAINABLE_FILE
    from ..tensors import load_tensors

    base_dir = Path(base_dir)
    manifest = read_manifest(base_dir, "compiled")
    cfg = manifest.get("recipe_config") or {}
    if "r" not in cfg or "alpha" not in cfg:
        raise EdgetuneError(f"{base_dir}: recipe {manifest.get('recipe')!r} has no LoRA adapter to train in a fleet")
    source = manifest.get("source") or {}
    initial = load_tensors(base_dir / TRAINABLE_FILE)
    pairs, _ = split_lora(initial)
    if not pairs:
        raise EdgetuneError(f"{base_dir}: no LoRA pairs among its trainable tensors")
    return BaseInfo(base_dir, source.get("sha256"), source.get("name") or "unknown", manifest.get("recipe", "?"),
                    int(cfg["r"]), float(cfg["alpha"]), float(cfg.get("dropout", 0.0)),
                    manifest.get("model_type", ""), initial)


def write_peft(base: BaseInfo, tensors: dict[str, torch.Tensor], out: str | os.PathLike, extra: dict | None = None,
               overwrite: bool = True) -> Path:
    """``tensors`` (trainable names) as a PEFT adapter dir, the same files ``edgetune export`` writes."""
    from ..exporters.peft import export_peft

    pairs, _ = split_lora(tensors)
    adapters = {module: (tensors[ka], tensors[kb]) for module, (ka, kb) in pairs.items()}
    targets = sorted({m.rsplit(".", 1)[-1] for m in adapters})
    with atomic_dir(out, overwrite) as tmp:
        export_peft(tmp, adapters, r=base.r, alpha=base.alpha, dropout=base.dropout, target_modules=targets,
                    base_model_name_or_path=base.name, fan_in_fan_out=base.model_type == "gpt2")
        write_manifest(tmp, "adapter", {"adapter_format": "peft", "recipe": base.recipe, "base_sha256": base.sha256,
                                        "base_name": base.name, **(extra or {})})
    return Path(out)


class FleetServer:
    """Holds the global adapter; admits, aggregates and records each round's client updates."""

    def __init__(self, base_dir: str | os.PathLike, out_dir: str | os.PathLike):
        self.base = read_base(base_dir)
        self.out = Path(out_dir)
        self.global_tensors = {k: v.clone() for k, v in self.base.initial.items()}
        self.adapter_bytes = tensor_bytes(self.global_tensors)
        self.records: list[dict] = []

    # ------------------------------------------------------------------ admission
    def check(self, update: ClientUpdate) -> str | None:
        """Why ``update`` is rejected, or None when it is admitted."""
        if self.base.sha256 and update.base_sha256 != self.base.sha256:
            return (f"base sha256 {str(update.base_sha256)[:12]}… differs from the server's "
                    f"{self.base.sha256[:12]}…")
        if set(update.tensors) != set(self.global_tensors):
            return "its adapter holds different tensors than the server's"
        for k, t in update.tensors.items():
            if t.shape != self.global_tensors[k].shape:
                return f"{k} has shape {tuple(t.shape)}, expected {tuple(self.global_tensors[k].shape)}"
            if not torch.isfinite(t).all():
                return f"{k} holds non-finite values"
        if not (isinstance(update.num_examples, int) and update.num_examples > 0):
            return f"example count {update.num_examples!r} is not a positive integer"
        return None

    # ------------------------------------------------------------------ rounds
    def finish_round(self, rnd: int, updates: list[ClientUpdate], expected: list[int] | None = None,
                     failures: dict[int, str] | None = None) -> dict:
        """Aggregate the admitted ``updates`` into the global adapter and write the round's outputs.

        Nodes in ``expected`` that sent nothing (or an error, see ``failures``) are recorded as
        missing; the round goes on with the others. With no admissible update the global adapter
        is carried over unchanged.
        """
        accepted, rejected = [], {}
        for u in updates:
            reason = self.check(u)
            if reason is None:
                accepted.append(u)
            else:
                rejected[u.node_id] = reason
        got = {u.node_id for u in updates}
        missing = {n: (failures or {}).get(n, "no reply") for n in (expected or []) if n not in got}
        if accepted:
            self.global_tensors = aggregate([u.tensors for u in accepted], [u.num_examples for u in accepted],
                                            self.base.scaling, self.base.r)
        record = {
            "round": rnd,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "clients": [{"node_id": u.node_id, "num_examples": u.num_examples, "bytes_sent": u.bytes_sent,
                         "bytes_ratio": round(u.bytes_sent / self.adapter_bytes, 4), **u.metrics}
                        for u in accepted],
            "rejected": {str(k): v for k, v in rejected.items()},
            "missing": {str(k): v for k, v in missing.items()},
            "adapter_bytes": self.adapter_bytes,
            "aggregated": bool(accepted),
        }
        self.records.append(record)
        self.write_round(rnd, record)
        return record

    def write_round(self, rnd: int, record: dict) -> None:
        extra = {"fleet_round": rnd, "fleet_clients": len(record["clients"])}
        write_peft(self.base, self.global_tensors, self.out / f"round-{rnd:03d}", extra)
        write_peft(self.base, self.global_tensors, self.out / LATEST, extra)
        with open(self.out / ROUNDS_FILE, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.write_status("running", rounds_done=rnd)

    def write_status(self, status: str, **info) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        write_status(self.out, status, base=str(self.base.path), adapter_bytes=self.adapter_bytes, **info)


def write_status(out: str | os.PathLike, status: str, **info) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_file(out / STATUS_FILE) as tmp:
        tmp.write_text(json.dumps({"status": status, **info}) + "\n")


def read_status(out: str | os.PathLike) -> dict | None:
    try:
        return json.loads((Path(out) / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None


def read_rounds(out: str | os.PathLike) -> list[dict]:
    path = Path(out) / ROUNDS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

