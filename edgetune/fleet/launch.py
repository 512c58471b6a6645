"""Starting and stopping the Flower processes of a fleet (SuperLink, SuperNodes, ``flwr run``).

Every process is started in its own session, tracked, and terminated with its children (the
``flower-superexec``, ``flwr-serverapp`` and ``flwr-clientapp`` processes it spawned) when the
:class:`Processes` block exits, whatever the reason. Each process gets its own ``FLWR_HOME`` in a
temporary directory, so nothing is written to ``~/.flwr``.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ..errors import EdgetuneError
from .keys import authorized_keys, check_keys_dir
from .server import read_status

CONNECTION = "edgetune"


def flower_bin(name: str) -> str:
    path = Path(sys.executable).parent / name
    if path.is_file():
        return str(path)
    found = shutil.which(name)
    if not found:
        from . import INSTALL_HINT

        raise EdgetuneError(f"{name} not found; {INSTALL_HINT}")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise EdgetuneError(f"address {address!r} must be HOST:PORT, e.g. 127.0.0.1:9092")
    return host.strip("[]"), int(port)


def port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.settimeout(0.3)
        return s.connect_ex((host, port)) == 0


def _toml_str(value: str) -> str:
    return json.dumps(str(value))  # a JSON string is a valid TOML basic string


def node_config(values: dict) -> str:
    """Flower's ``--node-config`` syntax: space separated key=value, strings quoted."""
    parts = []
    for k, v in values.items():
        parts.append(f"{k}={_toml_str(v) if isinstance(v, (str, Path)) else v}")
    return " ".join(parts)


class Processes:
    """The processes of one fleet, stopped (with their children) when the block exits."""

    def __init__(self, workdir: str | os.PathLike | None = None):
        self.procs: list[tuple[str, subprocess.Popen, Path]] = []
        self._own = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="edgetune-fleet-"))
        self.workdir.mkdir(parents=True, exist_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop_all()
        if self._own:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return False

    def home(self, name: str) -> Path:
        home = self.workdir / f"home-{name}"
        home.mkdir(parents=True, exist_ok=True)
        return home

    def env(self, name: str) -> dict:
        env = dict(os.environ)
        env["FLWR_HOME"] = str(self.home(name))
        env.setdefault("OMP_NUM_THREADS", "1")
        env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
        env["FLWR_TELEMETRY_ENABLED"] = "0"
        env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.2")  # start App processes sooner (default 1 s)
        return env

    def start(self, name: str, cmd: list[str], inherit_output: bool = False) -> subprocess.Popen:
        log = self.workdir / f"{name}.log"
        with open(log, "ab") as f:
            proc = subprocess.Popen(cmd, stdout=None if inherit_output else f,
                                    stderr=None if inherit_output else subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=self.env(name), start_new_session=True)
        self.procs.append((name, proc, log))
        return proc

    def log_tail(self, name: str, lines: int = 20) -> str:
        path = self.workdir / f"{name}.log"
        try:
            return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, proc: subprocess.Popen, grace: float = 5.0) -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        try:  # the session's leftovers (superexec, serverapp, clientapp), even after the leader exited
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass

    def stop_all(self) -> None:
        for _, proc, _ in reversed(self.procs):
            self.stop(proc)

    # ------------------------------------------------------------------ superlink
    def start_superlink(self, host: str, port: int, keys: Path) -> subprocess.Popen:
        keys = check_keys_dir(keys)
        proc = self.start("superlink", [
            flower_bin("flower-superlink"), "--ssl-ca-certfile", str(keys / "ca.pem"),
            "--ssl-certfile", str(keys / "server.pem"), "--ssl-keyfile", str(keys / "server.key"),
            "--enable-supernode-auth", "--host", host, "--port", str(port),
            "--disable-runtime-dependency-installation"])
        deadline = time.monotonic() + 120
        while not port_open(host, port):
            if proc.poll() is not None:
                raise EdgetuneError(f"the Flower SuperLink exited with code {proc.returncode}: "
                                    f"{self.log_tail('superlink', 3)}")
            if time.monotonic() > deadline:
                raise EdgetuneError(f"the Flower SuperLink did not open {host}:{port} within 120 s")
            time.sleep(0.2)
        self._write_connection(host, port, keys)
        return proc

    def _write_connection(self, host: str, port: int, keys: Path) -> None:
        addr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        (self.home("cli") / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = {_toml_str(addr)}\nroot-certificates = {_toml_str(keys / "ca.pem")}\n')

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([flower_bin("flwr"), *args], env=self.env("cli"), capture_output=True, text=True,
                              timeout=timeout, stdin=subprocess.DEVNULL)

    def register(self, public_keys: list[Path]) -> None:
        """Register SuperNode public keys with the SuperLink: only these nodes may connect."""
        running = [(pub, subprocess.Popen([flower_bin("flwr"), "supernode", "register", str(pub), CONNECTION],
                                          env=self.env("cli"), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, text=True)) for pub in public_keys]
        failed = []
        for pub, proc in running:  # in parallel: each `flwr` call spends ~2 s importing
            try:
                output, _ = proc.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                output, _ = proc.communicate()
            if proc.returncode != 0:
                failed.append(f"{pub}: {output.strip()[-200:]}")
        if failed:
            raise EdgetuneError(f"registering SuperNode keys failed: {failed[0]}")

    def submit(self, config: dict) -> None:
        """``flwr run`` the edgetune fleet app with ``config`` as its run config."""
        app = write_app(self.workdir / "app", config)
        done = self.flwr("run", str(app), CONNECTION, timeout=300)
        if done.returncode != 0:
            raise EdgetuneError(f"flwr run failed: {(done.stdout + done.stderr).strip()[-300:]}")

    # ------------------------------------------------------------------ supernode
    def start_supernode(self, name: str, superlink: str, ca: Path, key: Path | None, config: dict,
                        max_retries: int | None = None, inherit_output: bool = False) -> subprocess.Popen:
        cmd = [flower_bin("flower-supernode"), "--root-certificates", str(ca), "--superlink", superlink,
               "--port", str(free_port()), "--node-config", node_config(config)]
        if key is not None:
            cmd += ["--auth-supernode-private-key", str(key)]
        if max_retries is not None:
            cmd += ["--max-retries", str(max_retries), "--max-wait-time", "30"]
        return self.start(name, cmd, inherit_output)

    def check_alive(self, *names: str) -> None:
        for name, proc, _ in self.procs:
            if (not names or name in names) and proc.poll() is not None:
                raise EdgetuneError(f"{name} exited with code {proc.returncode}: {self.log_tail(name, 2)}")


def write_app(directory: Path, config: dict) -> Path:
    """A Flower App directory whose components are edgetune's ServerApp/ClientApp; ``config`` is its run config.

    The app holds only a shim that imports :mod:`edgetune.fleet.app` from the installed package,
    so the FAB Flower ships to the nodes is a few hundred bytes.
    """
    directory.mkdir(parents=True, exist_ok=True)
    pkg = directory / "edgetune_fleet_app"
    pkg.mkdir(exist_ok=True)
    (pkg / "__init__.py").write_text('"""Shim: the fleet app lives in edgetune.fleet.app."""\n'
                                     "from edgetune.fleet import app as _app\n\n"
                                     "server_app = _app.server_app\nclient_app = _app.client_app\n")
    lines = [f"{k} = {_toml_str(v) if isinstance(v, (str, Path)) else v}" for k, v in config.items()]
    (directory / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["hatchling"]\nbuild-backend = "hatchling.build"\n\n'
        '[project]\nname = "edgetune-fleet"\nversion = "1.0.0"\ndescription = "edgetune fleet fine-tuning"\n'
        'license = "Apache-2.0"\ndependencies = []\n\n'
        '[tool.hatch.build.targets.wheel]\npackages = ["."]\n\n'
        '[tool.flwr.app]\npublisher = "edgetune"\n\n'
        '[tool.flwr.app.components]\nserverapp = "edgetune_fleet_app:server_app"\n'
        'clientapp = "edgetune_fleet_app:client_app"\n\n'
        "[tool.flwr.app.config]\n" + "\n".join(lines) + "\n")
    return directory


def wait_for_run(procs: Processes, out: Path, timeout: float, on_round=None) -> dict:
    """Wait until the ServerApp writes status "finished" (return it) or "failed" (raise)."""
    from .server import read_rounds

    deadline = time.monotonic() + timeout
    seen = 0
    while True:
        status = read_status(out) or {}
        rounds = read_rounds(out)
        if on_round is not None:
            for record in rounds[seen:]:
                on_round(record)
        seen = len(rounds)
        if status.get("status") == "finished":
            return status
        if status.get("status") == "failed":
            raise EdgetuneError(f"the fleet server failed: {status.get('error')}")
        procs.check_alive("superlink")
        if time.monotonic() > deadline:
            raise EdgetuneError(f"the fleet run did not finish within {timeout:.0f} s "
                                f"({seen} round(s) done; logs in {procs.workdir})")
        time.sleep(0.5)
