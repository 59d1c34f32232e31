"""LLM.int8() (Dettmers et al. 2022): int8 weights and activations, outlier features kept in float.

>>> torchquant.ptq.llm_int8(model)                  # threshold 6.0, no calibration

Weights: vector-wise absmax int8, one symmetric grid per output channel.
Activations: at run time each token row gets its own symmetric int8 grid
(vector-wise), except the input feature columns that hold a value of
magnitude >= ``threshold`` in any token of the batch: those go through a
matmul in the activation's dtype against the same columns of the weight
(the mixed-precision decomposition), all others through the int8 kernel.
Detection and row quantization are one pass of the kernel
(:func:`torchquant.ops.w8a8_linear` with ``outlier_threshold``).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Union

from torch import nn

from torchquant.nn.quantized_linear import DEFAULT_OUTLIER_THRESHOLD, QuantizedLinear
from torchquant.ptq.each_linear import convert_each_linear
from torchquant.ptq.options import DEFAULT_EXCLUDE
from torchquant.ptq.report import PTQReport
from torchquant.layouts.w8a8 import W8A8Layout, int8_weight, int8_weight_grid

__all__ = ["llm_int8"]


def llm_int8(model: nn.Module, threshold: float = DEFAULT_OUTLIER_THRESHOLD, *,
             exclude: Union[str, Sequence[str]] = DEFAULT_EXCLUDE, blocks: Optional[str] = None) -> PTQReport:
    """Replace every ``nn.Linear`` in the blocks of ``model`` by its LLM.int8() QuantizedLinear, in place.

    Args:
        model: a float model.
        threshold: activation magnitude from which an input column is an
            outlier (6.0 in the paper); positive and finite.
        exclude: fnmatch patterns of layers left in floating point (default:
            the LM head).
        blocks: attribute path of the block list; found automatically when None.

    Returns:
        A :class:`~torchquant.ptq.report.PTQReport` (``method="LLM.int8()"``).
    """
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold) \
            or threshold <= 0:
        raise ValueError(f"llm_int8: threshold must be a positive finite number (6.0 in the paper), got "
                         f"{threshold!r}")

    def check(name: str, linear: nn.Linear) -> None:
        if linear.weight.device.type != "meta" and not bool(linear.weight.detach().isfinite().all()):
            raise ValueError(f"llm_int8: layer {name!r}: the weight holds NaN or Inf values, which have no int8 code")

    def build(name: str, linear: nn.Linear):
        layer = QuantizedLinear(int8_weight(*int8_weight_grid(linear.weight)),
                                None if linear.bias is None else linear.bias.detach(), layout=W8A8Layout(),
                                activations="llm_int8", outlier_threshold=float(threshold))
        return layer, None

    return convert_each_linear(model, "LLM.int8()", build, exclude=exclude, blocks=blocks, check=check)
