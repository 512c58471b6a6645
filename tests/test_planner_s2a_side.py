"""The planner's s2a lite-side-branch formula against autograd on tiny models, per byte.

Derived from edgetune/methods/s2a/side.py: n_side = ceil(L / every) + 1 side blocks; each SideMLP
saves its input u (N, d) and the up-projection its input s (N, d), uncompressed at every act-bits:
(n_side + 1)·N·d·dtype bytes. Trainable: n_side·(2d² + 2d) + d·C. Side-only (no bias, no prompt)
records no backbone op at all: the final norm and the loss head are all the backbone saves.
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from edgetune.compiler import compile_model
from edgetune.memory import saved_bytes_of_step
from edgetune.planner import JobSpec, ModelShape, job_for, saved_activation_bytes, side_blocks, weight_bytes
from test_planner_weights import stored_bytes

CFG = dict(vocab_size=300, hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)


@pytest.mark.parametrize("act_bits", [16, 4])
@pytest.mark.parametrize("opts", [
    {"side": True, "side_dim": 16},
    {"side": True, "side_dim": 16, "side_every": 2},  # ceil(3 / 2) + 1 = 3 side blocks
    {"side": True, "side_dim": 20, "side_every": 3},  # uneven channel pooling (48 / 20)
    {"side": True, "side_dim": 16, "bias": False, "prompt_len": 0},  # side only: no backbone node
])
def test_side_branch_bytes_match_autograd(opts, act_bits):
    torch.manual_seed(0)
    cfg = LlamaConfig(**CFG)
    model = compile_model(AutoModelForCausalLM.from_config(cfg), "s2a", act_bits=act_bits, **opts).train()
    job, shape = job_for(model), ModelShape.from_config(cfg)
    assert (job.side, job.side_dim, job.side_every) == (True, opts["side_dim"], opts.get("side_every", 1))
    ids = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    measured = saved_bytes_of_step(model, {"input_ids": ids, "labels": ids})
    predicted = saved_activation_bytes(shape, job, 2, 24)
    assert sum(predicted.values()) == measured, (predicted, measured)
    n_side = side_blocks(shape, job)
    assert predicted["side"] == (n_side + 1) * 2 * 24 * job.side_dim * 4  # fp32 model
    assert weight_bytes(shape, job) == stored_bytes(model)
    side = sum(p.numel() for n, p in model.named_parameters() if "s2a_side" in n)
    d = job.side_dim
    assert side == n_side * (2 * d * d + 2 * d) + d * cfg.hidden_size


def test_side_only_plans_far_smaller_than_bias_tuning():
    from edgetune.planner import choose, shape_for
    from edgetune.profiles import load_profile

    shape, nano = shape_for("llama-3.2-3b"), load_profile("jetson-orin-nano-8gb")
    bias = choose(shape, JobSpec("s2a", 0, dtype="bfloat16", act_bits=4), nano, 1, 1024)
    side = choose(shape, JobSpec("s2a", 0, dtype="bfloat16", act_bits=4, s2a_bias=False, s2a_prompt=(0, 4),
                                 side=True), nano, 1, 1024)
    assert side.activations["attention"] == 0 and side.activations["side"] > 0
    assert side.components["activations"] < 0.1 * bias.components["activations"]
    assert side.step_flops < bias.step_flops  # no backbone backward
