"""Derivative tables: shipped tables are optimal-looking, monotone, and their error is bounded."""
import numpy as np
import pytest
import torch

from edgetune.s2a.tables import DERIVATIVES, fit_table, shipped_tables, table_for, weighted_l2_error

NORMAL_X = np.linspace(-6, 6, 1201)
NORMAL_W = np.exp(-0.5 * NORMAL_X ** 2)


@pytest.mark.parametrize("op", ["silu", "gelu", "gelu_tanh"])
def test_shipped_4bit_tables_are_monotone_and_accurate(op):
    t = table_for(op, 4)
    assert t.borders.numel() == 15 and t.levels.numel() == 16
    assert bool((t.borders[1:] > t.borders[:-1]).all())
    x, w = torch.from_numpy(NORMAL_X), torch.from_numpy(NORMAL_W)
    err = weighted_l2_error(t, x, w)
    assert err < 0.05  # f' spans ~1.2; 16 levels under a N(0,1)-like weight leave < 5% RMS error
    # and far better than 16 equal-width levels over [-4, 4]
    uniform = fit_table(op, NORMAL_X, NORMAL_W, 4)
    assert weighted_l2_error(uniform, x, w) <= err + 0.01


def test_more_bits_means_less_error():
    errs = [weighted_l2_error(table_for("gelu", b), torch.from_numpy(NORMAL_X), torch.from_numpy(NORMAL_W))
            for b in (2, 3, 4)]
    assert errs[0] > errs[1] > errs[2]


def test_fit_is_optimal_against_perturbed_borders():
    t = fit_table("silu", NORMAL_X, NORMAL_W, 3)
    x, w = torch.from_numpy(NORMAL_X), torch.from_numpy(NORMAL_W)
    best = weighted_l2_error(t, x, w)
    g = torch.Generator().manual_seed(0)
    f = DERIVATIVES["silu"](x)
    for _ in range(20):  # any other borders (with their optimal levels) do no better
        borders = torch.sort(t.borders + torch.randn(t.borders.shape, generator=g, dtype=torch.float32) * 0.2).values
        codes = torch.bucketize(x.float(), borders)
        levels = torch.stack([(w * f)[codes == c].sum() / w[codes == c].sum().clamp_min(1e-30) for c in range(8)])
        err = torch.sqrt((w * (f - levels[codes]) ** 2).sum() / w.sum())
        assert float(err) >= best - 1e-9


def test_codes_and_derivative_lookup():
    t = table_for("silu", 4)
    x = torch.tensor([-100.0, float(t.borders[3]) + 1e-3, 100.0])
    codes = t.encode(x)
    assert codes.tolist() == [0, 4, 15]
    assert torch.equal(t.derivative(codes), t.levels[[0, 4, 15]])


def test_silu_table_was_fitted_on_real_preactivations():
    assert "SmolLM2" in shipped_tables()["silu@4"].source
