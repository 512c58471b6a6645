"""Fleet fine-tuning on Flower: many devices train an adapter locally, a server aggregates them.

* :mod:`edgetune.fleet.aggregate` — the aggregation math (torch only, no Flower).
* :mod:`edgetune.fleet.server` — the server's round state: the global adapter, the base-hash
  check, the per-round PEFT output (no Flower).
* :mod:`edgetune.fleet.app` — Flower's ``ServerApp`` and ``ClientApp`` (imports ``flwr``).
* :mod:`edgetune.fleet.keys` — CA, SuperLink TLS certificate and SuperNode key pairs.
* :mod:`edgetune.fleet.launch` — the SuperLink / SuperNode / ``flwr run`` processes.

See ``docs/fleet.md``.
"""
from __future__ import annotations

FLWR_VERSION = "1.42.0"
INSTALL_HINT = f"pip install flwr=={FLWR_VERSION}"


def require_flwr() -> None:
    """Raise :class:`~edgetune.errors.MissingDependency` (one line, exit 2) when flwr is absent."""
    import importlib.util

    from ..errors import MissingDependency

    if importlib.util.find_spec("flwr") is None:
        raise MissingDependency(f"edgetune fleet needs Flower: {INSTALL_HINT}")
