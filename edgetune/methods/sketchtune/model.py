"""The `sketchtune` rewrite: sequential calibration, then one sketch per target projection.

With ``materialize=True`` (compile) the decoder blocks are processed one at a time, in order
("true-sequential", as GPTQ and LeanQuant do), so every block is calibrated on the inputs it
will really see, i.e. the outputs of the blocks before it *after* they were sketched:

1. the calibration text is tokenized into ``calib_samples`` rows of ``calib_seq_len`` tokens and
   run through the model up to the first block, whose inputs (hidden states plus the mask /
   position arguments the model passes it) are cached;
2. for block ``i``: run it on the cached hidden states with pre-hooks on its target projections,
   accumulating ``H = XᵀX`` per distinct input (q/k/v share one, gate/up another: the hooks see
   the same tensor object and the projections are sketched together, rows concatenated);
3. sketch each group (``edgetune.quant.sketch.build_sketch``) and swap the projections for
   :class:`SketchLinear` modules, dropping their dense weights;
4. run block ``i`` again, now sketched, to get block ``i + 1``'s inputs.

Only the block being sketched has its projections' inputs held, and only one projection
group's dense weights are copied at a time; the rest of the model stays as loaded (and loses
its dense weights block by block). With ``materialize=False`` (loading a saved artifact) the
pass only builds empty :class:`SketchLinear` modules of the right shapes on the meta device.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from ...errors import EdgetuneError
from ...models.arch import ArchSpec, get_submodule_parent, linear_weight
from .config import SketchTuneConfig
from .layer import SketchLinear

EMBED_BLOCKSIZE = 64  # embed_nf4: bitsandbytes' default NF4 block
CHUNK_TOKENS = 4096  # calibration rows per forward chunk: chunk rows x seq_len <= this


class _Stop(Exception):
    pass


@contextlib.contextmanager
def _single_thread():
    """Run the column loop on one intra-op thread.

    The GPTQ loop and the k-means are thousands of small ops; on a shared or busy CPU the
    per-op synchronisation of a multi-threaded pool costs more than the work (measured here:
    a tiny model sketched in 0.9 s on one thread, 4-12 s on two while other jobs ran). The
    previous setting is restored afterwards.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


SHIPPED_CALIB = ("instructions.jsonl", "calib.txt")  # never instructions_heldout.jsonl: that is the held-out set


def shipped_calib() -> list[Path]:
    """The default calibration texts: the shipped instruction data (chat-rendered) and calib.txt (prose).

    About 23k tokens of the default model's tokenizer together, so 128 sequences of 128 tokens
    fit. The instruction data is what the model is fine-tuned on; the held-out file is never used.
    """
    return [Path(str(resources.files("edgetune.data") / name)) for name in SHIPPED_CALIB]


def _spread(n_rows: int, k: int) -> torch.Tensor:
    """``k`` row indices spread evenly over ``n_rows`` (all of the file is represented, not its start)."""
    return (torch.arange(k) * n_rows) // k


def calibration_ids(tokenizer, config: SketchTuneConfig) -> torch.Tensor:
    """The calibration rows (calib_samples, calib_seq_len) int64, or a one-line error saying what is needed.

    ``--calib`` takes any format the trainer reads (``edgetune.training.data``): the records are
    tokenized and packed into rows of ``calib_seq_len`` tokens; with more rows than needed,
    ``calib_samples`` rows spread evenly over the text are used.
    """
    from ...training.data import build_dataset

    paths = [Path(config.calib)] if config.calib else shipped_calib()
    parts = [build_dataset(p, tokenizer, config.calib_seq_len, pack=True) for p in paths]
    rows = torch.cat([ds.input_ids for ds in parts if bool(ds.attention_mask.all())]
                     or [torch.zeros(0, config.calib_seq_len, dtype=torch.long)])
    need = config.calib_samples * config.calib_seq_len
    if rows.shape[0] < config.calib_samples:
        have = sum(ds.n_tokens for ds in parts)
        names = " + ".join(str(p) for p in paths)
        raise EdgetuneError(
            f"calibration text {names} is too small: sketchtune needs {need:,} tokens "
            f"({config.calib_samples} samples x {config.calib_seq_len} tokens) and it has {have:,}; "
            f"pass a longer --calib file or lower --calib-samples / --calib-seq-len")
    idx = _spread(rows.shape[0], config.calib_samples)
    return rows[idx].contiguous()


def decoder_blocks(model: nn.Module, arch: ArchSpec) -> list[tuple[str, nn.Module]]:
    """The decoder blocks (path, module), in layer order, found through the arch's block pattern."""
    import re

    blocks = []
    for name, module in model.named_modules():
        m = re.match(arch.block_pattern, name + ".")
        if m and m.end() == len(name) + 1:
            blocks.append((int(m.group(1)), name, module))
    return [(name, module) for _, name, module in sorted(blocks, key=lambda t: t[0])]


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or "Norm" in type(module).__name__


def _make_progress(total: int):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    enabled = sys.stderr.isatty() or bool(os.environ.get("EDGETUNE_PROGRESS"))
    return Progress(TextColumn("[bold]sketching {task.fields[what]}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=Console(stderr=True), disable=not enabled, transient=False)


def _empty_layers(model: nn.Module, config: SketchTuneConfig, arch: ArchSpec, paths: list[str]) -> list[str]:
    changed = []
    for path in paths:
        parent, leaf = get_submodule_parent(model, path)
        old = getattr(parent, leaf)
        if isinstance(old, SketchLinear):
            continue
        weight, bias = linear_weight(old, arch)
        out_f, in_f = weight.shape
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        setattr(parent, leaf, SketchLinear(in_f, out_f, config.bits, config.groups_per_row, bias is not None,
                                           device="meta", dtype=dtype))
        changed.append(path)
    return changed


def _capture_first_block_inputs(model: nn.Module, block: nn.Module, ids: torch.Tensor, chunk_rows: int):
    """[(hidden (B, T, d), args, kwargs)] per chunk: what the model passes its first block."""
    cached = []

    def hook(module, args, kwargs):
        if args:
            hidden, rest = args[0], args[1:]
        else:
            kwargs = dict(kwargs)
            hidden, rest = kwargs.pop("hidden_states"), ()
        cached.append([hidden.detach(), rest, kwargs])
        raise _Stop

    handle = block.register_forward_pre_hook(hook, with_kwargs=True)
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    try:
        for start in range(0, ids.shape[0], chunk_rows):
            try:
                model(input_ids=ids[start:start + chunk_rows].to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return cached


def _run_block(block: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    out = block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _sketch_block(block_path: str, block: nn.Module, model: nn.Module, cached: list, paths: list[str],
                  config: SketchTuneConfig, arch: ArchSpec, stats: list) -> list[str]:
    """Calibrate, sketch and swap the target projections of one block; returns the rewritten paths."""
    from edgetune.quant.sketch import build_sketch, sketch_weight

    modules = {p: model.get_submodule(p) for p in paths}
    seen: dict[str, torch.Tensor] = {}

    def make_hook(path):
        def hook(module, args):
            seen[path] = args[0]
        return hook

    handles = [m.register_forward_pre_hook(make_hook(p)) for p, m in modules.items()]
    groups: list[tuple[str, ...]] | None = None
    hessians: dict[tuple[str, ...], torch.Tensor] = {}
    try:
        for hidden, args, kwargs in cached:
            seen.clear()
            _run_block(block, hidden, args, kwargs)
            missing = [p for p in paths if p not in seen]
            if missing:
                raise EdgetuneError(f"sketchtune: {missing[0]} was not called by its block during calibration")
            by_input: dict[int, list[str]] = {}
            for p in paths:  # projections that received the very same tensor object share a Hessian
                by_input.setdefault(id(seen[p]), []).append(p)
            chunk_groups = [tuple(g) for g in by_input.values()]
            if groups is None:
                groups = chunk_groups
            elif chunk_groups != groups:
                raise RuntimeError(f"{block_path}: projections shared inputs differently across calibration chunks")
            for g in groups:
                x = seen[g[0]].detach()
                x = x.reshape(-1, x.shape[-1]).to(torch.float32)
                h = (x.t() @ x).to(torch.float64)  # float32 per chunk (<= CHUNK_TOKENS rows), summed in float64
                hessians[g] = h if g not in hessians else hessians[g] + h
            seen.clear()
    finally:
        for h in handles:
            h.remove()

    changed = []
    for g in groups or []:
        t0 = time.perf_counter()
        H = hessians.pop(g)
        weights, biases = zip(*(linear_weight(modules[p], arch) for p in g))
        rows = [w.shape[0] for w in weights]
        W = torch.cat([w.detach().to(torch.float32) for w in weights], 0)  # (sum out, in): this group only
        with _single_thread():
            codes, table = build_sketch(W, H, config.bits, config.groups_per_row, damp=config.damp,
                                        exponent=config.exponent, kmeans_iters=config.kmeans_iters,
                                        block_size=config.block_size, act_order=config.act_order)
        # relative output error on the calibration inputs, tr(E H Eᵀ) / tr(W H Wᵀ): a diagnostic, float32 is enough
        H32 = H.to(torch.float32)
        E = W - sketch_weight(codes, table)
        den = float(((W @ H32) * W).sum())
        rel = float(((E @ H32) * E).sum()) / den if den > 0 else 0.0
        del E, H32
        start = 0
        for p, n, w, b in zip(g, rows, weights, biases):
            dtype = w.dtype if w.is_floating_point() else torch.float32
            new = SketchLinear.from_sketch(codes[start:start + n], table[start:start + n], config.bits,
                                           None if b is None else b.detach(), dtype=dtype)
            parent, leaf = get_submodule_parent(model, p)
            setattr(parent, leaf, new)
            modules.pop(p)  # the dense projection is now unreferenced here and can be freed
            changed.append(p)
            start += n
        del W, weights, biases, H, w, b
        stats.append({"paths": list(g), "rel_hessian_error": rel, "seconds": time.perf_counter() - t0})
    return changed


def apply(model: nn.Module, config: SketchTuneConfig, arch: ArchSpec, materialize: bool = True) -> list[str]:
    targets = config.resolve_targets(arch.linear_names)
    paths = arch.target_paths(model, targets)
    changed = []
    if config.embed_nf4:  # first, so the sequential calibration sees the embedding the model will have
        from ..embedding import quantize_embeddings

        changed += quantize_embeddings(model, EMBED_BLOCKSIZE, True, materialize)
    if not materialize:
        changed += _empty_layers(model, config, arch, paths)
    else:
        changed += _materialize(model, config, arch, paths)
    if config.train_norms:
        for module in model.modules():
            if _is_norm(module):
                for p in module.parameters(recurse=False):
                    p.requires_grad_(True)
    return changed


@torch.no_grad()
def _materialize(model: nn.Module, config: SketchTuneConfig, arch: ArchSpec, paths: list[str]) -> list[str]:
    todo = [p for p in paths if not isinstance(model.get_submodule(p), SketchLinear)]
    if not todo:
        return []
    for p in todo:
        w, _ = linear_weight(model.get_submodule(p), arch)
        if w.shape[1] < config.groups_per_row:
            raise EdgetuneError(f"{p} has {w.shape[1]} inputs, fewer than --groups-per-row {config.groups_per_row}")
    tokenizer = getattr(model, "edgetune_tokenizer", None)
    if tokenizer is None:
        raise EdgetuneError("sketchtune needs the tokenizer to read its calibration text: load the model with "
                            "edgetune.load (or set model.edgetune_tokenizer)")
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit is not None and config.calib_seq_len > limit:
        raise EdgetuneError(f"--calib-seq-len {config.calib_seq_len} is beyond the model's context of {limit} tokens")
    ids = calibration_ids(tokenizer, config)
    vocab = model.get_input_embeddings().num_embeddings
    if int(ids.max()) >= vocab:
        raise EdgetuneError(f"the tokenizer produced id {int(ids.max())} but the model has only {vocab} embeddings")
    blocks = decoder_blocks(model, arch)
    if not blocks:
        raise EdgetuneError("sketchtune: no decoder blocks found")
    was_training = model.training
    model.eval()
    stats: list[dict] = []
    changed: list[str] = []
    t_start = time.perf_counter()
    try:
        chunk_rows = max(1, CHUNK_TOKENS // ids.shape[1])
        cached = _capture_first_block_inputs(model, blocks[0][1], ids, chunk_rows)
        with _make_progress(len(blocks)) as progress:
            task = progress.add_task("layers", total=len(blocks), what=f"{len(todo)} projections")
            for block_path, block in blocks:
                in_block = [p for p in todo if p.startswith(block_path + ".")]
                if in_block:
                    changed += _sketch_block(block_path, block, model, cached, in_block, config, arch, stats)
                if block is not blocks[-1][1]:
                    for entry in cached:  # this block's outputs, computed with its sketched weights
                        entry[0] = _run_block(block, entry[0], entry[1], entry[2])
                progress.advance(task)
    finally:
        model.train(was_training)
    model.edgetune_sketch_stats = {"seconds": time.perf_counter() - t_start, "groups": stats,
                                   "calib_tokens": int(ids.numel())}
    return [p for p in paths if p in set(changed)]
