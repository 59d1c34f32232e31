"""Conversions that need no calibration data: each selected ``nn.Linear`` becomes its quantized layer on its own.

RTN, NF4 / FP4 and LLM.int8() share this walk: the Linear layers inside the
model's blocks (found as the calibrated passes find them) minus the excluded
ones are converted one by one, then swapped in; the report has one row per
Linear of the model. Nothing in the model changes if any layer fails.
"""
from __future__ import annotations

import time
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

from torch import nn

from torchquant.ptq.calibration import find_blocks, linear_layers
from torchquant.ptq.convert import set_submodule
from torchquant.ptq.options import exclude_patterns, is_excluded, layer_rows
from torchquant.ptq.report import QUANTIZED, LayerReport, LayerResult, PTQReport

__all__ = ["convert_each_linear", "select_linear_layers"]

# (quantized module, integer result for the report or None)
Built = Tuple[nn.Module, Optional[LayerResult]]


def select_linear_layers(model: nn.Module, exclude: Union[str, Sequence[str]], blocks: Optional[str], method: str):
    """``(found, selected, patterns)``: the block list found (or None) and the ``(name, Linear)`` pairs to convert."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{method}: model must be an nn.Module, got {type(model).__name__}")
    patterns = exclude_patterns(exclude)
    found = find_blocks(model, blocks)
    prefix, root = found if found is not None else ("", model)
    inside = linear_layers(root, prefix)
    if not inside:
        raise ValueError(f"{method}: the model has no nn.Linear layer" +
                         (f" inside its blocks {prefix!r}" if found is not None else "") + ": nothing to quantize")
    selected = [(name, m) for name, m in inside if not is_excluded(name, patterns)]
    if not selected:
        raise ValueError(f"{method}: every nn.Linear in the blocks is excluded (exclude={patterns!r}): nothing to "
                         "quantize")
    if selected[0][0] == "":
        raise ValueError(f"{method}: the model is itself an nn.Linear, which cannot be replaced in place; wrap it in "
                         "a module (e.g. nn.Sequential(layer))")
    return found, inside, selected, patterns


def convert_each_linear(model: nn.Module, method: str, build: Callable[[str, nn.Linear], Built], *,
                        exclude: Union[str, Sequence[str]], blocks: Optional[str],
                        check: Optional[Callable[[str, nn.Linear], None]] = None) -> PTQReport:
    """Replace each selected Linear of ``model`` by ``build(name, linear)``'s module, in place.

    ``check(name, linear)`` runs over every selected layer before anything is
    built (to refuse a layer with a clear error while the model is intact).
    """
    found, inside, selected, patterns = select_linear_layers(model, exclude, blocks, method)
    if check is not None:
        for name, linear in selected:
            check(name, linear)
    start = time.perf_counter()
    reports: Dict[str, LayerReport] = {}
    results: Dict[str, LayerResult] = {}
    built: Dict[str, nn.Module] = {}
    for name, linear in selected:
        t0 = time.perf_counter()
        module, result = build(name, linear)
        built[name] = module
        if result is not None:
            results[name] = result
        reports[name] = LayerReport(name, tuple(linear.weight.shape), QUANTIZED, seconds=time.perf_counter() - t0)
    outside = {name for name, _ in linear_layers(model)} - {name for name, _ in inside}
    layers = layer_rows(model, reports, outside, lambda name: is_excluded(name, patterns), method, "quantized")
    for name, layer in built.items():
        set_submodule(model, name, layer)
    return PTQReport(method, layers, blocks=found[0] if found is not None else None,
                     num_blocks=len(found[1]) if found is not None else 1, seconds=time.perf_counter() - start,
                     results=results)
