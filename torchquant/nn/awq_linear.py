"""Inference Linear layer holding a 4-bit weight in the AWQ GEMM checkpoint layout.

The buffers are exactly the tensors AutoAWQ's ``WQLinear_GEMM`` writes and
vLLM / transformers read, so a module's ``state_dict`` is an AWQ checkpoint
entry (layout and bit order in :mod:`torchquant.ptq.awq_format`):

* ``qweight`` int32 ``[in, out / 8]``: unsigned codes ``u = code - quant_min``
  of the transposed weight, packed along the output dimension;
* ``qzeros`` int32 ``[n_groups, out / 8]``: unsigned zero-points
  ``zero - quant_min``, packed the same way (no offset);
* ``scales`` float16 ``[n_groups, out]``;
* ``bias`` ``[out]`` or absent: float16 from :meth:`AWQLinear.from_codes`, a
  loaded checkpoint's own dtype otherwise.

The weight is ``W[o, i] = (u[i, o] - zero_u[i // g, o]) * scales[i // g, o]``,
formed in float32, where it is exact (a 4-bit difference times a float16),
then rounded once to the compute dtype: the number a float16 kernel computes.

A symmetric layer (``symmetric=True``: signed codes, zero-point 0) stores
the zero-point 8 everywhere, so readers that always apply ``qzeros`` and
readers that take ``zero_point: false`` to mean "subtract 8" agree. The format
holds 4-bit codes only; other widths are refused with an error.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from torchquant.nn.packed_linear import (PackedLinear, check_packed_tensors, check_tensor, is_int,
                                         unsigned_zero_points)

__all__ = ["AWQLinear", "AWQCodes"]

_FP16_MAX = torch.finfo(torch.float16).max


class AWQCodes(NamedTuple):
    """An AWQ layer in torchquant's code domain."""

    codes: Tensor  # int32 [out, in], in [quant_min, quant_min + 15]
    scales: Tensor  # float32 [out, n_groups] (the stored float16 values)
    zero_points: Tensor  # float32 [out, n_groups], integers in the code domain


def _format():
    # Imported on use: torchquant.ptq's modules import this one, so importing
    # the ptq package while this module loads could be circular.
    from torchquant.ptq import awq_format
    return awq_format


def _check_fp16_range(t: Tensor, name: str, positive: bool) -> None:
    """Finite, representable in float16 (the format's dtype) and, for scales, positive."""
    f = t.float()
    if not bool(torch.isfinite(f).all()) or bool((f.abs() > _FP16_MAX).any()):
        raise ValueError(f"{name} must be finite and within float16 range (AWQ checkpoints store it as float16)")
    if positive and (bool((f <= 0).any()) or bool((t.to(torch.float16) == 0).any())):
        raise ValueError(f"{name} must be positive and not underflow float16; found values in "
                         f"[{f.min().item():.3g}, {f.max().item():.3g}]")


class AWQLinear(PackedLinear):
    """``y = x W^T + b`` with ``W`` dequantized from AWQ GEMM buffers (see the module docstring).

    Build one with :meth:`from_codes` (from integer codes and grids) or
    :meth:`from_packed` (from checkpoint tensors); the constructor makes an
    empty layer of the right shapes for ``load_state_dict``.

    The dequantized weight is cached in the compute dtype of the last call,
    on its device; loading a state dict or moving the module drops it. After
    changing a buffer in place, call :meth:`clear_cache`.

    Args:
        in_features, out_features: the layer's shape; ``out_features`` must
            be a multiple of 8 (eight codes per int32 word).
        group_size: input columns per grid, dividing ``in_features``; None or
            -1 for one grid per row (AutoAWQ's -1).
        bias: whether the layer has a bias.
        bits: 4, the only width of the format.
        symmetric: signed codes with zero-point 0 (stored as 8).
        quant_min: the lowest code; -8 when symmetric, 0 otherwise by default.
    """

    def __init__(self, in_features: int, out_features: int, group_size: Optional[int] = 128, *, bias: bool = True,
                 bits: int = 4, symmetric: bool = False, quant_min: Optional[int] = None, device=None) -> None:
        super().__init__()
        _format().check_bits(bits)
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not is_int(value) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if out_features % _format().PACK:
            raise ValueError(f"out_features must be a multiple of {_format().PACK} for an AWQ layer (qweight packs "
                             f"{_format().PACK} output columns per int32 word), got {out_features}")
        if group_size is None or group_size == -1:
            group_size = -1
        elif not is_int(group_size) or group_size <= 0 or in_features % group_size:
            raise ValueError(f"group_size must be a positive divisor of in_features = {in_features}, or -1 / None "
                             f"for one group per row, got {group_size!r}")
        if quant_min is None:
            quant_min = -(1 << (bits - 1)) if symmetric else 0
        if not is_int(quant_min):
            raise TypeError(f"quant_min must be an integer, got {quant_min!r}")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size, self.symmetric, self.quant_min = group_size, bool(symmetric), quant_min
        words = out_features // _format().PACK
        self.register_buffer("qweight", torch.zeros(in_features, words, dtype=torch.int32, device=device))
        self.register_buffer("qzeros", torch.zeros(self.n_groups, words, dtype=torch.int32, device=device))
        self.register_buffer("scales", torch.ones(self.n_groups, out_features, dtype=torch.float16, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16, device=device) if bias else None)

    @property
    def group_columns(self) -> int:
        """Input columns per group (``in_features`` for one group per row)."""
        return self.in_features if self.group_size == -1 else self.group_size

    @property
    def n_groups(self) -> int:
        return self.in_features // self.group_columns

    @property
    def symmetric_zero(self) -> int:
        """The unsigned zero-point of a symmetric layer: the middle of the range."""
        return 1 << (self.bits - 1)

    # ---- construction --------------------------------------------------------------------

    @classmethod
    def from_codes(cls, codes: Tensor, scales: Tensor, zero_points: Tensor, bias: Optional[Tensor],
                   group_size: Optional[int], quant_min: int, symmetric: bool, bits: int = 4) -> "AWQLinear":
        """A layer from integer codes and grids in torchquant's code domain.

        Args:
            codes: integer ``[out, in]`` in ``[quant_min, quant_min + 15]``.
            scales: float ``[out, n_groups]``, positive; stored as float16.
            zero_points: float ``[out, n_groups]`` holding integers in the
                code range (0 everywhere when ``symmetric``).
            bias: ``[out]`` or None; stored as float16.
            group_size: columns per group, or None / -1 for one group per row.
            quant_min: the lowest code (-8 on a symmetric grid, 0 otherwise).
            symmetric: whether the grid is symmetric (recorded as the
                config's ``zero_point: false``).
            bits: 4.
        """
        check_tensor(codes, "codes", integer=True)
        if codes.dim() != 2:
            raise ValueError(f"codes must be 2-D [out_features, in_features], got shape {list(codes.shape)}")
        for name, t in (("scales", scales), ("zero_points", zero_points), ("bias", bias)):
            if t is not None:
                check_tensor(t, name)
                if t.device != codes.device:
                    raise ValueError(f"{name} is on {t.device} but codes are on {codes.device}")
        out_features, in_features = codes.shape
        layer = cls(in_features, out_features, group_size, bias=bias is not None, bits=bits, symmetric=symmetric,
                    quant_min=quant_min, device=codes.device)
        qmin, qmax, n_groups = layer.quant_min, layer.quant_max, layer.n_groups
        if codes.numel() and (int(codes.min()) < qmin or int(codes.max()) > qmax):
            raise ValueError(f"codes must lie in [quant_min, quant_min + 15] = [{qmin}, {qmax}], got values in "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        check_tensor(scales, "scales", (out_features, n_groups), integer=False)
        _check_fp16_range(scales, "scales", positive=True)
        check_tensor(zero_points, "zero_points", (out_features, n_groups))
        zero_u = unsigned_zero_points(zero_points, qmin, qmax)
        if layer.symmetric and not bool((zero_u == layer.symmetric_zero).all()):
            raise ValueError(f"zero_points of a symmetric layer must all be {layer.symmetric_zero + qmin} (unsigned "
                             f"{layer.symmetric_zero}); pass symmetric=False for an asymmetric grid")
        if bias is not None:
            check_tensor(bias, "bias", (out_features,), integer=False)
            _check_fp16_range(bias, "bias", positive=False)
        fmt = _format()
        layer.qweight = fmt.pack_awq((codes.to(torch.int32) - qmin).t(), bits)
        layer.qzeros = fmt.pack_awq(zero_u.t(), bits)
        layer.scales = scales.detach().t().to(torch.float16).contiguous()
        if bias is not None:
            layer.bias = bias.detach().to(torch.float16).clone()
        return layer

    @classmethod
    def from_packed(cls, qweight: Tensor, qzeros: Tensor, scales: Tensor, bias: Optional[Tensor],
                    group_size: Optional[int], bits: int = 4, symmetric: bool = False,
                    name: str = "") -> "AWQLinear":
        """A layer from checkpoint tensors (``scales`` float16; ``bias`` keeps its dtype).

        With ``symmetric`` every zero-point must be 8 (what ``zero_point:
        false`` means to the readers). Errors name the tensors as
        ``<name>.qweight`` etc.
        """
        p = f"{name}." if name else ""
        _format().check_bits(bits)
        check_packed_tensors(qweight, qzeros, scales, p)
        in_features, words = qweight.shape
        if is_int(group_size) and group_size > 0 and in_features % group_size:
            raise ValueError(f"{p}qweight has {in_features} input rows, not a multiple of group_size = {group_size}")
        layer = cls(in_features, words * _format().PACK, group_size, bias=bias is not None, bits=bits,
                    symmetric=symmetric, device=qweight.device)
        check_tensor(qzeros, p + "qzeros", tuple(layer.qzeros.shape))
        check_tensor(scales, p + "scales", tuple(layer.scales.shape))
        _check_fp16_range(scales, p + "scales", positive=True)
        if bias is not None:
            check_tensor(bias, p + "bias", (layer.out_features,), integer=False)
        for key, t in (("qzeros", qzeros), ("scales", scales), ("bias", bias)):
            if t is not None and t.device != qweight.device:
                raise ValueError(f"{p}{key} is on {t.device} but {p}qweight is on {qweight.device}")
        if layer.symmetric:
            zero_u = _format().unpack_awq(qzeros, bits)
            if not bool((zero_u == layer.symmetric_zero).all()):
                raise ValueError(f"{p}qzeros: a symmetric (zero_point: false) layer must store the zero-point "
                                 f"{layer.symmetric_zero} everywhere; found values in [{int(zero_u.min())}, "
                                 f"{int(zero_u.max())}]")
        layer.qweight = qweight.contiguous()
        layer.qzeros = qzeros.contiguous()
        layer.scales = scales.contiguous()
        if bias is not None:
            layer.bias = bias.contiguous()
        return layer

    # ---- the weight ----------------------------------------------------------------------

    def unpack(self) -> AWQCodes:
        """Codes, scales and zero-points in torchquant's code domain."""
        fmt = _format()
        u = fmt.unpack_awq(self.qweight, self.bits).t()
        zero_u = fmt.unpack_awq(self.qzeros, self.bits).t()
        return AWQCodes(codes=(u + self.quant_min).contiguous(), scales=self.scales.float().t().contiguous(),
                        zero_points=(zero_u + self.quant_min).float().contiguous())

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``[out, in]`` weight in ``dtype``, computed afresh (no cache)."""
        fmt = _format()
        g = self.group_columns
        u = fmt.unpack_awq(self.qweight, self.bits)  # [in, out]
        zero_u = fmt.unpack_awq(self.qzeros, self.bits).repeat_interleave(g, dim=0)  # [in, out]
        # Exact in float32 (see the module docstring), then one rounding to dtype.
        w = (u - zero_u).float() * self.scales.float().repeat_interleave(g, dim=0)
        return w.t().contiguous().to(dtype)
