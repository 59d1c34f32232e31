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

import time
from typing import Dict, Optional, Sequence, Union

import torch
from torch import nn

from torchquant import formats
from torchquant.layouts import TorchquantLayout
from torchquant.observers import make_observer
from torchquant.ptq.calibration import find_blocks, linear_layers
from torchquant.ptq.convert import quantized_layer, set_submodule
from torchquant.ptq.options import DEFAULT_EXCLUDE, exclude_patterns, is_excluded, layer_rows
from torchquant.ptq.report import QUANTIZED, LayerReport, LayerResult, PTQReport
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
    patterns = exclude_patterns(exclude)
    found = find_blocks(model, blocks)
    prefix, root = found if found is not None else ("", model)
    inside = linear_layers(root, prefix)
    selected = [(name, m) for name, m in inside if not is_excluded(name, patterns)]
    if not selected:
        raise ValueError(f"every nn.Linear in the blocks is excluded (exclude={patterns!r}): nothing to quantize")
    if selected[0][0] == "":
        raise ValueError("the model is itself an nn.Linear, which cannot be replaced in place; wrap it in a module "
                         "(e.g. nn.Sequential(layer))")
    if spec.granularity == "group":
        for name, m in selected:
            if m.in_features % spec.group_size:
                raise ValueError(f"layer {name!r}: spec.group_size={spec.group_size} does not divide its "
                                 f"{m.in_features} input features; pick another group_size or exclude the layer")

    start = time.perf_counter()
    reports: Dict[str, LayerReport] = {}
    results: Dict[str, LayerResult] = {}
    built: Dict[str, nn.Module] = {}
    for name, linear in selected:
        t0 = time.perf_counter()
        results[name] = q = rtn_result(linear.weight, spec)
        built[name] = quantized_layer(linear, q)
        reports[name] = LayerReport(name, tuple(linear.weight.shape), QUANTIZED, seconds=time.perf_counter() - t0)
    outside = {name for name, _ in linear_layers(model)} - {name for name, _ in inside}
    layers = layer_rows(model, reports, outside, lambda name: is_excluded(name, patterns), "RTN", "quantized")
    for name, layer in built.items():
        set_submodule(model, name, layer)
    return PTQReport("RTN", layers, blocks=prefix if found is not None else None,
                     num_blocks=len(found[1]) if found is not None else 1, seconds=time.perf_counter() - start,
                     results=results)
