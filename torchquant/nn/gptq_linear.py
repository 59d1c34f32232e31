"""``GPTQLinear``: a :class:`~torchquant.nn.QuantizedLinear` whose state dict is in the GPTQ layout.

The layer runs from its packed integers like every quantized Linear layer;
its ``state_dict`` holds exactly the tensors AutoGPTQ / GPTQModel write and
vLLM / exllama read (``qweight``, ``qzeros``, ``scales``, ``g_idx``,
``bias``; layout in :mod:`torchquant.layouts.gptq`). The name keeps the
constructors of GPTQ tensors: :meth:`GPTQLinear.from_codes` (the GPTQ op's
outputs) and :meth:`GPTQLinear.from_packed` (checkpoint tensors), and the
checkpoint's view of the weight (:attr:`qweight`, :attr:`qzeros`,
:attr:`scales`, :attr:`g_idx`, computed from the packed weight on access).

The weight is ``W[o, i] = (u[o, i] - zero_u[o, g_idx[i]]) * scales[g_idx[i], o]``,
with the format's float16 scales: storing them in float16 rounds the float32
scales of the GPTQ solver, so this weight can differ from the solver's
``weight_q`` by that rounding.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from torchquant.layouts.base import check_tensor, unsigned_zero_points
from torchquant.layouts.gptq import GPTQLayout, check_fp16_bias, check_fp16_scales
from torchquant.nn.quantized_linear import QuantizedLinear
from torchquant.quantized_weight import QuantizedWeight

__all__ = ["GPTQLinear", "GPTQCodes"]


class GPTQCodes(NamedTuple):
    """A GPTQ layer in torchquant's code domain (what the GPTQ op returns)."""

    codes: Tensor  # int32 [out, in], in [quant_min, quant_min + 2^bits - 1]
    scales: Tensor  # float32 [out, n_groups] (the stored float16 values)
    zero_points: Tensor  # float32 [out, n_groups], integers in the code domain
    g_idx: Tensor  # int32 [in]


class GPTQLinear(QuantizedLinear):
    """A quantized Linear layer saved in the GPTQ layout (see the module docstring).

    The constructor makes a layer of zero codes of the right shapes for
    ``load_state_dict``; build one from data with :meth:`from_codes` or
    :meth:`from_packed`.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: Optional[int] = None, *,
                 bias: bool = True, symmetric: bool = True, desc_act: bool = False, static_groups: bool = False,
                 quant_min: Optional[int] = None, device=None) -> None:
        layout = GPTQLayout(bits, group_size, symmetric=symmetric, desc_act=desc_act, static_groups=static_groups,
                            quant_min=quant_min)
        weight = layout.empty_weight(in_features, out_features, device)
        b = torch.zeros(out_features, dtype=torch.float16, device=device) if bias else None
        super().__init__(weight, b, layout=layout)

    # ---- construction --------------------------------------------------------------------

    @classmethod
    def from_codes(cls, codes: Tensor, scales: Tensor, zero_points: Tensor, g_idx: Tensor, bias: Optional[Tensor],
                   bits: int, group_size: Optional[int], quant_min: int, symmetric: bool, desc_act: bool = False,
                   static_groups: bool = False) -> "GPTQLinear":
        """A layer from the GPTQ op's outputs, in torchquant's code domain.

        Args:
            codes: int32 ``[out, in]`` in ``[quant_min, quant_min + 2^bits - 1]``.
            scales: float ``[out, n_groups]``, positive; stored as float16.
            zero_points: float ``[out, n_groups]`` holding integers in the code range.
            g_idx: integer ``[in]``, the group of each input column.
            bias: ``[out]`` or None; stored as float16.
            bits: 2, 3, 4 or 8.
            group_size: columns per group, or None / -1 for one group per row.
            quant_min: the lowest code (``-2^(bits-1)`` on a symmetric grid, 0 otherwise).
            symmetric: every zero-point is the middle of the range (0 on the
                signed grid); readers then ignore ``qzeros``.
            desc_act: the layer was quantized in act-order (``g_idx`` arbitrary).
            static_groups: groups were fixed before act-order (recorded only).
        """
        check_tensor(codes, "codes", integer=True)
        named = [("scales", scales), ("zero_points", zero_points), ("g_idx", g_idx)]
        for name, t in named + ([("bias", bias)] if bias is not None else []):
            check_tensor(t, name)
            if t.device != codes.device:
                raise ValueError(f"{name} is on {t.device} but codes are on {codes.device}")
        if codes.dim() != 2:
            raise ValueError(f"codes must be 2-D [out_features, in_features], got shape {list(codes.shape)}")
        layout = GPTQLayout(bits, group_size, symmetric=symmetric, desc_act=desc_act, static_groups=static_groups,
                            quant_min=quant_min)
        out_features, in_features = codes.shape
        layout.check_features(in_features, out_features)
        qmin, qmax, n_groups = layout.quant_min, layout.quant_max, layout.n_groups(in_features)
        lo, hi = int(codes.min()), int(codes.max())
        if lo < qmin or hi > qmax:
            raise ValueError(f"codes must lie in [quant_min, quant_min + 2^bits - 1] = [{qmin}, {qmax}], "
                             f"got values in [{lo}, {hi}]")
        check_tensor(scales, "scales", (out_features, n_groups), integer=False)
        check_fp16_scales(scales, "scales")
        check_tensor(zero_points, "zero_points", (out_features, n_groups))
        layout.check_symmetric_zeros(unsigned_zero_points(zero_points, qmin, qmax), "zero_points")
        layout.check_g_idx(g_idx, "g_idx", in_features)
        if bias is not None:
            check_tensor(bias, "bias", (out_features,), integer=False)
            check_fp16_bias(bias, "bias")
        # The format's float16 scales, exactly as a checkpoint will hold them.
        weight = QuantizedWeight.from_codes(codes, scales.detach().to(torch.float16).float(), zero_points, bits,
                                            quant_min=qmin, g_idx=g_idx)
        return cls._from_weight(weight, None if bias is None else bias.detach().to(torch.float16), layout)

    @classmethod
    def from_packed(cls, qweight: Tensor, qzeros: Tensor, scales: Tensor, g_idx: Optional[Tensor],
                    bias: Optional[Tensor], bits: int, group_size: Optional[int], symmetric: bool,
                    desc_act: bool = False, static_groups: bool = False, name: str = "") -> "GPTQLinear":
        """A layer from checkpoint tensors; ``qzeros`` in the "gptq_v2" convention (true zero-points).

        ``scales`` must be float16; ``bias`` keeps its dtype. ``g_idx`` None
        builds the grouping ``column // group_size``. Errors name the tensors
        as ``<name>.qweight`` etc.
        """
        p = f"{name}." if name else ""
        layout = GPTQLayout(bits, group_size, symmetric=symmetric, desc_act=desc_act, static_groups=static_groups)
        check_tensor(qweight, p + "qweight")
        if qweight.dtype != torch.int32 or qweight.dim() != 2:
            raise ValueError(f"{p}qweight must be a 2-D torch.int32 tensor, got {qweight.dtype} of shape "
                             f"{list(qweight.shape)}")
        rows, out_features = qweight.shape
        if rows * 32 % bits:
            raise ValueError(f"{p}qweight has {rows} rows, not a whole number of {bits}-bit input columns")
        in_features = rows * 32 // bits
        layout.check_features(in_features, out_features)
        tensors = {"qweight": qweight, "qzeros": qzeros, "scales": scales}
        if g_idx is not None:
            tensors["g_idx"] = g_idx
        weight = layout.from_state(tensors, in_features, out_features, name)
        if bias is not None:
            check_tensor(bias, p + "bias", (out_features,), integer=False)
            if bias.device != qweight.device:
                raise ValueError(f"{p}bias is on {bias.device} but {p}qweight is on {qweight.device}")
        return cls._from_weight(weight, bias, layout)  # a checkpoint's bias keeps its dtype

    # ---- the GPTQ settings and the checkpoint's view of the weight ---------------------------

    group_size = property(lambda self: self.layout.group_size, doc="Columns per group, -1 for one group per row.")
    symmetric = property(lambda self: self.layout.symmetric)
    desc_act = property(lambda self: self.layout.desc_act)
    static_groups = property(lambda self: self.layout.static_groups)
    quant_min = property(lambda self: self.layout.quant_min)
    quant_max = property(lambda self: self.layout.quant_max)
    n_groups = property(lambda self: self.layout.n_groups(self.in_features))

    qweight = property(lambda self: self.checkpoint_tensor("qweight"), doc="int32 ``[in * bits / 32, out]``.")
    qzeros = property(lambda self: self.checkpoint_tensor("qzeros"), doc="int32 ``[n_groups, out * bits / 32]``.")
    scales = property(lambda self: self.checkpoint_tensor("scales"), doc="float16 ``[n_groups, out]``.")
    g_idx = property(lambda self: self.checkpoint_tensor("g_idx"), doc="int32 ``[in]``.")

    def unpack(self) -> GPTQCodes:
        """Codes, scales, zero-points and g_idx in torchquant's code domain."""
        w = self.quantized_weight
        return GPTQCodes(codes=w.codes(self.quant_min), scales=w.scales.clone(),
                         zero_points=w.zero_points(self.quant_min), g_idx=w.g_idx())
