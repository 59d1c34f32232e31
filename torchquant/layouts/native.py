"""torchquant's own checkpoint layout of a quantized Linear weight (what ``save_quantized`` writes).

The state dict holds the weight as QAT's ``convert()`` has always stored it:

* ``qweight``: the codes of ``W [out, in]`` in row-major order, stored
  unsigned (``code - quant_min``) and packed by
  :func:`torchquant.formats.pack_codes` into a flat uint8 tensor (four codes
  a byte up to 2 bits, two up to 4, one up to 8);
* ``scale``, ``zero_point``: float32 in the shape of the weight quantizer's
  grid: ``[1]`` per tensor, ``[out]`` or ``[in]`` per channel (axis 0 or 1),
  ``[out, in / group_size]`` per group; zero-points in the code domain;
* ``g_idx``: int32 ``[in]``, only for act-order results of a post-training
  pass (the group of each column).

At run time a per-tensor grid becomes one group per row with the same value
in every row, a grid per input channel (axis 1) groups of one column; saving
takes the one value back, so the file is what it was.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from torchquant import formats
from torchquant.layouts.base import CheckpointLayout, check_devices, check_tensor, prefixed
from torchquant.quantized_weight import QuantizedWeight, layout_bits
from torchquant.spec import QuantSpec

__all__ = ["TorchquantLayout"]


class TorchquantLayout(CheckpointLayout):
    """``qweight`` / ``scale`` / ``zero_point`` (/ ``g_idx``) on the grid of ``spec`` (see the module docstring).

    Args:
        spec: the weight's :class:`~torchquant.spec.QuantSpec` (2 to 8 bits:
            the widths the run-time kernels read).
        act_order: the columns are grouped by ``g_idx`` rather than
            consecutively (stores ``g_idx``).
    """

    name = "torchquant"

    def __init__(self, spec: QuantSpec, act_order: bool = False) -> None:
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
        layout_bits(spec.bits)  # refuses widths the kernels do not read
        if act_order and spec.granularity != "group":
            raise ValueError("act_order groups columns by g_idx: it needs granularity='group'")
        self.spec, self.act_order = spec, bool(act_order)
        self.quant_min = spec.quant_min

    # ---- grids: the spec's shape <-> the run-time [out, groups] -------------------------------

    def _axis(self) -> int:
        return self.spec.axis % 2  # of a 2-D weight [out, in]

    def grid_shape(self, in_features: int, out_features: int) -> Tuple[int, ...]:
        s = self.spec
        if s.granularity == "tensor":
            return (1,)
        if s.granularity == "channel":
            return (out_features,) if self._axis() == 0 else (in_features,)
        return (out_features, in_features // s.group_size)

    def groups_per_row(self, in_features: int) -> int:
        """Groups of the run-time grid: 1 per tensor or output channel, ``in`` per input channel."""
        s = self.spec
        if s.granularity == "group":
            return in_features // s.group_size
        return in_features if s.granularity == "channel" and self._axis() == 1 else 1

    def runtime_grid(self, grid: Tensor, in_features: int, out_features: int) -> Tensor:
        """float32 ``[out, groups]`` of a grid tensor in the spec's shape (or any shape of as many elements), or
        of one already ``[out, groups]``."""
        g = grid.detach().to(torch.float32)
        if tuple(g.shape) == (out_features, self.groups_per_row(in_features)):
            return g.contiguous()
        g = g.reshape(-1)
        s = self.spec
        if s.granularity == "tensor":
            return g.reshape(1, 1).expand(out_features, 1).contiguous()
        if s.granularity == "channel" and self._axis() == 1:
            return g.reshape(1, in_features).expand(out_features, in_features).contiguous()
        return g.reshape(out_features, -1).contiguous()

    def spec_grid(self, grid: Tensor) -> Tensor:
        """The grid in the spec's shape, from the run-time ``[out, groups]`` (rows of one value keep one)."""
        s = self.spec
        if s.granularity == "tensor":
            return grid[0, :1].clone()
        if s.granularity == "channel":
            return grid[:, 0].clone() if self._axis() == 0 else grid[0, :].clone()
        return grid.clone()

    # ---- from a float weight or integer codes --------------------------------------------------

    def quantize(self, weight: Tensor, scale: Tensor, zero_point: Tensor) -> QuantizedWeight:
        """The weight rounded on the grid, with the arithmetic of the fake-quantize op (so it dequantizes to the
        fake-quantized weight bit for bit)."""
        s = self.spec
        grid = {"axis": s.axis if s.granularity == "channel" else None,
                "group_size": s.group_size if s.granularity == "group" else None}
        codes = formats.quantize(weight.detach(), scale, zero_point, s.quant_min, s.quant_max, **grid)
        return self.from_codes(codes, scale, zero_point.detach().float().round())

    def from_codes(self, codes: Tensor, scale: Tensor, zero_point: Tensor,
                   g_idx: Optional[Tensor] = None) -> QuantizedWeight:
        """Integer codes ``[out, in]`` and grids in the spec's shape (or ``[out, groups]``)."""
        out_features, in_features = codes.shape
        return QuantizedWeight.from_codes(codes, self.runtime_grid(scale, in_features, out_features),
                                          self.runtime_grid(zero_point, in_features, out_features), self.spec.bits,
                                          quant_min=self.quant_min, g_idx=g_idx if self.act_order else None)

    # ---- the adapter -----------------------------------------------------------------------

    def state_keys(self) -> Tuple[str, ...]:
        return ("qweight", "scale", "zero_point") + (("g_idx",) if self.act_order else ())

    def check_weight(self, weight: QuantizedWeight) -> None:
        if weight.bits != self.spec.bits or weight.lut is not None:
            raise ValueError(f"the layout holds {self.spec.bits}-bit integer codes; the weight has {weight.bits}-bit "
                             f"{weight.code_kind} codes")
        groups = self.groups_per_row(weight.in_features)
        if weight.num_groups != groups:
            raise ValueError(f"a {self.spec.granularity} grid of this layer has {groups} group(s) per row; the "
                             f"weight has {weight.num_groups}")
        if weight.perm is not None and not self.act_order:
            raise ValueError("the weight is in act-order (its columns regrouped): build the layout with "
                             "act_order=True so that g_idx is saved")

    def to_state(self, weight: QuantizedWeight) -> Dict[str, Tensor]:
        state = {"qweight": formats.pack_codes(weight.codes(self.quant_min), self.spec.bits, self.quant_min),
                 "scale": self.spec_grid(weight.scales),
                 "zero_point": self.spec_grid(weight.zero_points(self.quant_min))}
        if self.act_order:
            state["g_idx"] = weight.g_idx()
        return state

    def from_state(self, tensors: Dict[str, Tensor], in_features: int, out_features: int,
                   where: str = "") -> QuantizedWeight:
        p = prefixed(where)
        qweight, scale, zero_point = tensors["qweight"], tensors["scale"], tensors["zero_point"]
        numel = out_features * in_features
        per = formats.codes_per_byte(self.spec.bits)
        check_tensor(qweight, p + "qweight", (-(-numel // per),))
        if qweight.dtype != torch.uint8:
            raise TypeError(f"{p}qweight must be torch.uint8 (packed {self.spec.bits}-bit codes), got "
                            f"{qweight.dtype}")
        shape = self.grid_shape(in_features, out_features)
        for key, t in (("scale", scale), ("zero_point", zero_point)):
            check_tensor(t, p + key, shape, integer=False)
        g_idx = tensors.get("g_idx") if self.act_order else None
        check_devices({"qweight": qweight, "scale": scale, "zero_point": zero_point, "g_idx": g_idx}, "qweight", p)
        codes = formats.unpack_codes(qweight, self.spec.bits, self.quant_min, numel).reshape(out_features,
                                                                                            in_features)
        try:
            return self.from_codes(codes, scale, zero_point, g_idx)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{p.rstrip('.') or 'weight'}: {error}") from None

    def empty_weight(self, in_features: int, out_features: int, device=None) -> QuantizedWeight:
        # Code 0 and zero-point 0 lie on every grid (quant_min <= 0 <= quant_max).
        shape = self.grid_shape(in_features, out_features)
        return self.from_codes(torch.zeros(out_features, in_features, dtype=torch.int32, device=device),
                               torch.ones(shape, device=device), torch.zeros(shape, device=device))

    def config(self) -> Dict[str, Any]:
        return {"name": self.name, "spec": dict(self.spec.__dict__), "act_order": self.act_order}

    def weight_spec(self, in_features: int) -> QuantSpec:
        return self.spec

    def extra_repr(self) -> str:
        s = self.spec
        grid = {"tensor": "tensor", "channel": f"channel(axis={s.axis})", "group": f"group({s.group_size})"}
        return f"layout=torchquant, granularity={grid[s.granularity]}, symmetric={s.symmetric}" + \
            (", act_order=True" if self.act_order else "")
