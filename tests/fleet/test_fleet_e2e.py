"""A real fleet on 127.0.0.1 (SuperLink + SuperNodes, TLS, SuperNode auth) on a tiny Llama, and the CLI's errors."""
from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest

from edgetune.cli import main

DATA = Path(__file__).resolve().parents[2] / "edgetune" / "data"
needs_flwr = pytest.mark.skipif(importlib.util.find_spec("flwr") is None, reason="flwr is not installed")


def _heldout_loss(compiled, adapter=None):
    from edgetune.api import open_model
    from edgetune.evaluate import evaluate_loss
    from edgetune.training.data import build_dataset

    model, tok = open_model(compiled, adapter=adapter)
    return evaluate_loss(model, build_dataset(DATA / "instructions_heldout.jsonl", tok, 32), batch_size=8)["loss"]


@needs_flwr
def test_fleet_lowers_heldout_loss_and_refuses_an_unauthenticated_client(fleet_compiled, fleet_shards, tmp_path):
    from edgetune.fleet.keys import generate_keys
    from edgetune.fleet.launch import Processes, free_port
    from edgetune.fleet.run import client_config, serve
    from edgetune.fleet.server import read_rounds

    out = tmp_path / "out"
    out.mkdir()
    shards = sorted(fleet_shards.iterdir())
    with Processes(tmp_path / "work") as procs:
        keys = generate_keys(procs.workdir / "keys", 3)
        port = free_port()
        started = {}

        def start_clients():
            for i, shard in enumerate(shards):
                procs.start_supernode(f"client-{i}", f"127.0.0.1:{port}", keys / "ca.pem",
                                      keys / "clients" / f"client-{i}.key",
                                      client_config(fleet_compiled, shard, local_steps=8, batch=4, seq_len=32, lr=1e-2))
            # client-2's key was never registered with the SuperLink: it must be refused
            started["intruder"] = procs.start_supernode(
                "intruder", f"127.0.0.1:{port}", keys / "ca.pem", keys / "clients" / "client-2.key",
                client_config(fleet_compiled, shards[0], local_steps=8, batch=4, seq_len=32, lr=1e-2), max_retries=0)

        status = serve(procs, fleet_compiled, out, rounds=2, min_clients=2, host="127.0.0.1", port=port, keys=keys,
                       round_timeout=120, connect_timeout=60, on_ready=start_clients,
                       public_keys=[keys / "clients" / "client-0.pub", keys / "clients" / "client-1.pub"])
        intruder = started["intruder"]
        deadline = time.monotonic() + 30
        while intruder.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert intruder.returncode not in (None, 0)
        assert "Failed to activate SuperNode" in procs.log_tail("intruder", 40)
        assert "No SuperNode found with the given public key" in (procs.workdir / "superlink.log").read_text()

    assert status["status"] == "finished" and status["rounds_done"] == 2
    rounds = read_rounds(out)
    assert [r["round"] for r in rounds] == [1, 2]
    for r in rounds:
        assert len(r["clients"]) == 2 and not r["rejected"], r  # the intruder never took part
        for c in r["clients"]:
            assert r["adapter_bytes"] <= c["bytes_sent"] <= 1.05 * r["adapter_bytes"], c
    for name in ("round-001", "round-002", "adapter"):
        assert (out / name / "adapter_config.json").is_file()
    base, fleet = _heldout_loss(fleet_compiled), _heldout_loss(fleet_compiled, out / "adapter")
    assert fleet < base - 0.02, (base, fleet)
    assert _heldout_loss(fleet_compiled, out / "round-001") > fleet  # round 2 improved on round 1


def test_fleet_without_flwr_names_the_install_command(capsys, monkeypatch, fleet_compiled, fleet_shards, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "flwr" else real(name, *a))
    code = main(["fleet", "simulate", "--base", str(fleet_compiled), "--clients", "2", "--data-shards",
                 str(fleet_shards), "--rounds", "1", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "pip install flwr==1.42.0" in err[0], err


@needs_flwr
def test_fleet_bad_input_is_one_line(capsys, fleet_compiled, fleet_shards, tmp_path):
    cases = [
        (["simulate", "--base", str(fleet_compiled), "--clients", "3", "--data-shards", str(fleet_shards),
          "--rounds", "1", "--out", str(tmp_path / "o")], "fewer than --clients 3"),
        (["simulate", "--base", str(tmp_path), "--clients", "1", "--data-shards", str(fleet_shards),
          "--rounds", "1", "--out", str(tmp_path / "o")], "not an edgetune artifact"),
        (["server", "--base", str(fleet_compiled), "--rounds", "1", "--min-clients", "1", "--out",
          str(tmp_path / "o"), "--address", "nonsense"], "HOST:PORT"),
        (["server", "--base", str(fleet_compiled), "--rounds", "1", "--min-clients", "1", "--out",
          str(tmp_path / "o"), "--keys", str(tmp_path)], "edgetune fleet keys"),
    ]
    for args, needle in cases:
        code = main(["fleet", *args])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and needle in err[0] and "Traceback" not in err[0], (args, err)
    assert not (tmp_path / "o").exists()
