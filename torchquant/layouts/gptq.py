"""The GPTQ checkpoint layout of a quantized Linear weight (AutoGPTQ / GPTQModel; read by vLLM, exllama).

The state dict of a GPTQ layer holds exactly the tensors those tools write:

* ``qweight`` int32 ``[in * bits / 32, out]``: unsigned codes
  ``u = code - quant_min``, packed along the input dimension
  (:mod:`torchquant.layouts.gptq_words`);
* ``qzeros`` int32 ``[n_groups, out * bits / 32]``: unsigned zero-points
  ``zero - quant_min``, packed along the output dimension. Held in the
  "gptq_v2" convention (the true zero-point); :mod:`torchquant.ptq.checkpoint`
  converts to and from the v1 convention (zero - 1) at the file boundary;
* ``scales`` float16 ``[n_groups, out]``;
* ``g_idx`` int32 ``[in]``: the group of each input column (any order, for
  act-order);

and ``W[o, i] = (u[o, i] - zero_u[o, g_idx[i]]) * scales[g_idx[i], o]``. At
load the codes are repacked into the run-time layout, act-order columns
sorted into group order (the kernels permute the input instead); the float16
scales become float32 exactly, and go back to the same float16 at save.

The ecosystem's shapes require ``in_features`` and ``out_features`` to be
multiples of 32 and ``in_features`` a multiple of ``group_size``; other
shapes are refused rather than written in a form readers would misread.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from torchquant.layouts.base import (FP16_MAX, CheckpointLayout, check_devices, check_packed_tensors, check_tensor,
                                     is_int, prefixed)
from torchquant.layouts.gptq_words import SUPPORTED_BITS, pack_int32, unpack_int32
from torchquant.quantized_weight import QuantizedWeight
from torchquant.spec import QuantSpec

__all__ = ["GPTQLayout", "trivial_g_idx", "check_fp16_scales", "check_fp16_bias"]


def trivial_g_idx(in_features: int, group_size: int, device=None) -> Tensor:
    """``column // group_size`` (all zeros for -1, one group per row), int32."""
    g = torch.arange(in_features, dtype=torch.int32, device=device)
    return g // group_size if group_size != -1 else torch.zeros_like(g)


def check_fp16_scales(scales: Tensor, name: str) -> None:
    """Positive, finite and representable in float16 (the format's dtype)."""
    s = scales.float()
    if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
        raise ValueError(f"{name} must be positive and finite; found min {s.min().item()!r}, max {s.max().item()!r}")
    h = scales.to(torch.float16)
    if bool((h == 0).any()) or bool((s > FP16_MAX).any()):
        raise ValueError(f"{name} must be representable in float16 (GPTQ checkpoints store float16 scales): found "
                         f"values in [{s.min().item():.3g}, {s.max().item():.3g}], float16 covers "
                         f"[6e-08, {FP16_MAX:.0f}]")


def check_fp16_bias(t: Tensor, name: str) -> None:
    f = t.float()
    if not bool(torch.isfinite(f).all()) or bool((f.abs() > FP16_MAX).any()):
        raise ValueError(f"{name} must be finite and within float16 range (GPTQ checkpoints store it as float16)")


class GPTQLayout(CheckpointLayout):
    """GPTQ's tensors (see the module docstring) for one layer's settings.

    Args:
        bits: 2, 3, 4 or 8.
        group_size: columns per group, or -1 / None for one group per row.
        symmetric: every zero-point is the middle of the range (readers may
            then ignore ``qzeros``, as vLLM's Marlin path does).
        desc_act: act-order (``g_idx`` any grouping); otherwise ``g_idx``
            must be ``column // group_size``, as readers skip it.
        static_groups: recorded only.
        quant_min: the lowest code; ``-2^(bits-1)`` when symmetric, else 0.
    """

    name = "gptq"

    def __init__(self, bits: int, group_size: Optional[int] = None, *, symmetric: bool = True,
                 desc_act: bool = False, static_groups: bool = False, quant_min: Optional[int] = None) -> None:
        if not is_int(bits) or bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS} for a GPTQ layer, got {bits!r}")
        if group_size is None or group_size == -1:
            group_size = -1
        elif not is_int(group_size) or group_size <= 0:
            raise ValueError(f"group_size must be a positive integer, -1 or None (one group per row), got "
                             f"{group_size!r}")
        if quant_min is None:
            quant_min = -(1 << (bits - 1)) if symmetric else 0
        if not is_int(quant_min):
            raise TypeError(f"quant_min must be an integer, got {quant_min!r}")
        self.bits, self.group_size, self.quant_min = bits, group_size, quant_min
        self.symmetric, self.desc_act, self.static_groups = bool(symmetric), bool(desc_act), bool(static_groups)

    @property
    def quant_max(self) -> int:
        return self.quant_min + (1 << self.bits) - 1

    def n_groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else in_features // self.group_size

    def check_features(self, in_features: int, out_features: int) -> None:
        for name, value, why in (
                ("in_features", in_features, "qweight has in_features // 32 * bits rows"),
                ("out_features", out_features, "qzeros has out_features // 32 * bits columns")):
            if not is_int(value) or value <= 0 or value % 32:
                raise ValueError(f"{name} must be a positive multiple of 32 for a GPTQ layer ({why}), got {value!r}")
        if self.group_size != -1 and in_features % self.group_size:
            raise ValueError(f"group_size = {self.group_size} must divide in_features = {in_features}: GPTQ "
                             f"checkpoints hold whole groups (in_features / group_size rows of scales and qzeros)")

    def check_g_idx(self, g_idx: Tensor, name: str, in_features: int) -> None:
        check_tensor(g_idx, name, (in_features,), integer=True)
        n_groups = self.n_groups(in_features)
        lo, hi = int(g_idx.min()), int(g_idx.max())
        if lo < 0 or hi >= n_groups:
            raise ValueError(f"{name} must hold group indices in [0, {n_groups - 1}], got values in [{lo}, {hi}]")
        if not self.desc_act:
            # Readers skip g_idx when desc_act is false (vLLM's Marlin and the
            # exllama paths), so any other grouping would be silently misread there.
            if not torch.equal(g_idx.to(torch.int32), trivial_g_idx(in_features, self.group_size, g_idx.device)):
                raise ValueError(f"{name} is not column // group_size (act-order grouping) but desc_act is False: "
                                 f"pass desc_act=True for a layer quantized with act_order")

    def check_symmetric_zeros(self, zero_u: Tensor, name: str) -> None:
        if not self.symmetric:
            return
        mid = 1 << (self.bits - 1)
        if not bool((zero_u == mid).all()):
            raise ValueError(f"{name}: a symmetric {self.bits}-bit layer must have every zero-point at the middle of "
                             f"the range (unsigned {mid}, i.e. 0 on the signed grid); found unsigned values in "
                             f"[{int(zero_u.min())}, {int(zero_u.max())}]. Pass symmetric=False for an asymmetric grid")

    # ---- the adapter -----------------------------------------------------------------------

    def state_keys(self) -> Tuple[str, ...]:
        return ("qweight", "qzeros", "scales", "g_idx")

    def check_weight(self, weight: QuantizedWeight) -> None:
        if weight.bits != self.bits or weight.lut is not None:
            raise ValueError(f"a GPTQ layer holds {self.bits}-bit integer codes; the weight has {weight.bits}-bit "
                             f"{weight.code_kind} codes")
        self.check_features(weight.in_features, weight.out_features)
        if weight.num_groups != self.n_groups(weight.in_features):
            raise ValueError(f"a GPTQ layer of group_size {self.group_size} has {self.n_groups(weight.in_features)} "
                             f"groups per row; the weight has {weight.num_groups}")

    def to_state(self, weight: QuantizedWeight) -> Dict[str, Tensor]:
        return {"qweight": pack_int32(weight.unsigned_codes().to(torch.int32).t(), self.bits, dim=0),
                "qzeros": pack_int32(weight.zeros.to(torch.int32).t(), self.bits, dim=1),
                "scales": weight.scales.t().to(torch.float16).contiguous(),
                "g_idx": weight.g_idx()}

    def from_state(self, tensors: Dict[str, Tensor], in_features: int, out_features: int,
                   where: str = "") -> QuantizedWeight:
        p = prefixed(where)
        qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
        g_idx = tensors.get("g_idx")
        check_packed_tensors(qweight, qzeros, scales, p)
        n_groups = self.n_groups(in_features)
        check_tensor(qweight, p + "qweight", (in_features // 32 * self.bits, out_features))
        check_tensor(qzeros, p + "qzeros", (n_groups, out_features // 32 * self.bits))
        check_tensor(scales, p + "scales", (n_groups, out_features))
        check_fp16_scales(scales, p + "scales")
        if g_idx is None:
            g_idx = trivial_g_idx(in_features, self.group_size, qweight.device)
        self.check_g_idx(g_idx, p + "g_idx", in_features)
        check_devices({"qweight": qweight, "qzeros": qzeros, "scales": scales, "g_idx": g_idx}, "qweight", p)
        zero_u = unpack_int32(qzeros, self.bits, dim=1).t()
        self.check_symmetric_zeros(zero_u, p + "qzeros")
        u = unpack_int32(qweight, self.bits, dim=0).t()
        return QuantizedWeight.from_codes(u, scales.float().t(), zero_u.float(), self.bits, g_idx=g_idx)

    def empty_weight(self, in_features: int, out_features: int, device=None) -> QuantizedWeight:
        self.check_features(in_features, out_features)
        return QuantizedWeight.empty(out_features, in_features, self.bits, self.n_groups(in_features), device=device)

    def config(self) -> Dict[str, Any]:
        return {"name": self.name, "bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
                "desc_act": self.desc_act, "static_groups": self.static_groups, "quant_min": self.quant_min}

    def weight_spec(self, in_features: int) -> QuantSpec:
        grid = {"granularity": "channel", "axis": 0} if self.group_size == -1 else \
            {"granularity": "group", "group_size": self.group_size}
        return QuantSpec(bits=self.bits, symmetric=self.symmetric, **grid)

    def extra_repr(self) -> str:
        return (f"layout=gptq, symmetric={self.symmetric}, desc_act={self.desc_act}, "
                f"static_groups={self.static_groups}")
