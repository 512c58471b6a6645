"""ORT Training commands: ``export-training``, ``ort-train``, ``ort-export`` (see docs/ort.md).

Only click is imported at module level; torch, onnx and onnxruntime load when a command runs.
"""
from __future__ import annotations

import click


def register(cli) -> None:
    from ..cli import _given, train_options

    @cli.command("export-training")
    @click.argument("compiled", type=click.Path())
    @click.option("--out", required=True, type=click.Path(), help="ORT training directory to write")
    @click.option("--lr", type=float, default=2e-4, show_default=True,
                  help="initial AdamW learning rate stored with the optimizer (ort-train sets it every step)")
    @click.option("--weight-decay", type=float, default=0.0, show_default=True, help="AdamW weight decay (baked in)")
    @click.option("--grad-clip", type=float, default=1.0, show_default=True,
                  help="global gradient-norm clip (baked in; 0: off)")
    @click.option("--nf4", type=click.Choice(["op", "graph"]), default="op", show_default=True,
                  help="qlora base: edgetune's NF4MatMul custom op, or decode with standard ONNX ops")
    @click.option("--act4", type=click.Choice(["auto", "op", "off"]), default="auto", show_default=True,
                  help="SiLU/GELU as edgetune's 4-bit derivative-coded op (auto: when compiled with --act-bits 4)")
    @click.option("--overwrite", is_flag=True, help="replace --out if it exists")
    def export_training_cmd(compiled, out, lr, weight_decay, grad_clip, nf4, act4, overwrite):
        """Export a COMPILED artifact as ONNX Runtime Training artifacts."""
        from ..ort.export import export_training

        result = export_training(compiled, out, lr=lr, weight_decay=weight_decay, grad_clip=grad_clip, nf4=nf4,
                                 act4=act4, overwrite=overwrite)
        s = result.sizes
        click.echo(f"exported {len(result.trainable)} trainable and {len(result.frozen)} frozen tensors to {out}: "
                   f"checkpoint {s['checkpoint'] / 2**20:.2f} MiB + graphs {s['graphs'] / 2**20:.2f} MiB = "
                   f"{s['total'] / 2**20:.2f} MiB ({s['ratio_vs_fp32']:.2f}x the fp32 model's "
                   f"{s['fp32_model'] / 2**20:.2f} MiB)")

    @cli.command("ort-train")
    @click.argument("ort_dir", type=click.Path())
    @click.option("--data", required=True, type=click.Path(), help="training data (.jsonl or .txt)")
    @click.option("--out", required=True, type=click.Path(), help="run directory to write")
    @click.option("--overwrite", is_flag=True, help="replace --out if it exists")
    @click.option("--resume", is_flag=True, help="continue the run in --out from its newest valid checkpoint")
    @train_options
    def ort_train_cmd(ort_dir, data, out, overwrite, resume, **options):
        """Fine-tune on an ORT training directory (from export-training) with onnxruntime.training."""
        from ..ort.train import train_ort

        result = train_ort(ort_dir, data, out, overwrite=overwrite, resume=resume,
                           **_given(train_options.fields, options))
        click.echo(f"trained {result.steps} steps on ORT: loss {result.first_loss:.4f} -> {result.last_loss:.4f}; "
                   f"run in {out}")

    @cli.command("ort-export")
    @click.argument("run", type=click.Path())
    @click.option("--format", "fmt", default="peft", show_default=True, help="peft | onnx (inference model)")
    @click.option("--out", required=True, type=click.Path(), help="adapter directory (peft) or .onnx file")
    @click.option("--dtype", default="float32", show_default=True, help="float32 | float16 (peft)")
    @click.option("--overwrite", is_flag=True, help="replace --out if it exists")
    def ort_export_cmd(run, fmt, out, dtype, overwrite):
        """Export what an ORT RUN trained: a PEFT adapter, or an inference ONNX model."""
        from ..ort.adapter import export_run

        path = export_run(run, out, format=fmt, dtype=dtype, overwrite=overwrite)
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
        click.echo(f"wrote {fmt} ({size / 2**20:.2f} MiB) to {out}")
