"""Sketch construction for one matrix: k-means, GPTQ code assignment, and the baselines it must beat."""
from __future__ import annotations

import pytest
import torch

from edgetune.quant.sketch import (bits_per_weight, build_sketch, group_index, hessian_error, hessian_from_inputs,
                                   inverse_hessian_factor, nearest_codes, nearest_sketch, round_to_nearest,
                                   sketch_weight, weighted_kmeans_1d)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Thousands of tiny ops: one intra-op thread is much faster on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _problem(out_f=48, in_f=128, tokens=1024, seed=0):
    """A weight with a few outlier rows and inputs with correlated features and loud channels."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(in_f) + 0.8 * torch.randn(in_f, in_f, generator=g) / in_f ** 0.5
    X = torch.randn(tokens, in_f, generator=g) @ mix  # correlated features
    X[:, :4] *= 8  # a few loud channels, as LLM activations have
    W = torch.randn(out_f, in_f, generator=g) * 0.05
    W[:, 5] *= 6
    return W, X, hessian_from_inputs(X)


def test_group_index_is_contiguous_and_even():
    gi = group_index(576, 4)
    assert gi.tolist() == [c // 144 for c in range(576)]
    gi = group_index(10, 4)  # not divisible: still contiguous, sizes differ by at most one
    assert gi.tolist() == sorted(gi.tolist())
    counts = torch.bincount(gi).tolist()
    assert len(counts) == 4 and max(counts) - min(counts) <= 1


def test_hessian_error_is_output_error():
    W, X, H = _problem()
    W_hat = W + 0.01 * torch.randn_like(W)
    direct = float(((W.double() - W_hat.double()) @ X.double().t()).pow(2).sum())
    assert hessian_error(W, W_hat, H) == pytest.approx(direct, rel=1e-9)


def test_inverse_factor():
    _, _, H = _problem()
    U = inverse_hessian_factor(H, damp=0.1)
    Hd = H + 0.1 * torch.diagonal(H).mean() * torch.eye(H.shape[0], dtype=torch.float64)
    assert torch.allclose(U.t() @ U, torch.linalg.inv(Hd), rtol=1e-8, atol=1e-12)
    assert torch.equal(U, torch.triu(U))
    # a singular Hessian (fewer tokens than inputs) is fine thanks to the damping
    X = torch.randn(8, 32)
    assert torch.isfinite(inverse_hessian_factor(hessian_from_inputs(X), damp=0.01)).all()


def _weighted_sse(x, w, c):
    codes = nearest_codes(x.double(), c)
    return float(((x.double() - c.gather(1, codes)) ** 2 * w.double()).sum())


def test_weighted_kmeans_finds_clusters_and_is_a_fixed_point():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([-3.0, -1.0, 0.5, 4.0])
    x = (centres[torch.randint(0, 4, (5, 400), generator=g)] + 0.01 * torch.randn(5, 400, generator=g))
    c = weighted_kmeans_1d(x, None, 4)
    assert c.shape == (5, 4)
    assert torch.allclose(c.float(), centres.expand(5, 4), atol=0.01)
    # Lloyd fixed point: every centre is the (weighted) mean of the values nearest to it
    w = torch.rand(400, generator=g) ** 3
    x = torch.randn(3, 400, generator=g)
    c = weighted_kmeans_1d(x, w, 8, iters=500)
    assert torch.all(c[:, 1:] >= c[:, :-1])
    codes = nearest_codes(x.double(), c)
    for r in range(3):
        for k in range(8):
            sel = codes[r] == k
            if sel.any():
                mean = (x[r, sel].double() * w[sel]).sum() / w[sel].sum()
                assert float(mean) == pytest.approx(float(c[r, k]), abs=1e-6)  # float32 interval search
    # the weights matter: the weighted fit beats the unweighted one on the weighted error
    c_plain = weighted_kmeans_1d(x, None, 8)
    assert _weighted_sse(x, w, c) < _weighted_sse(x, w, c_plain)


def test_degenerate_rows():
    x = torch.zeros(2, 10)
    x[1] = 1.5
    c = weighted_kmeans_1d(x, None, 4)
    assert torch.isfinite(c).all()
    assert torch.allclose(sketch_weight(nearest_codes(x.double(), c).to(torch.uint8), c.unsqueeze(1), torch.float64),
                          x.double())


@pytest.mark.parametrize("bits", (2, 3, 4))
@pytest.mark.parametrize("gpr", (1, 4))
def test_sketch_beats_round_to_nearest(bits, gpr):
    W, _, H = _problem()
    codes, table = build_sketch(W, H, bits, gpr)
    K = 1 << bits
    assert codes.dtype == torch.uint8 and codes.shape == W.shape and int(codes.max()) < K
    assert table.shape == (W.shape[0], gpr, K) and table.dtype == torch.float32
    assert torch.equal(table, table.half().float())  # fp16-representable: what the layer stores
    assert torch.all(table[..., 1:] >= table[..., :-1])
    err = hessian_error(W, sketch_weight(codes, table), H)
    rtn = hessian_error(W, sketch_weight(*round_to_nearest(W, bits, gpr)), H)
    kmeans_only = hessian_error(W, sketch_weight(*nearest_sketch(W, bits, gpr)), H)
    assert err < 0.7 * rtn, (err, rtn)
    assert err < kmeans_only, (err, kmeans_only)  # the error feedback pays off on correlated inputs


def test_more_groups_and_bits_help():
    W, _, H = _problem()
    e = {(b, g): hessian_error(W, sketch_weight(*build_sketch(W, H, b, g)), H) for b in (2, 4) for g in (1, 4)}
    assert e[(4, 1)] < e[(2, 1)] and e[(4, 4)] < e[(2, 4)]
    assert e[(2, 4)] < e[(2, 1)] and e[(4, 4)] < e[(4, 1)]


def test_act_order_and_dead_inputs():
    W, X, _ = _problem()
    X[:, 7] = 0  # an input that never fires
    H = hessian_from_inputs(X)
    for act_order in (True, False):
        codes, table = build_sketch(W, H, 3, 2, act_order=act_order)
        W_hat = sketch_weight(codes, table)
        assert torch.isfinite(W_hat).all()
        assert hessian_error(W, W_hat, H) < hessian_error(W, sketch_weight(*round_to_nearest(W, 3, 2)), H)


def test_rows_are_independent():
    """Sketching q/k/v together (rows concatenated) is exactly sketching each on its own."""
    W, _, H = _problem()
    c_all, t_all = build_sketch(W, H, 4, 2)
    c_top, t_top = build_sketch(W[:20], H, 4, 2)  # 20 of the 48 rows
    assert torch.equal(c_all[:20], c_top) and torch.equal(t_all[:20], t_top)


def test_uncorrelated_inputs_reduce_to_nearest_codes():
    """With H = I there is nothing to compensate: GPTQ picks the nearest entry of each table."""
    g = torch.Generator().manual_seed(1)
    W = torch.randn(16, 32, generator=g)
    H = torch.eye(32, dtype=torch.float64)  # no correlation: error feedback has nowhere to go
    codes, table = build_sketch(W, H, 3, 1, exponent=0.0)
    assert torch.equal(codes.long(), nearest_codes(W.double(), table[:, 0].double()))


def test_bits_per_weight():
    assert bits_per_weight(576, 4, 1) == pytest.approx(4 + 16 * 16 / 576)
    assert bits_per_weight(576, 3, 4) == pytest.approx(3 + 4 * 8 * 16 / 576)
