"""The memory planner: will this job fit on that device, and with what batch and sequence length?

Everything here is arithmetic on the model's config (no weights are loaded), so
``edgetune plan llama-2-7b --device jetson-orin-nano-8gb`` answers at once.

The saved-activation formula counts, per decoder block of a Llama-family model trained with
LoRA on a frozen base, exactly the tensors PyTorch autograd keeps (measured with
``edgetune.memory.SavedTensorCounter`` and asserted in ``tests/test_planner.py``):

======================  ===========================================================
RMSNorm (x2)            input (N·d) and 1/rms (N) each; block 0's first norm saves
                        nothing because the embedding output needs no gradient
LoRA inputs             the normed input of q/k/v (N·d) if any of them is adapted,
                        of gate/up (N·d) likewise, down's input (N·f) if adapted;
                        o's input is SDPA's output, already counted
LoRA hiddens            x·Aᵀ (N·r) per adapted projection
attention (SDPA)        q (N·h·hd), k and v (N·h_kv·hd each), output (N·h·hd),
                        log-sum-exp (N·h); no T×T probabilities
SwiGLU MLP              gate output, silu output, up output (N·f each)
loss head               fp32 log-probabilities (N·V), labels (N int64)
======================  ===========================================================

with N = batch × seq_len tokens. Frozen matmuls save nothing (no weight gradient is needed),
which is why ``lora`` and ``qlora`` save the same bytes.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .errors import EdgetuneError
from .profiles import DeviceProfile
from .s2a.loss import LOSS_LOGITS_BYTES, LOSS_MAX_ROWS, vocab_slice  # noqa: F401 (LOSS_LOGITS_BYTES: re-exported)

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
LLAMA_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Runtime overhead on top of the tensors, by accelerator. CPU: allocator slack and per-op
# scratch (glibc malloc arenas, oneDNN/OpenMP buffers), measured here as ~6% of tensor bytes plus
# ~150 MiB beyond the interpreter+torch+transformers baseline (most of it is code the first step
# loads lazily: a micro-model step adds 121 MiB of RSS for lora, 169 MiB for qlora with
# bitsandbytes, measured here). CUDA: the context is 287 MB with CUDA's lazy module loading (the
# PyTorch default since 1.13) vs 667 MB without (pytorch/pytorch#86509, a desktop GPU) and "around
# 400MB" per a PyTorch maintainer (pytorch/pytorch#109888); no Jetson measurement was found. We
# assume 512 MiB with cuBLAS/cuDNN handles (edgetune.profiles.DEFAULT_CUDA_CONTEXT_MIB), counted
# once: the profile's ``cuda_context_mib`` is what the plan adds, and the shipped CUDA profiles set
# it to 0 because their reserve (total - usable) already holds the context. On top, 8% for the
# caching allocator's rounding and fragmentation (not measured here; lifespan-unaware allocators
# waste "up to 43%" under recomputation and pipelining, arXiv:2507.16274, which plain LoRA
# training does not do).
OVERHEAD = {"cpu": (150 * 2**20, 0.06), "cuda": (0, 0.08)}  # (fixed bytes, fraction of the tensors)


def overhead_bytes(profile: DeviceProfile, tensors: int) -> int:
    """Runtime overhead on ``profile`` for ``tensors`` bytes of tensors: fixed + fraction + CUDA context."""
    fixed, frac = OVERHEAD[profile.accelerator]
    return int(fixed + profile.cuda_context_bytes + frac * tensors)
# Forward intermediates that are freed but not yet reused when backward starts (sums, rotary and
# MLP temporaries, the allocator's free lists), as a fraction of the uncompressed (act-bits 16)
# saved bytes: with the S2A rewrite the forward still makes the same full-precision intermediates
# (taking it of the compressed bytes under-predicted the act-bits 4 peaks by 21-49%). Fitted on
# measured peaks: first 0.72 (0.65-0.79 on the default model); after the vocab-sliced loss head and
# the in-place S2A backwards, the implied fraction is 0.40-0.85 over the default model's eight
# configurations (benchmarks/planner_accuracy.py) and the tiny test's four
# (tests/test_planner_peak.py), and 0.55 puts all twelve within 15%. An in-sample fit.
TRANSIENT_FRACTION = 0.55
# CUDA profiles (unmeasured: no GPU has been lent): PyTorch's caching allocator keeps freed blocks
# and hands them to the next request of the same size class, and every decoder block allocates the
# same sizes, so the forward's freed intermediates do not pile up across blocks as glibc's heap
# high-water mark does on the CPU. What is alive beyond the saved tensors is one block's worth: its
# full-precision intermediates in forward (before they are compressed or freed), or in backward its
# reconstructed inputs plus the gradients with respect to them. Hence 2 x one block's uncompressed
# saved bytes; the dequantized weight, attention gradients and loss-head chunk are counted as
# workspaces, and the allocator's rounding/fragmentation by the 8% of OVERHEAD["cuda"].
CUDA_TRANSIENT_BLOCKS = 2


def transient_bytes(accelerator: str, uncompressed: int, per_block: int | None,
                    blocks: int = CUDA_TRANSIENT_BLOCKS) -> int:
    """Freed-but-held activation temporaries at the peak: the CPU fit, or the CUDA one-block model
    (``blocks`` = 1 where no backward runs through the backbone: only its forward intermediates)."""
    if accelerator == "cuda" and per_block is not None:
        return blocks * per_block
    return int(TRANSIENT_FRACTION * uncompressed)
RECIPES = ("lora", "qlora", "s2a", "sketchtune")  # the recipes the planner has formulas for
# The chunked loss head of the S2A rewrite (edgetune/s2a/loss.py, imported: one source for the
# sizes) is one vocab-sliced online-softmax pass over row chunks of at most LOSS_MAX_ROWS rows,
# each vocab slice's fp32 logits (and a coded head's decoded slice) kept near LOSS_LOGITS_BYTES
# (vocab_slice).
# quant/nf4.py _BNB_DEQUANT_MIN_NUMEL: dequantize_nf4 takes bitsandbytes' kernel for tensors of at
# least this many values, and only on the CPU; below it, and on every CUDA tensor, the torch path.
NF4_BNB_MIN_NUMEL = 1 << 18
# quant/nf4.py _DECODE_CHUNK: the torch path decodes a tensor of more values than this in whole-block
# chunks of (this // blocksize) blocks into one preallocated output of the target dtype.
NF4_DECODE_CHUNK = 1 << 20
# edgetune/methods/embedding.py HEAD_SLICE_BYTES: the plain-forward NF4 LM head decodes
# HEAD_SLICE_BYTES / (4·C) rows at a time (act-bits 16, where HF's own loss runs).
NF4_HEAD_SLICE_BYTES = 64 * 2**20


def _nf4_reference_bytes(numel: int, a: int, blocksize: int) -> int:
    """dequantize_nf4_reference on ``numel`` values: its float32 levels (padded to whole blocks) and
    their float32 product with the absmax are alive together with the cast result (none in fp32)."""
    return 8 * -(-numel // blocksize) * blocksize + (a if a != 4 else 0) * numel


def nf4_decode_bytes(numel: int, a: int, accelerator: str, blocksize: int = 64,
                     absmax_decoded: bool = True) -> int:
    """Peak bytes while ``dequantize_nf4`` (quant/nf4.py) decodes ``numel`` weights to a dtype of
    ``a`` bytes, its result included. Its three paths, read off the code:

    * bitsandbytes' CPU kernel (CPU tensors of >= NF4_BNB_MIN_NUMEL values): its float32 output
      (n rounded up to even) and the cast of it, (4 + a)·n (4·n in fp32: the cast is free);
    * the torch path on at most NF4_DECODE_CHUNK values (small CPU tensors, small CUDA ones): the
      reference's float32 levels, their float32 product and the cast at once, (8 + a)·n (8·n in fp32);
    * the torch path on more (every large CUDA tensor): the preallocated a·n output plus one chunk
      of ``NF4_DECODE_CHUNK // blocksize`` blocks decoded by the reference, (8 + a)·chunk (8·chunk
      in fp32: the chunk's product is what is copied in).

    Plus the block absmax in float32 when it is made for the decode (``absmax_decoded``: under
    double quantization, or gathered for a slice of head rows; a plain absmax is used in place).
    Measured per byte with a live-storage tracker in tests/test_planner_workspace.py.
    """
    absmax = 4 * -(-numel // blocksize) if absmax_decoded else 0
    if accelerator == "cpu" and numel >= NF4_BNB_MIN_NUMEL:
        return 4 * (numel + numel % 2) + (a if a != 4 else 0) * numel + absmax
    if numel <= NF4_DECODE_CHUNK:
        return _nf4_reference_bytes(numel, a, blocksize) + absmax
    step = NF4_DECODE_CHUNK // blocksize * blocksize
    return a * numel + _nf4_reference_bytes(step, a, blocksize) + absmax


def _head_chunk_bytes(r: int, prev: int, c: int, vocab: int, a: int, coded: bool, accelerator: str,
                      blocksize: int) -> int:
    """Peak bytes of one row chunk of ``r`` rows of the S2A loss head (see loss_workspace_bytes),
    with ``prev`` bytes of the previous chunk's result still bound."""
    cast = a if a != 4 else 0  # a bf16/fp16 copy of an fp32 tensor; none in fp32
    up = 4 if a != 4 else 0  # an fp32 copy of a bf16/fp16 tensor; none in fp32
    acc = r * c * 4  # the fp32 Σ softmax·W accumulator (r, C)
    vs = vocab_slice(r, vocab, c * a if coded else 0)
    moments = []
    for s in {vs, vocab - (-(-vocab // vs) - 1) * vs}:  # a full slice and the last (their paths may differ)
        w = s * c * a if coded else 0  # the decoded slice (vs, C); a dense slice is a view
        if coded:
            moments.append(acc + nf4_decode_bytes(s * c, a, accelerator, blocksize))
        moments += [
            # (the logits matmul's result and its fp32 cast, acc + w + r·s·(4 + cast), is below the next)
            acc + w + r * s * (4 + cast) + r * c * a,  # the softmax slice, its cast, the matmul result
            acc + w + r * s * 4 + r * c * (a + up),  # the matmul result and its fp32 cast
        ]
    if coded:  # W[y]: the rows' gathered packed bytes and their decode to fp32 (NF4Weight.take_rows)
        moments.append(acc + r * c // 2 + nf4_decode_bytes(r * c, 4, accelerator, blocksize))
    # (a dense W[y], the gathered rows and their fp32 cast, acc + r·C·(a + up), is below the next)
    moments.append(3 * acc)  # the accumulator, W[y] in fp32 and their difference
    return prev + max(moments)


def loss_workspace_bytes(shape: "ModelShape", job: "JobSpec", batch: int, seq_len: int,
                         accelerator: str = "cuda") -> int:
    """Peak bytes alive inside the loss head beyond what it saves for backward (its dh (N, C)).

    act-bits 16 runs HF's own loss: the fp32 logits and the softmax gradient, (N, V) each (exact for a
    dense head); an NF4 head decodes one slice of HEAD_SLICE_BYTES / (4·C) rows at a time on top,
    counted in full (an upper bound: a live-storage probe of the HF loss over an NF4 head measured
    0.6-0.85 of it), and keeps every slice's float32 absmax (V·C/64 values) with its autograd node.

    The S2A head (act-bits 8/4) walks row chunks of ``r = min(B·(T-1), LOSS_MAX_ROWS)`` rows and
    within a chunk vocab slices of ``vs = vocab_slice(r, V, C·a)`` rows for an NF4 head (the fp32
    logits (r, vs) and the decoded slice (vs, C) each held to LOSS_LOGITS_BYTES),
    ``vocab_slice(r, V)`` for a dense one. Each slice is freed before the next is made
    (``del w, logits, p``), so one slice's largest moment bounds them all (a full slice's or the
    last one's); what is alive then, read off ``edgetune/s2a/loss.py`` and measured per byte in
    tests/test_planner_loss_workspace.py:

    * always the fp32 accumulator (r, C) and the fp32 logits slice (r, vs);
    * in a compute dtype other than fp32, the bf16/fp16 copy of the softmax slice fed to the
      matmul, the matmul's (r, C) result in that dtype and its fp32 cast (fp32 makes no copies);
    * for an NF4 head (``embed_nf4``) the decoded slice (vs, C) in the compute dtype, and while it is
      decoded the decoder's intermediates (:func:`nf4_decode_bytes`: a full slice and the last,
      shorter one, can take different decoder paths);
    * at a chunk's end W[y] (an NF4 head decodes those rows to fp32 from their gathered bytes; the
      int64 block index is freed once their scales are read), then the accumulator, W[y] in fp32 and
      their difference, (r, C) fp32 each;
    * from the second chunk on, the previous chunk's (r, C) fp32 result, still bound while the next
      chunk runs;
    * for batch > 1, the hidden states and labels reshaped to rows (``hidden[:, :-1]`` is not
      contiguous then: a (B·(T-1), C) copy, and an int64 label copy), for the whole loss.
    """
    a = DTYPE_BYTES[job.dtype]
    c, vocab = shape.hidden, shape.vocab
    if job.act_bits == 16:
        head = max(1, NF4_HEAD_SLICE_BYTES // (4 * c)) if job.embed_nf4 else 0
        sizes = {min(head, vocab), vocab % head} - {0} if head else set()  # a full slice and the last
        decode = max((nf4_decode_bytes(s * c, a, accelerator, job.blocksize) for s in sizes), default=0)
        # each slice's matmul node keeps its NF4Weight, whose gathered float32 absmax lives to backward
        scales = 4 * vocab * (c // job.blocksize) if job.embed_nf4 else 0
        return 2 * batch * seq_len * vocab * 4 + decode + scales
    n_rows = batch * (seq_len - 1)
    if n_rows <= 0:  # a single position predicts nothing: the loss walks no rows
        return 0
    r = min(n_rows, LOSS_MAX_ROWS)
    last = n_rows - (-(-n_rows // r) - 1) * r  # the last chunk's rows (= r with one chunk)
    coded = job.embed_nf4
    peak = _head_chunk_bytes(r, 0, c, vocab, a, coded, accelerator, job.blocksize)
    if n_rows > r:  # later chunks: the previous full chunk's result is still bound
        peak = max(peak, _head_chunk_bytes(last, r * c * 4, c, vocab, a, coded, accelerator, job.blocksize))
        if n_rows > 2 * r:
            peak = max(peak, _head_chunk_bytes(r, r * c * 4, c, vocab, a, coded, accelerator, job.blocksize))
    copies = (n_rows * c * a + n_rows * 8) if batch > 1 else 0
    return peak + copies


@dataclass(frozen=True)
class ModelShape:
    """The few numbers of a decoder-only LM that memory depends on."""

    model_type: str
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    context: int
    tied: bool
    qkv_bias: bool = False  # Qwen2 (and Llama with attention_bias) add a bias to q, k and v

    @classmethod
    def from_config(cls, cfg) -> "ModelShape":
        get = (lambda k, d=None: cfg.get(k, d)) if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
        model_type = get("model_type")
        if model_type not in ("llama", "qwen2", "mistral"):
            raise EdgetuneError(f"the planner supports llama, qwen2, mistral, vit and resnet configs, "
                                f"not {model_type!r}")
        hidden, heads = int(get("hidden_size")), int(get("num_attention_heads"))
        return cls(model_type, hidden, int(get("intermediate_size")), int(get("num_hidden_layers")), heads,
                   int(get("num_key_value_heads") or heads), int(get("head_dim") or hidden // heads),
                   int(get("vocab_size")), int(get("max_position_embeddings")),
                   bool(get("tie_word_embeddings", False)),
                   model_type == "qwen2" or bool(get("attention_bias", False)))

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of each projection of one block."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        d, f = self.hidden, self.ffn
        return {"q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, q),
                "gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}

    @property
    def bias_numel(self) -> int:
        """Bias values of one block (q, k and v where the config has them)."""
        return (self.heads + 2 * self.kv_heads) * self.head_dim if self.qkv_bias else 0

    @property
    def params(self) -> int:
        per_block = sum(o * i for o, i in self.linear_shapes().values()) + 2 * self.hidden + self.bias_numel
        emb = self.vocab * self.hidden
        return self.layers * per_block + emb * (1 if self.tied else 2) + self.hidden


def _getter(cfg):
    return (lambda k, d=None: cfg.get(k, d)) if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))


def _labels(get) -> int:
    return int(get("num_labels") or len(get("id2label") or {}) or 2)


VIT_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")  # transformers' ViT projection names


@dataclass(frozen=True)
class VitShape:
    """The numbers of a ViT image classifier (transformers ``ViTForImageClassification``) memory depends on."""

    hidden: int
    ffn: int
    layers: int
    heads: int
    image: int
    patch: int
    channels: int
    labels: int
    qkv_bias: bool
    model_type: str = "vit"

    @classmethod
    def from_config(cls, cfg) -> "VitShape":
        get = _getter(cfg)
        return cls(int(get("hidden_size")), int(get("intermediate_size")), int(get("num_hidden_layers")),
                   int(get("num_attention_heads")), int(get("image_size")), int(get("patch_size")),
                   int(get("num_channels", 3)), _labels(get), bool(get("qkv_bias", True)))

    @property
    def tokens(self) -> int:
        """Patches plus the [CLS] token: the fixed sequence every image becomes."""
        return (self.image // self.patch) ** 2 + 1

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        d, f = self.hidden, self.ffn
        return {"q_proj": (d, d), "k_proj": (d, d), "v_proj": (d, d), "o_proj": (d, d), "fc1": (f, d), "fc2": (d, f)}

    def bias_numel(self) -> int:
        return (3 * self.hidden if self.qkv_bias else 0) + 2 * self.hidden + self.ffn  # + o_proj, fc1, fc2

    def frozen_numel(self) -> int:
        """Everything but the projections' weights and the classifier: biases, norms, patch/position embeddings."""
        d = self.hidden
        per_block = self.bias_numel() + 4 * d  # two LayerNorms
        emb = self.channels * self.patch ** 2 * d + d + d + self.tokens * d  # conv + bias, cls, positions
        return self.layers * per_block + emb + 2 * d

    @property
    def params(self) -> int:
        return (self.layers * sum(o * i for o, i in self.linear_shapes().values()) + self.frozen_numel()
                + self.hidden * self.labels + self.labels)


@dataclass(frozen=True)
class ResNetShape:
    """A bottleneck ResNet (transformers ``ResNetForImageClassification``): stem, stages, classifier."""

    embedding: int
    hidden_sizes: tuple[int, ...]
    depths: tuple[int, ...]
    image: int
    channels: int
    labels: int
    downsample_in_bottleneck: bool = False
    downsample_in_first_stage: bool = False
    model_type: str = "resnet"

    @classmethod
    def from_config(cls, cfg) -> "ResNetShape":
        get = _getter(cfg)
        if get("layer_type", "bottleneck") != "bottleneck":
            raise EdgetuneError(f"the planner supports bottleneck ResNets, not layer_type {get('layer_type')!r}")
        # ResNetConfig has no image size; the shipped config adds image_size = 224 (ImageNet)
        return cls(int(get("embedding_size")), tuple(int(x) for x in get("hidden_sizes")),
                   tuple(int(x) for x in get("depths")), int(get("image_size", 224)), int(get("num_channels", 3)),
                   _labels(get), bool(get("downsample_in_bottleneck", False)),
                   bool(get("downsample_in_first_stage", False)))

    @property
    def tokens(self) -> int:
        return 0  # no sequence axis: the planner picks the batch

    @property
    def params(self) -> int:
        return resnet_walk(self, 1, 4)["params"]


def shape_from_config(cfg):
    """The planner's shape for a config dict or object: a decoder LM, a ViT or a ResNet."""
    model_type = _getter(cfg)("model_type")
    if model_type == "vit":
        return VitShape.from_config(cfg)
    if model_type == "resnet":
        return ResNetShape.from_config(cfg)
    return ModelShape.from_config(cfg)


def shipped_configs() -> dict[str, Path]:
    root = resources.files("edgetune.configs")
    return {p.name.removesuffix(".json"): Path(str(p)) for p in root.iterdir() if p.name.endswith(".json")}


def shape_for(model: str):
    """A shipped config name, ``default``, a HF model directory, or a .gguf file (metadata only)."""
    configs = shipped_configs()
    name = "smollm2-135m" if model == "default" else model
    if name in configs:
        return shape_from_config(json.loads(configs[name].read_text()))
    path = Path(model)
    if path.is_dir() and (path / "config.json").is_file():
        try:
            return shape_from_config(json.loads((path / "config.json").read_text()))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise EdgetuneError(f"{path / 'config.json'}: not a usable model config ({exc})") from None
    if path.is_file() and path.suffix == ".gguf":
        try:
            from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

            cfg = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
        except Exception as exc:  # gguf raises many types on a bad file
            raise EdgetuneError(f"cannot read GGUF metadata of {path}: {exc}") from None
        return ModelShape.from_config(cfg)
    raise EdgetuneError(f"no config for {model!r}: give a model directory, a .gguf file or one of "
                        f"{', '.join(sorted(configs))}")


@dataclass(frozen=True)
class JobSpec:
    recipe: str = "qlora"
    r: int = 16
    targets: tuple[str, ...] = LLAMA_PROJ
    blocksize: int = 64
    double_quant: bool = True  # the qlora default (QLoraConfig.double_quant); s2a's config says its own
    dtype: str = "float32"
    act_bits: int = 16  # the S2A rewrite: 16 = none, 8 or 4 = compressed saved activations
    gate_code4: bool = False  # S2A: 4-bit derivative code + 8-bit f(g) for the gated MLP's gate
    # recipe "s2a": bias tuning on every projection and decoder norm, a (length, rank) prompt per block
    s2a_bias: bool = True
    s2a_prompt: tuple[int, int] = (16, 4)
    s2a_nf4: bool = True
    # recipe "sketchtune": b-bit packed codes + (out, GPR, 2**b) tables per target projection
    bits: int = 4
    groups_per_row: int = 4
    train_norms: bool = False
    # qlora / sketchtune: the frozen input embedding (and an untied lm_head) stored in NF4
    # (edgetune/methods/embedding.py), with the recipe's blocksize and double quantization
    embed_nf4: bool = False
    # recipe "s2a": the lite side branch (edgetune/methods/s2a/side.py)
    side: bool = False
    side_dim: int = 64
    side_every: int = 1


@dataclass
class Plan:
    fits: bool
    budget_bytes: int
    total_bytes: int
    batch: int
    seq_len: int
    components: dict[str, int]
    activations: dict[str, int] = field(default_factory=dict)
    device: str = ""
    recipe: str = ""
    step_time_s: float | None = None
    suggestion: str | None = None
    step_flops: int = 0  # the matmul FLOPs the step-time estimate is made of
    image_size: int = 0  # image models: the input side in pixels (seq_len is then the ViT's tokens, or 0)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _lora_rank(job: JobSpec) -> int:
    """The rank of the x·Aᵀ hiddens each adapted projection saves: none for sketchtune (its table
    gradient needs only the input, which it shares with the other readers of the same tensor)."""
    return job.r if job.recipe in ("lora", "qlora") else 0


NF4_DQ_BLOCK = 256  # quant/nf4.py DQ_BLOCKSIZE: absmax values per float32 scale under double quantization


def nf4_bytes(numel: int, blocksize: int, double_quant: bool) -> int:
    """Stored bytes of one NF4 tensor of ``numel`` weights, as ``quant/nf4.py`` lays it out
    (``NF4Weight.tensor_specs``): 4-bit codes, two per byte (an odd count padded), and per block of
    ``blocksize`` a float32 absmax or, with double quantization, a uint8 code per block plus a
    float32 scale per 256 blocks, the 256-entry float32 code book and one float32 offset."""
    blocks = -(-numel // blocksize)
    packed = -(-numel // 2)
    if double_quant:
        return packed + blocks + 4 * -(-blocks // NF4_DQ_BLOCK) + 4 * 256 + 4
    return packed + 4 * blocks


def _q8(numel: int) -> int:
    """Bytes of one tensor saved as 8-bit groups of 64 (codes + float32 min and scale per group)."""
    groups = -(-numel // 64)
    return groups * 64 + groups * 8


def side_blocks(shape: ModelShape, job: JobSpec) -> int:
    """Side blocks of the s2a lite side branch: one per ``side_every``-th decoder input
    (``range(0, L, every)``, edgetune/methods/s2a/model.py) plus one for the final hidden state."""
    return -(-shape.layers // job.side_every) + 1 if job.recipe == "s2a" and job.side else 0


def side_saved_bytes(shape: ModelShape, job: JobSpec, batch: int, seq_len: int) -> int:
    """What the side branch saves: each ``SideMLP`` its input u (N, d) (it recomputes W1·u and silu in
    backward) and the up-projection its input s (N, d), in the compute dtype at every act-bits (the
    S2A rewrite does not touch the side). The pooled inputs are detached: the backbone saves nothing
    for the side. Per token (n_side + 1)·d·dtype bytes."""
    n_side = side_blocks(shape, job)
    return (n_side + 1) * batch * seq_len * job.side_dim * DTYPE_BYTES[job.dtype] if n_side else 0


def _backbone_records(job: JobSpec) -> bool:
    """False for a side-only s2a job: nothing in the backbone trains and the side's inputs are
    detached, so autograd records no backbone op; only the final norm (its input h_L + U·s now needs
    a gradient) and the loss head save anything."""
    return not (job.recipe == "s2a" and not job.s2a_bias and not job.s2a_prompt[0])


def _with_side(out: dict[str, int], shape: ModelShape, job: JobSpec, batch: int, seq_len: int,
               final_norm: int) -> dict[str, int]:
    if not _backbone_records(job):
        out.update(norms=final_norm, lora_inputs=0, attention=0, mlp=0)
    if side_blocks(shape, job):
        out["side"] = side_saved_bytes(shape, job, batch, seq_len)
    return out


def lean_activation_bytes(shape: ModelShape, job: JobSpec, batch: int, seq_len: int) -> dict[str, int]:
    """Saved bytes after the S2A rewrite (act-bits 8 or 4), by layer type.

    Norms keep an 8-bit input and a float32 1/rms per row; attention keeps 8-bit q, k, v (before
    the GQA expansion) and output plus the float32 log-sum-exp; the gated MLP keeps 8-bit
    gate and up (or, with ``gate_code4``, the gate's 4-bit derivative code and 8-bit up and SiLU
    outputs); LoRA inputs are 8-bit and shared by the projections that read the same tensor
    (o_proj reads the attention output, already saved); the loss head keeps the final
    hidden states, the labels and one float32 log-sum-exp per row.
    """
    n = batch * seq_len
    a = DTYPE_BYTES[job.dtype]
    d, f = shape.hidden, shape.ffn
    qd, kvd = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    t = set(job.targets)
    qkv, gate_up = bool(t & {"q_proj", "k_proj", "v_proj"}), bool(t & {"gate_proj", "up_proj"})
    s2a = job.recipe == "s2a"  # a prompt at block 0's input and biases everywhere: every op records
    after_attn = qkv or "o_proj" in t or s2a
    norm = _q8(n * d) + 4 * n
    attn_layer = 2 * _q8(n * qd) + 2 * _q8(n * kvd) + 4 * n * shape.heads
    mlp_layer = (-(-n * f // 2) + 2 * _q8(n * f)) if job.gate_code4 else 2 * _q8(n * f)
    lora_in = _q8(n * d) * qkv + _q8(n * d) * gate_up + _q8(n * f) * ("down_proj" in t)
    rest = shape.layers - 1
    norms = rest * 2 * norm + (norm if after_attn else 0) + (norm if s2a else 0) + norm
    attention = rest * attn_layer + (attn_layer if qkv or s2a else 0) + 2 * seq_len * shape.head_dim * a
    mlp = rest * mlp_layer + (mlp_layer if after_attn or gate_up else 0)
    lora = 0 if s2a else shape.layers * (lora_in + n * _lora_rank(job) * len(t) * a)
    rows = batch * (seq_len - 1)
    loss = rows * d * a  # dh (N, C): the chunked head takes its gradient in forward (edgetune.s2a.loss)
    return _with_side({"norms": norms, "lora_inputs": lora, "attention": attention, "mlp": mlp, "loss_head": loss},
                      shape, job, batch, seq_len, norm)


def saved_activation_bytes(shape: ModelShape, job: JobSpec, batch: int, seq_len: int) -> dict[str, int]:
    """Bytes autograd saves for backward, by layer type (see the module docstring)."""
    if job.act_bits != 16:
        return lean_activation_bytes(shape, job, batch, seq_len)
    n = batch * seq_len
    a = DTYPE_BYTES[job.dtype]
    d, f = shape.hidden, shape.ffn
    qd, kvd = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    t = set(job.targets)
    qkv, gate_up = bool(t & {"q_proj", "k_proj", "v_proj"}), bool(t & {"gate_proj", "up_proj"})
    attn_layer = n * (2 * qd + 2 * kvd + shape.heads) * a
    norm = n * (d + 1) * a
    lora_in = n * a * (d * qkv + d * gate_up + f * ("down_proj" in t))
    # Block 0: autograd saves only from the first adapted projection on (nothing before it
    # needs a gradient); every later block sees a residual stream that does.
    s2a = job.recipe == "s2a"  # a prompt at block 0's input and biases everywhere: every op records
    after_attn = qkv or "o_proj" in t or s2a
    first_attn = attn_layer if qkv or s2a else (n * qd * a if "o_proj" in t else 0)  # o's input alone
    first_norm = norm * (2 if s2a else 1) if after_attn else 0  # block 0's second norm (and first, s2a)
    first_mlp = 3 * n * f * a if after_attn else n * f * a * (2 * ("gate_proj" in t) + ("up_proj" in t))
    rest = shape.layers - 1
    norms = rest * 2 * norm + first_norm + norm  # + the final norm
    attention = rest * attn_layer + first_attn + 2 * seq_len * shape.head_dim * a  # + rotary cos/sin
    mlp = rest * 3 * n * f * a + first_mlp
    lora = 0 if s2a else shape.layers * (lora_in + n * _lora_rank(job) * len(t) * a)
    loss = n * shape.vocab * 4 + n * 8 + 4  # fp32 log-probs, int64 labels, nll_loss's fp32 total_weight
    return _with_side({"norms": norms, "lora_inputs": lora, "attention": attention, "mlp": mlp, "loss_head": loss},
                      shape, job, batch, seq_len, norm)


def weight_bytes(shape: ModelShape, job: JobSpec) -> tuple[int, int]:
    """(frozen base bytes as stored, trainable bytes).

    ``sketchtune`` stores each target projection as codes bit-packed densely (``ceil(in·b/8)``
    bytes per row, ``quant/bitpack.py``) plus the fp16 ``table_init`` it was built with (kept for
    the exported delta); the trainable ``table`` (out, GPR, 2**b) is in the compute dtype
    (``SketchLinear``). Embeddings, lm_head, norms and projections it does not target stay as
    loaded, in the compute dtype.
    """
    a = DTYPE_BYTES[job.dtype]
    linears = shape.linear_shapes()
    frozen = trainable = 0
    for name, (o, i) in linears.items():
        numel = o * i * shape.layers
        if (job.recipe == "qlora" or (job.recipe == "s2a" and job.s2a_nf4)) and name in job.targets:
            frozen += nf4_bytes(o * i, job.blocksize, job.double_quant) * shape.layers  # one NF4Weight per layer
        elif job.recipe == "sketchtune" and name in job.targets:
            table = o * job.groups_per_row * (1 << job.bits) * shape.layers
            frozen += o * -(-i * job.bits // 8) * shape.layers + 2 * table  # packed codes + fp16 table_init
            trainable += table * a
        else:
            frozen += numel * a
    norms = (2 * shape.layers + 1) * shape.hidden * a
    tables = 1 if shape.tied else 2  # the input embedding, and an untied lm_head
    if job.embed_nf4:  # NF4 in the linears' layout; a tied head is the embedding itself, stored once
        frozen += tables * nf4_bytes(shape.vocab * shape.hidden, job.blocksize, job.double_quant)
    else:
        frozen += tables * shape.vocab * shape.hidden * a
    frozen += shape.layers * shape.bias_numel * a + norms
    frozen += 2 * (shape.head_dim // 2) * 4  # the rotary embedding's fp32 inv_freq and original_inv_freq buffers
    if job.recipe == "s2a":
        length, rank = job.s2a_prompt
        per_block = (sum(o for o, _ in linears.values()) + 2 * shape.hidden) * job.s2a_bias
        per_block += (length * rank + rank * shape.hidden) if length else 0
        # the side branch: per side block fc1 and fc2 (d x d + bias each), and the up-projection U (C x d)
        d = job.side_dim
        side = side_blocks(shape, job) * (2 * d * d + 2 * d) + (d * shape.hidden if job.side else 0)
        return frozen, (per_block * shape.layers + side) * a
    if job.recipe == "sketchtune":
        if job.train_norms:
            frozen, trainable = frozen - norms, trainable + norms
        return frozen, trainable
    trainable = sum(job.r * (o + i) for n, (o, i) in linears.items() if n in job.targets) * shape.layers * a
    return frozen, trainable


# ----------------------------------------------------------------------------------- image models
#
# ViT (LoRA or QLoRA on the projections, the classifier head trained) and ResNet (full fine-tuning:
# edgetune has no LoRA for convolutions). Both see a fixed input per image, so the batch is the only
# axis the planner picks. What autograd keeps per ViT block (``tests/test_planner_vision.py``):
#
#   LayerNorm (x2)   input (N·d) + float32 mean and rstd (N each); block 0's first saves nothing
#   LoRA inputs      LN output read by q/k/v (N·d), by fc1 (N·d); the GELU output read by fc2 (N·f);
#                    o_proj reads SDPA's output, already saved; x·Aᵀ (N·r) per adapted projection
#   attention        q, k, v, output (N·d each) + float32 log-sum-exp (N·h)
#   GELU             its input (N·f)
#   head             final LayerNorm as above, and the classifier's input: a [CLS] slice whose
#                    storage is the whole LN output (N·d); log-probs (B·L fp32), labels, total_weight
#
# with N = batch × tokens. Under the S2A rewrite (act-bits 8/4) every N·d/N·f tensor above is kept in
# 8-bit groups of 64, the GELU input too at act-bits 8 and as 4-bit derivative codes (N·f/2 bytes) at 4;
# x·Aᵀ and the head stay as they are.


def _vit_targets(job: "JobSpec") -> tuple[str, ...]:
    if tuple(job.targets) == LLAMA_PROJ:  # the LM default ("all") means every ViT projection
        return VIT_PROJ
    unknown = sorted(set(job.targets) - set(VIT_PROJ))
    if unknown:
        raise EdgetuneError(f"unknown ViT projection(s) {', '.join(unknown)}; choose from {', '.join(VIT_PROJ)}")
    return tuple(job.targets)


def vit_activation_bytes(shape: VitShape, job: "JobSpec", batch: int) -> dict[str, int]:
    """Bytes autograd saves for backward in a ViT with LoRA (see the block comment above)."""
    n = batch * shape.tokens
    a = DTYPE_BYTES[job.dtype]
    d, f, h = shape.hidden, shape.ffn, shape.heads
    t = set(_vit_targets(job))
    qkv, o, fc1, fc2 = bool(t & {"q_proj", "k_proj", "v_proj"}), "o_proj" in t, "fc1" in t, "fc2" in t
    if job.act_bits == 16:
        nd, nf, gelu = n * d * a, n * f * a, n * f * a
    else:
        nd, nf = _q8(n * d), _q8(n * f)
        gelu = nf if job.act_bits == 8 else -(-n * f // 2)  # 4-bit derivative codes only at act-bits 4
    ln = nd + 2 * 4 * n
    attn = 4 * nd + 4 * n * h
    r = _lora_rank(job)
    after_attn = qkv or o
    rest = shape.layers - 1
    norms = rest * 2 * ln + (ln if after_attn else 0) + ln  # + the final LayerNorm
    attention = rest * attn + (attn if qkv else 0)
    lora_in = (nd * qkv + nd * fc1 + nf * fc2) * shape.layers + (nd if o and not qkv else 0)  # block 0: o's own input
    mlp = rest * gelu + (gelu if after_attn or fc1 else 0)
    hiddens = shape.layers * n * r * len(t) * a
    head = n * d * a + batch * shape.labels * 4 + batch * 8 + 4
    return {"norms": norms, "lora_inputs": lora_in + hiddens, "attention": attention, "mlp": mlp, "head": head}


def vit_weight_bytes(shape: VitShape, job: "JobSpec") -> tuple[int, int]:
    """(frozen bytes, trainable bytes): NF4 targets under qlora, LoRA A/B and the classifier train."""
    a = DTYPE_BYTES[job.dtype]
    t = _vit_targets(job)
    frozen = shape.frozen_numel() * a
    for name, (o, i) in shape.linear_shapes().items():
        if job.recipe == "qlora" and name in t:
            frozen += shape.layers * nf4_bytes(o * i, job.blocksize, job.double_quant)
        else:
            frozen += shape.layers * o * i * a
    lora = sum(job.r * (o + i) for n, (o, i) in shape.linear_shapes().items() if n in t) * shape.layers
    return frozen, (lora + shape.hidden * shape.labels + shape.labels) * a


def _conv_out(size: int, kernel: int, stride: int) -> int:
    return (size + 2 * (kernel // 2) - kernel) // stride + 1  # padding kernel // 2, as transformers' ResNet


def resnet_walk(shape: ResNetShape, batch: int, a: int, recipe: str = "full", act_bits: int = 16) -> dict[str, int]:
    """Walk a bottleneck ResNet: saved bytes by layer type, params, buffers, forward FLOPs.

    ``full`` fine-tuning trains everything; ``norm`` trains the BatchNorm affine parameters and the
    classifier with the convolutions frozen (as in ``tests/s2a/test_vision_resnet.py``). Plain
    autograd (act-bits 16) saves every convolution's input, even a frozen one's, as long as
    anything before it trains (inputs are the previous ReLU's output, shared, so only the
    max-pool output is new, and the pixels under ``full``), every BatchNorm's input plus float32
    batch mean and inverse std per channel, every ReLU's output, the max-pool's int64 indices,
    and the classifier's pooled input. The S2A rewrite (act-bits 8 or 4, ``norm`` only;
    ``edgetune/s2a/vision.py``) keeps no input for a frozen convolution, the BatchNorm input in
    8-bit groups of 64 (flat NCHW) with the same per-channel statistics, 1 bit per ReLU output,
    4 bits per max-pool position, and nothing for the global average pool.
    """
    if recipe not in ("full", "norm"):
        raise EdgetuneError(f"ResNet is planned for recipes 'full' (everything trains) and 'norm' (BatchNorm "
                            f"and classifier train), not {recipe!r}: edgetune has no LoRA for convolutions")
    lean = act_bits != 16
    if lean and recipe == "full":
        raise EdgetuneError("the planner has full ResNet fine-tuning at act-bits 16 only (trained convolutions "
                            "keep their inputs); use recipe 'norm' for --act-bits 8/4")
    out = {"conv_inputs": 0, "batchnorm": 0, "relu": 0, "pool": 0, "head": 0, "params": 0, "trainable": 0,
           "buffers": 0, "flops": 0, "largest": 0}
    b = batch

    def conv(cin, cout, k, hin, stride):
        hout = _conv_out(hin, k, stride)
        out["params"] += cout * cin * k * k
        out["trainable"] += cout * cin * k * k if recipe == "full" else 0
        out["flops"] += 2 * b * hout * hout * cin * cout * k * k
        bn(cout, hout)
        return hout

    def bn(c, hw):
        numel = b * c * hw * hw
        out["batchnorm"] += (_q8(numel) if lean else numel * a) + 2 * c * 4
        out["params"] += 2 * c
        out["trainable"] += 2 * c
        out["buffers"] += 2 * c * a + 8  # running mean and var, num_batches_tracked (int64)
        out["largest"] = max(out["largest"], numel * a)

    def relu(numel):
        out["relu"] += -(-numel // 8) if lean else numel * a

    h = shape.image
    if recipe == "full":
        out["conv_inputs"] += b * shape.channels * h * h * a  # the pixels (the stem's weight gradient)
    h = conv(shape.channels, shape.embedding, 7, h, 2)
    relu(b * shape.embedding * h * h)
    h = _conv_out(h, 3, 2)  # max-pool 3x3, stride 2, padding 1
    pooled = b * shape.embedding * h * h
    out["pool"] += -(-pooled // 2) if lean else pooled * 8
    if not lean:
        out["conv_inputs"] += pooled * a  # the first block's input is the pool's output
    cin = shape.embedding
    for s, (c, depth) in enumerate(zip(shape.hidden_sizes, shape.depths)):
        for j in range(depth):
            stride = (2 if s or shape.downsample_in_first_stage else 1) if j == 0 else 1
            m = c // 4
            s1, s2 = (stride, 1) if shape.downsample_in_bottleneck else (1, stride)
            h1 = conv(cin, m, 1, h, s1)
            relu(b * m * h1 * h1)
            h2 = conv(m, m, 3, h1, s2)
            relu(b * m * h2 * h2)
            conv(m, c, 1, h2, 1)
            if cin != c or stride != 1:
                conv(cin, c, 1, h, stride)  # the projection shortcut
            relu(b * c * h2 * h2)
            cin, h = c, h2
    out["head"] += b * cin * a + b * shape.labels * 4 + b * 8 + 4  # pooled input, log-probs, labels, total_weight
    out["params"] += cin * shape.labels + shape.labels
    out["trainable"] += cin * shape.labels + shape.labels
    out["flops"] += 2 * b * cin * shape.labels
    return out


def _vision_plan(shape, job: "JobSpec", profile: DeviceProfile, batch: int) -> "Plan":
    if job.embed_nf4:
        raise EdgetuneError("--embed-nf4 applies to language models: image models have no token embedding")
    a = DTYPE_BYTES[job.dtype]
    if isinstance(shape, ResNetShape):
        walk = resnet_walk(shape, batch, a, job.recipe, job.act_bits)
        acts = {k: walk[k] for k in ("conv_inputs", "batchnorm", "relu", "pool", "head")}
        plain = resnet_walk(shape, batch, a, job.recipe, 16)
        uncompressed = sum(plain[k] for k in acts)
        per_block = None  # stages differ in size: no one-block model, the CPU fraction is used everywhere
        frozen = walk["buffers"] + (walk["params"] - walk["trainable"]) * a
        trainable = walk["trainable"] * a
        workspace = {"backward_workspace": 2 * walk["largest"]}  # one layer's grad_input and grad_output
        # forward and input gradients, plus weight gradients when the convolutions train
        flops = (3 if job.recipe == "full" else 2) * walk["flops"]
    else:
        if job.recipe not in ("lora", "qlora"):
            raise EdgetuneError(f"the planner has ViT formulas for recipes lora and qlora, not {job.recipe!r}")
        acts = vit_activation_bytes(shape, job, batch)
        plain_vit = vit_activation_bytes(shape, dataclasses.replace(job, act_bits=16), batch)
        uncompressed = sum(plain_vit.values())
        per_block = (uncompressed - plain_vit["head"]) // shape.layers
        frozen, trainable = vit_weight_bytes(shape, job)
        n, d = batch * shape.tokens, shape.hidden
        dequant = nf4_decode_bytes(shape.hidden * shape.ffn, a, profile.accelerator, job.blocksize,
                                   job.double_quant) if job.recipe == "qlora" else 0
        workspace = {"attention_workspace": 4 * n * d * a, "weight_workspace": dequant}
        lin = shape.layers * sum(o * i for o, i in shape.linear_shapes().values())
        flops = 2 * (2 * n * lin + 4 * batch * shape.tokens ** 2 * d * shape.layers)  # forward + input grads
    components = {"weights": frozen, "trainable": trainable, "gradients": trainable, "optimizer": 2 * trainable,
                  "activations": sum(acts.values()),
                  "activation_transients": transient_bytes(profile.accelerator, uncompressed, per_block),
                  **workspace}
    components["overhead"] = overhead_bytes(profile, sum(components.values()))
    total = sum(components.values())
    step = flops / (profile.peak_tflops * 1e12 * 0.5) + 2 * (frozen + trainable) / (profile.memory_bandwidth_gbps * 1e9)
    return Plan(total <= profile.usable_bytes, profile.usable_bytes, total, batch, shape.tokens, components, acts,
                profile.name, job.recipe, round(step, 3), step_flops=int(flops), image_size=shape.image)


def _choose_vision(shape, job: "JobSpec", profile: DeviceProfile, batch: int | None, seq_len: int | None) -> "Plan":
    """Image models: the batch is the only axis; a missing one is the largest that fits (up to 4096)."""
    if seq_len is not None:
        raise EdgetuneError("--seq-len does not apply to image models: every image is the same size; "
                            "the planner picks --batch")
    if batch is not None:
        plan = _vision_plan(shape, job, profile, batch)
    elif not _vision_plan(shape, job, profile, 1).fits:
        plan = _vision_plan(shape, job, profile, 1)
    else:
        lo, hi = 1, 2
        while hi <= 4096 and _vision_plan(shape, job, profile, hi).fits:
            lo, hi = hi, hi * 2
        while hi - lo > 1:  # largest fitting batch in [lo, hi)
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if _vision_plan(shape, job, profile, mid).fits else (lo, mid)
        plan = _vision_plan(shape, job, profile, min(lo, 4096))
    if not plan.fits:
        if isinstance(shape, VitShape) and job.act_bits != 4 and \
                _vision_plan(shape, dataclasses.replace(job, act_bits=4), profile, plan.batch).fits:
            plan.suggestion = "use --act-bits 4 (compressed saved activations)"
        elif isinstance(shape, VitShape) and job.recipe == "lora" and \
                _vision_plan(shape, dataclasses.replace(job, recipe="qlora"), profile, plan.batch).fits:
            plan.suggestion = "use --recipe qlora (NF4 base weights)"
        elif plan.batch > 1 and _vision_plan(shape, job, profile, 1).fits:
            plan.suggestion = "use a smaller --batch"
        else:
            plan.suggestion = "no setting fits this device; choose a smaller model or a device with more memory"
    return plan


def plan_job(shape: ModelShape, job: JobSpec, profile: DeviceProfile, batch: int, seq_len: int) -> Plan:
    if isinstance(shape, (VitShape, ResNetShape)):
        return _vision_plan(shape, job, profile, batch)
    frozen, trainable = weight_bytes(shape, job)
    acts = saved_activation_bytes(shape, job, batch, seq_len)
    # The forward's intermediates are full precision whatever backward keeps of them; a side-only
    # s2a job saves nothing in the backbone but its forward still makes the same ones.
    plain = saved_activation_bytes(shape, dataclasses.replace(job, act_bits=16, side=False,
                                                              s2a_bias=job.s2a_bias or not _backbone_records(job)),
                                   batch, seq_len)
    n = batch * seq_len
    a = DTYPE_BYTES[job.dtype]
    qd, kvd = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    # Transients at the peak (start of backward): the loss head's workspace (loss_workspace_bytes),
    # one block's attention gradients, and one projection's decoded or gathered weight.
    loss_ws = loss_workspace_bytes(shape, job, batch, seq_len, profile.accelerator)
    attn_ws = n * (2 * qd + 2 * kvd) * a
    # qlora (and s2a on an NF4 base) dequantizes, sketchtune gathers, one dense projection at a time;
    # the NF4 decoder's intermediates are alive while it decodes (nf4_decode_bytes; not monotone in
    # the size on the CPU, where small tensors take the torch path: the max over the targets)
    sizes = {o * i for n, (o, i) in shape.linear_shapes().items() if n in job.targets}
    largest = max(sizes, default=0)
    if job.recipe == "qlora" or (job.recipe == "s2a" and job.s2a_nf4):
        dequant_ws = max((nf4_decode_bytes(s, a, profile.accelerator, job.blocksize, job.double_quant)
                          for s in sizes), default=0)
    else:
        dequant_ws = largest * a if job.recipe == "sketchtune" else 0
    components = {
        "weights": frozen,
        "trainable": trainable,
        "gradients": trainable,
        "optimizer": 2 * trainable,
        "activations": sum(acts.values()),
        "activation_transients": transient_bytes(profile.accelerator, sum(plain.values()),
                                                 (sum(plain.values()) - plain["loss_head"]) // shape.layers,
                                                 CUDA_TRANSIENT_BLOCKS if _backbone_records(job) else 1),
        "attention_workspace": attn_ws,
        "weight_workspace": dequant_ws,  # one decoded (qlora, s2a nf4) or gathered (sketchtune) projection
        "loss_workspace": loss_ws,
    }
    components["overhead"] = overhead_bytes(profile, sum(components.values()))
    total = sum(components.values())
    # forward + input gradients; a side-only s2a job runs no backbone backward (autograd recorded none)
    flops = 2 * n * (shape.params - shape.vocab * shape.hidden * (0 if shape.tied else 1)) * (2 if _backbone_records(job) else 1)
    step = flops / (profile.peak_tflops * 1e12 * 0.5) + 2 * (frozen + trainable) / (profile.memory_bandwidth_gbps * 1e9)
    return Plan(total <= profile.usable_bytes, profile.usable_bytes, total, batch, seq_len, components, acts,
                profile.name, job.recipe, round(step, 3), step_flops=int(flops))


def _seq_candidates(context: int) -> list[int]:
    out, t = [], 64
    while t <= context:
        out.append(t)
        t *= 2
    if context not in out:
        out.append(context)
    return out


def choose(shape: ModelShape, job: JobSpec, profile: DeviceProfile, batch: int | None = None,
           seq_len: int | None = None) -> Plan:
    """The plan for the given batch/seq_len; a missing one is the largest that fits (seq_len first)."""
    if isinstance(shape, (VitShape, ResNetShape)):
        return _choose_vision(shape, job, profile, batch, seq_len)
    if seq_len is not None and seq_len > shape.context:
        raise EdgetuneError(f"--seq-len {seq_len} is beyond the model's context of {shape.context} tokens")
    seqs = [seq_len] if seq_len else _seq_candidates(shape.context)
    chosen = None
    for t in seqs:
        p = plan_job(shape, job, profile, batch or 1, t)
        if p.fits:
            chosen = p
        elif chosen is not None:
            break
    if chosen is None:
        failed = plan_job(shape, job, profile, batch or 1, seqs[0])
        failed.suggestion = suggest(shape, job, profile, batch or 1, seqs[0])
        return failed
    if batch is None:
        b = 1
        while plan_job(shape, job, profile, b * 2, chosen.seq_len).fits and b < 256:
            b *= 2
        chosen = plan_job(shape, job, profile, b, chosen.seq_len)
    return chosen


def suggest(shape: ModelShape, job: JobSpec, profile: DeviceProfile, batch: int, seq_len: int) -> str:
    """The cheapest change that makes the job fit, as advice a person can act on."""
    if job.act_bits != 4 and plan_job(shape, dataclasses.replace(job, act_bits=4), profile, batch, seq_len).fits:
        return "use --act-bits 4 (compressed saved activations)"
    if job.recipe == "lora" and plan_job(shape, dataclasses.replace(job, recipe="qlora"), profile, batch, seq_len).fits:
        return "use --recipe qlora (NF4 base weights)"
    # NF4 embeddings (qlora, sketchtune): before any shorter sequence, which changes the task itself
    embed = "use --embed-nf4 (NF4 embedding" + (")" if shape.tied else " and lm_head)")
    if job.recipe in ("qlora", "sketchtune") and not job.embed_nf4:
        nf4 = dataclasses.replace(job, embed_nf4=True)
        if plan_job(shape, nf4, profile, batch, seq_len).fits:
            return embed
        if job.act_bits != 4 and plan_job(shape, dataclasses.replace(nf4, act_bits=4), profile, batch, seq_len).fits:
            return "use --act-bits 4 --embed-nf4"
    if job.recipe == "lora" and plan_job(shape, dataclasses.replace(job, recipe="qlora", embed_nf4=True), profile,
                                         batch, seq_len).fits:
        return "use --recipe qlora --embed-nf4"
    for t in sorted((s for s in _seq_candidates(shape.context) if s < seq_len), reverse=True):
        if plan_job(shape, job, profile, 1, t).fits:
            return f"use --batch 1 --seq-len {t}"
    if job.recipe == "lora":
        for t in sorted((s for s in _seq_candidates(shape.context) if s < seq_len), reverse=True):
            if plan_job(shape, dataclasses.replace(job, recipe="qlora"), profile, 1, t).fits:
                return f"use --recipe qlora --batch 1 --seq-len {t}"
    return "no setting fits this device; choose a smaller model or a device with more memory"


# Each recipe's compile-time default for NF4 double quantization (QLoraConfig / S2AConfig; a test
# keeps these equal), so that ``plan`` without --double-quant plans what ``compile`` would build.
DOUBLE_QUANT_DEFAULT = {"qlora": True, "s2a": False}


def job_from_options(recipe: str, *, dtype: str, act_bits: int = 16, rank: int = 16, bits: int = 4,
                     groups_per_row: int = 4, double_quant: bool | None = None, embed_nf4: bool = False,
                     side: bool | None = None, side_dim: int | None = None, side_every: int | None = None,
                     bias: bool | None = None, prompt_len: int | None = None, hidden: int | None = None) -> JobSpec:
    """The job ``edgetune plan`` describes: options a recipe does not have are refused, and those not
    given take the recipe's compile-time defaults."""
    s2a_opts = {"--side": side, "--side-dim": side_dim, "--side-every": side_every, "--bias": bias,
                "--prompt-len": prompt_len}
    foreign = [k for k, v in s2a_opts.items() if v is not None] if recipe != "s2a" else []
    if embed_nf4 and recipe not in ("qlora", "sketchtune"):
        foreign.append("--embed-nf4")
    if double_quant is not None and recipe not in ("qlora", "s2a") and not (recipe == "sketchtune" and embed_nf4):
        foreign.append("--double-quant")
    if foreign:
        raise EdgetuneError(f"recipe {recipe!r} has no option(s) {', '.join(foreign)}")
    dq = DOUBLE_QUANT_DEFAULT.get(recipe, JobSpec.double_quant) if double_quant is None else double_quant
    job = JobSpec(recipe, rank if recipe in ("lora", "qlora") else 0, dtype=dtype, act_bits=act_bits,
                  double_quant=dq, bits=bits, groups_per_row=groups_per_row, embed_nf4=embed_nf4)
    if embed_nf4 and hidden is not None and hidden % job.blocksize:
        raise EdgetuneError(f"--embed-nf4 needs the hidden size ({hidden}) to be a multiple of the NF4 block size "
                            f"({job.blocksize}), so that rows decode on their own")
    if recipe != "s2a":
        return job
    from .methods.s2a.config import S2AConfig  # the runtime's own validation (imports torch: s2a plans only)

    given = {k: v for k, v in dict(side=side, side_dim=side_dim, side_every=side_every, bias=bias,
                                   prompt_len=prompt_len).items() if v is not None}
    try:
        cfg = S2AConfig(double_quant=dq, **given)
    except ValueError as exc:
        raise EdgetuneError(f"s2a: {exc}") from None
    if cfg.side and hidden is not None and not 1 <= cfg.side_dim <= hidden:
        raise EdgetuneError(f"--side-dim must be in [1, hidden size {hidden}], got {cfg.side_dim}")
    return dataclasses.replace(job, blocksize=cfg.blocksize, s2a_bias=cfg.bias, s2a_prompt=(cfg.prompt_len,
                               cfg.prompt_rank), s2a_nf4=cfg.base == "nf4", side=cfg.side, side_dim=cfg.side_dim,
                               side_every=cfg.side_every)


def job_for(model) -> JobSpec | None:
    """The planner's view of a compiled model, or None for recipes it has no formula for."""
    info = getattr(model, "edgetune", None)
    if info is None or info.recipe not in RECIPES or getattr(info, "task", "causal-lm") != "causal-lm":
        return None  # no formula for image classifiers
    cfg = info.config
    from .models.arch import arch_for

    if info.recipe == "s2a":
        return JobSpec("s2a", 0, tuple(arch_for(model.config).linear_names), cfg.blocksize, cfg.double_quant,
                       info.dtype, info.compression.act_bits, info.compression.gate_code4, cfg.bias,
                       (cfg.prompt_len, cfg.prompt_rank), cfg.base == "nf4", side=cfg.side, side_dim=cfg.side_dim,
                       side_every=cfg.side_every)

    targets = cfg.resolve_targets(arch_for(model.config).linear_names)
    if info.recipe == "sketchtune":
        return JobSpec("sketchtune", 0, tuple(targets), getattr(cfg, "blocksize", 64),
                       getattr(cfg, "double_quant", JobSpec.double_quant), dtype=info.dtype,
                       act_bits=info.compression.act_bits, gate_code4=info.compression.gate_code4, bits=cfg.bits,
                       groups_per_row=cfg.groups_per_row, train_norms=cfg.train_norms,
                       embed_nf4=getattr(cfg, "embed_nf4", False))
    return JobSpec(info.recipe, cfg.r, tuple(targets), getattr(cfg, "blocksize", 64),
                   getattr(cfg, "double_quant", False), info.dtype, info.compression.act_bits,
                   info.compression.gate_code4, embed_nf4=getattr(cfg, "embed_nf4", False))


def plan_for_model(model, batch: int | None = None, seq_len: int | None = None) -> Plan | None:
    """Plan a compiled model on its own device profile; None where the planner has no formula."""
    job = job_for(model)
    if job is None:
        return None
    try:
        shape = ModelShape.from_config(model.config)
    except EdgetuneError:
        return None
    return choose(shape, job, model.edgetune.device, batch, seq_len)


def format_bytes(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.1f} MiB"
