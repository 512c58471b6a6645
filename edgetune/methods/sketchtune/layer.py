"""A frozen sketched linear layer whose only trainable tensor is its lookup table.

``W[r, c] = table[r, g(c), codes[r, c]]`` (see ``edgetune.quant.sketch``). The codes are a
bit-packed uint8 buffer (``edgetune.quant.bitpack``, dense: 3-bit codes take 3 bits), the table
an ``nn.Parameter`` (out, GPR, 2**bits) in the compute dtype, so stock optimizers update it
unchanged. ``table_init`` (fp16 buffer) keeps the table the sketch was built with: the exported
adapter is ``table − table_init`` (``edgetune.exporters.sketch``).

The matmul owns its autograd (:class:`_SketchMatmul`):

* forward: unpack the codes and gather ``W`` (out, in) transiently, ``y = x Wᵀ (+ bias)``;
* backward: gather ``W`` again, ``grad_x = dY W``; ``grad_W = dYᵀ X`` (out, in) transiently and
  ``grad_table = scatter_add`` of ``grad_W`` into each row group's ``2**bits`` buckets.

Only ``x`` goes through ``save_for_backward`` (and only when the table needs a gradient); the
table (a parameter) is saved too, so an in-place update between forward and backward is caught
by autograd's version check. The codes are a frozen buffer referenced from ``ctx``. No dense
weight outlives a forward or a backward call, and forward changes no state.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from edgetune.quant.bitpack import packed_size, unpack_codes
from edgetune.quant.sketch import group_index


def gather_index(codes_packed: torch.Tensor, bits: int, in_features: int, groups_per_row: int) -> torch.Tensor:
    """Flat table indices ``g(c) · 2**bits + code[r, c]`` (out, in) int64 from the packed codes.

    For 2, 4 and 8 bits (whole codes per byte) the codes are unpacked straight into the int64
    index tensor, one strided write per code position in a byte: 4-5x faster than unpacking to
    a uint8 tensor and converting (measured 3.4 ms vs 16 ms for 1536 x 576 at 4 bits, one
    thread), which matters because this runs in every forward and every backward.
    """
    offset = group_index(in_features, groups_per_row, codes_packed.device) * (1 << bits)  # (in,)
    out_f, nbytes = codes_packed.shape
    if 8 % bits == 0:
        per, mask = 8 // bits, (1 << bits) - 1
        index = torch.empty(out_f, nbytes * per, dtype=torch.int64, device=codes_packed.device)
        view = index.view(out_f, nbytes, per)
        for i in range(per):
            view[..., i] = (codes_packed >> (bits * i)) & mask if i else codes_packed & mask
        if nbytes * per != in_features:
            index = index[:, :in_features]
        index += offset
        return index
    codes = unpack_codes(codes_packed, bits, in_features, dtype=torch.int64)  # (out, in)
    return codes + offset.unsqueeze(0)


class _SketchMatmul(torch.autograd.Function):
    """y = x @ gather(table, codes)ᵀ + bias, with grads for x and the table.

    The gather and the table gradient go through the op registry (``edgetune.kernels``: C++ on
    the CPU when built, the pure-torch reference otherwise). With an S2A ``comp`` the input kept
    for the table gradient is stored in 8-bit groups (shared with the other projections reading
    the same tensor) instead of full precision.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, table: torch.Tensor, codes: torch.Tensor, bits: int,
                bias: Optional[torch.Tensor], comp=None) -> torch.Tensor:
        from edgetune.kernels import ops as kops

        # x: (..., in); table: (out, GPR, K); codes: packed uint8 (out, ceil(in*bits/8))
        in_f = x.shape[-1]
        w = kops.sketch_gather(table.detach().to(x.dtype), codes, bits, in_f)  # (out, in), transient
        y = torch.matmul(x, w.t())  # (..., out)
        if bias is not None:
            y = y + bias.to(y.dtype)
        ctx.codes, ctx.bits, ctx.in_features = codes, bits, in_f  # frozen buffer: a reference, not saved
        ctx.x_shape, ctx.x_dtype, ctx.compressed = x.shape, x.dtype, False
        if not ctx.needs_input_grad[1]:
            ctx.save_for_backward(None, table)
        elif comp is not None:
            from edgetune.s2a.functions import int8_shared

            q = int8_shared(x, comp)
            ctx.compressed = True
            ctx.save_for_backward(q.codes, q.lo, q.scale, table)
        else:
            ctx.save_for_backward(x, table)
        return y

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        from edgetune.kernels import ops as kops

        *saved, table = ctx.saved_tensors
        out_f, gpr, k = table.shape
        grad_x = grad_table = None
        if ctx.needs_input_grad[0]:
            w = kops.sketch_gather(table.to(grad_out.dtype), ctx.codes, ctx.bits, ctx.in_features)  # (out, in)
            grad_x = torch.matmul(grad_out, w)  # (..., in)
            del w
        if ctx.needs_input_grad[1]:
            if ctx.compressed:
                from edgetune.s2a.functions import load_int8_shared

                x = load_int8_shared(*saved, ctx.x_shape, ctx.x_dtype)  # shared with the group's other readers
            else:
                (x,) = saved
            grad_table = kops.sketch_grad_table(grad_out, x.to(grad_out.dtype), ctx.codes, ctx.bits, gpr)
            grad_table = grad_table.view(out_f, gpr, k).to(table.dtype)
        return grad_x, grad_table, None, None, None, None


def sketch_linear(x: torch.Tensor, table: torch.Tensor, codes: torch.Tensor, bits: int,
                  bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Functional form: ``x (..., in) @ W(table, codes)ᵀ + bias``."""
    return _SketchMatmul.apply(x, table, codes, bits, bias)


class SketchLinear(nn.Module):
    """A linear layer stored as a sketch: packed codes, a trainable table, its initial copy.

    Tensors: ``codes`` (buffer, uint8 (out, ceil(in·bits/8)), bit-packed rows), ``table``
    (parameter, (out, GPR, 2**bits), compute dtype), ``table_init`` (buffer, fp16, same shape),
    ``bias`` (buffer, compute dtype) if any. Built empty (``device="meta"``) for loading a
    saved artifact with ``assign=True``; :meth:`from_sketch` fills it from construction output.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, groups_per_row: int, bias: bool = False,
                 device=None, dtype: Optional[torch.dtype] = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.groups_per_row = bits, groups_per_row
        k = 1 << bits
        dtype = dtype or torch.float32
        self.register_buffer("codes", torch.empty(out_features, packed_size(in_features, bits), dtype=torch.uint8,
                                                  device=device))
        self.table = nn.Parameter(torch.empty(out_features, groups_per_row, k, dtype=dtype, device=device))
        self.register_buffer("table_init", torch.empty(out_features, groups_per_row, k, dtype=torch.float16,
                                                       device=device))
        if bias:
            self.register_buffer("bias", torch.empty(out_features, dtype=dtype, device=device))
        else:
            self.register_buffer("bias", None)

    @classmethod
    def from_sketch(cls, codes: torch.Tensor, table: torch.Tensor, bits: int, bias: Optional[torch.Tensor] = None,
                    dtype: torch.dtype = torch.float32) -> "SketchLinear":
        """From unpacked codes (out, in) and a table (out, GPR, 2**bits) (fp16-representable values)."""
        from edgetune.quant.bitpack import pack_codes

        out_f, in_f = codes.shape
        layer = cls(in_f, out_f, bits, table.shape[1], bias is not None, device="meta", dtype=dtype)
        device = codes.device
        layer.codes = pack_codes(codes, bits)
        init = table.to(torch.float16)
        layer.table_init = init
        layer.table = nn.Parameter(init.to(dtype), requires_grad=True)
        if bias is not None:
            layer.bias = bias.detach().to(device=device, dtype=dtype).clone()
        return layer

    @property
    def compute_dtype(self) -> torch.dtype:
        return self.table.dtype

    def unpacked_codes(self) -> torch.Tensor:
        """The codes as uint8 (out, in)."""
        return unpack_codes(self.codes, self.bits, self.in_features)

    def dense_weight(self, dtype: Optional[torch.dtype] = None, table: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The dense weight (out, in) in ``dtype`` (default: the table's), from ``table`` (default: the current one)."""
        table = self.table if table is None else table
        index = gather_index(self.codes, self.bits, self.in_features, self.groups_per_row)
        w = table.detach().reshape(self.out_features, -1).to(dtype or table.dtype).gather(1, index)
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (..., in) -> (..., out)
        comp = getattr(self, "compression", None)
        return _SketchMatmul.apply(x, self.table, self.codes, self.bits, self.bias, comp)

    def _apply(self, fn, recurse=True):
        # Casting the module (.half(), .to(bf16)) casts the table and bias; codes and table_init keep their dtype.
        keep = {n: self._buffers[n] for n in ("codes", "table_init") if self._buffers.get(n) is not None}
        super()._apply(fn, recurse)
        for name, old in keep.items():
            new = self._buffers[name]
            if new is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)
        return self

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"groups_per_row={self.groups_per_row}, bias={self.bias is not None}, dtype={self.compute_dtype}")
