"""`edgetune doctor`: which kernel backends are built, usable and active here, and why any is not.

Only click at top level; torch and the registry are imported when the command runs.
"""
from __future__ import annotations

import click


def register(cli) -> None:
    @cli.command("doctor")
    @click.option("--json", "as_json", is_flag=True, help="print a JSON object instead of a table")
    def doctor_cmd(as_json):
        """Show the kernel backends (reference, cpu, cuda, triton): built, active, and why one is missing."""
        import json
        import os

        import torch

        from ..kernels import ops, registry

        rows = registry.report()
        forced = os.environ.get(registry.ENV) or None
        devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
        active = {}
        for dev in devices:
            try:
                with registry.use_backend(None):
                    active[dev] = {name: registry.choose(name, torch.device(dev), impls)
                                   for name, impls in ops.IMPLS.items()}
            except registry.BackendUnavailable as exc:
                active[dev] = {"error": str(exc)}
        info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
                "cuda_available": torch.cuda.is_available(), "forced": forced,
                "backends": rows, "active": active}
        if as_json:
            click.echo(json.dumps(info, indent=1))
            return
        click.echo(f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none'}; "
                   f"device visible: {torch.cuda.is_available()})")
        if forced:
            click.echo(f"{registry.ENV}={forced} forces a backend")
        for r in rows:
            click.echo(f"  {r['backend']:<10} {'yes' if r['usable'] else 'NO ':<4} {r['reason']}")
        for dev, table in active.items():
            if "error" in table:
                click.echo(f"active on {dev}: error: {table['error']}")
                continue
            by = {}
            for op, b in table.items():
                by.setdefault(b, []).append(op)
            click.echo(f"active on {dev}: " + "; ".join(f"{b}: {', '.join(v)}" for b, v in by.items()))
