"""Linear layers that divide their input by a per-channel scale: the online form of input scaling.

SmoothQuant and AWQ multiply the input columns of a weight by ``s`` and
divide the layer's input by ``s``. Usually the division is folded offline
into whatever produces the input (a LayerNorm's weight, a Linear's output
rows). Where nothing can absorb it, because the input also feeds a residual
connection (post-LN encoders such as BERT) or comes out of a nonlinearity
that does not commute with scaling (GELU, SiLU), the division has to happen
at run time:

* :class:`InputScaledLinear`: ``y = F.linear(x / input_scale, weight, bias)``,
  a float layer (``weight`` already holds the scaled columns);
* its quantized forms: every :class:`~torchquant.nn.QuantizedLinear` (W8A8,
  GPTQ, AWQ, torchquant's own) has an optional ``input_scale`` of its own;
  :class:`InputScaledW8A8Linear` is the name of a
  :class:`~torchquant.nn.W8A8Linear` that always has one.

Each keeps the buffer ``input_scale`` ``[in_features]`` (float32, or float64
for float64 weights) in its ``state_dict``.
"""
from __future__ import annotations

from typing import Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchquant.nn.w8a8_linear import W8A8Linear

__all__ = ["InputScaledLinear", "InputScaledW8A8Linear"]


def _scale_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(weight_dtype, torch.float32)


def _divide(x: Tensor, input_scale: Tensor) -> Tensor:
    # One rounding of the quotient, in the wider of the two dtypes, back to the input's dtype.
    return (x / input_scale).to(x.dtype)


def check_scales(scales: Tensor, in_features: int, where: str) -> Tensor:
    """``scales`` detached, after checking it is a positive, finite, floating ``[in_features]`` tensor."""
    if not isinstance(scales, Tensor):
        raise TypeError(f"{where}: scales must be a Tensor of shape [{in_features}], got {type(scales).__name__}")
    if scales.dim() != 1 or scales.numel() != in_features:
        raise ValueError(f"{where}: scales must have shape [{in_features}] (one per input feature), got "
                         f"{list(scales.shape)}")
    if not scales.dtype.is_floating_point:
        raise TypeError(f"{where}: scales must be floating point, got {scales.dtype}")
    if not bool(torch.isfinite(scales).all()) or not bool((scales > 0).all()):
        raise ValueError(f"{where}: scales must be positive and finite; {int((~(scales > 0)).sum())} are <= 0 and "
                         f"{int((~torch.isfinite(scales)).sum())} are not finite")
    return scales.detach()


class InputScaledLinear(nn.Linear):
    """``y = F.linear(x / input_scale, weight, bias)``: an ``nn.Linear`` whose input is divided per channel.

    A subclass of ``nn.Linear``, so parameter names (``weight``, ``bias``),
    ``isinstance`` checks and weight quantizers keep working; the division
    costs one elementwise pass over the input at run time.

    Build one from an existing layer with :meth:`convert_`; the constructor
    makes a layer with ``input_scale = 1`` (e.g. for ``load_state_dict``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.register_buffer("input_scale", torch.ones(in_features, dtype=_scale_dtype(self.weight.dtype),
                                                       device=self.weight.device))

    @classmethod
    @torch.no_grad()
    def convert_(cls, linear: nn.Linear, scales: Tensor) -> "InputScaledLinear":
        """Scales ``linear``'s inputs by ``scales`` without changing its function, in place.

        Column ``j`` of the weight is multiplied by ``scales[j]`` (computed in
        the wider of the two dtypes, rounded once) and ``input_scale[j]`` by
        the same factor. A plain ``nn.Linear`` becomes an ``InputScaledLinear``
        with ``input_scale = scales``; an ``InputScaledLinear`` has its
        ``input_scale`` multiplied.

        The module object stays the same (its class is switched, as
        ``torch.nn.utils.parametrize`` does): references held elsewhere (a
        parent module, hooks, a calibration walk that moves the module
        between devices, a scaling group naming it as the producer of
        another group's input) remain valid.

        Returns ``linear`` itself.
        """
        if type(linear) is not nn.Linear and not isinstance(linear, InputScaledLinear):
            # A subclass may compute something other than F.linear(x, weight, bias).
            raise TypeError(f"InputScaledLinear.convert_ expects an nn.Linear or an InputScaledLinear, got "
                            f"{type(linear).__name__}")
        weight = linear.weight
        s = check_scales(scales, linear.in_features, "InputScaledLinear.convert_").to(weight.device)
        wide = torch.promote_types(weight.dtype, s.dtype)
        weight.data.copy_(weight.data.to(wide) * s.to(wide))
        if isinstance(linear, InputScaledLinear):
            linear.input_scale.copy_(linear.input_scale * s.to(linear.input_scale.dtype))
            return linear
        linear.__class__ = cls
        linear.register_buffer("input_scale", s.to(_scale_dtype(weight.dtype)).clone())
        return linear

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(_divide(x, self.input_scale), self.weight, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + ", input_scale=[" + str(self.in_features) + "]"


class InputScaledW8A8Linear(W8A8Linear):
    """A :class:`~torchquant.nn.W8A8Linear` with an ``input_scale``: ``x / input_scale`` is what gets quantized.

    A static ``act_scale`` (``act_granularity="tensor"``) is the grid of
    ``x / input_scale``, which is what the calibration of
    :func:`torchquant.ptq.quantize_w8a8` measures. (``W8A8Linear.from_float``
    of an :class:`InputScaledLinear` gives the same layer; this name keeps
    its constructor with the buffer always there.)
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, act_granularity: str = "token",
                 act_scale: Union[float, Tensor, None] = None, *, device=None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__(in_features, out_features, bias, act_granularity, act_scale, input_scale=True,
                         device=device, dtype=dtype)

    @classmethod
    def from_float(cls, linear: nn.Linear, act_granularity: str = "token",
                   act_scale: Union[float, Tensor, None] = None) -> "InputScaledW8A8Linear":
        """The W8A8 form of an :class:`InputScaledLinear` (its scaled weight, its ``input_scale``)."""
        if not isinstance(linear, InputScaledLinear):
            raise TypeError(f"InputScaledW8A8Linear.from_float expects an InputScaledLinear, got "
                            f"{type(linear).__name__}; use W8A8Linear.from_float for a plain nn.Linear")
        return super().from_float(linear, act_granularity, act_scale)
