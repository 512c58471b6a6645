"""NF4Linear: a frozen NF4 matmul with its own autograd (forward, grad_x, state, hooks)."""
from __future__ import annotations

import pytest
import torch

from edgetune.methods.qlora.layer import NF4Linear, _NF4Matmul
from edgetune.quant import nf4


def _dense(out_f, in_f, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.05  # (out, in)
    b = torch.randn(out_f, generator=g) * 0.1 if bias else None  # (out,)
    return w, b


def _x(*shape, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


@pytest.fixture(params=[False, True], ids=["nf4", "nf4-dq"])
def double_quant(request):
    return request.param


@pytest.mark.parametrize("bias", [True, False])
def test_forward_equals_dense_matmul_of_dequantized_weight(double_quant, bias):
    w, b = _dense(96, 64, bias=bias)
    layer = NF4Linear.from_weight(w, b, 64, double_quant)
    x = _x(2, 5, 64)  # (B, T, in)
    y = layer(x)
    w_hat = layer.dequantize()  # (out, in)
    assert w_hat.shape == (96, 64) and w_hat.dtype == torch.float32
    expected = x @ w_hat.t() + (b if bias else 0)
    assert y.shape == (2, 5, 96)
    assert torch.equal(y, expected)
    assert torch.equal(w_hat, nf4.dequantize_nf4(nf4.quantize_nf4(w, 64, double_quant)))


def test_grad_input_matches_autograd_through_dense_weight(double_quant):
    w, b = _dense(80, 48, seed=2)  # 3840 values: not all blocks of 256 for the dq stats
    layer = NF4Linear.from_weight(w, b, 64, double_quant)
    x = _x(3, 7, 48, seed=3).requires_grad_(True)
    g = _x(3, 7, 80, seed=4)
    (layer(x) * g).sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    w_dense = layer.dequantize().requires_grad_(True)
    (torch.nn.functional.linear(x_ref, w_dense, layer.bias) * g).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)
    assert not any(t.requires_grad for t in layer.buffers())
    assert list(layer.parameters()) == []


def test_gradcheck_float64(double_quant):
    w, b = _dense(12, 64, seed=5)
    layer = NF4Linear.from_weight(w, b, 64, double_quant)
    q = layer.nf4_weight()
    x = _x(4, 64, seed=6, dtype=torch.float64).requires_grad_(True)
    y = _NF4Matmul.apply(x, q, layer.bias)
    assert y.dtype == torch.float64
    # float64 forward uses the exact float64 upcast of the float32 dequantized weight
    assert torch.equal(y, x.detach() @ layer.dequantize(torch.float64).t() + layer.bias.double())
    # fast mode (random-projection Jacobian check): the slow mode's 2·numel tiny float64 matmuls
    # crawl when the CPU is oversubscribed
    assert torch.autograd.gradcheck(lambda t: _NF4Matmul.apply(t, q, layer.bias), (x,), fast_mode=True)
    x_small = x.detach()[:1, :].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: _NF4Matmul.apply(t, q, None), (x_small,))


def test_eval_forward_first_changes_nothing(double_quant):
    w, b = _dense(128, 96, seed=7)
    fresh = NF4Linear.from_weight(w, b, 64, double_quant)
    used = NF4Linear.from_weight(w, b, 64, double_quant)
    before = {k: v.clone() for k, v in used.state_dict().items()}
    used.eval()
    with torch.no_grad():
        used(_x(1, 96, seed=8))  # a single-row (gemv-shaped) inference forward
        used(_x(4, 96, seed=9))
    used.train()
    for k, v in used.state_dict().items():
        assert torch.equal(v, before[k]) and v.dtype == before[k].dtype, k

    def run(layer):
        x = _x(2, 3, 96, seed=10).requires_grad_(True)
        y = layer(x)
        (y * _x(2, 3, 128, seed=11)).sum().backward()
        return y.detach(), x.grad

    y0, g0 = run(fresh)
    y1, g1 = run(used)
    assert torch.equal(y0, y1)
    assert torch.equal(g0, g1)


def test_no_tensors_saved_for_backward(double_quant):
    layer = NF4Linear.from_weight(*_dense(64, 64, seed=12), 64, double_quant)
    x = _x(2, 8, 64, seed=13).requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(x)
    assert y.requires_grad
    assert saved == []  # neither x nor any packed-weight buffer
    y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    # control: the hooks do see what an ordinary linear op saves
    dense = torch.nn.Linear(64, 64)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        dense(x)
    assert len(saved) > 0


def test_meta_construction_then_load_state_dict_assign(double_quant):
    w, b = _dense(72, 130, seed=14)  # 9360 values: 146.25 blocks of 64, short last block
    src = NF4Linear.from_weight(w, b, 64, double_quant)
    expected_names = {"packed", "bias"} | ({"absmax_q", "absmax_scale", "absmax_code", "absmax_offset"}
                                           if double_quant else {"absmax"})
    assert set(src.state_dict()) == expected_names
    meta = NF4Linear(130, 72, True, 64, double_quant, device="meta", dtype=torch.float32)
    assert all(t.is_meta for t in meta.buffers())
    assert {k: (v.shape, v.dtype) for k, v in meta.state_dict().items()} == \
        {k: (v.shape, v.dtype) for k, v in src.state_dict().items()}
    meta.load_state_dict(src.state_dict(), assign=True)
    assert not any(t.is_meta for t in meta.buffers())
    x = _x(3, 130, seed=15)
    assert torch.equal(meta(x), src(x))
    no_bias = NF4Linear(130, 72, False, 64, double_quant, device="meta")
    assert no_bias.bias is None and "bias" not in no_bias.state_dict()


def test_bf16_input():
    w, b = _dense(64, 128, seed=16)
    layer = NF4Linear.from_weight(w.bfloat16(), b.bfloat16(), 64)
    assert layer.compute_dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    assert layer.absmax.dtype == torch.float32
    x = _x(2, 4, 128, seed=17, dtype=torch.bfloat16).requires_grad_(True)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 4, 64)
    w_bf16 = layer.dequantize()  # (out, in) bf16
    assert w_bf16.dtype == torch.bfloat16
    assert torch.equal(y, x.detach() @ w_bf16.t() + layer.bias)
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(x.grad.float(), (torch.ones(2, 4, 64, dtype=torch.bfloat16) @ w_bf16).float())
    # a float32 layer fed bf16 activations computes in bf16 too
    layer32 = NF4Linear.from_weight(w, b, 64)
    assert layer32(x.detach()).dtype == torch.bfloat16


def test_module_dtype_cast_keeps_quant_stats(double_quant):
    w, b = _dense(64, 64, seed=18)
    layer = NF4Linear.from_weight(w, b, 64, double_quant)
    w32 = layer.dequantize()
    layer.to(torch.bfloat16)
    assert layer.compute_dtype == torch.bfloat16 and layer.bias.dtype == torch.bfloat16
    for name, t in layer.nf4_weight().to_tensors().items():
        assert t.dtype in (torch.uint8, torch.float32), name
    assert torch.equal(layer.dequantize(torch.float32), w32)


def test_extra_repr_and_shapes():
    layer = NF4Linear(576, 1536, bias=False, blocksize=64, double_quant=True, device="meta")
    r = repr(layer)
    assert "in_features=576" in r and "out_features=1536" in r and "double_quant=True" in r
    assert layer.packed.shape == (1536 * 576 // 2,) and layer.packed.dtype == torch.uint8
    assert layer.absmax_q.shape == (1536 * 576 // 64,) and layer.absmax_scale.shape == (54,)
    assert layer.absmax_code.shape == (256,) and layer.absmax_offset.shape == ()
