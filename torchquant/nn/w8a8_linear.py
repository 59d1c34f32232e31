"""``W8A8Linear``: int8 weights and int8 activations, as SmoothQuant deploys them.

A :class:`~torchquant.nn.QuantizedLinear` in W8A8 mode whose state dict is in
the W8A8 layout (:mod:`torchquant.layouts.w8a8`):

* weight: int8 codes per output channel on a symmetric grid
  (``scale = max|w_row| / 127.5``, torchquant's symmetric min/max grid);
* activations, quantized by the kernel on every call
  (``torchquant.ops.w8a8_linear``, int32 accumulation):

  - ``act_granularity="token"``: one dynamic grid per row (token), the grid
    of ``torchquant.ops.quantize_per_token`` (SmoothQuant's O1 setting);
  - ``act_granularity="tensor"``: one grid for the whole input, dynamic
    (O2: ``max|x| / 127.5`` of each input) or, given ``act_scale`` from
    calibration, static (O3).

``y = acc * s_x * s_w + bias`` in float32, returned in the input's dtype.
Gradients reach the input straight through (``dy W``). A layer whose input
must be divided by SmoothQuant's scales first (nothing before it could absorb
them) has the buffer ``input_scale``.
"""
from __future__ import annotations

from typing import Union

import torch
from torch import Tensor, nn

from torchquant.layouts.w8a8 import W8A8Layout, int8_weight, int8_weight_grid
from torchquant.nn.quantized_linear import QuantizedLinear

__all__ = ["W8A8Linear", "ACT_GRANULARITIES"]

# act_granularity -> the activation mode of QuantizedLinear.
_MODES = {"token": "int8_per_token", "tensor": "int8_per_tensor"}
ACT_GRANULARITIES = tuple(_MODES)


def _check_settings(act_granularity: str, act_scale) -> str:
    if act_granularity not in _MODES:
        raise ValueError(f"act_granularity must be one of {ACT_GRANULARITIES}, got {act_granularity!r}")
    if act_scale is not None and act_granularity != "tensor":
        raise ValueError("act_scale is a static per-tensor scale: it needs act_granularity='tensor' "
                         f"(got act_granularity={act_granularity!r})")
    return _MODES[act_granularity]


class W8A8Linear(QuantizedLinear):
    """``y = x W^T + b`` with int8 weights and int8 activations (see the module docstring).

    Build one with :meth:`from_float`; the constructor makes a layer of the
    right shapes (zero codes) for ``load_state_dict``.

    State dict: ``weight_codes`` int8 ``[out, in]``, ``weight_scales``
    float32 ``[out]`` (``W ~ weight_codes * weight_scales[:, None]``),
    ``bias`` in the original layer's dtype (or None), ``act_scale`` float32
    ``[1]`` for a static per-tensor activation grid, ``input_scale`` ``[in]``
    for a layer that divides its input.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, act_granularity: str = "token",
                 act_scale: Union[float, Tensor, None] = None, *, input_scale: bool = False, device=None,
                 dtype: torch.dtype = torch.float32) -> None:
        mode = _check_settings(act_granularity, act_scale)
        layout = W8A8Layout()
        weight = layout.empty_weight(in_features, out_features, device)
        b = torch.zeros(out_features, dtype=dtype, device=device) if bias else None
        # input_scale in the wider of float32 and the weight's dtype, as InputScaledLinear keeps it.
        s = torch.ones(in_features, dtype=torch.promote_types(dtype, torch.float32), device=device) \
            if input_scale else None
        super().__init__(weight, b, layout=layout, activations=mode, act_scale=act_scale, input_scale=s)

    @classmethod
    def from_float(cls, linear: nn.Linear, act_granularity: str = "token",
                   act_scale: Union[float, Tensor, None] = None) -> "W8A8Linear":
        """A W8A8 layer from a float ``nn.Linear`` (e.g. after SmoothQuant's folding).

        Args:
            linear: the layer; its weight is quantized per output channel. An
                :class:`~torchquant.nn.InputScaledLinear` keeps its
                ``input_scale``.
            act_granularity: ``"token"`` (dynamic per row) or ``"tensor"``.
            act_scale: with ``"tensor"``, a static scale from calibration
                (e.g. ``max|x| / 127.5``); None quantizes each input on its
                own range.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{cls.__name__}.from_float expects an nn.Linear, got {type(linear).__name__}")
        mode = _check_settings(act_granularity, act_scale)
        try:
            codes, scales = int8_weight_grid(linear.weight)
        except ValueError as error:
            raise ValueError(f"{cls.__name__}.from_float: {error}") from None
        bias = None if linear.bias is None else linear.bias.detach()
        input_scale = getattr(linear, "input_scale", None)
        return cls._from_weight(int8_weight(codes, scales), bias, W8A8Layout(), activations=mode,
                                act_scale=act_scale, input_scale=input_scale if isinstance(input_scale, Tensor)
                                else None)

    @property
    def act_granularity(self) -> str:
        return "token" if self.activations == "int8_per_token" else "tensor"

    # The checkpoint's view of the weight (computed from the packed bytes on access); these tensors replace
    # QuantizedLinear.weight_codes(), which gives the same codes as int32.
    weight_codes = property(lambda self: self.checkpoint_tensor("weight_codes"), doc="int8 ``[out, in]``.")
    weight_scales = property(lambda self: self.checkpoint_tensor("weight_scales"), doc="float32 ``[out]``.")

    def extra_repr(self) -> str:
        act = self.act_granularity + (" (static)" if self.act_scale is not None else "")
        text = (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"act_granularity={act}")
        return text + (f", input_scale=[{self.in_features}]" if self.input_scale is not None else "")
