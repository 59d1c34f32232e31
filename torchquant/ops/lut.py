"""Block-wise lookup-table codes: NF4 / FP4 weights and the 8-bit double quantization of their scales.

A tensor is cut into consecutive blocks of ``block_size`` values of its
flattened form (the last block may be shorter). Each block keeps its absmax;
each value is coded as the index of the level of a table (``lut``, at most
256 float32 levels, in any order) nearest to ``value / absmax``::

    absmax[b] = max |x| over block b
    s         = clamp(x * (1 / max(absmax[b], 1e-38)), -1, 1)
    code      = the level nearest to s; on a midpoint, the lower level
    x_hat     = lut[code] * absmax[b]

This is how bitsandbytes quantizes (``quantize_4bit`` / ``quantize_blockwise``,
``torch.bucketize`` over the sorted midpoints), so codes agree with it bit for
bit. The run-time kernels read 4-bit codes packed by
:func:`torchquant.ops.pack_weight` with the table as their ``lut``.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

__all__ = ["lut_quantize", "lut_dequantize"]

_MAX_LEVELS = 256
_FLOAT_INPUTS = (torch.float32, torch.float16, torch.bfloat16)


def lut_quantize(x: Tensor, lut: Tensor, block_size: int) -> Tuple[Tensor, Tensor]:
    """Codes uint8 (``x``'s shape) and absmax float32 ``[ceil(numel / block_size)]`` (see the module docstring).

    Args:
        x: float32, float16 or bfloat16, any shape; NaN / Inf raise ``ValueError``.
        lut: float32 ``[L]``, ``2 <= L <= 256`` finite levels in ``[-1, 1]``.
        block_size: values per block, positive.
    """
    return torch.ops.torchquant.lut_quantize(x, lut, block_size)


def lut_dequantize(codes: Tensor, absmax: Tensor, lut: Tensor, block_size: int) -> Tensor:
    """float32 ``lut[codes] * absmax[block]``, the inverse of :func:`lut_quantize`.

    Args:
        codes: uint8, any shape, each code an index into ``lut`` (checked on
            CPU; on CUDA a code past the table reads NaN).
        absmax: float32 ``[ceil(codes.numel() / block_size)]``.
        lut: float32 ``[L]``.
        block_size: values per block, positive.
    """
    return torch.ops.torchquant.lut_dequantize(codes, absmax, lut, block_size)


# ---- fake kernels: the metadata checks of csrc/runtime/lut_quant_ops.cpp ---------------------

def _check_table(op: str, lut: Tensor, device: torch.device) -> None:
    torch._check_type(lut.dtype == torch.float32, lambda: f"{op}: lut must be float32, got {lut.dtype}")
    torch._check_value(lut.dim() == 1 and 2 <= lut.shape[0] <= _MAX_LEVELS,
                       lambda: f"{op}: lut must have shape [L] with 2 <= L <= {_MAX_LEVELS} levels, got "
                               f"{list(lut.shape)}")
    torch._check_value(lut.device == device,
                       lambda: f"{op}: lut must be on the input's device ({device}), got {lut.device}")


def _check_block_size(op: str, block_size: int) -> None:
    torch._check_value(block_size >= 1, lambda: f"{op}: block_size must be positive, got {block_size}")


@torch.library.register_fake("torchquant::lut_quantize")
def _lut_quantize_fake(x, lut, block_size):
    op = "torchquant.lut_quantize"
    torch._check_type(x.dtype in _FLOAT_INPUTS,
                      lambda: f"{op}: x must be float32, float16 or bfloat16, got {x.dtype}")
    _check_table(op, lut, x.device)
    _check_block_size(op, block_size)
    blocks = (x.numel() + block_size - 1) // block_size
    return x.new_empty(x.shape, dtype=torch.uint8), x.new_empty((blocks,), dtype=torch.float32)


@torch.library.register_fake("torchquant::lut_dequantize")
def _lut_dequantize_fake(codes, absmax, lut, block_size):
    op = "torchquant.lut_dequantize"
    torch._check_type(codes.dtype == torch.uint8, lambda: f"{op}: codes must be uint8, got {codes.dtype}")
    _check_block_size(op, block_size)
    _check_table(op, lut, codes.device)
    torch._check_type(absmax.dtype == torch.float32, lambda: f"{op}: absmax must be float32, got {absmax.dtype}")
    blocks = (codes.numel() + block_size - 1) // block_size
    torch._check_value(absmax.dim() == 1 and absmax.shape[0] == blocks,
                       lambda: f"{op}: absmax must have shape [{blocks}] (one value per block of {block_size} "
                               f"of the {codes.numel()} codes), got {list(absmax.shape)}")
    torch._check_value(absmax.device == codes.device,
                       lambda: f"{op}: absmax must be on the input's device ({codes.device}), got {absmax.device}")
    return codes.new_empty(codes.shape, dtype=torch.float32)
