"""``AWQLinear``: a :class:`~torchquant.nn.QuantizedLinear` whose state dict is in the AWQ GEMM layout.

The layer runs from its packed integers like every quantized Linear layer;
its ``state_dict`` holds exactly the tensors AutoAWQ's ``WQLinear_GEMM``
writes and vLLM / transformers read (``qweight``, ``qzeros``, ``scales``,
``bias``; layout and bit order in :mod:`torchquant.layouts.awq`). The name
keeps the constructors :meth:`AWQLinear.from_codes` (integer codes and grids)
and :meth:`AWQLinear.from_packed` (checkpoint tensors), and the checkpoint's
view of the weight (:attr:`qweight`, :attr:`qzeros`, :attr:`scales`,
computed from the packed weight on access).

The weight is ``W[o, i] = (u[i, o] - zero_u[i // g, o]) * scales[i // g, o]``
with the format's float16 scales. The format holds 4-bit codes only.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from torchquant.layouts.awq import AWQLayout
from torchquant.layouts.base import check_fp16_range, check_tensor, is_int, unsigned_zero_points
from torchquant.nn.quantized_linear import QuantizedLinear
from torchquant.quantized_weight import QuantizedWeight

__all__ = ["AWQLinear", "AWQCodes"]


class AWQCodes(NamedTuple):
    """An AWQ layer in torchquant's code domain."""

    codes: Tensor  # int32 [out, in], in [quant_min, quant_min + 15]
    scales: Tensor  # float32 [out, n_groups] (the stored float16 values)
    zero_points: Tensor  # float32 [out, n_groups], integers in the code domain


class AWQLinear(QuantizedLinear):
    """A quantized Linear layer saved in the AWQ GEMM layout (see the module docstring).

    The constructor makes a layer of zero codes of the right shapes for
    ``load_state_dict``; build one from data with :meth:`from_codes` or
    :meth:`from_packed`.

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
        layout = AWQLayout(group_size, symmetric=symmetric, quant_min=quant_min, bits=bits)
        weight = layout.empty_weight(in_features, out_features, device)
        b = torch.zeros(out_features, dtype=torch.float16, device=device) if bias else None
        super().__init__(weight, b, layout=layout)

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
        layout = AWQLayout(group_size, symmetric=symmetric, quant_min=quant_min, bits=bits)
        out_features, in_features = codes.shape
        layout.check_features(in_features, out_features)
        qmin, qmax, n_groups = layout.quant_min, layout.quant_max, layout.n_groups(in_features)
        if codes.numel() and (int(codes.min()) < qmin or int(codes.max()) > qmax):
            raise ValueError(f"codes must lie in [quant_min, quant_min + 15] = [{qmin}, {qmax}], got values in "
                             f"[{int(codes.min())}, {int(codes.max())}]")
        check_tensor(scales, "scales", (out_features, n_groups), integer=False)
        check_fp16_range(scales, "scales", positive=True, fmt="AWQ")
        check_tensor(zero_points, "zero_points", (out_features, n_groups))
        zero_u = unsigned_zero_points(zero_points, qmin, qmax)
        if layout.symmetric and not bool((zero_u == layout.symmetric_zero).all()):
            raise ValueError(f"zero_points of a symmetric layer must all be {layout.symmetric_zero + qmin} (unsigned "
                             f"{layout.symmetric_zero}); pass symmetric=False for an asymmetric grid")
        if bias is not None:
            check_tensor(bias, "bias", (out_features,), integer=False)
            check_fp16_range(bias, "bias", positive=False, fmt="AWQ")
        # The format's float16 scales, exactly as a checkpoint will hold them.
        weight = QuantizedWeight.from_codes(codes, scales.detach().to(torch.float16).float(), zero_points, bits,
                                            quant_min=qmin)
        return cls._from_weight(weight, None if bias is None else bias.detach().to(torch.float16), layout)

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
        layout = AWQLayout(group_size, symmetric=symmetric, bits=bits)
        check_tensor(qweight, p + "qweight")
        if qweight.dtype != torch.int32 or qweight.dim() != 2:
            raise ValueError(f"{p}qweight must be a 2-D torch.int32 tensor, got {qweight.dtype} of shape "
                             f"{list(qweight.shape)}")
        in_features, words = qweight.shape
        if is_int(group_size) and group_size > 0 and in_features % group_size:
            raise ValueError(f"{p}qweight has {in_features} input rows, not a multiple of group_size = {group_size}")
        out_features = words * (32 // bits)
        layout.check_features(in_features, out_features)
        weight = layout.from_state({"qweight": qweight, "qzeros": qzeros, "scales": scales}, in_features,
                                   out_features, name)
        if bias is not None:
            check_tensor(bias, p + "bias", (out_features,), integer=False)
            if bias.device != qweight.device:
                raise ValueError(f"{p}bias is on {bias.device} but {p}qweight is on {qweight.device}")
        return cls._from_weight(weight, bias, layout)  # a checkpoint's bias keeps its dtype

    # ---- the AWQ settings and the checkpoint's view of the weight ----------------------------

    group_size = property(lambda self: self.layout.group_size, doc="Columns per group, -1 for one group per row.")
    group_columns = property(lambda self: self.layout.group_columns(self.in_features),
                             doc="Input columns per group (``in_features`` for one group per row).")
    n_groups = property(lambda self: self.layout.n_groups(self.in_features))
    symmetric = property(lambda self: self.layout.symmetric)
    symmetric_zero = property(lambda self: self.layout.symmetric_zero)
    quant_min = property(lambda self: self.layout.quant_min)
    quant_max = property(lambda self: self.layout.quant_max)

    qweight = property(lambda self: self.checkpoint_tensor("qweight"), doc="int32 ``[in, out / 8]``.")
    qzeros = property(lambda self: self.checkpoint_tensor("qzeros"), doc="int32 ``[n_groups, out / 8]``.")
    scales = property(lambda self: self.checkpoint_tensor("scales"), doc="float16 ``[n_groups, out]``.")

    def unpack(self) -> AWQCodes:
        """Codes, scales and zero-points in torchquant's code domain."""
        w = self.quantized_weight
        return AWQCodes(codes=w.codes(self.quant_min), scales=w.scales.clone(),
                        zero_points=w.zero_points(self.quant_min))
