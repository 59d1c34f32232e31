"""The run-time layout itself as a checkpoint layout: the tensors the kernels read, saved as they are.

For a weight no ecosystem format describes (4-bit lookup-table codes, for
instance) and for loading without repacking. The state dict holds

* ``packed``: uint8 ``[out, packed_row_bytes(in, bits)]``;
* ``scales``, ``zeros``: float32 ``[out, groups]`` (zeros in the unsigned
  code domain; absent for lookup-table codes stored without zero-points);
* ``lut``: float32 ``[16]``, for lookup-table codes only;
* with double-quantized scales, ``scale_codes`` uint8 ``[out, groups]``,
  ``scale_absmax`` float32, ``scale_offset`` float32 ``[1]`` and
  ``scale_code_map`` float32 ``[256]`` in place of ``scales``
  (:class:`~torchquant.quantized_weight.QuantizedScales`);
* ``perm``: int64 ``[in]``, for act-order weights only.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
from torch import Tensor

from torchquant.layouts.base import CheckpointLayout, check_devices, is_int, prefixed
from torchquant.quantized_weight import QuantizedScales, QuantizedWeight, layout_bits
from torchquant.spec import QuantSpec

__all__ = ["RuntimeLayout"]

_SCALE_KEYS = ("scale_codes", "scale_absmax", "scale_offset", "scale_code_map")


class RuntimeLayout(CheckpointLayout):
    """The run-time tensors of a weight of ``bits``-wide codes in ``groups`` groups per row.

    ``lookup_table`` and ``act_order`` say whether ``lut`` and ``perm`` are
    part of the state (they must be there when loading); ``double_quant``
    (with ``scale_block_size``) that the scales are stored in 8 bits;
    ``zero_points=False`` (lookup-table codes only) that no zero grid is.
    """

    name = "runtime"

    def __init__(self, bits: int, groups: int = 1, *, lookup_table: bool = False, act_order: bool = False,
                 double_quant: bool = False, scale_block_size: int = 256, zero_points: bool = True) -> None:
        layout_bits(bits)
        if not is_int(groups) or groups < 1:
            raise ValueError(f"groups must be a positive integer, got {groups!r}")
        if not is_int(scale_block_size) or scale_block_size < 1:
            raise ValueError(f"scale_block_size must be a positive integer, got {scale_block_size!r}")
        self.bits, self.groups = bits, groups
        self.lookup_table, self.act_order = bool(lookup_table), bool(act_order)
        self.double_quant = bool(double_quant)
        self.zero_points = bool(zero_points)
        if not self.zero_points and not self.lookup_table:
            raise ValueError("zero_points=False needs lookup_table=True: integer codes need their zero-points")
        self.scale_block_size = scale_block_size if self.double_quant else 256

    @classmethod
    def of(cls, weight: QuantizedWeight) -> "RuntimeLayout":
        """The layout that saves ``weight`` as it is."""
        dq = weight.quantized_scales
        return cls(weight.bits, weight.num_groups, lookup_table=weight.lut is not None,
                   act_order=weight.perm is not None, double_quant=dq is not None,
                   scale_block_size=dq.block_size if dq is not None else 256,
                   zero_points=weight.stored_zeros is not None)

    def state_keys(self) -> Tuple[str, ...]:
        scales = _SCALE_KEYS if self.double_quant else ("scales",)
        return ("packed",) + scales + (("zeros",) if self.zero_points else ()) + \
            (("lut",) if self.lookup_table else ()) + \
            (("perm",) if self.act_order else ())

    def check_weight(self, weight: QuantizedWeight) -> None:
        if RuntimeLayout.of(weight) != self:
            raise ValueError(f"the layout saves {self.config()}; the weight is {RuntimeLayout.of(weight).config()}")

    def to_state(self, weight: QuantizedWeight) -> Dict[str, Tensor]:
        state = {"packed": weight.packed.clone()}
        if self.double_quant:
            state.update(zip(_SCALE_KEYS, (t.clone() for t in weight.quantized_scales.tensors())))
        else:
            state["scales"] = weight.scales.clone()
        if self.zero_points:
            state["zeros"] = weight.zeros.clone()
        if self.lookup_table:
            state["lut"] = weight.lut.clone()
        if self.act_order:
            state["perm"] = weight.perm.clone()
        return state

    def from_state(self, tensors: Dict[str, Tensor], in_features: int, out_features: int,
                   where: str = "") -> QuantizedWeight:
        p = prefixed(where)
        check_devices(dict(tensors), "packed", p)
        for key in ("scale_codes" if self.double_quant else "scales",) + (("zeros",) if self.zero_points else ()):
            if tensors[key].shape != (out_features, self.groups):
                raise ValueError(f"{p}{key} must have shape {[out_features, self.groups]}, got "
                                 f"{list(tensors[key].shape)}")
        perm = tensors.get("perm") if self.act_order else None
        if perm is not None and perm.device.type == "cpu" and perm.dtype == torch.int64 and perm.dim() == 1:
            if not torch.equal(torch.sort(perm).values, torch.arange(perm.numel())):
                raise ValueError(f"{p}perm must be a permutation of 0 .. {perm.numel() - 1}")
        try:
            scales = QuantizedScales(*(tensors[k] for k in _SCALE_KEYS), block_size=self.scale_block_size) \
                if self.double_quant else tensors["scales"]
            weight = QuantizedWeight(tensors["packed"], scales, tensors["zeros"] if self.zero_points else None,
                                     self.bits, in_features,
                                     lut=tensors.get("lut") if self.lookup_table else None, perm=perm)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{p.rstrip('.') or 'weight'}: {error}") from None
        if weight.out_features != out_features:
            raise ValueError(f"{p}packed must have {out_features} rows, got {weight.out_features}")
        return weight

    def empty_weight(self, in_features: int, out_features: int, device=None) -> QuantizedWeight:
        weight = QuantizedWeight.empty(out_features, in_features, self.bits, self.groups,
                                       lookup_table=self.lookup_table, zero_points=self.zero_points, device=device)
        if self.act_order:
            weight.perm = torch.arange(in_features, device=device)
        if self.double_quant:
            weight = QuantizedWeight(weight.packed, QuantizedScales.quantize(weight.scales, self.scale_block_size),
                                     weight.stored_zeros, weight.bits, in_features, lut=weight.lut, perm=weight.perm)
        return weight

    def config(self) -> Dict[str, Any]:
        config = {"name": self.name, "bits": self.bits, "groups": self.groups, "lookup_table": self.lookup_table,
                  "act_order": self.act_order}
        if self.double_quant:
            config.update(double_quant=True, scale_block_size=self.scale_block_size)
        if not self.zero_points:
            config["zero_points"] = False
        return config

    def weight_spec(self, in_features: int) -> QuantSpec:
        grid = {"granularity": "channel", "axis": 0} if self.groups == 1 else \
            {"granularity": "group", "group_size": in_features // self.groups}
        return QuantSpec(bits=self.bits, symmetric=False, **grid)

    def extra_repr(self) -> str:
        return "layout=runtime" + (", lut" if self.lookup_table else "") + (", act_order" if self.act_order else "") \
            + (", double_quant" if self.double_quant else "")
