"""Backend selection, forcing, diagnostics, and the actpack wire-in (bit-exact with its reference)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from edgetune.kernels import ops, registry
from edgetune.quant import actpack


def test_default_backend_on_cpu_is_the_best_built():
    x = torch.randn(77)
    ops.pack_bits(x > 0)
    expected = "cpu" if registry.status("cpu")[0] else "reference"
    assert registry.forced() is None or os.environ.get(registry.ENV)
    if registry.forced() is None:
        assert registry.last_backend["pack_bits"] == expected


def test_env_forces_a_backend_and_bad_names_fail_with_a_reason(monkeypatch):
    monkeypatch.setenv(registry.ENV, "reference")
    ops.pack_nibbles(torch.zeros(5, dtype=torch.uint8))
    assert registry.last_backend["pack_nibbles"] == "reference"
    monkeypatch.setenv(registry.ENV, "fastest")
    with pytest.raises(registry.BackendUnavailable, match="not a backend"):
        ops.pack_nibbles(torch.zeros(5, dtype=torch.uint8))
    if not torch.cuda.is_available():
        monkeypatch.setenv(registry.ENV, "cuda")
        with pytest.raises(registry.BackendUnavailable, match="cuda"):
            ops.pack_nibbles(torch.zeros(5, dtype=torch.uint8))


def test_missing_native_library_is_reported_not_raised_at_import(monkeypatch):
    monkeypatch.setattr(registry, "_state", {})
    monkeypatch.setattr(registry.importlib.util, "find_spec", lambda name: None)
    ok, why = registry.status("cpu")
    assert not ok and "edgetune._cpu_ops is missing" in why
    with registry.use_backend(None):
        assert registry.choose("pack_bits", torch.device("cpu"), ops.IMPLS["pack_bits"]) == "reference"


def test_import_defines_no_ops_and_loads_no_native_library():
    code = ("import sys, edgetune, edgetune.kernels, torch\n"
            "print(hasattr(torch.ops.edgetune, 'act4_forward'), 'edgetune.kernels.ops' in sys.modules, "
            "'triton' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["False", "False", "False"], out.stdout + out.stderr


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_actpack_public_functions_equal_their_references(backend):
    if not registry.status(backend)[0]:
        pytest.skip(registry.status(backend)[1])
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, 259, generator=g) * 4
    with registry.use_backend(backend):
        codes = torch.randint(0, 16, (5, 259), generator=g, dtype=torch.uint8)
        assert torch.equal(actpack.pack_nibbles(codes), actpack.pack_nibbles_reference(codes))
        p = actpack.pack_nibbles_reference(codes)
        assert torch.equal(actpack.unpack_nibbles(p, codes.numel()), actpack.unpack_nibbles_reference(p, codes.numel()))
        m = x > 0.3
        assert torch.equal(actpack.pack_bits(m), actpack.pack_bits_reference(m))
        b = actpack.pack_bits_reference(m)
        assert torch.equal(actpack.unpack_bits(b, m.numel()), actpack.unpack_bits_reference(b, m.numel()))
        for dtype in (torch.float32, torch.bfloat16):
            xd = x.to(dtype)
            q, r = actpack.quantize_int8_groups(xd), actpack.quantize_int8_groups_reference(xd)
            assert all(torch.equal(a, c) for a, c in zip(q.tensors(), r.tensors()))
            assert q.shape == r.shape and q.dtype == r.dtype
            assert torch.equal(actpack.dequantize_int8_groups(q), actpack.dequantize_int8_groups_reference(r))
            assert torch.equal(actpack.dequantize_int8_groups(q, torch.float32),
                               actpack.dequantize_int8_groups_reference(r, torch.float32))
        s1 = actpack.quantize_int8_groups(x, 64, True, torch.Generator().manual_seed(3))
        s2 = actpack.quantize_int8_groups_reference(x, 64, True, torch.Generator().manual_seed(3))
        assert torch.equal(s1.codes, s2.codes)
        assert not torch.equal(s1.codes, actpack.quantize_int8_groups(x).codes)  # it really is stochastic
    assert registry.last_backend["quantize_int8"] == backend


def test_s2a_act4_gradient_is_identical_on_every_cpu_backend():
    from edgetune.s2a.functions import Act4Pointwise

    if not registry.status("cpu")[0]:
        pytest.skip(registry.status("cpu")[1])
    x = torch.randn(3, 101, requires_grad=True)
    dy = torch.randn(3, 101)
    grads = []
    for backend in ("reference", "cpu"):
        with registry.use_backend(backend):
            x.grad = None
            Act4Pointwise.apply(x, "silu").backward(dy)
            grads.append(x.grad.clone())
    assert torch.equal(grads[0], grads[1])


def test_doctor_lists_every_backend_with_a_reason():
    import json

    from click.testing import CliRunner

    from edgetune.cli import cli

    res = CliRunner().invoke(cli, ["doctor", "--json"])
    assert res.exit_code == 0, res.output
    info = json.loads(res.output)
    assert [r["backend"] for r in info["backends"]] == list(registry.BACKENDS)
    assert all(r["reason"] for r in info["backends"])
    cpu_ok = registry.status("cpu")[0]
    assert info["active"]["cpu"]["act4_forward"] == ("cpu" if cpu_ok else "reference")
    text = CliRunner().invoke(cli, ["doctor"]).output
    assert "reference" in text and "cuda" in text and "active on cpu" in text
