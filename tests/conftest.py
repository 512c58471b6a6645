"""Shared fixtures: a tiny tokenizer and tiny random models built offline, in seconds."""
from __future__ import annotations

import os

# Tiny models run fastest on one thread, and subprocesses inherit this; the real-model test
# raises the thread count for itself.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
# Triton kernels are tested on the CPU through its interpreter. The variable must be set before
# anything imports triton (peft and bitsandbytes do, during collection), or triton.language's own
# helpers are built for compiled mode and the interpreter cannot call them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tiny_models import build_tiny_model, build_tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture
def tiny_llama(tiny_tokenizer):
    return build_tiny_model("llama", len(tiny_tokenizer))


@pytest.fixture(scope="session")
def tiny_hf_dir(tmp_path_factory, tiny_tokenizer):
    """A Hugging Face model directory (config.json + safetensors + tokenizer) of a tiny Llama."""
    path = tmp_path_factory.mktemp("tiny-llama-hf")
    model = build_tiny_model("llama", len(tiny_tokenizer))
    model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path
