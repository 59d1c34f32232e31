"""NF4 / FP4 weights (QLoRA's 4-bit NormalFloat and bitsandbytes' FP4), no calibration data.

>>> torchquant.ptq.nf4(model)                                # NF4, blocks of 64
>>> torchquant.ptq.nf4(model, dtype="fp4", double_quant=True)

Each weight is cut into blocks of ``block_size`` consecutive input columns;
each block keeps its absmax and each value the index of the nearest of 16
levels (:mod:`torchquant.lookup_tables`) after dividing by it: the codes
bitsandbytes' ``quantize_4bit`` gives, bit for bit. With ``double_quant`` the
absmax values are stored in 8 bits too (blocks of 256 on the dynamic map,
minus their mean), QLoRA's double quantization: 4.127 bits per weight instead
of 4.5 at blocks of 64.

The layers become :class:`~torchquant.nn.QuantizedLinear` layers computing
from the packed codes with the 4-bit lookup-table kernels (the table is the
layer's ``lut``), saved in the run-time layout.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from torchquant import ops
from torchquant.layouts import RuntimeLayout
from torchquant.lookup_tables import LUT_DTYPES, levels_of
from torchquant.nn.quantized_linear import QuantizedLinear
from torchquant.ptq.each_linear import convert_each_linear
from torchquant.ptq.options import DEFAULT_EXCLUDE
from torchquant.ptq.report import PTQReport
from torchquant.quantized_weight import QuantizedScales, QuantizedWeight

__all__ = ["nf4", "lookup_table_weight", "DEFAULT_BLOCK_SIZE"]

DEFAULT_BLOCK_SIZE = 64  # QLoRA's and bitsandbytes' default
SCALE_BLOCK_SIZE = 256  # double quantization's blocks of absmax values (QLoRA)


def _check_settings(dtype: str, block_size: int, where: str) -> None:
    if dtype not in LUT_DTYPES:
        raise ValueError(f"{where}: dtype must be one of {LUT_DTYPES}, got {dtype!r}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"{where}: block_size must be a positive integer, got {block_size!r}")


def _check_weight(weight: Tensor, block_size: int, where: str) -> None:
    if not isinstance(weight, Tensor) or not weight.dtype.is_floating_point or weight.dim() != 2:
        got = f"{weight.dtype} of shape {list(weight.shape)}" if isinstance(weight, Tensor) else type(weight).__name__
        raise TypeError(f"{where}: the weight must be a 2-D floating-point tensor [out_features, in_features], "
                        f"got {got}")
    if weight.shape[1] % block_size:
        raise ValueError(f"{where}: block_size={block_size} does not divide the weight's {weight.shape[1]} input "
                         f"features (blocks are runs of consecutive input columns); pick a block size that divides "
                         f"it, or exclude the layer")
    if weight.device.type != "meta" and not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{where}: the weight holds NaN or Inf values, which have no 4-bit code")


@torch.no_grad()
def lookup_table_weight(weight: Tensor, dtype: str = "nf4", block_size: int = DEFAULT_BLOCK_SIZE,
                        double_quant: bool = False, where: str = "weight") -> QuantizedWeight:
    """The :class:`~torchquant.quantized_weight.QuantizedWeight` of a float ``weight [out, in]`` in NF4 / FP4."""
    _check_settings(dtype, block_size, where)
    _check_weight(weight, block_size, where)
    out_features, in_features = weight.shape
    lut = levels_of(dtype).to(weight.device)
    codes, absmax = ops.lut_quantize(weight.detach().to(torch.float32), lut, block_size)
    groups = in_features // block_size
    absmax = absmax.view(out_features, groups)
    scales = QuantizedScales.quantize(absmax, SCALE_BLOCK_SIZE) if double_quant else absmax
    # No zero grid: the levels are centred on 0 (the kernels get zeros formed per call).
    return QuantizedWeight(ops.pack_weight(codes, 4), scales, None, 4, in_features, lut=lut)


def nf4(model: nn.Module, *, dtype: str = "nf4", block_size: int = DEFAULT_BLOCK_SIZE, double_quant: bool = False,
        exclude: Union[str, Sequence[str]] = DEFAULT_EXCLUDE, blocks: Optional[str] = None) -> PTQReport:
    """Replace every ``nn.Linear`` in the blocks of ``model`` by its NF4 (or FP4) QuantizedLinear, in place.

    Args:
        model: a float model.
        dtype: ``"nf4"`` (NormalFloat4) or ``"fp4"``.
        block_size: input columns per absmax block; must divide every
            selected layer's ``in_features``.
        double_quant: store the absmax values in 8 bits (QLoRA).
        exclude: fnmatch patterns of layers left in floating point (default:
            the LM head).
        blocks: attribute path of the block list; found automatically when None.

    Returns:
        A :class:`~torchquant.ptq.report.PTQReport` (``method="NF4"`` or ``"FP4"``).
    """
    method = dtype.upper() if isinstance(dtype, str) else "NF4"
    _check_settings(dtype, block_size, f"ptq.nf4")

    def check(name: str, linear: nn.Linear) -> None:
        _check_weight(linear.weight, block_size, f"layer {name!r}")

    def build(name: str, linear: nn.Linear):
        weight = lookup_table_weight(linear.weight, dtype, block_size, double_quant, f"layer {name!r}")
        bias = None if linear.bias is None else linear.bias.detach()
        return QuantizedLinear(weight, bias, layout=RuntimeLayout.of(weight)), None

    return convert_each_linear(model, method, build, exclude=exclude, blocks=blocks, check=check)
