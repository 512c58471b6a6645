"""Export a compiled artifact as ONNX Runtime Training artifacts (``edgetune export-training``).

An ORT directory holds::

    manifest.json          kind "ort-training": the source's sha256s, recipe, name map, sizes
    training_model.onnx    forward + causal-LM loss + gradients of the adapter parameters
    eval_model.onnx        forward + loss
    optimizer_model.onnx   AdamW as torch.optim.AdamW computes it (adam_mode 0, eps 1e-8), weight decay,
                           global-norm gradient clipping
    checkpoint             adapter parameters (trainable) and the frozen base (packed NF4 stays uint8)
    config.json, tokenizer/  copied from the compiled artifact, so the directory is self-contained

Graph inputs are ``input_ids``, ``attention_mask`` and ``labels``, all (batch, seq) int64 with
both axes dynamic. The loss is HF's: logits[:, :-1] against labels[:, 1:], mean over labels that
are not -100 (``SoftmaxCrossEntropyLoss``).

How the model is exported (each point is a workaround from ``ORT_TRAINING.md``, re-checked here):

* TorchScript exporter (``dynamo=False``), opset 17, ``do_constant_folding=False``, and the model
  in *training* mode: then the exporter merges initializers only when they share storage (tied
  embeddings), never by value, so an all-zero ``lora_B`` or all-ones norm weights keep their own
  names. Dropout is 0 in every recipe config we export (checked).
* Attention is exported as the eager implementation (softmax attention with an explicit causal
  mask); ORT has gradient builders for all of its ops.
* Every parameter and buffer of the model becomes an initializer with its torch name. The adapter
  parameters are ``requires_grad``; every other named tensor is ``frozen_params``, so it lives
  once in ``checkpoint`` (shared by the training and eval sessions) rather than in both graphs.
* qlora's frozen NF4 weights: with ``nf4="op"`` (default) each projection is one
  ``edgetune::NF4MatMul`` node of edgetune's custom-op library (see :mod:`.custom_ops`) over the
  packed uint8 codes and the float32 block absmax. With ``nf4="graph"`` the codes are decoded with
  standard ops (BitShift/BitwiseAnd/Gather/Mul) before a MatMul: no library needed, but ORT keeps
  each decoded fp32 weight alive until its backward MatMul. Double-quantized absmax is decoded
  with standard ops in both modes (it is 1/64 of a weight).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from ..errors import ArtifactError, EdgetuneError
from ..fsutil import atomic_dir, check_output_path, sha256_file
from ..manifest import read_manifest, write_manifest
from ._deps import require_ort

KIND = "ort-training"
OPSET = 17
GRAPH_FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx")
CHECKPOINT_FILE = "checkpoint"
NF4_MODES = ("op", "graph")
ACT4_MODES = ("auto", "op", "off")
RECIPES = ("lora", "qlora", "s2a", "sketchtune")
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**27  # protobuf's 2 GiB limit, less headroom for the graph itself
IGNORE_INDEX = -100


# ----------------------------------------------------------------------------- export-time modules


class _ExportNF4(nn.Module):
    """Stands in for an NF4Linear during export; same buffer names, so the ONNX names match torch."""

    def __init__(self, layer, mode: str):
        super().__init__()
        self.mode = mode
        self.in_features, self.out_features, self.blocksize = layer.in_features, layer.out_features, layer.blocksize
        for name in ("packed", "absmax", "absmax_q", "absmax_scale", "absmax_code", "absmax_offset", "bias"):
            t = getattr(layer, name, None)
            if t is not None:
                self.register_buffer(name, t)
        self.double_quant = layer.double_quant

    def _absmax(self) -> torch.Tensor:
        if not self.double_quant:
            return self.absmax
        from ..quant.nf4 import DQ_BLOCKSIZE

        nb = self.absmax_q.shape[0]
        scale = self.absmax_scale.repeat_interleave(DQ_BLOCKSIZE)[:nb]  # (nb,)
        return self.absmax_code[self.absmax_q.long()] * scale + self.absmax_offset

    def _dense(self) -> torch.Tensor:
        """(out, in) float32 from the codes, with ops ORT runs (graph mode)."""
        from ..quant.nf4 import NF4_CODE

        numel = self.out_features * self.in_features
        packed = self.packed.to(torch.int32)  # ORT's CPU Div/Mod have no uint8 kernels
        hi = torch.div(packed, 16, rounding_mode="floor")  # opset 17 has no BitwiseAnd: Div/Mod do it
        lo = torch.remainder(packed, 16)
        codes = torch.stack([hi, lo], dim=-1).reshape(-1)[:numel].long()  # (numel,)
        values = NF4_CODE.to(self.packed.device)[codes].reshape(-1, self.blocksize)  # (nb, bs)
        return (values * self._absmax().reshape(-1, 1)).reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        if self.mode == "op":
            from .custom_ops import torch_nf4_matmul

            y = torch_nf4_matmul()(x, self.packed, self._absmax())
        else:
            y = torch.matmul(x, self._dense().t())
        return y + self.bias if getattr(self, "bias", None) is not None else y


class _ExportSketch(nn.Module):
    """Stands in for a SketchLinear during export: ``W = table.flat[index(codes)]`` decoded in-graph.

    The packed codes stay the frozen uint8 buffer ``codes`` (same name, so the checkpoint holds
    them bit-packed); the table stays the trainable ``table``. Decoding uses standard ONNX ops
    only (Cast/Concat/Gather/Mul/Add/Div/Mod on int32, then one Gather of the flattened table),
    so ORT's own Gather gradient is the table gradient (a scatter-add of dW into the buckets,
    which is what SketchTune's backward computes) and no library is needed. The dense weight
    exists transiently and, as with ``--nf4 graph``, ORT keeps it (and the int64 index) until
    backward. The bit stream is :mod:`edgetune.quant.bitpack`'s: code c occupies bits
    [bits·c, bits·c + bits) of its row, least significant first, so it is read from the 16 bits
    of bytes b0 = bits·c // 8 and b0 + 1 (a zero byte is appended to every row for the last one).
    """

    def __init__(self, layer):
        super().__init__()
        from ..quant.sketch import group_index

        self.in_features, self.out_features, self.bits = layer.in_features, layer.out_features, layer.bits
        k = 1 << layer.bits
        self.register_buffer("codes", layer.codes)  # (out, ceil(in*bits/8)) uint8
        self.table = layer.table  # (out, GPR, K) trainable
        if layer.bias is not None:
            self.register_buffer("bias", layer.bias)
        else:
            self.bias = None
        bit = torch.arange(layer.in_features) * layer.bits  # (in,)
        self.register_buffer("byte0", bit // 8, persistent=False)
        self.register_buffer("byte1", bit // 8 + 1, persistent=False)
        self.register_buffer("divisor", (2 ** (bit % 8)).to(torch.int32), persistent=False)
        self.register_buffer("col_offset", group_index(layer.in_features, layer.groups_per_row) * k, persistent=False)
        self.register_buffer("row_offset", (torch.arange(layer.out_features) * layer.groups_per_row * k).unsqueeze(1),
                             persistent=False)  # (out, 1)

    def _index(self) -> torch.Tensor:  # (out, in) int64 flat indices into the table
        codes = self.codes.to(torch.int32)  # ORT's CPU Div/Mod have no uint8 kernels
        codes = torch.cat([codes, torch.zeros_like(codes[:, :1])], dim=1)  # (out, nbytes + 1)
        word = codes.index_select(1, self.byte0) + codes.index_select(1, self.byte1) * 256  # (out, in)
        code = torch.remainder(torch.div(word, self.divisor, rounding_mode="floor"), 1 << self.bits)
        return code.long() + self.col_offset + self.row_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        index = self._index()
        w = torch.index_select(self.table.reshape(-1), 0, index.reshape(-1)).reshape(index.shape)  # (out, in)
        y = torch.matmul(x, w.to(x.dtype).t())
        return y + self.bias if self.bias is not None else y


class _ExportPrompt(nn.Module):
    """Stands in for S2A's LowRankPrompt during export (same ``A``/``B`` parameters): adds A·B to
    the first L positions for any sequence length. The torch module slices with a Python
    ``min(L, T)``, which tracing would freeze at the example's T; here the (L, d) prompt is
    concatenated with T zero rows and cut to T rows, all with dynamic shapes."""

    def __init__(self, prompt):
        super().__init__()
        self.A, self.B = prompt.A, prompt.B  # (L, r), (r, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, T, d)
        prompt = (self.A @ self.B).to(h.dtype)  # (L, d)
        rows = torch.cat([prompt, torch.zeros_like(h[0])], dim=0)  # (L + T, d)
        return h + rows[: h.shape[1]]


class _ExportLayerNorm(nn.Module):
    """Stands in for nn.LayerNorm during export (same ``weight``/``bias``), written with
    ReduceMean/Sub/Mul/Sqrt/Div. The TorchScript exporter writes ``LayerNormalization`` with one
    output, and ORT's gradient builder for it needs the saved mean and inverse std (outputs 1 and
    2), so GPT-2-style models failed with "i < node_->OutputDefs().size()"."""

    def __init__(self, norm: nn.LayerNorm):
        super().__init__()
        self.eps, self.shape = norm.eps, tuple(norm.normalized_shape)
        self.weight, self.bias = norm.weight, norm.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., C)
        dims = tuple(range(-len(self.shape), 0))
        mean = x.mean(dim=dims, keepdim=True)
        centred = x - mean
        var = (centred * centred).mean(dim=dims, keepdim=True)
        y = centred / torch.sqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight
        return y + self.bias if self.bias is not None else y


def _swap_recipe_modules(model: nn.Module) -> dict:
    """SketchTune's and S2A's modules and nn.LayerNorm -> their export stand-ins; returns counts."""
    from ..methods.sketchtune.layer import SketchLinear
    from ..models.arch import get_submodule_parent

    counts = {"sketch": 0, "prompt": 0, "layernorm": 0}
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.LayerNorm):
            parent, leaf = get_submodule_parent(model, name)
            setattr(parent, leaf, _ExportLayerNorm(module))
            counts["layernorm"] += 1
        elif isinstance(module, SketchLinear):
            parent, leaf = get_submodule_parent(model, name)
            setattr(parent, leaf, _ExportSketch(module))
            counts["sketch"] += 1
        elif type(module).__name__ == "LowRankPrompt":
            parent, leaf = get_submodule_parent(model, name)
            setattr(parent, leaf, _ExportPrompt(module))
            counts["prompt"] += 1
    return counts


class _ExportAct4(nn.Module):
    """Stands in for a SiLU/GELU module during export: ``edgetune::Act4<op>`` (f(x) plus the packed
    4-bit derivative codes that its gradient, ``Act4Grad``, reads). The tables are the shipped
    :func:`edgetune.s2a.tables.table_for` ones, passed as (shared) buffers, so they become
    initializers of the graph rather than attributes."""

    def __init__(self, op: str, borders: torch.Tensor, levels: torch.Tensor):
        super().__init__()
        self.op = op
        self.register_buffer("borders", borders, persistent=False)
        self.register_buffer("levels", levels, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (...) -> (...)
        from .custom_ops import torch_act4

        y, _codes = torch_act4()(x, self.borders, self.levels, self.op)
        return y


def _swap_act4(model: nn.Module) -> list[str]:
    """Replace every SiLU/GELU module by :class:`_ExportAct4`; returns the S2A op names swapped."""
    from ..models.arch import get_submodule_parent
    from ..s2a.rewriter import activation_op
    from ..s2a.tables import table_for
    from .custom_ops import ACT4_OPS

    tables, ops = {}, []
    for name, module in list(model.named_modules()):
        op = activation_op(module)
        if op not in ACT4_OPS:
            continue
        if op not in tables:  # one borders/levels pair per op, shared by every layer (one initializer)
            t = table_for(op, 4)
            tables[op] = (t.borders.clone(), t.levels.clone())
        parent, leaf = get_submodule_parent(model, name)
        setattr(parent, leaf, _ExportAct4(op, *tables[op]))
        ops.append(op)
    return ops


class _Logits(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, V)
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def _swap_nf4(model: nn.Module, mode: str) -> int:
    from ..methods.qlora.layer import NF4Linear
    from ..models.arch import get_submodule_parent

    swapped = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, NF4Linear):
            if module.in_features * module.out_features % module.blocksize:
                raise EdgetuneError(f"{name}: {module.out_features}x{module.in_features} is not a whole number of "
                                    f"NF4 blocks of {module.blocksize}; the ORT export does not handle a short block")
            parent, leaf = get_submodule_parent(model, name)
            setattr(parent, leaf, _ExportNF4(module, mode))
            swapped += 1
    return swapped


def _strip_wrapper_prefix(graph, prefix: str = "model.") -> None:
    """Initializers come out as ``model.<torch name>`` (the wrapper's attribute); name them as torch does."""
    renames = {t.name: t.name[len(prefix):] for t in graph.graph.initializer if t.name.startswith(prefix)}
    for t in graph.graph.initializer:
        t.name = renames.get(t.name, t.name)
    for node in graph.graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
    for vi in list(graph.graph.input) + list(graph.graph.value_info):
        vi.name = renames.get(vi.name, vi.name)


def load_plain(directory: str | os.PathLike):
    """A compiled artifact as the recipe's model *without* the S2A activation-lean rewrite.

    S2A changes only what backward saves, never the forward values, and its compressed-saving
    autograd Functions do not export; ORT builds its own backward from the plain forward. This is
    :func:`edgetune.artifact.load_compiled` minus that rewrite: returns (model, tokenizer, manifest,
    recipe config), with only the adapter parameters requiring grad.
    """
    from ..artifact import load_compiled

    model, tokenizer, manifest = load_compiled(directory, activation_rewrite=False)
    return model, tokenizer, manifest, model.edgetune.config


# ----------------------------------------------------------------------------- the loss block


def _causal_lm_loss(vocab_size: int):
    import numpy as np
    import onnx
    from onnxruntime.training import onnxblock
    from onnxruntime.training.onnxblock import _graph_utils

    class CausalLMLoss(onnxblock.Block):
        """mean CE(logits[:, :-1], labels[:, 1:]) over labels != -100, with a (batch, seq) labels input."""

        def __init__(self):
            super().__init__()
            self.ce = onnxblock.loss.CrossEntropyLoss(reduction="mean", ignore_index=IGNORE_INDEX)

        def build(self, logits_name: str) -> str:
            graph = self.base.graph
            graph.input.append(onnx.helper.make_tensor_value_info("labels", onnx.TensorProto.INT64, ["batch", "seq"]))

            def const(label, values):
                name = _graph_utils.generate_graph_name(label)
                graph.initializer.append(onnx.numpy_helper.from_array(np.array(values, dtype=np.int64), name))
                return name

            def node(op, inputs, label):
                out = _graph_utils.generate_graph_name(label)
                graph.node.append(onnx.helper.make_node(op, inputs, [out], name=out))
                return out

            zero, minus1, one, big = const("zero", [0]), const("minus1", [-1]), const("one", [1]), \
                const("end", [np.iinfo(np.int64).max])
            axis1 = const("axis1", [1])
            pred = node("Slice", [logits_name, zero, minus1, axis1], "shift_logits")  # (B, T-1, V)
            pred = node("Reshape", [pred, const("flat_v", [-1, vocab_size])], "flat_logits")  # (B(T-1), V)
            target = node("Slice", ["labels", one, big, axis1], "shift_labels")  # (B, T-1)
            target = node("Reshape", [target, minus1], "flat_labels")  # (B(T-1),)
            return self.ce(pred, target)

    return CausalLMLoss()


# ----------------------------------------------------------------------------- export


@dataclasses.dataclass
class ExportResult:
    out: Path
    trainable: list[str]
    frozen: list[str]
    sizes: dict


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def export_training(compiled_dir: str | os.PathLike, out: str | os.PathLike, *, lr: float = 2e-4,
                    weight_decay: float = 0.0, grad_clip: float = 1.0, nf4: str = "op", act4: str = "auto",
                    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD, overwrite: bool = False) -> ExportResult:
    """Write ORT training artifacts for the compiled artifact at ``compiled_dir`` into ``out``.

    ``act4``: ``auto`` exports every SiLU/GELU as edgetune's 4-bit derivative-coded op when the
    artifact was compiled with ``--act-bits 4`` (its manifest's ``s2a`` block), ``op`` always,
    ``off`` never (plain ONNX ops, exact gradients).

    ``external_data_threshold``: a graph (the torch export handed to ``generate_artifacts``, and
    each written graph) whose tensors exceed this many bytes is stored with ONNX external data
    (``<graph>.data`` beside it); default 2 GiB minus headroom, protobuf's limit. The checkpoint
    is ORT's own flatbuffer; ORT 1.19 writes its ``checkpoint.data`` itself when it needs one."""
    onnx, ort = require_ort()
    ort.set_default_logger_severity(3)
    from onnxruntime.training import artifacts, onnxblock


    if nf4 not in NF4_MODES:
        raise EdgetuneError(f"--nf4 must be one of {', '.join(NF4_MODES)}, got {nf4!r}")
    if act4 not in ACT4_MODES:
        raise EdgetuneError(f"--act4 must be one of {', '.join(ACT4_MODES)}, got {act4!r}")
    if not (lr > 0) or not (weight_decay >= 0) or not (grad_clip >= 0):
        raise EdgetuneError("--lr must be > 0, --weight-decay and --grad-clip >= 0")
    compiled_dir = Path(compiled_dir)
    check_output_path(out, overwrite)
    model, tokenizer, manifest, cfg = load_plain(compiled_dir)
    recipe = manifest["recipe"]
    if recipe not in RECIPES:
        raise EdgetuneError(f"recipe {recipe!r} is not supported by the ORT export (supported: {', '.join(RECIPES)})")
    if getattr(cfg, "side", False):
        raise EdgetuneError("the ORT export does not handle S2A's side branch yet; compile with --no-side")
    if getattr(cfg, "embed_nf4", False):
        raise EdgetuneError("the ORT export does not handle NF4 embeddings yet; compile without --embed-nf4")
    if getattr(cfg, "dropout", 0.0):
        raise EdgetuneError(f"the ORT export needs --dropout 0 (this artifact has {cfg.dropout}): "
                            "a dropout mask would be baked into the graph")
    drop = _base_dropout(model)
    if drop:
        raise EdgetuneError(f"the ORT export needs dropout 0 in the model ({drop}): a dropout mask would be baked "
                            "into the graph")
    if model.dtype != torch.float32:
        raise EdgetuneError(f"the ORT export supports float32 artifacts only (this one is {manifest['dtype']})")
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    state_names = set(model.state_dict()) | {n for n, _ in model.named_parameters()}
    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    fp32_bytes += sum(getattr(m, "out_features", 0) * getattr(m, "in_features", 0) * 4
                      for m in model.modules() if type(m).__name__ in ("NF4Linear", "SketchLinear"))
    fp32_bytes -= sum(m.table.numel() * 4 for m in model.modules() if type(m).__name__ == "SketchLinear")

    n_nf4 = _swap_nf4(model, nf4)
    recipe_modules = _swap_recipe_modules(model)
    act_bits = int((manifest.get("s2a") or {}).get("act_bits", 16))
    act4_ops = _swap_act4(model) if act4 == "op" or (act4 == "auto" and act_bits == 4) else []
    library = None
    if (n_nf4 and nf4 == "op") or act4_ops:
        from .custom_ops import build_library, register_gradients

        library = build_library()
        register_gradients()
    model.config._attn_implementation = "eager"
    model.train()  # training-mode export: initializers are merged by storage only (see the docstring)
    wrapper = _Logits(model)
    prompt_len = int(getattr(cfg, "prompt_len", 0) or 0)
    ids = torch.randint(0, model.config.vocab_size, (2, max(8, prompt_len + 2)))
    mask = torch.ones_like(ids)

    out = Path(out)
    with atomic_dir(out, overwrite) as tmp:
        # torch writes a > 2 GB model with external data (one file per tensor): keep it all in a
        # hidden folder that is removed once the graph is in memory
        raw_dir = tmp / ".forward"
        raw_dir.mkdir()
        raw = raw_dir / "forward.onnx"
        with torch.no_grad():
            torch.onnx.export(wrapper, (ids, mask), str(raw), input_names=["input_ids", "attention_mask"],
                              output_names=["logits"], opset_version=OPSET, do_constant_folding=False,
                              training=torch.onnx.TrainingMode.TRAINING, dynamo=False,
                              custom_opsets={"edgetune": 1} if library else None,
                              dynamic_axes={"input_ids": {0: "batch", 1: "seq"},
                                            "attention_mask": {0: "batch", 1: "seq"},
                                            "logits": {0: "batch", 1: "seq"}})
        graph = onnx.load(str(raw))
        shutil.rmtree(raw_dir)
        _strip_wrapper_prefix(graph)
        init_names = {t.name for t in graph.graph.initializer}
        missing = [n for n in trainable if n not in init_names]
        if missing:
            raise ArtifactError(f"the export renamed adapter parameters (e.g. {missing[0]}); cannot train them")
        # Named tensors of the model (tied ones appear once, under one of their names).
        frozen = sorted(n for n in init_names if n in state_names and n not in trainable)
        optimizer = onnxblock.optim.AdamW(eps=1e-8, weight_decay=weight_decay,
                                          clip_grad=onnxblock.optim.ClipGradNorm(grad_clip) if grad_clip else None)
        base = graph
        if _tensor_bytes(graph) > external_data_threshold:
            # generate_artifacts refuses a ModelProto over 2 GB: give it a path with external data
            base_dir = tmp / ".base"
            base_dir.mkdir()
            base = str(base_dir / "base.onnx")
            _save_external(onnx, graph, Path(base), "base.onnx.data")
        artifacts.generate_artifacts(base, requires_grad=trainable, frozen_params=frozen,
                                     loss=_causal_lm_loss(model.config.vocab_size), optimizer=optimizer,
                                     artifact_directory=str(tmp), custom_op_library=str(library) if library else None)
        shutil.rmtree(tmp / ".base", ignore_errors=True)
        _torch_adamw(onnx, tmp / "optimizer_model.onnx")
        external = _externalize(onnx, tmp, external_data_threshold)
        shutil.copyfile(compiled_dir / "config.json", tmp / "config.json")
        tokenizer.save_pretrained(str(tmp / "tokenizer"))
        sizes = {"checkpoint": _files_bytes(tmp, CHECKPOINT_FILE),  # + checkpoint.data if ORT wrote one
                 "graphs": sum(_files_bytes(tmp, f) for f in GRAPH_FILES),
                 "fp32_model": fp32_bytes}
        sizes["total"] = sizes["checkpoint"] + sizes["graphs"]
        sizes["ratio_vs_fp32"] = sizes["total"] / fp32_bytes
        write_manifest(tmp, KIND, {
            "compiled": {"path": str(compiled_dir.resolve()), "manifest_sha256": sha256_file(compiled_dir / "manifest.json")},
            "source": manifest.get("source"),
            "base_sha256": (manifest.get("source") or {}).get("sha256"),
            "recipe": recipe,
            "recipe_config": manifest["recipe_config"],
            "model_type": manifest.get("model_type"),
            "vocab_size": model.config.vocab_size,
            "opset": OPSET,
            "nf4": nf4 if n_nf4 else None,
            # graphs whose tensors went to ONNX external data (<graph>.data), and the threshold used
            "external_data": {"threshold_bytes": external_data_threshold, "graphs": external},
            # sketchtune: codes stay bit-packed uint8 in the checkpoint and are decoded in-graph
            "sketch": {"layers": recipe_modules["sketch"], "decode": "graph"} if recipe_modules["sketch"] else None,
            "custom_op_library": ({"sources_sha256": _sources_sha(), "ops": _ops_used(graph)}
                                  if library else None),
            # the S2A nonlinearities exported as Act4 ops (4-bit derivative codes saved for backward)
            "act4": {"ops": sorted(set(act4_ops)), "count": len(act4_ops), "source_act_bits": act_bits}
            if act4_ops else None,
            "optimizer": {"type": "AdamW", "lr": lr, "eps": 1e-8, "betas": [0.9, 0.999],
                          "weight_decay": weight_decay, "grad_clip": grad_clip},
            "inputs": ["input_ids", "attention_mask", "labels"],
            # ONNX initializer name -> torch state-dict name (identical by construction; checked above)
            "parameters": {n: n for n in trainable},
            "frozen": frozen,
            "sizes": sizes,
        })
    return ExportResult(out, trainable, frozen, sizes)


def _torch_adamw(onnx, path: Path) -> None:
    """onnxblock writes ``AdamWOptimizer`` with ``adam_mode=1`` (transformers' AdamW: eps added before
    the bias correction, i.e. an effective eps of eps/sqrt(1-beta2^t), 32x at step 1). Mode 0 is
    torch.optim.AdamW, which the torch backend uses; switch to it so both backends take the same steps."""
    model = onnx.load(str(path))
    found = False
    for node in model.graph.node:
        if node.op_type == "AdamWOptimizer":
            for attr in node.attribute:
                if attr.name == "adam_mode":
                    attr.i = 0
                    found = True
    if not found:
        raise ArtifactError(f"{path.name}: no AdamWOptimizer node with adam_mode (onnxruntime changed?)")
    onnx.save(model, str(path))


def _base_dropout(model: nn.Module) -> str:
    """The first nonzero dropout on the causal-LM path (an nn.Dropout module, or the attention
    probability Llama-style attention reads from the config), or ''."""
    p = getattr(model.config, "attention_dropout", 0.0)
    if isinstance(p, float) and p > 0:
        return f"config attention_dropout={p}"
    for name, m in model.named_modules():
        if isinstance(m, nn.Dropout) and m.p > 0:
            return f"{name}: p={m.p}"
    return ""


def _tensor_bytes(model) -> int:
    """Bytes of a ModelProto's initializers (a > 2 GB proto cannot report its own ByteSize)."""
    return sum(t.ByteSize() for t in model.graph.initializer)


def _files_bytes(directory: Path, name: str) -> int:
    """Size of ``name`` plus its external data ``name.data``, if any."""
    return sum((directory / n).stat().st_size for n in (name, name + ".data") if (directory / n).is_file())


_EXTERNAL_TYPES = (1, 2, 10, 11, 16)  # FLOAT, UINT8, FLOAT16, DOUBLE, BFLOAT16: weights, never shapes


def _save_external(onnx, model, path: Path, location: str) -> bool:
    """Save ``model`` at ``path`` with its weight-like tensors in ``location`` (next to it).

    Integer tensors stay inline: ORT's shape inference reads shape constants (Slice starts,
    Reshape shapes) only from inline data ("Cannot parse data from external tensors").
    Returns whether any tensor went external."""
    from onnx.external_data_helper import set_external_data

    moved = False
    for t in model.graph.initializer:
        if t.data_type in _EXTERNAL_TYPES and t.HasField("raw_data") and t.raw_data:
            set_external_data(t, location)
            moved = True
    onnx.save(model, str(path))  # writes every tensor marked external into ``location``
    return moved


def _externalize(onnx, directory: Path, threshold: int) -> list[str]:
    """Re-save every graph of ``directory`` whose tensors exceed ``threshold`` bytes with its
    weight-like tensors in ``<graph>.data`` (one file, next to it; ORT resolves it from the
    graph's folder)."""
    done = []
    for name in GRAPH_FILES:
        path = directory / name
        model = onnx.load(str(path))
        if _tensor_bytes(model) > threshold and _save_external(onnx, model, path, name + ".data"):
            done.append(name)
    return done


def _ops_used(graph) -> list[str]:
    """The edgetune-domain ops of the forward graph plus their gradient ops."""
    from .custom_ops import ACT4_GRAD, ACT4_OPS, BACKWARD_OP, DOMAIN, FORWARD_OP

    used = {n.op_type for n in graph.graph.node if n.domain == DOMAIN}
    if FORWARD_OP in used:
        used.add(BACKWARD_OP)
    if used & set(ACT4_OPS.values()):
        used.add(ACT4_GRAD)
    return sorted(f"{DOMAIN}::{op}" for op in used)


def _sources_sha() -> str:
    from .custom_ops import sources_sha256

    return sources_sha256()


def read_ort_dir(directory: str | os.PathLike, verify: bool = True) -> dict:
    """The manifest of an ORT training directory (verified), or a one-line ArtifactError."""
    directory = Path(directory)
    manifest = read_manifest(directory, KIND, verify=verify)
    for name in (*GRAPH_FILES, CHECKPOINT_FILE):
        if name not in manifest["files"]:
            raise ArtifactError(f"{directory / 'manifest.json'}: {name} is not listed in the manifest")
    return manifest


__all__ = ["export_training", "read_ort_dir", "ExportResult", "KIND", "NF4_MODES", "ACT4_MODES"]
