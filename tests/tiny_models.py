"""Tiny tokenizer and tiny random models built offline in seconds, for tests (not fixtures)."""
from __future__ import annotations

import torch

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Edge devices fine-tune small language models with little memory.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "Paris is the capital of France, and Rome is the capital of Italy.",
    "Instruction: explain why the sky is blue. Response: sunlight scatters off air molecules.",
    "def add(a, b):\n    return a + b\n",
] * 20


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<|endoftext|>", unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    return fast


def build_tiny_model(model_type: str, vocab_size: int, seed: int = 0):
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    torch.manual_seed(seed)
    if model_type == "llama":
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          tie_word_embeddings=True)
    elif model_type == "qwen2":
        cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          tie_word_embeddings=False)
    elif model_type == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                         bos_token_id=1, eos_token_id=2)
    else:
        raise ValueError(model_type)
    model = AutoModelForCausalLM.from_config(cfg)
    model.eval()
    return model


def grid(shape, seed=0, lo=-1.0):
    """float64 values on each 8-bit group's grid (so the 8-bit saved forms are lossless in gradcheck):
    lo + k/128, k in [0, 255], with k = 0 and 255 in every group of 64."""
    n = 1
    for s in shape:
        n *= s
    k = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed))
    k[0::64], k[1::64] = 0, 255
    return (lo + k.double() / 128).view(shape).requires_grad_()


def norm_tuning(model: torch.nn.Module) -> torch.nn.Module:
    """Frozen convolutions; BatchNorm affine parameters and the classifier (any Linear) train."""
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.Linear)):
            for p in m.parameters():
                p.requires_grad_(True)
    return model
