"""The S2A rewrite on vision models: saved-activation bytes of ViT-B/16 and ResNet-50 vs their peers.

    OMP_NUM_THREADS=1 python benchmarks/s2a_vision.py --threads 1      # both, 224², batch 32
    python benchmarks/s2a_vision.py --models resnet --batch 4          # smaller

Both sides: ``transformers.ViTForImageClassification(ViTConfig())`` (ViT-B/16: 12 blocks, d=768,
224² input, 1000 classes) with random weights and the same LoRA (r=16, alpha=32) on the query,
key, value and both MLP projections of every block; everything else frozen except the
classifier. PEFT LoRA is the peer; edgetune wraps the same projections in its ``LoraLinear``
and runs the activation-lean rewrite (LayerNorm 8-bit, GELU 4-bit derivative codes, attention
8-bit, LoRA inputs 8-bit). Saved bytes come from one forward under ``saved_tensors_hooks``
(unique storages, parameters excluded; no backward needed to count them). A small-batch
backward gives the cosine similarity of the LoRA gradients against the uncompressed model.

ResNet-50 (``transformers.ResNetForImageClassification(ResNetConfig())``, random weights, batch
statistics in train mode): the trainable set is the BatchNorm affine parameters and the
classifier (norm tuning; edgetune has no LoRA for convolutions). The peer is plain torch
fine-tuning of that same set; PEFT LoRA (r=16 on every convolution, classifier trained, BatchNorm
frozen) is printed as a second reference with a different trainable set. edgetune rewrites
BatchNorm (8-bit input + per-channel stats), ReLU (1 bit), frozen convolutions (no saved input),
max pooling (4-bit window positions) and global average pooling (nothing saved); act-bits 8 and 4
are the same for it (no GELU/SiLU).

Prints tables; asserts nothing.
"""
from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from common import MIB, SavedTensors, frozen_storage_ptrs  # noqa: E402

warnings.filterwarnings("ignore")
TARGETS = ("q_proj", "k_proj", "v_proj", "fc1", "fc2")


def vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    model = ViTForImageClassification(ViTConfig(num_labels=1000))
    for p in model.parameters():
        p.requires_grad_(False)
    for p in model.classifier.parameters():
        p.requires_grad_(True)
    return model


def _targets(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("vit.layers")
            and n.endswith(TARGETS)]


def edgetune_lora(model, act_bits: int):
    from edgetune.methods.lora.layer import LoraLinear
    from edgetune.s2a.functions import Compression
    from edgetune.s2a.rewriter import rewrite

    g = torch.Generator().manual_seed(0)
    for path in _targets(model):
        parent, _, leaf = path.rpartition(".")
        old = model.get_submodule(path)
        lora = LoraLinear(old, old.in_features, old.out_features, 16, 32.0)
        lora.reset_parameters(g)
        with torch.no_grad():
            lora.lora_B.normal_(0, 0.01, generator=g)
        setattr(model.get_submodule(parent), leaf, lora)
    report = rewrite(model, Compression(act_bits))
    return model, report


def peft_lora(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=_targets(model),
                                            modules_to_save=["classifier"]))


def resnet50():
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    model = ResNetForImageClassification(ResNetConfig(num_labels=1000))
    for p in model.parameters():
        p.requires_grad_(False)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.Linear)):
            for p in m.parameters():
                p.requires_grad_(True)
    return model


def resnet_peft(model):
    from peft import LoraConfig, get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=convs, modules_to_save=["classifier"]))


def saved(model, pixels, labels) -> int:
    rec = SavedTensors(frozen_storage_ptrs(model))
    model.train()
    with rec.record():
        loss = nn.functional.cross_entropy(model(pixel_values=pixels).logits, labels)
    del loss
    return rec.nbytes


def grads(model, pixels, labels) -> torch.Tensor:
    model.train()
    model.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(pixel_values=pixels).logits, labels).backward()
    return torch.cat([p.grad.flatten() for n, p in model.named_parameters()
                      if p.grad is not None and ("lora" in n or "classifier" not in n)])


def _table(title: str, rows, peer: int) -> None:
    print(f"\n{title}")
    print(f"{'config':22} {'saved MiB':>10} {'vs peer':>8} {'grad cos':>10}")
    for name, b, cos in rows:
        print(f"{name:22} {b / MIB:10.1f} {b / peer:8.3f} {'' if cos is None else f'{cos:.5f}':>10}")


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def run_vit(args, pixels, labels) -> None:
    from edgetune.s2a.functions import Compression
    from edgetune.s2a.rewriter import rewrite

    base = vit()
    rows = []
    peft = peft_lora(copy.deepcopy(base))
    rows.append(("peft-lora", saved(peft, pixels, labels), None))
    del peft
    plain, _ = edgetune_lora(copy.deepcopy(base), 16)
    del base
    gb = args.grad_batch
    g16 = grads(plain, pixels[:gb], labels[:gb]) if gb else None
    rows.append(("edgetune@16", saved(plain, pixels, labels), None))
    for bits in (8, 4):
        lean = copy.deepcopy(plain)
        report = rewrite(lean, Compression(bits))
        cos = _cos(grads(lean, pixels[:gb], labels[:gb]), g16) if gb else None
        rows.append((f"edgetune@{bits}", saved(lean, pixels, labels), cos))
        if bits == 4:
            print("ViT rewritten:", {k: len(v) for k, v in report.changed.items()}, "unknown:", report.unknown)
        del lean
    _table(f"ViT-B/16, 224², batch {args.batch}, LoRA r=16 on q/k/v/fc1/fc2 (+ classifier); peer: PEFT LoRA; "
           f"LoRA-grad cosine vs edgetune@16 at batch {gb}", rows, rows[0][1])


def run_resnet(args, pixels, labels) -> None:
    from edgetune.s2a.functions import Compression
    from edgetune.s2a.rewriter import rewrite

    base = resnet50()
    rows = []
    gb = max(args.grad_batch, 2)  # batch statistics need two images
    plain = copy.deepcopy(base)
    g_plain = grads(plain, pixels[:gb], labels[:gb]) if args.grad_batch else None
    rows.append(("plain (BN affine + fc)", saved(plain, pixels, labels), None))
    del plain
    peft = resnet_peft(copy.deepcopy(base))
    rows.append(("peft-lora convs r=16", saved(peft, pixels, labels), None))
    del peft
    lean = copy.deepcopy(base)
    report = rewrite(lean, Compression(4))
    print("ResNet rewritten:", {k: len(v) for k, v in report.changed.items()}, "unknown:", report.unknown)
    cos = _cos(grads(lean, pixels[:gb], labels[:gb]), g_plain) if args.grad_batch else None
    rows.append(("edgetune@4 (= @8)", saved(lean, pixels, labels), cos))
    _table(f"ResNet-50, 224², batch {args.batch}, norm tuning (BN affine + classifier); peer: plain torch, same "
           f"trainable set; gradient cosine vs plain at batch {gb}", rows, rows[0][1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--grad-batch", type=int, default=2, help="batch of the gradient-cosine backward (0: skip)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="vit,resnet", help="comma separated: vit, resnet")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(args.batch, 3, 224, 224, generator=g)
    labels = torch.randint(0, 1000, (args.batch,), generator=g)
    print(f"torch {torch.__version__}, {args.threads} thread(s)")
    for name in args.models.split(","):
        {"vit": run_vit, "resnet": run_resnet}[name.strip()](args, pixels, labels)


if __name__ == "__main__":
    main()
