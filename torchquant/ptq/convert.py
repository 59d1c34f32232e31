"""Quantized layers put into a model: what the converters and loaders of every layout share.

:func:`to_quantized_modules` (torchquant's own layout), ``to_gptq_modules``
and ``to_awq_modules`` replace each quantized ``nn.Linear`` by the
:class:`~torchquant.nn.QuantizedLinear` holding its codes, first making sure
that the model is the one the pass quantized: its weight is the report's
dequantized weight, or it already holds the report's codes. ``load_gptq``
and ``load_awq`` replace each ``nn.Linear`` a checkpoint quantized by the
layer built from its tensors, on the same device.
"""
from __future__ import annotations

from typing import Dict, Iterator, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from torchquant.layouts import TorchquantLayout
from torchquant.nn.quantized_linear import QuantizedLinear
from torchquant.ptq.report import LayerResult, PTQReport

__all__ = ["set_submodule", "report_layers", "check_weight_is_result", "check_holds_codes", "check_load_target",
           "check_layer_tensors", "place_like", "quantized_layer", "to_quantized_modules"]


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where the submodule ``name`` of ``model`` is (``name`` not empty)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


# ---- from a post-training report ------------------------------------------------------------

def report_layers(model: nn.Module, report: PTQReport, caller: str, made_by: str,
                  empty_hint: str = "") -> Iterator[Tuple[str, nn.Module, LayerResult]]:
    """``(name, module, q)`` for each layer the report quantized, after checking the arguments.

    ``made_by`` is the call that makes such a report (in the TypeError);
    ``empty_hint`` explains an empty report. A layer the model lacks is
    refused when the iteration reaches it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(report, PTQReport):
        raise TypeError(f"report must be the PTQReport of a post-training pass ({made_by}), got "
                        f"{type(report).__name__}")
    if not report.results:
        raise ValueError(f"{caller}: the {report.method} report holds no quantized weights (report.results is "
                         f"empty{empty_hint})")
    return _report_layers(dict(model.named_modules()), report, caller)


def _report_layers(modules: Dict[str, nn.Module], report: PTQReport,
                   caller: str) -> Iterator[Tuple[str, nn.Module, LayerResult]]:
    for name, q in report.results.items():
        module = modules.get(name)
        if module is None or name == "":
            raise ValueError(f"{caller}: the report quantized layer {name!r}, which the model does not have as a "
                             "submodule; pass the model the report was made on")
        yield name, module, q


def check_weight_is_result(weight: Tensor, q: LayerResult, where: str) -> None:
    """The layer computes with the report's dequantized weight (up to its dtype's rounding).

    ``where`` names the weight in the error: "<caller>: the weight of 'name'".
    """
    w = weight.detach().float()
    dq = q.dequantize().to(w.device)
    # A hundredth of a grid step: an unquantized weight sits up to half a step away.
    tol = 0.01 * q.scales[:, q.g_idx.long()].to(w.device) + torch.finfo(weight.dtype).eps * dq.abs()
    off = int(((w - dq).abs() > tol).sum())
    if off:
        raise ValueError(f"{where} is not the one the report's codes give ({off} of {w.numel()} elements differ by "
                         "more than 1% of a grid step); pass the model the pass quantized, after the pass")


def check_holds_codes(got: Sequence[Tensor], q: LayerResult, where: str,
                      scale_dtype: torch.dtype = torch.float16) -> None:
    """A packed layer's unpacked ``(codes, zero_points, scales[, g_idx])`` are the report's (scales rounded to
    ``scale_dtype``, the layout's)."""
    expected = (q.codes, q.zero_points, q.scales.to(scale_dtype).float(), q.g_idx)
    if not all(torch.equal(a.cpu(), b) for a, b in zip(got, expected)):
        raise ValueError(f"{where}, holding other codes than the report's")


def quantized_layer(module: nn.Linear, q: LayerResult) -> QuantizedLinear:
    """The :class:`QuantizedLinear` (torchquant's layout) of ``module``'s codes ``q``, on its device.

    Keeps the layer's bias and, for an :class:`~torchquant.nn.InputScaledLinear`,
    its ``input_scale``; act-order codes keep their ``g_idx``.
    """
    device = module.weight.device
    groups = q.scales.shape[1]
    act_order = not torch.equal(q.g_idx.long(), torch.arange(q.g_idx.numel()) // (q.g_idx.numel() // groups))
    layout = TorchquantLayout(q.spec, act_order=act_order)
    weight = layout.from_codes(q.codes.to(device), q.scales.to(device), q.zero_points.to(device),
                               q.g_idx.to(device))
    input_scale = getattr(module, "input_scale", None)
    return QuantizedLinear(weight, None if module.bias is None else module.bias.detach(), layout=layout,
                           input_scale=input_scale if isinstance(input_scale, Tensor) else None)


def to_quantized_modules(model: nn.Module, report: PTQReport) -> nn.Module:
    """Replace each quantized ``nn.Linear`` of ``model`` by the :class:`~torchquant.nn.QuantizedLinear` of its
    codes, in place, saved in torchquant's own layout (:func:`torchquant.save_quantized`).

    Any report with integer results will do (RTN, GPTQ, AWQ); unlike the
    GPTQ and AWQ layouts, this one keeps float32 scales, act-order groups of
    any grid and the ``input_scale`` of a layer that divides its input, so
    the converted model computes what the float model the pass left computes,
    up to float rounding. Every layer is checked and built before any is
    replaced: on an error the model is unchanged. Layers that already hold
    the report's codes are left as they are. Returns ``model``.
    """
    built: Dict[str, QuantizedLinear] = {}
    for name, module, q in report_layers(model, report, "to_quantized_modules", "torchquant.ptq.gptq(...)"):
        where = f"to_quantized_modules: layer {name!r}"
        if isinstance(module, QuantizedLinear):
            w = module.quantized_weight
            check_holds_codes((w.codes(q.quant_min), w.zero_points(q.quant_min), w.scales, w.g_idx()), q,
                              f"{where} is already a {type(module).__name__}", scale_dtype=torch.float32)
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(f"{where} is a {type(module).__name__} in the model; only nn.Linear layers become "
                             "QuantizedLinear")
        if tuple(module.weight.shape) != tuple(q.unsigned_codes.shape):
            raise ValueError(f"{where} has weight shape {list(module.weight.shape)} but the report's codes are "
                             f"{list(q.unsigned_codes.shape)}")
        check_weight_is_result(module.weight, q, f"{where}: its weight")
        try:
            built[name] = quantized_layer(module, q)
        except ValueError as error:  # widths the kernels do not read
            raise ValueError(f"{where}: {error}") from None
    for name, layer in built.items():
        set_submodule(model, name, layer)
    return model


# ---- from a checkpoint ----------------------------------------------------------------------

def check_load_target(name: str, module: Optional[nn.Module], kind: type, path, caller: str) -> None:
    """The model has an ``nn.Linear`` (or already a ``kind`` layer) where the checkpoint has packed layer ``name``."""
    if module is None:
        raise ValueError(f"{caller}: {path} quantizes layer {name!r}, which the model does not have")
    if not isinstance(module, (nn.Linear, kind)):
        raise ValueError(f"{caller}: {path} quantizes {name!r}, a {type(module).__name__} in the model; only "
                         f"nn.Linear layers can become {kind.__name__}")


def check_layer_tensors(tensors: Dict[str, Tensor], name: str, keys: Sequence[str], path, caller: str) -> None:
    """The checkpoint holds ``<name>.<key>`` for each of ``keys`` beside ``<name>.qweight``."""
    for key in keys:
        if f"{name}.{key}" not in tensors:
            raise ValueError(f"{caller}: {path} has {name}.qweight but no {name}.{key}")


def place_like(layer: nn.Module, module: nn.Module, name: str, path, caller: str) -> nn.Module:
    """``layer`` (loaded) on the device of the model's ``module``, once their biases agree."""
    if (layer.bias is None) != (module.bias is None):
        has = "has" if layer.bias is not None else "has no"
        raise ValueError(f"{caller}: {path} {has} {name}.bias but the model's layer "
                         f"{'has none' if module.bias is None else 'has one'}")
    device = module.packed_weight.device if isinstance(module, QuantizedLinear) else module.weight.device
    return layer.to(device)
