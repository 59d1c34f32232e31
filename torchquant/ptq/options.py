"""What the post-training passes (GPTQ, AWQ, SmoothQuant) share in their settings and their reports.

* ``exclude``: fnmatch patterns of layer or module names a pass leaves
  alone; a layer is excluded when its name or the name of a module
  containing it matches (``"model.layers.0"`` excludes the whole block);
* the group-size check every grouped pass makes before changing anything;
* the report's rows: one per Linear layer of the model, in module order.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from typing import Callable, Collection, Dict, List, Optional, Tuple

from torch import nn

from torchquant.ptq.calibration import BlockwisePass, find_blocks, linear_layers
from torchquant.ptq.report import EXCLUDED, OUTSIDE_BLOCKS, LayerReport

__all__ = ["DEFAULT_EXCLUDE", "exclude_patterns", "is_excluded", "is_int", "is_number", "check_group_size",
           "layer_rows"]

# The output head maps to the vocabulary and is the most sensitive layer; GPTQ
# checkpoints keep it in floating point.
DEFAULT_EXCLUDE: Tuple[str, ...] = ("lm_head", "*.lm_head")


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def exclude_patterns(exclude) -> Tuple[str, ...]:
    """``exclude`` (one pattern or a sequence of them) as a tuple of patterns."""
    if isinstance(exclude, str):
        return (exclude,)
    if isinstance(exclude, Iterable) and not isinstance(exclude, bytes):
        patterns = tuple(exclude)
        if all(isinstance(p, str) for p in patterns):
            return patterns
    raise TypeError("exclude must be an fnmatch pattern string or a sequence of them (e.g. ('lm_head', "
                    f"'*.mlp.gate')), got {exclude!r}")


def is_excluded(name: str, patterns: Tuple[str, ...]) -> bool:
    """Whether ``name`` or a module containing it matches one of ``patterns``."""
    parts = name.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[:i]), p) for i in range(1, len(parts) + 1) for p in patterns)


def check_group_size(model: nn.Module, blocks: Optional[str], pass_: BlockwisePass,
                     group_size: Optional[int]) -> None:
    """Before anything changes: every layer the walk will quantize (``pass_.select``) has whole groups."""
    g = group_size
    if g is None or not isinstance(model, nn.Module):
        return
    found = find_blocks(model, blocks)
    prefix, root = (found[0], found[1]) if found is not None else ("", model)
    for name, module in linear_layers(root, prefix):
        if pass_.select(name, module) and module.in_features % g:
            raise ValueError(f"layer {name!r}: spec.group_size={g} does not divide its {module.in_features} input "
                             "features; pick another group_size or exclude the layer")


def layer_rows(model: nn.Module, reports: Dict[str, LayerReport], outside: Collection[str],
               excluded: Callable[[str], bool], method: str, done: str) -> List[LayerReport]:
    """One row per Linear layer of ``model``: its report, else excluded or outside the blocks.

    A selected layer inside the blocks always has a report (``method`` and
    ``done`` word the error if one has not: that is a bug, not a user error).
    """
    outside = set(outside)
    layers = []
    for name, module in linear_layers(model):
        if name in reports:
            layers.append(reports[name])
        else:
            status = EXCLUDED if excluded(name) else OUTSIDE_BLOCKS if name in outside else None
            if status is None:
                raise RuntimeError(f"{method}: layer {name!r} was neither {done} nor skipped")
            layers.append(LayerReport(name, tuple(module.weight.shape), status))
    return layers
