"""`edgetune merge`: apply an exported adapter to its base on the server side.

Dispatches on the adapter directory's manifest kind (``edgetune.api.merge``); today that is a
SketchTune table delta (``edgetune export RUN --format sketch``). Only click is imported at top
level: the merge itself loads torch and transformers when it runs.
"""
from __future__ import annotations

import click


def register(cli) -> None:
    @cli.command("merge")
    @click.argument("base_dir", type=click.Path())
    @click.argument("adapter", type=click.Path())
    @click.option("--out", required=True, type=click.Path(), help="directory to write")
    @click.option("--dense", is_flag=True,
                  help="write a plain Hugging Face model directory (transformers loads it) instead of the sketched "
                       "artifact with merged tables")
    @click.option("--dtype", default=None, help="float32 | float16 | bfloat16 weights of a --dense model "
                                                "(default: the compute dtype)")
    @click.option("--force", is_flag=True, help="merge an adapter trained on a different base or sketch")
    @click.option("--overwrite", is_flag=True, help="replace --out if it exists")
    def merge_cmd(base_dir, adapter, out, dense, dtype, force, overwrite):
        """Merge ADAPTER into BASE_DIR (the compiled artifact it was trained on) and write --out."""
        from .. import api

        path = api.merge(base_dir, adapter, out, dense=dense, dtype=dtype, force=force, overwrite=overwrite)
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        what = "dense Hugging Face model" if dense else "sketched artifact"
        click.echo(f"merged {adapter} into {base_dir}: {what} ({size / 2**20:.1f} MiB) -> {out}")
