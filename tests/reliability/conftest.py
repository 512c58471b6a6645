"""Fixtures of the reliability suite, and the tally its report is made from.

Every test here adds what it did to ``TALLY`` (faults injected, corrupt files refused, fuzz
examples run, runs killed and resumed); the totals are printed at the end of the session and, if
``EDGETUNE_RELIABILITY_REPORT`` names a file, written there as JSON.
"""
from __future__ import annotations

import collections
import json
import os
from pathlib import Path

import pytest
from reliability_helpers import TALLY, TEXT, one_thread, train_argv


@pytest.fixture(scope="session")
def tally():
    return TALLY


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


@pytest.fixture(scope="session")
def train_text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("reliability-data") / "train.txt"
    path.write_text("\n\n".join(f"{TEXT[i % len(TEXT)]} Paragraph {i}." for i in range(40)) + "\n")
    return path


@pytest.fixture(scope="session")
def compiled_dropout(tmp_path_factory, tiny_hf_dir) -> Path:
    """A LoRA artifact of the tiny Llama with dropout 0.1, so resuming must restore the RNG too."""
    from edgetune.cli import main

    out = tmp_path_factory.mktemp("reliability-compiled") / "lora-dropout"
    assert main(["compile", str(tiny_hf_dir), "--recipe", "lora", "--r", "8", "--dropout", "0.1",
                 "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def reference_run(tmp_path_factory, compiled_dropout, train_text) -> Path:
    """The uninterrupted run every resumed run is compared with."""
    from edgetune.cli import main

    out = tmp_path_factory.mktemp("reliability-ref") / "run"
    with one_thread():
        assert main(train_argv(compiled_dropout, train_text, out, "--save-every", "1")) == 0
    return out


def pytest_terminal_summary(terminalreporter):
    if not TALLY:
        return
    terminalreporter.section("reliability tally")
    groups = collections.defaultdict(dict)
    for key, n in sorted(TALLY.items()):
        group, _, name = key.partition(":")
        groups[group][name] = n
    for group, items in groups.items():
        terminalreporter.write_line(f"{group}: {sum(items.values())}")
        for name, n in items.items():
            terminalreporter.write_line(f"    {n:6d}  {name}")
    path = os.environ.get("EDGETUNE_RELIABILITY_REPORT")
    if path:
        Path(path).write_text(json.dumps({g: dict(i) for g, i in groups.items()}, indent=2) + "\n")
