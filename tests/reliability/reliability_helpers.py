"""Shared by the reliability tests: run settings, the tally, and CLI helpers."""
from __future__ import annotations

import collections
from pathlib import Path

import torch

# What the report counts: faults injected, inputs tried, files refused, runs resumed, fuzz examples.
TALLY: collections.Counter = collections.Counter()

STEPS = 12
SEQ_LEN = 32
BATCH = 2

TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Edge devices fine-tune small language models with little memory.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "Paris is the capital of France, and Rome is the capital of Italy.",
    "Instruction: explain why the sky is blue. Response: sunlight scatters off air molecules.",
    "def add(a, b):\n    return a + b",
]


def train_argv(compiled: Path, data: Path, out: Path, *extra) -> list[str]:
    return ["train", str(compiled), "--data", str(data), "--out", str(out), "--steps", str(STEPS),
            "--batch", str(BATCH), "--seq-len", str(SEQ_LEN), "--lr", "3e-3", "--seed", "7", *map(str, extra)]


class one_thread:
    """One intra-op thread: runs in this process and in children compare bitwise, and two shared
    cores are not lost to OpenMP spinning."""

    def __enter__(self):
        self.before = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)


def error_line(err: str) -> str:
    """The one ``edgetune: error:`` line (progress and warnings may precede it), never a traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("edgetune: error:")]
    assert len(lines) == 1, err
    return lines[0]


def run_cli(capsys, argv):
    from edgetune.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err
