"""Compressed-saving BatchNorm for convolutional vision models (ResNet), plus its pure-torch oracle.

Why BatchNorm needs its own Function: torch's batch norm keeps its fp32 *input* (N, C, H, W) for
backward, and in a ResNet that input is the largest tensor of every conv → BN → ReLU triple (the
ReLU output goes to 1 bit with :class:`~edgetune.s2a.functions.Relu1Bit`; frozen convolutions keep
no input at all). Here the input is kept in 8-bit groups of 64 (the flat NCHW layout, so at
H·W ≥ 64 a group never spans two channels) plus the exact per-channel mean and 1/std, and the
backward is torch's batch-norm backward evaluated on the dequantized input:

* train mode (batch statistics), with x̂ = (x − μ)·σ⁻¹ and g = dY·w, per channel over (N, H, W):
  dx = σ⁻¹ · (g − mean(g) − x̂ · mean(g · x̂)),  dw = Σ dY·x̂,  db = Σ dY;
  the running statistics are updated in forward exactly as ``F.batch_norm`` does;
* eval mode / frozen statistics: a pure per-channel affine y = x·s + t with s = w·σ⁻¹; dx = dY·s
  needs nothing saved, and x (8-bit) is kept only when ``weight`` trains (dw = Σ dY·x̂).

:func:`batch_norm_reference` is the plain-torch formula the tests use as the oracle.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgetune.quant.actpack import pack_nibbles, unpack_nibbles

from .functions import Compression, _acc, _load_int8, _save_int8, int8_shared


def _channel_view(t: torch.Tensor, ndim: int) -> torch.Tensor:
    """(C,) -> (1, C, 1, ...) broadcastable against an (N, C, *) tensor of ``ndim`` dims."""
    return t.view(1, -1, *([1] * (ndim - 2)))


def _reduce_dims(ndim: int) -> tuple[int, ...]:
    return (0, *range(2, ndim))  # every dim but the channel


def batch_norm_reference(x, running_mean, running_var, weight, bias, training: bool, momentum: float, eps: float):
    """Batch norm written out in torch ops (autograd gives its gradient): the test oracle."""
    dims = _reduce_dims(x.dim())
    if training:
        mean = x.mean(dims)
        var = x.var(dims, unbiased=False)
    else:
        mean, var = running_mean, running_var
    n = (x - _channel_view(mean, x.dim())) / torch.sqrt(_channel_view(var, x.dim()) + eps)
    if weight is not None:
        n = n * _channel_view(weight, x.dim())
    return n + _channel_view(bias, x.dim()) if bias is not None else n


class LeanBatchNormTrain(torch.autograd.Function):
    """Batch-statistics batch norm saving x in 8-bit groups plus per-channel mean and 1/std."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum: float, eps: float, comp: Compression):
        dims = _reduce_dims(x.dim())
        h = x.to(_acc(x.dtype))
        mean = h.mean(dims)  # (C,)
        var = h.var(dims, unbiased=False)  # (C,)
        rstd = torch.rsqrt(var + eps)  # (C,)
        if running_mean is not None:  # as F.batch_norm: unbiased variance into the running estimate
            count = x.numel() // x.shape[1]
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1 - momentum).add_((var * (count / max(count - 1, 1))).to(running_var.dtype),
                                                alpha=momentum)
        scale = rstd if weight is None else rstd * weight.to(rstd.dtype)
        shift = -mean * scale if bias is None else bias.to(rstd.dtype) - mean * scale
        y = (h * _channel_view(scale, x.dim()) + _channel_view(shift, x.dim())).to(x.dtype)
        ctx.save_for_backward(*_save_int8(int8_shared(x, comp)), mean, rstd, weight)
        ctx.shape, ctx.has_weight = x.shape, weight is not None
        return y

    @staticmethod
    def backward(ctx, grad):
        codes, lo, scale, mean, rstd, weight = ctx.saved_tensors
        acc, nd = rstd.dtype, len(ctx.shape)
        dims = _reduce_dims(nd)
        n = (_load_int8(codes, lo, scale, ctx.shape, acc) - _channel_view(mean, nd)) * _channel_view(rstd, nd)
        g = grad.to(acc)
        gw = g * _channel_view(weight.to(acc), nd) if ctx.has_weight else g
        dx = _channel_view(rstd, nd) * (gw - gw.mean(dims, keepdim=True) - n * (gw * n).mean(dims, keepdim=True))
        dw = (g * n).sum(dims).to(grad.dtype) if ctx.needs_input_grad[1] else None
        db = g.sum(dims).to(grad.dtype) if ctx.needs_input_grad[2] else None
        return dx.to(grad.dtype), dw, db, None, None, None, None, None


class LeanBatchNormFrozen(torch.autograd.Function):
    """Running-statistics batch norm: a per-channel affine; x kept (8-bit) only for a trained weight."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps: float, comp: Compression):
        nd = x.dim()
        rstd = torch.rsqrt(running_var.to(_acc(x.dtype)) + eps)  # (C,)
        scale = rstd if weight is None else rstd * weight.to(rstd.dtype)
        shift = -running_mean.to(rstd.dtype) * scale
        if bias is not None:
            shift = shift + bias.to(rstd.dtype)
        y = (x.to(rstd.dtype) * _channel_view(scale, nd) + _channel_view(shift, nd)).to(x.dtype)
        keep_x = weight is not None and weight.requires_grad
        saved = _save_int8(int8_shared(x, comp)) if keep_x else (torch.empty(0),) * 3
        ctx.save_for_backward(*saved, running_mean, rstd, scale)
        ctx.shape, ctx.keep_x = x.shape, keep_x
        return y

    @staticmethod
    def backward(ctx, grad):
        codes, lo, qscale, mean, rstd, scale = ctx.saved_tensors
        acc, nd = rstd.dtype, len(ctx.shape)
        dims = _reduce_dims(nd)
        g = grad.to(acc)
        dx = (g * _channel_view(scale, nd)).to(grad.dtype) if ctx.needs_input_grad[0] else None
        dw = None
        if ctx.needs_input_grad[1] and ctx.keep_x:
            n = (_load_int8(codes, lo, qscale, ctx.shape, acc) - _channel_view(mean.to(acc), nd)) * _channel_view(rstd, nd)
            dw = (g * n).sum(dims).to(grad.dtype)
        db = g.sum(dims).to(grad.dtype) if ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None, None, None


class LeanBatchNorm(nn.Module):
    """Drop-in for ``nn.BatchNorm1d/2d/3d``: same parameters, buffers and train/eval semantics.

    Keeps the replaced module's ``weight``, ``bias``, ``running_mean``, ``running_var`` and
    ``num_batches_tracked`` under the same names, so state dicts load unchanged. Outside autograd
    it runs ``F.batch_norm`` itself.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, comp: Compression):
        super().__init__()
        self.num_features, self.eps, self.momentum = bn.num_features, bn.eps, bn.momentum
        self.affine, self.track_running_stats = bn.affine, bn.track_running_stats
        self.weight, self.bias = bn.weight, bn.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            self.register_buffer(name, getattr(bn, name, None))
        self.comp = comp
        self.training = bn.training

    def _momentum(self) -> float:
        """The factor for this step's statistics, as ``nn.BatchNorm`` computes it (None: cumulative mean)."""
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                return 1.0 / float(self.num_batches_tracked)
        return 0.0 if self.momentum is None else self.momentum

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, *)
        batch_stats = self.training or self.running_mean is None
        momentum = self._momentum() if self.training else 0.0
        recording = torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                    for t in (x, self.weight, self.bias))
        if not recording:
            return F.batch_norm(x, self.running_mean if not self.training or self.track_running_stats else None,
                                self.running_var if not self.training or self.track_running_stats else None,
                                self.weight, self.bias, batch_stats, momentum, self.eps)
        if batch_stats:
            track = self.training and self.track_running_stats and self.running_mean is not None
            return LeanBatchNormTrain.apply(x, self.weight, self.bias, self.running_mean if track else None,
                                            self.running_var if track else None, momentum, self.eps, self.comp)
        return LeanBatchNormFrozen.apply(x, self.weight, self.bias, self.running_mean, self.running_var, self.eps,
                                         self.comp)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, act_bits={self.comp.act_bits}"


# --------------------------------------------------------------------------- pooling


class _GlobalAvgPool(torch.autograd.Function):
    """mean over (H, W): backward spreads dY evenly, so nothing but the shape is kept."""

    @staticmethod
    def forward(ctx, x):  # (N, C, H, W) -> (N, C, 1, 1)
        ctx.shape = x.shape
        return x.mean((2, 3), keepdim=True)

    @staticmethod
    def backward(ctx, grad):
        h, w = ctx.shape[2], ctx.shape[3]
        return (grad / (h * w)).expand(ctx.shape).contiguous()


class LeanGlobalAvgPool(nn.Module):
    """``nn.AdaptiveAvgPool2d(1)`` without the saved input torch's adaptive pooling keeps."""

    @staticmethod
    def accepts(m: nn.AdaptiveAvgPool2d) -> bool:
        size = m.output_size
        return size == 1 or (not isinstance(size, int) and tuple(size) == (1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            return F.adaptive_avg_pool2d(x, 1)
        return _GlobalAvgPool.apply(x) if torch.is_grad_enabled() and x.requires_grad else x.mean((2, 3), keepdim=True)


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


class _MaxPool4Bit(torch.autograd.Function):
    """2-D max pooling keeping only where in its window each maximum was: 4 bits per output.

    torch keeps the fp32 input and int64 flat indices (12 B per output plus 4 B per input). The
    window position (kh·kW + kw < 16) gives back the flat index exactly, and the backward is the
    same scatter-add of dY to the argmax positions that torch's max-pool backward does.
    """

    @staticmethod
    def forward(ctx, x, kernel, stride, padding):  # (N, C, H, W) -> (N, C, Ho, Wo)
        y, idx = F.max_pool2d(x, kernel, stride, padding, return_indices=True)
        w_in = x.shape[-1]
        ho, wo = y.shape[-2:]
        oh = torch.arange(ho, device=x.device).view(ho, 1) * stride[0] - padding[0]  # (Ho, 1) window top
        ow = torch.arange(wo, device=x.device).view(1, wo) * stride[1] - padding[1]  # (1, Wo) window left
        code = (idx // w_in - oh) * kernel[1] + (idx % w_in - ow)  # (N, C, Ho, Wo) in [0, kH·kW)
        ctx.save_for_backward(pack_nibbles(code.to(torch.uint8)))
        ctx.meta = (x.shape, y.shape, kernel, stride, padding)
        return y

    @staticmethod
    def backward(ctx, grad):
        (packed,) = ctx.saved_tensors
        in_shape, out_shape, kernel, stride, padding = ctx.meta
        n, c, h_in, w_in = in_shape
        ho, wo = out_shape[-2:]
        code = unpack_nibbles(packed, grad.numel()).view(out_shape).long()
        oh = torch.arange(ho, device=grad.device).view(ho, 1) * stride[0] - padding[0]
        ow = torch.arange(wo, device=grad.device).view(1, wo) * stride[1] - padding[1]
        idx = (oh + code // kernel[1]) * w_in + (ow + code % kernel[1])  # flat input index per output
        dx = grad.new_zeros(n, c, h_in * w_in)
        dx.scatter_add_(2, idx.view(n, c, -1), grad.reshape(n, c, -1))
        return dx.view(in_shape), None, None, None


class LeanMaxPool2d(nn.Module):
    """``nn.MaxPool2d`` (kernel ≤ 16 positions, no dilation, floor mode) saving 4 bits per output."""

    def __init__(self, m: nn.MaxPool2d):
        super().__init__()
        self.kernel_size, self.stride = _pair(m.kernel_size), _pair(m.stride or m.kernel_size)
        self.padding = _pair(m.padding)

    @staticmethod
    def accepts(m: nn.MaxPool2d) -> bool:
        k = _pair(m.kernel_size)
        return (k[0] * k[1] <= 16 and _pair(m.dilation) == (1, 1) and not m.ceil_mode and not m.return_indices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4 and torch.is_grad_enabled() and x.requires_grad:
            return _MaxPool4Bit.apply(x, self.kernel_size, self.stride, self.padding)
        return F.max_pool2d(x, self.kernel_size, self.stride, self.padding)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}"


# --------------------------------------------------------------------------- frozen convolution


class _FrozenConv2d(torch.autograd.Function):
    """conv2d with a frozen weight: dx = conv_transpose(dY, w) needs no copy of x.

    torch's convolution keeps its input for backward even when the weight does not train (the
    input is only needed for dW); in a ResNet whose norms or head train, that is the fp32 input
    of every convolution. Here only the (parameter) weight is kept.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups: int):
        ctx.save_for_backward(weight)
        ctx.meta = (x.shape, stride, padding, dilation, groups, bias is not None)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        shape, stride, padding, dilation, groups, has_bias = ctx.meta
        dx = db = None
        if ctx.needs_input_grad[0]:
            shaped = grad.new_empty(1).expand(shape)  # only its shape is read: no memory
            dx = torch.ops.aten.convolution_backward(grad, shaped, weight, None, stride, padding, dilation, False,
                                                     [0, 0], groups, (True, False, False))[0]
        if has_bias and ctx.needs_input_grad[2]:
            db = grad.sum((0, 2, 3))
        return dx, None, db, None, None, None, None


class LeanConv2d(nn.Module):
    """``nn.Conv2d`` (zero padding) that keeps no input while its weight is frozen.

    Same ``weight`` / ``bias`` names. Whether the weight trains is looked at on every call, so
    a weight made trainable later simply runs torch's own convolution (which keeps the input).
    """

    def __init__(self, m: nn.Conv2d):
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = m.in_channels, m.out_channels, m.kernel_size
        self.stride, self.padding, self.dilation, self.groups = m.stride, m.padding, m.dilation, m.groups
        self.weight, self.bias = m.weight, m.bias

    @staticmethod
    def accepts(m: nn.Module) -> bool:
        return type(m) is nn.Conv2d and m.padding_mode == "zeros" and not isinstance(m.padding, str)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, Cin, H, W) -> (N, Cout, Ho, Wo)
        if self.weight.requires_grad or not (torch.is_grad_enabled() and x.requires_grad):
            return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return _FrozenConv2d.apply(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, frozen weight: no saved input")
