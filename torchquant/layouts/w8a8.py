"""The W8A8 checkpoint layout (SmoothQuant's deployment): int8 weight codes per output channel.

The state dict of a W8A8 layer holds

* ``weight_codes``: int8 ``[out, in]``, symmetric codes ``q`` in ``[-128, 127]``;
* ``weight_scales``: float32 ``[out]``, ``W = q * weight_scales[:, None]``;

(besides ``bias``, ``act_scale`` and ``input_scale``, which the module keeps
as buffers of their own). In the run-time layout the codes are the unsigned
bytes ``u = q + 128`` with zero-point 128, the layout the int8 x int8 kernels
read. The weight grid is torchquant's symmetric min/max grid per row:
``scale = max|w_row| / 127.5`` (:func:`torchquant.observers.qparams_from_range`).
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
from torch import Tensor

from torchquant import formats
from torchquant.layouts.base import CheckpointLayout, check_devices, check_tensor, prefixed
from torchquant.observers import qparams_from_range
from torchquant.quantized_weight import QuantizedWeight
from torchquant.spec import QuantSpec

__all__ = ["W8A8Layout", "WEIGHT_SPEC", "QMIN", "QMAX", "int8_weight_grid", "int8_weight", "check_int8_weight"]

QMIN, QMAX = -128, 127
WEIGHT_SPEC = QuantSpec(bits=8, symmetric=True, granularity="channel", axis=0)
_ZERO_U = -QMIN  # the unsigned zero-point of a symmetric int8 grid


def int8_weight_grid(weight: Tensor) -> Tuple[Tensor, Tensor]:
    """``(codes int8 [out, in], scales float32 [out])`` of a float weight on the symmetric grid of each row."""
    w = weight.detach()
    if not bool(torch.isfinite(w).all()):
        raise ValueError("the weight contains NaN or Inf")
    out_features = w.shape[0]
    if w.numel() == 0:
        return torch.zeros(w.shape, dtype=torch.int8, device=w.device), torch.ones(out_features, device=w.device)
    lo, hi = torch.aminmax(w.float(), dim=1)
    scales, zero = qparams_from_range(lo, hi, WEIGHT_SPEC)
    codes = formats.quantize(w, scales, zero, QMIN, QMAX, axis=0)
    return codes.to(torch.int8), scales.float()


def int8_weight(codes: Tensor, scales: Tensor) -> QuantizedWeight:
    """The run-time weight of int8 codes ``[out, in]`` and per-row scales ``[out]``."""
    return QuantizedWeight.from_codes(codes, scales.reshape(-1, 1), torch.zeros_like(scales).reshape(-1, 1), 8,
                                      quant_min=QMIN)


def check_int8_weight(weight: QuantizedWeight, where: str) -> None:
    """Refuses a weight the int8 x int8 kernels cannot read: they need 8-bit codes on one symmetric grid per
    output channel (unsigned zero-point 128), no lookup table and no column permutation."""
    symmetric = weight.zeros.device.type == "meta" or bool((weight.zeros == _ZERO_U).all())
    if (weight.bits != 8 or weight.num_groups != 1 or weight.lut is not None or weight.perm is not None
            or not symmetric):
        raise ValueError(f"{where} needs symmetric int8 codes with one grid per output channel (8 bits, unsigned "
                         f"zero-point 128); the weight has {weight.bits}-bit {weight.code_kind} codes in "
                         f"{weight.num_groups} group(s) per row{', act-order' if weight.perm is not None else ''}"
                         f"{'' if symmetric else ', asymmetric grids'}")


class W8A8Layout(CheckpointLayout):
    """``weight_codes`` / ``weight_scales`` (see the module docstring)."""

    name = "w8a8"
    quant_min = QMIN

    def state_keys(self) -> Tuple[str, ...]:
        return ("weight_codes", "weight_scales")

    def check_weight(self, weight: QuantizedWeight) -> None:
        check_int8_weight(weight, "the W8A8 layout")

    def to_state(self, weight: QuantizedWeight) -> Dict[str, Tensor]:
        return {"weight_codes": weight.codes(QMIN).to(torch.int8), "weight_scales": weight.scales[:, 0].clone()}

    def from_state(self, tensors: Dict[str, Tensor], in_features: int, out_features: int,
                   where: str = "") -> QuantizedWeight:
        p = prefixed(where)
        codes, scales = tensors["weight_codes"], tensors["weight_scales"]
        check_tensor(codes, p + "weight_codes", (out_features, in_features))
        check_tensor(scales, p + "weight_scales", (out_features,))
        if codes.dtype != torch.int8:
            raise TypeError(f"{p}weight_codes must be torch.int8, got {codes.dtype}")
        if scales.dtype != torch.float32:
            raise TypeError(f"{p}weight_scales must be torch.float32, got {scales.dtype}")
        check_devices({"weight_codes": codes, "weight_scales": scales}, "weight_codes", p)
        return int8_weight(codes, scales)

    def empty_weight(self, in_features: int, out_features: int, device=None) -> QuantizedWeight:
        return int8_weight(torch.zeros(out_features, in_features, dtype=torch.int8, device=device),
                           torch.ones(out_features, device=device))

    def config(self) -> Dict[str, Any]:
        return {"name": self.name}

    def weight_spec(self, in_features: int) -> QuantSpec:
        return WEIGHT_SPEC

    def extra_repr(self) -> str:
        return "layout=w8a8"
