"""Integer codes and their storage: quantize / dequantize on a grid, bit packing.

Codes are stored unsigned (``code - quant_min``) in the narrowest container:
two per byte up to 4 bits, four per byte up to 2 bits, one byte up to 8 bits
and int16 / int32 above. Quantization here uses exactly the arithmetic of the
fake-quantize op (``round_half_even(x * (1 / scale)) + zero_point``), so
``dequantize(quantize(w)) == fake_quantize(w)`` bit for bit.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["quantize", "dequantize", "pack_codes", "unpack_codes", "codes_per_byte", "grid_view"]


def grid_view(x: Tensor, axis: Optional[int], group_size: Optional[int], scale: Tensor) -> Tuple[Tensor, Tensor]:
    """``x`` and ``scale`` (or any per-grid tensor) reshaped so they broadcast."""
    if group_size is not None:
        return x.reshape(*x.shape[:-1], x.shape[-1] // group_size, group_size), scale.unsqueeze(-1)
    if axis is not None:
        shape = [1] * x.dim()
        shape[axis] = -1
        return x, scale.reshape(shape)
    return x, scale.reshape(())


def quantize(x: Tensor, scale: Tensor, zero_point: Tensor, quant_min: int, quant_max: int,
             axis: Optional[int] = None, group_size: Optional[int] = None) -> Tensor:
    """Integer codes of ``x`` (int32, the shape of ``x``)."""
    xv, s = grid_view(x.float(), axis, group_size, scale.float())
    _, z = grid_view(x, axis, group_size, zero_point.float().round())
    inv = torch.reciprocal(s)
    q = torch.clamp(torch.round(xv * inv) + z, quant_min, quant_max)
    return q.to(torch.int32).reshape(x.shape)


def dequantize(codes: Tensor, scale: Tensor, zero_point: Tensor, axis: Optional[int] = None,
               group_size: Optional[int] = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """``(codes - zero_point) * scale`` on the grids of ``scale``."""
    qv, s = grid_view(codes.float(), axis, group_size, scale.float())
    _, z = grid_view(codes, axis, group_size, zero_point.float().round())
    return ((qv - z) * s).reshape(codes.shape).to(dtype)


def codes_per_byte(bits: int) -> int:
    return 4 if bits <= 2 else 2 if bits <= 4 else 1


def pack_codes(codes: Tensor, bits: int, quant_min: int) -> Tensor:
    """Codes in ``[quant_min, quant_min + 2^bits)`` stored unsigned and packed, flattened.

    Sub-byte codes are packed little-end first: element ``i`` of a byte sits
    at bits ``[i * width, (i + 1) * width)``.
    """
    u = (codes.reshape(-1).to(torch.int32) - quant_min)
    if bits > 8:
        return u.to(torch.int32 if bits > 15 else torch.int16)
    per = codes_per_byte(bits)
    if per == 1:
        return u.to(torch.uint8)
    width = 8 // per
    pad = (-u.numel()) % per
    if pad:
        u = torch.cat([u, u.new_zeros(pad)])
    u = u.reshape(-1, per)
    packed = torch.zeros(u.shape[0], dtype=torch.int32, device=u.device)
    for i in range(per):
        packed |= u[:, i] << (i * width)
    return packed.to(torch.uint8)


def unpack_codes(packed: Tensor, bits: int, quant_min: int, numel: int) -> Tensor:
    """Inverse of :func:`pack_codes`: int32 codes, flattened, ``numel`` of them."""
    if bits > 8 or codes_per_byte(bits) == 1:
        return packed.to(torch.int32)[:numel] + quant_min
    per = codes_per_byte(bits)
    width = 8 // per
    mask = (1 << width) - 1
    p = packed.to(torch.int32)
    parts = [(p >> (i * width)) & mask for i in range(per)]
    return torch.stack(parts, dim=1).reshape(-1)[:numel] + quant_min
