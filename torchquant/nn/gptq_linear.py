"""Inference Linear layer holding a GPTQ-quantized weight in the GPTQ checkpoint layout.

The buffers are exactly the tensors AutoGPTQ / GPTQModel write and vLLM /
exllama read, so a module's ``state_dict`` is a GPTQ checkpoint entry:

* ``qweight`` int32 ``[in * bits / 32, out]``: unsigned codes
  ``u = code - quant_min``, packed along the input dimension
  (:mod:`torchquant.ptq.packing`);
* ``qzeros`` int32 ``[n_groups, out * bits / 32]``: unsigned zero-points
  ``zero - quant_min``, packed along the output dimension. Held here in the
  "gptq_v2" convention (the true zero-point); :mod:`torchquant.ptq.checkpoint`
  converts to and from the v1 convention (zero - 1) at the file boundary;
* ``scales`` float16 ``[n_groups, out]``;
* ``g_idx`` int32 ``[in]``: the group of each input column (any order, for
  act-order);
* ``bias`` ``[out]`` or absent: float16 from :meth:`GPTQLinear.from_codes`, a
  loaded checkpoint's own dtype otherwise.

The weight is ``W[o, i] = (u[o, i] - zero_u[o, g_idx[i]]) * scales[g_idx[i], o]``.
The product is formed in float32, where it is exact (an integer below 2^8
times a float16 needs at most 19 significant bits), then rounded once to the
compute dtype: the same number a float16 kernel computes. Storing the scales in
float16 is the format's choice; it rounds the float32 scales of the GPTQ
solver, so this weight can differ from the solver's ``weight_q`` by that
rounding.

The ecosystem's shapes require ``in_features`` and ``out_features`` to be
multiples of 32 (``in // 32 * bits`` rows of ``qweight``, ``out // 32 * bits``
columns of ``qzeros``) and ``in_features`` to be a multiple of ``group_size``;
other shapes are refused with an error rather than written in a form readers
would misread.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from torchquant.nn.packed_linear import (PackedLinear, check_packed_tensors, check_tensor, is_int,
                                         unsigned_zero_points)

__all__ = ["GPTQLinear", "GPTQCodes"]

_FP16_MAX = torch.finfo(torch.float16).max


class GPTQCodes(NamedTuple):
    """A GPTQ layer in torchquant's code domain (what the GPTQ op returns)."""

    codes: Tensor  # int32 [out, in], in [quant_min, quant_min + 2^bits - 1]
    scales: Tensor  # float32 [out, n_groups] (the stored float16 values)
    zero_points: Tensor  # float32 [out, n_groups], integers in the code domain
    g_idx: Tensor  # int32 [in]


def _packing():
    # Imported on use: torchquant.ptq's modules import this one, so importing
    # the ptq package while this module loads could be circular.
    from torchquant.ptq import packing
    return packing


def _check_bits(bits) -> None:
    supported = _packing().SUPPORTED_BITS
    if not is_int(bits) or bits not in supported:
        raise ValueError(f"bits must be one of {supported} for a GPTQ layer, got {bits!r}")


def _normalize_group_size(group_size: Optional[int], in_features: int) -> int:
    """-1 (the checkpoint's spelling of "one group per row") or a positive divisor of ``in_features``."""
    if group_size is None or group_size == -1:
        return -1
    if not is_int(group_size) or group_size <= 0:
        raise ValueError(f"group_size must be a positive integer, -1 or None (one group per row), got {group_size!r}")
    if in_features % group_size:
        raise ValueError(f"group_size = {group_size} must divide in_features = {in_features}: GPTQ checkpoints hold "
                         f"whole groups (in_features / group_size rows of scales and qzeros)")
    return group_size


def _check_features(in_features: int, out_features: int) -> None:
    for name, value, why in (
            ("in_features", in_features, "qweight has in_features // 32 * bits rows"),
            ("out_features", out_features, "qzeros has out_features // 32 * bits columns")):
        if not is_int(value) or value <= 0 or value % 32:
            raise ValueError(f"{name} must be a positive multiple of 32 for a GPTQ layer ({why}), got {value!r}")


def _check_scales(scales: Tensor, name: str) -> None:
    """Positive, finite and representable in float16 (the format's dtype)."""
    s = scales.float()
    if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
        raise ValueError(f"{name} must be positive and finite; found min {s.min().item()!r}, max {s.max().item()!r}")
    h = scales.to(torch.float16)
    if bool((h == 0).any()) or bool((s > _FP16_MAX).any()):
        raise ValueError(f"{name} must be representable in float16 (GPTQ checkpoints store float16 scales): found "
                         f"values in [{s.min().item():.3g}, {s.max().item():.3g}], float16 covers "
                         f"[6e-08, {_FP16_MAX:.0f}]")


def _check_g_idx(g_idx: Tensor, name: str, in_features: int, n_groups: int, group_size: int, desc_act: bool) -> None:
    check_tensor(g_idx, name, (in_features,), integer=True)
    lo, hi = int(g_idx.min()), int(g_idx.max())
    if lo < 0 or hi >= n_groups:
        raise ValueError(f"{name} must hold group indices in [0, {n_groups - 1}], got values in [{lo}, {hi}]")
    if not desc_act:
        # Readers skip g_idx when desc_act is false (vLLM's Marlin and the
        # exllama paths), so any other grouping would be silently misread there.
        expected = _trivial_g_idx(in_features, group_size, g_idx.device)
        if not torch.equal(g_idx.to(torch.int32), expected):
            raise ValueError(f"{name} is not column // group_size (act-order grouping) but desc_act is False: "
                             f"pass desc_act=True for a layer quantized with act_order")


def _trivial_g_idx(in_features: int, group_size: int, device=None) -> Tensor:
    g = torch.arange(in_features, dtype=torch.int32, device=device)
    return g // group_size if group_size != -1 else torch.zeros_like(g)


def _check_symmetric_zeros(zero_u: Tensor, bits: int, name: str) -> None:
    # Readers of sym=True checkpoints may assume this zero-point and ignore qzeros (vLLM's Marlin path does).
    mid = 1 << (bits - 1)
    if not bool((zero_u == mid).all()):
        raise ValueError(f"{name}: a symmetric {bits}-bit layer must have every zero-point at the middle of the "
                         f"range (unsigned {mid}, i.e. 0 on the signed grid); found unsigned values in "
                         f"[{int(zero_u.min())}, {int(zero_u.max())}]. Pass symmetric=False for an asymmetric grid")


class GPTQLinear(PackedLinear):
    """``y = x W^T + b`` with ``W`` dequantized from GPTQ codes (see the module docstring).

    Build one with :meth:`from_codes` (from the GPTQ op's outputs) or
    :meth:`from_packed` (from checkpoint tensors); the constructor makes an
    empty layer of the right shapes for ``load_state_dict``.

    The dequantized weight is cached in the compute dtype of the last call,
    on its device; loading a state dict or moving the module drops it. After
    changing a buffer in place, call :meth:`clear_cache`.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: Optional[int] = None, *,
                 bias: bool = True, symmetric: bool = True, desc_act: bool = False, static_groups: bool = False,
                 quant_min: Optional[int] = None, device=None) -> None:
        super().__init__()
        _check_bits(bits)
        _check_features(in_features, out_features)
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = _normalize_group_size(group_size, in_features)
        self.symmetric, self.desc_act, self.static_groups = bool(symmetric), bool(desc_act), bool(static_groups)
        if quant_min is None:
            quant_min = -(1 << (bits - 1)) if symmetric else 0
        if not is_int(quant_min):
            raise TypeError(f"quant_min must be an integer, got {quant_min!r}")
        self.quant_min = quant_min
        n_groups = self.n_groups
        self.register_buffer("qweight", torch.zeros(in_features // 32 * bits, out_features, dtype=torch.int32,
                                                    device=device))
        self.register_buffer("qzeros", torch.zeros(n_groups, out_features // 32 * bits, dtype=torch.int32,
                                                   device=device))
        self.register_buffer("scales", torch.ones(n_groups, out_features, dtype=torch.float16, device=device))
        self.register_buffer("g_idx", _trivial_g_idx(in_features, self.group_size, device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16, device=device) if bias else None)

    @property
    def n_groups(self) -> int:
        return 1 if self.group_size == -1 else self.in_features // self.group_size

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
        out_features, in_features = codes.shape
        layer = cls(in_features, out_features, bits, group_size, bias=bias is not None, symmetric=symmetric,
                    desc_act=desc_act, static_groups=static_groups, quant_min=quant_min, device=codes.device)
        n_groups = layer.n_groups
        qmin, qmax = layer.quant_min, layer.quant_max
        lo, hi = int(codes.min()), int(codes.max())
        if lo < qmin or hi > qmax:
            raise ValueError(f"codes must lie in [quant_min, quant_min + 2^bits - 1] = [{qmin}, {qmax}], "
                             f"got values in [{lo}, {hi}]")
        check_tensor(scales, "scales", (out_features, n_groups), integer=False)
        _check_scales(scales, "scales")
        check_tensor(zero_points, "zero_points", (out_features, n_groups))
        zero_u = unsigned_zero_points(zero_points, qmin, qmax)
        if layer.symmetric:
            _check_symmetric_zeros(zero_u, bits, "zero_points")
        _check_g_idx(g_idx, "g_idx", in_features, n_groups, layer.group_size, layer.desc_act)
        if bias is not None:
            check_tensor(bias, "bias", (out_features,), integer=False)
            _check_fp16(bias, "bias")

        layer.qweight = _packing().pack_int32((codes - qmin).t(), bits, dim=0)
        layer.qzeros = _packing().pack_int32(zero_u.t(), bits, dim=1)
        layer.scales = scales.t().to(torch.float16).contiguous()
        layer.g_idx = g_idx.to(torch.int32).contiguous()
        if bias is not None:
            layer.bias = bias.detach().to(torch.float16).clone()
        return layer

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
        _check_bits(bits)
        check_packed_tensors(qweight, qzeros, scales, p)
        rows, out_features = qweight.shape
        if rows * 32 % bits:
            raise ValueError(f"{p}qweight has {rows} rows, not a whole number of {bits}-bit input columns")
        in_features = rows * 32 // bits
        layer = cls(in_features, out_features, bits, group_size, bias=bias is not None, symmetric=symmetric,
                    desc_act=desc_act, static_groups=static_groups, device=qweight.device)
        check_tensor(qzeros, p + "qzeros", tuple(layer.qzeros.shape))
        check_tensor(scales, p + "scales", tuple(layer.scales.shape))
        _check_scales(scales, p + "scales")
        if g_idx is None:
            g_idx = _trivial_g_idx(in_features, layer.group_size, qweight.device)
        _check_g_idx(g_idx, p + "g_idx", in_features, layer.n_groups, layer.group_size, layer.desc_act)
        if layer.symmetric:
            _check_symmetric_zeros(_packing().unpack_int32(qzeros, bits, dim=1), bits, p + "qzeros")
        if bias is not None:
            check_tensor(bias, p + "bias", (out_features,), integer=False)
        for key, t in (("qzeros", qzeros), ("scales", scales), ("g_idx", g_idx), ("bias", bias)):
            if t is not None and t.device != qweight.device:
                raise ValueError(f"{p}{key} is on {t.device} but {p}qweight is on {qweight.device}")
        layer.qweight = qweight.contiguous()
        layer.qzeros = qzeros.contiguous()
        layer.scales = scales.contiguous()
        layer.g_idx = g_idx.to(torch.int32).contiguous()
        if bias is not None:
            layer.bias = bias.contiguous()  # a checkpoint's bias keeps its dtype
        return layer

    # ---- the weight ----------------------------------------------------------------------

    def unpack(self) -> GPTQCodes:
        """Codes, scales, zero-points and g_idx in torchquant's code domain."""
        u = _packing().unpack_int32(self.qweight, self.bits, dim=0).t()
        zero_u = _packing().unpack_int32(self.qzeros, self.bits, dim=1).t()
        return GPTQCodes(codes=(u + self.quant_min).contiguous(), scales=self.scales.float().t().contiguous(),
                         zero_points=(zero_u + self.quant_min).float().contiguous(), g_idx=self.g_idx.clone())

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``[out, in]`` weight in ``dtype``, computed afresh (no cache)."""
        g = self.g_idx.long()
        u = _packing().unpack_int32(self.qweight, self.bits, dim=0)  # [in, out]
        zero_u = _packing().unpack_int32(self.qzeros, self.bits, dim=1)  # [n_groups, out]
        # Exact in float32 (see the module docstring), then one rounding to dtype.
        w = (u - zero_u[g]).float() * self.scales.float()[g]
        return w.t().contiguous().to(dtype)

    def _extra_settings(self) -> str:
        return f", desc_act={self.desc_act}, static_groups={self.static_groups}"


def _check_fp16(t: Tensor, name: str) -> None:
    f = t.float()
    if not bool(torch.isfinite(f).all()) or bool((f.abs() > _FP16_MAX).any()):
        raise ValueError(f"{name} must be finite and within float16 range (GPTQ checkpoints store it as float16)")
