"""The aggregation math and the server's admission rules (no Flower needed)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from edgetune.errors import EdgetuneError
from edgetune.fleet.aggregate import A_ROW_NORM, aggregate, aggregate_lora, delta_w, fedavg
from edgetune.fleet.server import ClientUpdate, FleetServer, layout_digest, pack, unpack


def _pair(gen, r, out_f, in_f, a=None):
    a = torch.randn(r, in_f, generator=gen, dtype=torch.float64) if a is None else a
    return a, torch.randn(out_f, r, generator=gen, dtype=torch.float64)


def test_identical_clients_give_the_client_update():
    gen = torch.Generator().manual_seed(0)
    a, b = _pair(gen, 4, 24, 20)
    sketch = torch.randn(16, generator=gen, dtype=torch.float64)
    client = {"m.q_proj.lora_A": a, "m.q_proj.lora_B": b, "m.q_proj.sketch_table": sketch}
    out = aggregate([client] * 3, [5, 1, 7], scaling=2.0, r=4)
    torch.testing.assert_close(delta_w(out["m.q_proj.lora_A"], out["m.q_proj.lora_B"], 2.0), delta_w(a, b, 2.0),
                               rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out["m.q_proj.sketch_table"], sketch, rtol=0, atol=1e-12)
    assert out["m.q_proj.lora_A"].shape == a.shape and out["m.q_proj.lora_B"].shape == b.shape


def test_weighted_average_of_products_is_exact_when_the_rank_allows():
    # All clients share A (the row space), so Σ w_k s B_k A has rank <= r: the SVD refactor is exact.
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(4, 20, generator=gen, dtype=torch.float64)
    pairs = [_pair(gen, 4, 24, 20, a=a) for _ in range(3)]
    counts = [10, 30, 60]
    expected = sum(c / 100 * delta_w(pa, pb, 0.5) for (pa, pb), c in zip(pairs, counts))
    agg_a, agg_b = aggregate_lora(pairs, [c / 100 for c in counts], scaling=0.5, r=4)
    torch.testing.assert_close(delta_w(agg_a, agg_b, 0.5), expected, rtol=1e-10, atol=1e-10)


def test_separate_averaging_of_a_and_b_would_be_wrong_and_truncation_is_optimal():
    gen = torch.Generator().manual_seed(2)
    for out_f, in_f, r in ((24, 20, 4), (6, 5, 2)):  # K·r <= dims (QR path) and K·r > in (dense path)
        pairs = [_pair(gen, r, out_f, in_f) for _ in range(3)]
        w = [0.2, 0.3, 0.5]
        mean = sum(wk * delta_w(a, b, 1.0) for (a, b), wk in zip(pairs, w))
        naive = delta_w(sum(wk * a for (a, _), wk in zip(pairs, w)), sum(wk * b for (_, b), wk in zip(pairs, w)), 1.0)
        assert (naive - mean).norm() > 0.1 * mean.norm()  # the reason for averaging products
        u, s, vt = np.linalg.svd(mean.numpy())
        best = torch.from_numpy((u[:, :r] * s[:r]) @ vt[:r])  # Eckart–Young rank-r optimum
        agg_a, agg_b = aggregate_lora(pairs, w, scaling=1.0, r=r)
        torch.testing.assert_close(delta_w(agg_a, agg_b, 1.0), best, rtol=1e-9, atol=1e-9)


def test_refactored_a_keeps_live_orthogonal_rows_even_for_a_zero_update():
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(4, 20, generator=gen)
    zero_b = torch.zeros(24, 4)
    agg_a, agg_b = aggregate_lora([(a, zero_b), (a, zero_b)], [0.5, 0.5], scaling=2.0, r=4)
    assert float(agg_b.abs().max()) == 0.0
    gram = agg_a.double() @ agg_a.double().t()
    torch.testing.assert_close(gram, torch.eye(4, dtype=torch.float64) * A_ROW_NORM ** 2, rtol=1e-5, atol=1e-6)
    assert agg_a.dtype == torch.float32


def test_fedavg_weights_by_example_count():
    t = [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])]
    torch.testing.assert_close(fedavg(t, [0.25, 0.75]), torch.tensor([2.5, 5.0]))
    out = aggregate([{"s2a.table": t[0]}, {"s2a.table": t[1]}], [100, 300], scaling=1.0)
    torch.testing.assert_close(out["s2a.table"], torch.tensor([2.5, 5.0]))
    with pytest.raises(EdgetuneError):
        aggregate([{"s2a.table": t[0]}], [0], scaling=1.0)


def test_pack_roundtrip_and_layout():
    like = {"b.lora_B": torch.zeros(3, 2), "a.lora_A": torch.zeros(2, 5)}
    src = {k: torch.randn(v.shape) for k, v in like.items()}
    flat = pack(src)
    assert flat.shape == (16,)
    back = unpack(flat, like)
    for k in like:
        torch.testing.assert_close(back[k], src[k], rtol=0, atol=0)
    assert layout_digest(src) == layout_digest(like)
    assert layout_digest({"a.lora_A": torch.zeros(2, 6)}) != layout_digest({"a.lora_A": torch.zeros(2, 5)})
    with pytest.raises(ValueError):
        unpack(flat[:-1], like)


def test_server_rejects_a_foreign_base_and_tolerates_missing_clients(fleet_compiled, tmp_path):
    from edgetune.api import attach_adapter, lora_adapters, open_model

    server = FleetServer(fleet_compiled, tmp_path / "out")
    gen = torch.Generator().manual_seed(4)
    trained = {k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in server.global_tensors.items()}
    good = ClientUpdate(1, trained, 40, server.base.sha256, bytes_sent=server.adapter_bytes)
    foreign = ClientUpdate(2, {k: v * 3 for k, v in trained.items()}, 1000, "0" * 64)
    record = server.finish_round(1, [good, foreign], expected=[1, 2, 3])
    assert [c["node_id"] for c in record["clients"]] == [1]
    assert "base sha256" in record["rejected"]["2"]
    assert record["missing"] == {"3": "no reply"}
    # one admitted client: the aggregate is its update, product for product
    model, _ = open_model(fleet_compiled, adapter=tmp_path / "out" / "round-001")
    scaling = server.base.scaling
    for module, (a, b) in lora_adapters(model).items():
        torch.testing.assert_close(delta_w(a, b, scaling),
                                   delta_w(trained[module + ".lora_A"], trained[module + ".lora_B"], scaling),
                                   rtol=1e-4, atol=1e-5)
    # a round in which nobody answers keeps the global adapter
    before = {k: v.clone() for k, v in server.global_tensors.items()}
    record = server.finish_round(2, [], expected=[1, 2])
    assert not record["aggregated"] and len(record["missing"]) == 2
    for k in before:
        assert torch.equal(server.global_tensors[k], before[k])
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    # the written adapter is an edgetune export: attach_adapter checks its base hash
    attach_adapter(model, tmp_path / "out" / "adapter")
