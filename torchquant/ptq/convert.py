"""Packed layers (GPTQ, AWQ GEMM) put into a model: what the two layouts' converters and loaders share.

``to_gptq_modules`` and ``to_awq_modules`` replace each quantized
``nn.Linear`` by the layer holding its codes, first making sure that the
model is the one the pass quantized: its weight is the report's dequantized
weight, or it already holds the report's codes. ``load_gptq`` and
``load_awq`` replace each ``nn.Linear`` a checkpoint quantized by the layer
built from its tensors, on the same device.
"""
from __future__ import annotations

from typing import Dict, Iterator, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from torchquant.ptq.report import PTQReport, QuantizedWeight

__all__ = ["set_submodule", "report_layers", "check_weight_is_result", "check_holds_codes", "check_load_target",
           "check_layer_tensors", "place_like"]


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` where the submodule ``name`` of ``model`` is (``name`` not empty)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


# ---- from a post-training report ------------------------------------------------------------

def report_layers(model: nn.Module, report: PTQReport, caller: str, made_by: str,
                  empty_hint: str = "") -> Iterator[Tuple[str, nn.Module, QuantizedWeight]]:
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
                   caller: str) -> Iterator[Tuple[str, nn.Module, QuantizedWeight]]:
    for name, q in report.results.items():
        module = modules.get(name)
        if module is None or name == "":
            raise ValueError(f"{caller}: the report quantized layer {name!r}, which the model does not have as a "
                             "submodule; pass the model the report was made on")
        yield name, module, q


def check_weight_is_result(weight: Tensor, q: QuantizedWeight, where: str) -> None:
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


def check_holds_codes(got: Sequence[Tensor], q: QuantizedWeight, where: str) -> None:
    """A packed layer's unpacked ``(codes, zero_points, scales[, g_idx])`` are the report's (scales in float16)."""
    expected = (q.codes, q.zero_points, q.scales.to(torch.float16).float(), q.g_idx)
    if not all(torch.equal(a.cpu(), b) for a, b in zip(got, expected)):
        raise ValueError(f"{where}, holding other codes than the report's")


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
    device = module.qweight.device if isinstance(module, type(layer)) else module.weight.device
    return layer.to(device)
