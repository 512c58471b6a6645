"""edgetune's ORT custom-op library (csrc/ort) builds, and its ops match torch."""
from __future__ import annotations

import pytest
import torch

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxruntime.training.api")
onnx = pytest.importorskip("onnx")

from edgetune.ort.custom_ops import build_library  # noqa: E402
from edgetune.quant.nf4 import dequantize_nf4, quantize_nf4  # noqa: E402


def _session(op, last_dim, lib):
    from onnx import TensorProto as T
    from onnx import helper

    graph = helper.make_graph(
        [helper.make_node(op, ["a", "packed", "absmax"], ["y"], domain="edgetune")], "g",
        [helper.make_tensor_value_info("a", T.FLOAT, ["b", "t", last_dim]),
         helper.make_tensor_value_info("packed", T.UINT8, [None]),
         helper.make_tensor_value_info("absmax", T.FLOAT, [None])],
        [helper.make_tensor_value_info("y", T.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("edgetune", 1)])
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(lib))
    return ort.InferenceSession(model.SerializeToString(), so)


@pytest.fixture(scope="module")
def library():
    return build_library()


# (out, in, blocksize): square, rectangular, an odd in_features (rows then start on a low nibble),
# more rows than one decode tile, and a block that spans rows.
SHAPES = [(32, 64, 64), (48, 64, 32), (64, 63, 64), (40, 24, 64)]


@pytest.mark.parametrize("n,k,bs", SHAPES)
def test_nf4_matmul_and_its_gradient_match_torch(library, n, k, bs):
    gen = torch.Generator().manual_seed(n * k)
    w = torch.randn(n, k, generator=gen)
    q = quantize_nf4(w, bs)
    dense = dequantize_nf4(q, dtype=torch.float32)  # (n, k)
    x = torch.randn(2, 5, k, generator=gen, requires_grad=True)
    y_ref = x @ dense.t()
    dy = torch.randn(2, 5, n, generator=gen)
    (dx_ref,) = torch.autograd.grad(y_ref, x, dy)
    feeds = {"packed": q.packed.numpy(), "absmax": q.absmax.numpy()}
    y = _session("NF4MatMul", k, library).run(None, {"a": x.detach().numpy(), **feeds})[0]
    dx = _session("NF4MatMulGrad", n, library).run(None, {"a": dy.numpy(), **feeds})[0]
    assert y.shape == (2, 5, n) and dx.shape == (2, 5, k)
    torch.testing.assert_close(torch.from_numpy(y), y_ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.from_numpy(dx), dx_ref, rtol=1e-5, atol=1e-5)


def test_mismatched_shapes_give_nan_not_garbage(library):
    q = quantize_nf4(torch.randn(32, 64), 64)
    x = torch.randn(1, 3, 48).numpy()  # 32*64 is not a multiple of... 48 divides 2048? no: 2048 % 48 != 0
    y = _session("NF4MatMul", 48, library).run(None, {"a": x, "packed": q.packed.numpy(), "absmax": q.absmax.numpy()})[0]
    assert torch.isnan(torch.from_numpy(y)).all()


def test_library_is_cached_by_source_hash(library):
    assert build_library() == library
    assert library.name.startswith("libedgetune_ort-") and library.stat().st_size > 0


def test_loading_the_library_keeps_subnormal_floats(library):
    """A library built with -ffast-math would switch flush-to-zero on for the whole process."""
    import ctypes

    ctypes.CDLL(str(library))
    tiny = torch.tensor(1e-40, dtype=torch.float32)
    assert float(tiny * 1.0) != 0.0 and float(torch.tensor(1e-39) / 10) != 0.0
