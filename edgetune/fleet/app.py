"""Flower's ServerApp and ClientApp for edgetune fleets (Flower's Message API, flwr 1.42).

The SuperLink runs :data:`server_app` (in a ``flwr-serverapp`` process it spawns for the run) and
every SuperNode runs :data:`client_app` (a ``flwr-clientapp`` process per message). Each round:

1. the server sends every connected node a ``train`` message: the global adapter's tensors
   (``ArrayRecord``) and ``{"round", "base-sha256"}`` (``ConfigRecord``);
2. a client loads its compiled artifact (``node_config["compiled"]``), puts the global tensors
   into its trainable parameters, trains ``local-steps`` steps on ``node_config["data"]`` with
   edgetune's trainer (:func:`edgetune.training.loop.train_model`) and replies with only its
   trainable tensors, its example count, its base's sha256 and its train loss;
3. the server admits or rejects each reply and aggregates (:class:`~edgetune.fleet.server.FleetServer`).

The bytes a client sends are measured on the server as the serialized size of the reply Message
(every object Flower pushes for it: the message, record dict, records and array chunks).
"""
from __future__ import annotations

import tempfile
import time
import traceback
from pathlib import Path

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

ADAPTER = "adapter"  # the one packed array of a message (see edgetune.fleet.server.pack)

client_app = ClientApp()
server_app = ServerApp()


def message_bytes(msg: Message) -> int:
    """What Flower serializes and pushes for ``msg``: the deflated bytes of every object in it."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(obj.deflate()) for obj in get_all_nested_objects(msg).values())


# --------------------------------------------------------------------------- client


def _local_train(msg: Message, context: Context) -> Message:
    import torch

    from ..api import check_seq_len, load_compiled
    from ..compiler import trainable_parameters
    from ..training.data import build_dataset
    from ..training.loop import TrainConfig, train_model
    from .server import layout_digest, pack, unpack

    cfg = context.node_config
    config = msg.content["config"]
    rnd = int(config["round"])
    compiled = Path(str(cfg["compiled"]))
    model, tokenizer = load_compiled(compiled)
    seq_len, batch = int(cfg.get("seq-len", 64)), int(cfg.get("batch", 4))
    check_seq_len(model, seq_len)
    params = trainable_parameters(model)
    if str(config["layout"]) != layout_digest(params):
        raise ValueError("the server's adapter does not fit this client's compiled model")
    incoming = unpack(torch.from_numpy(msg.content["arrays"][ADAPTER].numpy()), params)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(incoming[name])
    dataset = build_dataset(str(cfg["data"]), tokenizer, seq_len)
    train_config = TrainConfig(steps=int(cfg.get("local-steps", 10)), batch=batch, seq_len=seq_len,
                               lr=float(cfg.get("lr", 2e-4)), seed=rnd, warmup_steps=0, save_every=0,
                               save_interval_s=0, keep=1)
    with tempfile.TemporaryDirectory(prefix="edgetune-fleet-client-") as tmp:
        result = train_model(model, dataset, train_config, Path(tmp) / "run", progress=False)
    source = getattr(model, "edgetune_source", None)
    trained = {n: p.detach().cpu().contiguous() for n, p in trainable_parameters(model).items()}
    content = RecordDict({
        "arrays": ArrayRecord({ADAPTER: Array(pack(trained).numpy())}),
        "metrics": MetricRecord({"num-examples": len(dataset), "train-loss": float(result.last_loss),
                                 "first-loss": float(result.first_loss), "local-steps": result.steps}),
        "config": ConfigRecord({"base-sha256": source.sha256 if source is not None else "",
                                "layout": layout_digest(trained)}),
    })
    return Message(content=content, reply_to=msg)


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    return _local_train(msg, context)


# --------------------------------------------------------------------------- server


def _wait_for_nodes(grid: Grid, n: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= n:
            return nodes
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(nodes)} of {n} clients connected within {timeout:.0f} s")
        time.sleep(0.3)


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    import torch

    from .server import ClientUpdate, FleetServer, layout_digest, pack, unpack, write_status

    cfg = context.run_config
    out = Path(str(cfg["out"]))
    try:
        server = FleetServer(str(cfg["base"]), out)
        server.write_status("running", rounds_done=0)
        rounds, min_clients = int(cfg["rounds"]), int(cfg["min-clients"])
        round_timeout = float(cfg.get("round-timeout", 3600))
        _wait_for_nodes(grid, min_clients, float(cfg.get("connect-timeout", 600)))
        for rnd in range(1, rounds + 1):
            nodes = _wait_for_nodes(grid, 1, float(cfg.get("connect-timeout", 600)))
            layout = layout_digest(server.global_tensors)
            flat = pack(server.global_tensors).numpy()
            messages = [Message(content=RecordDict({
                "arrays": ArrayRecord({ADAPTER: Array(flat)}),
                "config": ConfigRecord({"round": rnd, "base-sha256": server.base.sha256 or "", "layout": layout}),
            }), message_type="train", dst_node_id=node, group_id=str(rnd)) for node in nodes]
            replies = list(grid.send_and_receive(messages, timeout=round_timeout))
            updates, failures = [], {}
            for reply in replies:
                node = reply.metadata.src_node_id
                if reply.has_error():
                    failures[node] = f"client error: {reply.error.reason}"[:300]
                    continue
                metrics, meta = reply.content["metrics"], reply.content["config"]
                try:  # a different layout leaves the tensors empty, and FleetServer.check rejects them
                    tensors = (unpack(torch.from_numpy(reply.content["arrays"][ADAPTER].numpy()),
                                      server.global_tensors) if str(meta["layout"]) == layout else {})
                except (KeyError, ValueError):
                    tensors = {}
                updates.append(ClientUpdate(
                    node_id=node, tensors=tensors,
                    num_examples=int(metrics["num-examples"]),
                    base_sha256=str(meta["base-sha256"]) or None,
                    bytes_sent=message_bytes(reply),
                    metrics={"train_loss": float(metrics["train-loss"]), "first_loss": float(metrics["first-loss"])}))
            record = server.finish_round(rnd, updates, expected=nodes, failures=failures)
            print(f"edgetune fleet: round {rnd}/{rounds}: {len(record['clients'])} aggregated, "
                  f"{len(record['rejected'])} rejected, {len(record['missing'])} missing", flush=True)
        server.write_status("finished", rounds_done=rounds)
    except BaseException as exc:  # the launcher waits on this file; say why the run ended
        write_status(out, "failed", error=" ".join(f"{type(exc).__name__}: {exc}".split())[:500],
                     traceback=traceback.format_exc()[-4000:])
        raise
