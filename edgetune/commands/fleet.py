"""`edgetune fleet`: federated fine-tuning of one adapter across devices, on Flower (docs/fleet.md).

Only light modules at top level: flwr, torch and the fleet package are imported inside commands.
"""
from __future__ import annotations

from pathlib import Path

import click


def _echo_round(record: dict) -> None:
    sent = ", ".join(f"{c['bytes_sent']:,} B ({c['bytes_ratio']:.3f}x)" for c in record["clients"]) or "-"
    extra = ""
    if record["rejected"]:
        extra += f"; rejected {len(record['rejected'])}: " + "; ".join(record["rejected"].values())
    if record["missing"]:
        extra += f"; missing {len(record['missing'])}"
    click.echo(f"round {record['round']}: {len(record['clients'])} client(s) aggregated, bytes sent per client "
               f"{sent} (adapter {record['adapter_bytes']:,} B){extra}")


def _keys_or_error(keys):
    from ..errors import EdgetuneError

    if keys is None:
        raise EdgetuneError("--keys is required: create them with `edgetune fleet keys --out KEYS --clients N`")
    return Path(keys)


def register(cli) -> None:
    @cli.group("fleet")
    def fleet():
        """Train one adapter on many devices with Flower: keys, server, client, simulate."""

    @fleet.command("keys")
    @click.option("--out", required=True, type=click.Path(), help="directory to write the CA, server cert, client keys")
    @click.option("--clients", default=1, show_default=True, type=int, help="SuperNode key pairs to create")
    @click.option("--host", "hosts", multiple=True, help="extra server name or IP for the certificate (repeatable)")
    @click.option("--overwrite", is_flag=True, help="replace --out if it exists")
    def keys_cmd(out, clients, hosts, overwrite):
        """Create TLS certificates and SuperNode authentication keys (for loopback tests and trusted LANs)."""
        from ..fleet.keys import generate_keys

        generate_keys(out, clients, tuple(hosts), overwrite=overwrite)
        click.echo(f"wrote {out}/ca.pem, server.pem/.key and {clients} client key pair(s) in {out}/clients")

    @fleet.command("server")
    @click.option("--base", required=True, type=click.Path(), help="compiled artifact directory (lora or qlora)")
    @click.option("--rounds", required=True, type=int, help="federated rounds")
    @click.option("--min-clients", required=True, type=int, help="clients that must connect before round 1")
    @click.option("--address", default="127.0.0.1:9092", show_default=True, help="HOST:PORT to listen on")
    @click.option("--keys", type=click.Path(), help="directory from `edgetune fleet keys`; its clients/*.pub may connect")
    @click.option("--out", required=True, type=click.Path(), help="output dir: round-NNN/ and adapter/ (PEFT)")
    @click.option("--overwrite", is_flag=True, help="replace --out if it exists")
    @click.option("--round-timeout", default=3600.0, show_default=True, help="seconds to wait for a round's replies")
    @click.option("--connect-timeout", default=600.0, show_default=True, help="seconds to wait for --min-clients")
    def server_cmd(base, rounds, min_clients, address, keys, out, overwrite, round_timeout, connect_timeout):
        """Run a Flower SuperLink and the aggregation ServerApp; write the adapter after every round."""
        from ..fleet import require_flwr

        require_flwr()
        from ..fleet.launch import parse_address
        from ..fleet.run import run_server

        host, port = parse_address(address)
        if rounds < 1 or min_clients < 1:
            from ..errors import EdgetuneError

            raise EdgetuneError("--rounds and --min-clients must be >= 1")
        status = run_server(base, out, rounds=rounds, min_clients=min_clients, host=host, port=port,
                            keys=_keys_or_error(keys), overwrite=overwrite, round_timeout=round_timeout,
                            connect_timeout=connect_timeout, on_round=_echo_round,
                            on_ready=lambda: click.echo(f"fleet server listening on {host}:{port}", err=True))
        click.echo(f"finished {status['rounds_done']} round(s); aggregated adapter in {Path(out) / 'adapter'}")

    @fleet.command("client")
    @click.argument("compiled", type=click.Path())
    @click.option("--data", required=True, type=click.Path(), help="this device's training data (.jsonl or .txt)")
    @click.option("--server", "server", required=True, help="the fleet server's HOST:PORT")
    @click.option("--local-steps", default=10, show_default=True, type=int, help="training steps per round")
    @click.option("--batch", default=4, show_default=True, type=int, help="sequences per step")
    @click.option("--seq-len", default=256, show_default=True, type=int, help="tokens per sequence")
    @click.option("--lr", default=2e-4, show_default=True, type=float, help="learning rate")
    @click.option("--ca", type=click.Path(), help="the fleet's CA certificate (KEYS/ca.pem)")
    @click.option("--key", type=click.Path(), help="this device's private key (KEYS/clients/client-<i>.key)")
    def client_cmd(compiled, data, server, local_steps, batch, seq_len, lr, ca, key):
        """Join a fleet as a Flower SuperNode: train COMPILED on --data each round, send back the adapter."""
        from ..errors import EdgetuneError
        from ..fleet import require_flwr

        require_flwr()
        from ..fleet.launch import parse_address
        from ..fleet.run import check_client_inputs, run_client

        parse_address(server)
        if ca is None or key is None:
            raise EdgetuneError("--ca and --key are required (see `edgetune fleet keys`)")
        check_client_inputs(compiled, data, local_steps, batch, seq_len, lr)
        code = run_client(compiled, data, server, ca, key, local_steps=local_steps, batch=batch, seq_len=seq_len,
                          lr=lr)
        if code != 0:
            raise EdgetuneError(f"the Flower SuperNode exited with code {code} (refused or lost the server?)")

    @fleet.command("simulate")
    @click.option("--base", required=True, type=click.Path(), help="compiled artifact directory (lora or qlora)")
    @click.option("--clients", required=True, type=int, help="number of clients (SuperNodes) to start")
    @click.option("--data-shards", required=True, type=click.Path(), help="directory of per-client data files")
    @click.option("--rounds", required=True, type=int, help="federated rounds")
    @click.option("--out", required=True, type=click.Path(), help="output dir: round-NNN/ and adapter/ (PEFT)")
    @click.option("--overwrite", is_flag=True, help="replace --out if it exists")
    @click.option("--local-steps", default=10, show_default=True, type=int, help="training steps per round")
    @click.option("--batch", default=4, show_default=True, type=int, help="sequences per step")
    @click.option("--seq-len", default=256, show_default=True, type=int, help="tokens per sequence")
    @click.option("--lr", default=2e-4, show_default=True, type=float, help="learning rate")
    def simulate_cmd(base, clients, data_shards, rounds, out, overwrite, local_steps, batch, seq_len, lr):
        """Run a whole fleet on this machine: real SuperLink and SuperNode processes on 127.0.0.1, with TLS and node auth."""
        from ..fleet import require_flwr

        require_flwr()
        from ..fleet.run import shard_files, simulate

        shards = shard_files(data_shards, clients)
        status = simulate(base, shards, out, rounds=rounds, overwrite=overwrite, local_steps=local_steps,
                          batch=batch, seq_len=seq_len, lr=lr, on_round=_echo_round)
        click.echo(f"finished {status['rounds_done']} round(s) with {clients} clients; aggregated adapter in "
                   f"{Path(out) / 'adapter'}")
