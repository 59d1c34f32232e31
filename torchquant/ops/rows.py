"""Rows quantized on their own asymmetric grid: the building block of the quantized KV cache.

``quantize_rows(x [R, K], bits)`` puts each row on the asymmetric min/max grid
of ``bits`` bits (the range widened to hold 0, as every torchquant grid) and
packs the codes in the run-time layout, so that
``dequantize_weight(packed, scales, zeros, bits, K)`` gives the rows back.
Keys quantized per channel are the rows of ``x^T``, values per token the rows of ``x``.
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from .linear import packed_row_bytes

__all__ = ["quantize_rows", "ROW_BITS"]

ROW_BITS = (2, 4, 8)
_FLOAT_INPUTS = (torch.float32, torch.float16, torch.bfloat16)


def quantize_rows(x: Tensor, bits: int) -> Tuple[Tensor, Tensor, Tensor]:
    """``(packed uint8 [R, packed_row_bytes(K, bits)], scales float32 [R, 1], zeros float32 [R, 1])``.

    Args:
        x: float32, float16 or bfloat16 ``[R, K]``, finite (NaN / Inf raise
            ``ValueError`` on CPU; on CUDA a NaN row gets a NaN scale).
        bits: 2, 4 or 8.
    """
    return torch.ops.torchquant.quantize_rows(x, bits)


@torch.library.register_fake("torchquant::quantize_rows")
def _quantize_rows_fake(x, bits):
    op = "torchquant.quantize_rows"
    torch._check_value(bits in ROW_BITS, lambda: f"{op}: bits must be 2, 4 or 8, got {bits}")
    torch._check_type(x.dtype in _FLOAT_INPUTS,
                      lambda: f"{op}: x must be float32, float16 or bfloat16, got {x.dtype}")
    torch._check_value(x.dim() == 2 and x.shape[1] >= 1,
                       lambda: f"{op}: x must have shape [rows, K] with K >= 1, got {list(x.shape)}")
    rows, k = x.shape
    return (x.new_empty((rows, packed_row_bytes(k, bits)), dtype=torch.uint8),
            x.new_empty((rows, 1), dtype=torch.float32), x.new_empty((rows, 1), dtype=torch.float32))
