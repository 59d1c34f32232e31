"""Round to nearest (RTN): every Linear weight rounded on its own grid, no calibration data.

>>> report = torchquant.ptq.rtn(model, QuantSpec(bits=4, symmetric=False, granularity="group", group_size=128))
>>> torchquant.save_quantized(model, "model.safetensors")

The baseline every post-training method is measured against: each weight's
grid comes from the observer of its spec (``spec.observer``: min / max by
default, or the MSE clipping search), and each element is rounded to the
nearest code with the fake-quantize op's arithmetic. The layers become
:class:`~torchquant.nn.QuantizedLinear` layers that run from their packed
codes, saved in torchquant's own layout; the report keeps the integer
results, as every pass's does.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from torchquant import formats
from torchquant.layouts import TorchquantLayout
from torchquant.observers import make_observer
from torchquant.ptq.convert import quantized_layer
from torchquant.ptq.each_linear import convert_each_linear
from torchquant.ptq.options import DEFAULT_EXCLUDE
from torchquant.ptq.report import LayerResult, PTQReport
from torchquant.spec import QuantSpec

__all__ = ["rtn", "rtn_result"]


@torch.no_grad()
def rtn_result(weight: torch.Tensor, spec: QuantSpec) -> LayerResult:
    """The codes and grid of one weight ``[out, in]`` rounded to nearest on the grid of ``spec``."""
    observer = make_observer(spec)
    w = weight.detach()
    observer(w)
    scale, zero_point = observer.calculate_qparams()
    grid = {"axis": spec.axis if spec.granularity == "channel" else None,
            "group_size": spec.group_size if spec.granularity == "group" else None}
    codes = formats.quantize(w, scale, zero_point, spec.quant_min, spec.quant_max, **grid)
    out_features, in_features = w.shape
    # The grids as [out, groups] (a grid per input channel is a group of one column).
    layout = TorchquantLayout(spec)
    scales = layout.runtime_grid(scale, in_features, out_features)
    zeros = layout.runtime_grid(zero_point.round(), in_features, out_features)
    g_idx = torch.arange(in_features) // (in_features // scales.shape[1])
    return LayerResult.from_codes(codes, scales, zeros, g_idx, spec)


def rtn(model: nn.Module, spec: QuantSpec, *, exclude: Union[str, Sequence[str]] = DEFAULT_EXCLUDE,
        blocks: Optional[str] = None) -> PTQReport:
    """Replace every ``nn.Linear`` in the blocks of ``model`` by its round-to-nearest QuantizedLinear, in place.

    Args:
        model: a float model.
        spec: the weight grid (2 to 8 bits; per tensor, channel or group).
        exclude: fnmatch patterns of layers left in floating point (default:
            the LM head).
        blocks: attribute path of the block list (e.g. ``"encoder.layer"``);
            found automatically when None; a model without one is treated as
            one block. Layers outside the blocks stay in floating point.

    Returns:
        A :class:`~torchquant.ptq.report.PTQReport` (``method="RTN"``) with
        the integer result of each quantized layer in ``results``.
    """
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a QuantSpec, got {type(spec).__name__}")
    TorchquantLayout(spec)  # refuses widths the kernels do not read, before anything changes

    def check(name: str, linear: nn.Linear) -> None:
        if spec.granularity == "group" and linear.in_features % spec.group_size:
            raise ValueError(f"layer {name!r}: spec.group_size={spec.group_size} does not divide its "
                             f"{linear.in_features} input features; pick another group_size or exclude the layer")

    def build(name: str, linear: nn.Linear):
        q = rtn_result(linear.weight, spec)
        return quantized_layer(linear, q), q

    return convert_each_linear(model, "RTN", build, exclude=exclude, blocks=blocks, check=check)
