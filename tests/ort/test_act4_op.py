"""edgetune::Act4SiLU / Act4GELU / Act4GELUTanh and Act4Grad against S2A's torch reference."""
from __future__ import annotations

import pytest
import torch

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from edgetune.ort.custom_ops import ACT4_OPS, build_library  # noqa: E402
from edgetune.quant.actpack import pack_nibbles_reference  # noqa: E402
from edgetune.s2a.functions import Act4Pointwise  # noqa: E402
from edgetune.s2a.tables import FORWARDS, table_for  # noqa: E402


def _session(op, inputs, outputs, lib):
    from onnx import helper

    graph = helper.make_graph(
        [helper.make_node(op, [n for n, _ in inputs], [n for n, _ in outputs], domain="edgetune")], "g",
        [helper.make_tensor_value_info(n, t, None) for n, t in inputs],
        [helper.make_tensor_value_info(n, t, None) for n, t in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("edgetune", 1)])
    so = ort.SessionOptions()
    so.register_custom_ops_library(str(lib))
    return ort.InferenceSession(model.SerializeToString(), so)


@pytest.fixture(scope="module")
def library():
    return build_library()


@pytest.mark.parametrize("op", sorted(ACT4_OPS))
@pytest.mark.parametrize("shape", [(2, 5, 8), (3, 7, 11), (1,)])  # even, odd (a padded nibble), one element
def test_act4_forward_codes_and_gradient_match_the_torch_reference(library, op, shape):
    from onnx import TensorProto as T

    table = table_for(op, 4)
    gen = torch.Generator().manual_seed(len(shape) * 31 + shape[-1])
    x = (torch.randn(shape, generator=gen) * 2).requires_grad_()
    x.data[..., 0] = table.borders[3]  # exactly on a border: code counts borders strictly below
    if x.numel() > 2:
        x.data.view(-1)[1] = float("nan")  # torch.bucketize puts NaN past every border
    feeds = {"x": x.detach().numpy(), "b": table.borders.numpy(), "l": table.levels.numpy()}
    y, codes = _session(ACT4_OPS[op], [("x", T.FLOAT), ("b", T.FLOAT), ("l", T.FLOAT)],
                        [("y", T.FLOAT), ("c", T.UINT8)], library).run(None, feeds)
    ref_codes = pack_nibbles_reference(table.encode(x))  # (ceil(n/2),) the actpack layout
    assert codes.shape == ref_codes.shape
    assert torch.equal(torch.from_numpy(codes), ref_codes)
    torch.testing.assert_close(torch.from_numpy(y), FORWARDS[op](x.detach()), rtol=1e-6, atol=1e-6, equal_nan=True)
    # the gradient: S2A's autograd Function is the oracle (levels[code] * dy)
    dy = torch.randn(shape, generator=gen)
    (dx_ref,) = torch.autograd.grad(Act4Pointwise.apply(x, op), x, dy)
    dx = _session("Act4Grad", [("dy", T.FLOAT), ("c", T.UINT8), ("l", T.FLOAT)], [("dx", T.FLOAT)],
                  library).run(None, {"dy": dy.numpy(), "c": codes, "l": table.levels.numpy()})[0]
    assert dx.shape == tuple(shape)
    torch.testing.assert_close(torch.from_numpy(dx), dx_ref, rtol=0, atol=0)


def test_act4_grad_with_codes_of_the_wrong_size_gives_nan(library):
    from onnx import TensorProto as T

    table = table_for("silu", 4)
    dx = _session("Act4Grad", [("dy", T.FLOAT), ("c", T.UINT8), ("l", T.FLOAT)], [("dx", T.FLOAT)], library).run(
        None, {"dy": torch.ones(4, 6).numpy(), "c": torch.zeros(5, dtype=torch.uint8).numpy(),
               "l": table.levels.numpy()})[0]
    assert torch.isnan(torch.from_numpy(dx)).all()
