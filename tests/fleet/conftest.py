"""Fixtures for the fleet tests: a tiny compiled LoRA artifact and two data shards."""
from __future__ import annotations

from pathlib import Path

import pytest

from edgetune.cli import main

DATA = Path(__file__).resolve().parents[2] / "edgetune" / "data"


@pytest.fixture(scope="session")
def fleet_compiled(tmp_path_factory, tiny_hf_dir):
    out = tmp_path_factory.mktemp("fleet") / "tiny.lora"
    assert main(["compile", str(tiny_hf_dir), "--recipe", "lora", "--r", "8", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def fleet_shards(tmp_path_factory):
    """instructions.jsonl split into two disjoint shards (even and odd lines)."""
    root = tmp_path_factory.mktemp("shards")
    lines = (DATA / "instructions.jsonl").read_text().splitlines()
    for i in range(2):
        (root / f"shard-{i}.jsonl").write_text("\n".join(lines[i::2]) + "\n")
    return root
