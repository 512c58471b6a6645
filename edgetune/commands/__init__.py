"""CLI command modules, one per feature area; each defines ``register(cli)`` (see ``edgetune.cli``)."""
