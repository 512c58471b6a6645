"""BatchNorm, pooling and ReLU of a ResNet through the rewriter, against plain torch.

The Functions are checked in float64 (gradcheck, with inputs on each 8-bit group's grid so the
saved form is lossless) and against the pure-torch oracle; then whole tiny ResNets — one written
like torchvision's (one in-place ReLU module called several times per block, ``out += identity``)
and transformers' ``ResNetForImageClassification`` — train the same with and without the rewrite.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from edgetune.memory import SavedTensorCounter
from edgetune.s2a.functions import Compression
from edgetune.s2a.modules import LeanActivation
from edgetune.s2a.rewriter import rewrite
from edgetune.s2a.vision import (LeanBatchNorm, LeanBatchNormFrozen, LeanBatchNormTrain, LeanConv2d, LeanGlobalAvgPool,
                                 LeanMaxPool2d, batch_norm_reference)
from tiny_models import grid, norm_tuning

C8 = Compression(act_bits=8)


def _affine(c, seed):
    g = torch.Generator().manual_seed(seed)
    w = (1 + 0.3 * torch.randn(c, dtype=torch.float64, generator=g)).requires_grad_()
    b = torch.randn(c, dtype=torch.float64, generator=g).requires_grad_()
    return w, b


def test_batchnorm_train_gradcheck_and_matches_oracle():
    x = grid((2, 3, 8, 8))  # each (n, c) plane is one group of 64
    w, b = _affine(3, 1)
    assert torch.autograd.gradcheck(lambda x, w, b: LeanBatchNormTrain.apply(x, w, b, None, None, 0.1, 1e-5, C8),
                                    (x, w, b))
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    rm0, rv0 = rm.clone(), rv.clone()
    y = LeanBatchNormTrain.apply(x, w, b, rm, rv, 0.1, 1e-5, C8)
    ref = batch_norm_reference(x, None, None, w, b, True, 0.1, 1e-5)
    assert torch.allclose(y, ref, atol=1e-12)
    assert torch.allclose(y, F.batch_norm(x, rm0, rv0, w, b, True, 0.1, 1e-5), atol=1e-12)
    assert torch.allclose(rm, rm0) and torch.allclose(rv, rv0)  # the same running update as torch
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w, b), dy)
    want = torch.autograd.grad(ref, (x, w, b), dy)
    for a, e in zip(got, want):
        assert torch.allclose(a, e, atol=1e-10)


def test_batchnorm_frozen_gradcheck_and_keeps_x_only_for_a_trained_weight():
    x = grid((2, 2, 4, 8), seed=2)
    w, b = _affine(2, 3)
    rm, rv = torch.tensor([0.1, -0.2], dtype=torch.float64), torch.tensor([0.5, 2.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x, w, b: LeanBatchNormFrozen.apply(x, w, b, rm, rv, 1e-5, C8), (x, w, b))
    ref = batch_norm_reference(x, rm, rv, w, b, False, 0.0, 1e-5)
    assert torch.allclose(LeanBatchNormFrozen.apply(x, w, b, rm, rv, 1e-5, C8), ref, atol=1e-12)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        LeanBatchNormFrozen.apply(x, w.detach(), b, rm, rv, 1e-5, C8)
    assert max(t.numel() for t in saved) == 2  # no copy of x when the weight is frozen: (C,) stats only


@pytest.mark.parametrize("momentum", [0.1, None])
def test_lean_batchnorm_module_tracks_like_torch(momentum):
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(4, momentum=momentum)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    lean = LeanBatchNorm(copy.deepcopy(bn), Compression(4))
    for step in range(3):
        x = torch.randn(3, 4, 8, 8) * (step + 1) + step
        assert torch.allclose(bn(x), lean(x), atol=1e-5)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.allclose(getattr(bn, name).float(), getattr(lean, name).float(), atol=1e-6), name
    bn.eval(), lean.eval()
    x = torch.randn(2, 4, 8, 8)
    assert torch.allclose(bn(x), lean(x), atol=1e-6)
    assert set(bn.state_dict()) == set(lean.state_dict())


@pytest.mark.parametrize("k,s,p", [(3, 2, 1), (2, 2, 0), (3, 1, 1)])
def test_maxpool_4bit_matches_torch(k, s, p):
    x = torch.randn(2, 3, 11, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(k + s)).requires_grad_()
    ref = F.max_pool2d(x, k, s, p)
    pool = LeanMaxPool2d(nn.MaxPool2d(k, s, p))
    y = pool(x)
    assert torch.equal(y, ref)
    dy = torch.randn_like(y)
    assert torch.equal(torch.autograd.grad(y, x, dy)[0], torch.autograd.grad(ref, x, dy)[0])
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        pool(x)
    assert sum(t.numel() * t.element_size() for t in saved) == (y.numel() + 1) // 2  # 4 bits per output


@pytest.mark.parametrize("stride,padding,groups", [(1, 1, 1), (2, 3, 1), (2, 0, 2)])
def test_frozen_conv_keeps_no_input_and_matches_torch(stride, padding, groups):
    g = torch.Generator().manual_seed(stride + padding)
    conv = nn.Conv2d(4, 6, 3, stride, padding, groups=groups).double()
    conv.weight.requires_grad_(False)  # the bias still trains
    lean = LeanConv2d(conv)
    x = torch.randn(2, 4, 9, 7, dtype=torch.float64, generator=g, requires_grad=True)
    y, ref = lean(x), conv(x)
    assert torch.equal(y, ref)
    dy = torch.randn_like(y)
    got, want = torch.autograd.grad(y, (x, conv.bias), dy), torch.autograd.grad(ref, (x, conv.bias), dy)
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(got, want))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lean(x)
    assert [t is conv.weight for t in saved] == [True]  # the weight (a parameter) only
    conv.weight.requires_grad_(True)  # a trainable weight: torch's own convolution, dW included
    assert torch.allclose(torch.autograd.grad(lean(x), conv.weight, dy)[0],
                          torch.autograd.grad(conv(x), conv.weight, dy)[0], atol=1e-12)


def test_global_avg_pool_gradcheck():
    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    pool = LeanGlobalAvgPool()
    assert torch.allclose(pool(x), F.adaptive_avg_pool2d(x, 1))
    assert torch.autograd.gradcheck(pool, (x,))


# --------------------------------------------------------------------------- whole models


class Block(nn.Module):
    """torchvision's BasicBlock: one ``ReLU(inplace=True)`` module used twice, ``out += identity``."""

    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                           if stride != 1 or cin != cout else None)

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class TinyResNet(nn.Module):
    def __init__(self, classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = nn.Sequential(Block(8, 8, 1), Block(8, 16, 2))
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(self.avgpool(self.layer1(x)), 1))


def _run(model, pixels, labels, logits_of=lambda out: out):
    model.train()
    model.zero_grad(set_to_none=True)
    with SavedTensorCounter(model) as c:
        logits = logits_of(model(pixels))
    F.cross_entropy(logits, labels).backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    return logits.detach(), grads, c.bytes


def _parity(plain, lean, pixels, labels, logits_of=lambda out: out):
    l0, g0, b0 = _run(plain, pixels, labels, logits_of)
    l1, g1, b1 = _run(lean, pixels, labels, logits_of)
    assert torch.allclose(l0, l1, atol=1e-4)
    cos = F.cosine_similarity(g0, g1, dim=0)
    assert cos > 0.999, float(cos)
    assert b1 < b0 / 3, (b1, b0)
    for (n, a), (_, b) in zip(plain.named_buffers(), lean.named_buffers()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5), n  # running statistics updated the same


def test_torchvision_style_resnet_rewrite_matches_and_saves_less():
    torch.manual_seed(0)
    plain = norm_tuning(TinyResNet())
    lean = copy.deepcopy(plain)
    report = rewrite(lean, Compression(4))
    assert set(report.changed) >= {"batchnorm", "activations", "conv_pool"}
    assert isinstance(lean.layer1[0].relu, LeanActivation) and isinstance(lean.layer1[0].bn1, LeanBatchNorm)
    assert "layer1.0.relu" in report.changed["activations"]  # the shared module is replaced once, every call uses it
    assert report.unknown == []  # frozen convolutions too: they keep no input
    assert rewrite(lean, Compression(4)).changed == {}  # idempotent
    g = torch.Generator().manual_seed(1)
    pixels, labels = torch.randn(4, 3, 32, 32, generator=g), torch.tensor([0, 1, 4, 2])
    _parity(plain, lean, pixels, labels)


def test_transformers_resnet_rewrite_matches_and_saves_less():
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    cfg = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="bottleneck", num_labels=3)
    plain = norm_tuning(ResNetForImageClassification(cfg))
    lean = copy.deepcopy(plain)
    report = rewrite(lean, Compression(4))
    assert len(report.changed["batchnorm"]) == sum(isinstance(m, nn.BatchNorm2d) for m in plain.modules())
    assert report.unknown == [], report.unknown
    g = torch.Generator().manual_seed(2)
    pixels, labels = torch.randn(3, 3, 32, 32, generator=g), torch.tensor([0, 2, 1])
    _parity(plain, lean, pixels, labels, logits_of=lambda out: out.logits)
