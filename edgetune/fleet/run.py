"""The fleet commands as functions: server, client and a one-machine simulation (real processes)."""
from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import EdgetuneError
from ..fsutil import check_output_path
from .keys import authorized_keys, check_keys_dir, generate_keys
from .launch import Processes, free_port
from .server import read_base


def _prepare_out(out, overwrite: bool) -> Path:
    out = check_output_path(out, overwrite)
    if out.exists() or out.is_symlink():
        shutil.rmtree(out) if out.is_dir() and not out.is_symlink() else out.unlink()
    out.mkdir(parents=True)
    return out.resolve()


def serve(procs: Processes, base, out: Path, *, rounds: int, min_clients: int, host: str, port: int, keys: Path,
          round_timeout: float, connect_timeout: float, public_keys: list[Path] | None = None,
          on_ready=None, on_round=None) -> dict:
    """Start the SuperLink in ``procs``, register the client keys, submit the run and wait for it."""
    from .launch import wait_for_run

    public_keys = authorized_keys(keys) if public_keys is None else public_keys
    if not public_keys:
        raise EdgetuneError(f"no client public keys in {keys}/clients: no device could authenticate")
    procs.start_superlink(host, port, keys)
    procs.register(public_keys)
    if on_ready is not None:
        on_ready()
    procs.submit({"base": str(Path(base).resolve()), "out": str(out), "rounds": rounds, "min-clients": min_clients,
                  "round-timeout": float(round_timeout), "connect-timeout": float(connect_timeout)})
    return wait_for_run(procs, out, connect_timeout + rounds * (round_timeout + 60) + 120, on_round=on_round)


def run_server(base, out, *, rounds: int, min_clients: int, host: str, port: int, keys, overwrite: bool = False,
               round_timeout: float = 3600.0, connect_timeout: float = 600.0, on_ready=None, on_round=None) -> dict:
    read_base(base)  # bad input fails here, before any process starts
    keys = check_keys_dir(keys)
    out = _prepare_out(out, overwrite)
    with Processes() as procs:
        return serve(procs, base, out, rounds=rounds, min_clients=min_clients, host=host, port=port, keys=keys,
                     round_timeout=round_timeout, connect_timeout=connect_timeout, on_ready=on_ready,
                     on_round=on_round)


def check_client_inputs(compiled, data, local_steps: int, batch: int, seq_len: int, lr: float) -> None:
    from ..manifest import read_manifest

    read_manifest(compiled, "compiled")
    if not Path(data).is_file():
        raise EdgetuneError(f"--data {data} does not exist")
    if local_steps < 1 or batch < 1 or seq_len < 2 or not lr > 0:
        raise EdgetuneError("--local-steps and --batch must be >= 1, --seq-len >= 2 and --lr > 0")


def client_config(compiled, data, *, local_steps: int, batch: int, seq_len: int, lr: float) -> dict:
    return {"compiled": str(Path(compiled).resolve()), "data": str(Path(data).resolve()), "local-steps": local_steps,
            "batch": batch, "seq-len": seq_len, "lr": lr}


def run_client(compiled, data, server: str, ca, key, *, local_steps: int, batch: int, seq_len: int,
               lr: float) -> int:
    """Run a SuperNode in the foreground until it exits (Ctrl-C stops it); return its exit code."""
    with Processes() as procs:
        proc = procs.start_supernode("client", server, Path(ca).resolve(), Path(key).resolve(),
                                     client_config(compiled, data, local_steps=local_steps, batch=batch,
                                                   seq_len=seq_len, lr=lr), inherit_output=True)
        try:
            return proc.wait()
        except KeyboardInterrupt:
            return 130


def shard_files(directory, clients: int) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        raise EdgetuneError(f"--data-shards {directory} is not a directory")
    files = sorted(p for p in directory.iterdir() if p.is_file() and p.suffix in (".jsonl", ".txt")
                   and not p.name.startswith("."))
    if clients < 1:
        raise EdgetuneError("--clients must be >= 1")
    if len(files) < clients:
        raise EdgetuneError(f"--data-shards {directory} holds {len(files)} .jsonl/.txt file(s), "
                            f"fewer than --clients {clients}")
    return files[:clients]


def simulate(base, shards: list[Path], out, *, rounds: int, overwrite: bool = False, local_steps: int = 10,
             batch: int = 4, seq_len: int = 256, lr: float = 2e-4, round_timeout: float = 3600.0,
             connect_timeout: float = 300.0, on_round=None, workdir=None) -> dict:
    """A whole fleet on 127.0.0.1: fresh keys, a TLS SuperLink with node auth, one SuperNode per shard."""
    if rounds < 1:
        raise EdgetuneError("--rounds must be >= 1")
    read_base(base)
    for shard in shards:
        check_client_inputs(base, shard, local_steps, batch, seq_len, lr)
    out = _prepare_out(out, overwrite)
    with Processes(workdir) as procs:
        keys = generate_keys(procs.workdir / "keys", len(shards))
        host, port = "127.0.0.1", free_port()

        def start_clients():
            for i, shard in enumerate(shards):
                procs.start_supernode(f"client-{i}", f"{host}:{port}", keys / "ca.pem",
                                      keys / "clients" / f"client-{i}.key",
                                      client_config(base, shard, local_steps=local_steps, batch=batch,
                                                    seq_len=seq_len, lr=lr))

        try:
            return serve(procs, base, out, rounds=rounds, min_clients=len(shards), host=host, port=port, keys=keys,
                         round_timeout=round_timeout, connect_timeout=connect_timeout, on_ready=start_clients,
                         on_round=on_round)
        except EdgetuneError as exc:
            raise EdgetuneError(f"{exc} (client-0 log: {procs.log_tail('client-0', 1)[-200:]})") from None

