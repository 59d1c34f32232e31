"""The tables of lookup-table codes: NF4 and FP4 levels, and the 8-bit dynamic map of double quantization.

A 4-bit lookup-table weight stores, per value, the index of one of 16 levels
in ``[-1, 1]`` and, per block of values, the block's absmax
(:mod:`torchquant.ops.lut`); the run-time kernels read ``(lut[u] - 0) *
absmax``. QLoRA (Dettmers et al. 2023) stores the absmax values themselves in
8 bits ("double quantization"): minus their mean, in blocks of 256, on the
signed dynamic 8-bit map.

The levels are computed here from their definitions, as the QLoRA paper and
bitsandbytes give them, in the same float32 arithmetic, so that codes agree
with bitsandbytes bit for bit (the tests check the tables against it).
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

__all__ = ["nf4_levels", "fp4_levels", "dynamic_map", "levels_of", "LUT_DTYPES"]

LUT_DTYPES = ("nf4", "fp4")

# The outermost quantile of NF4: the levels are N(0, 1) quantiles of 8 equal steps
# of probability from 0.5 to this one on the positive side, 7 on the negative side,
# so that 0 is a level and the grid is asymmetric by one level (QLoRA, section 3;
# bitsandbytes' create_normal_map(offset=0.9677083, use_extra_value=True)).
_NF4_OFFSET = 0.9677083


@functools.lru_cache(maxsize=None)
def _nf4() -> Tensor:
    def quantiles(steps: int) -> Tensor:
        # linspace in float32 (as the reference does), the inverse CDF in float64.
        p = torch.linspace(_NF4_OFFSET, 0.5, steps, dtype=torch.float32)[:-1].to(torch.float64)
        return torch.special.ndtri(p)
    values = torch.cat([quantiles(9), torch.zeros(1, dtype=torch.float64), -quantiles(8)])
    values = values.to(torch.float32).sort().values
    return values / values.max()


def nf4_levels() -> Tensor:
    """float32 ``[16]``: the NormalFloat4 levels, ascending, ``-1`` to ``1`` with an exact 0 (code 7)."""
    return _nf4().clone()


# bitsandbytes' FP4 code: a sign bit and 3 magnitude bits, code c and c + 8 the same
# magnitude with opposite signs; the magnitudes (two exponent bits, one mantissa bit,
# the exponent bits in bitsandbytes' order) scaled so that the largest is 1.
_FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)


def fp4_levels() -> Tensor:
    """float32 ``[16]``: the FP4 levels in code order (codes 8-15 are the negatives of 0-7)."""
    magnitudes = torch.tensor(_FP4_MAGNITUDES, dtype=torch.float32)
    values = torch.cat([magnitudes, 0.0 - magnitudes])  # 0 - 0 = +0: code 8 is a plain zero too
    return values / values.abs().max()


def levels_of(dtype: str) -> Tensor:
    """The 16 levels of ``dtype`` (``"nf4"`` or ``"fp4"``)."""
    if dtype == "nf4":
        return nf4_levels()
    if dtype == "fp4":
        return fp4_levels()
    raise ValueError(f"dtype must be one of {LUT_DTYPES}, got {dtype!r}")


@functools.lru_cache(maxsize=None)
def _dynamic(max_exponent_bits: int = 7, total_bits: int = 8) -> Tensor:
    # Dettmers (2015), "8-Bit Approximations for Parallelism in Deep Learning": a sign,
    # a run of zero bits giving the decimal exponent, an indicator bit, and the rest a
    # linear fraction in [0.1, 1]; the more exponent bits, the fewer fraction bits.
    non_sign_bits = total_bits - 1
    data = []
    for i in range(max_exponent_bits):
        fraction_items = int(2 ** (i + non_sign_bits - max_exponent_bits) + 1)
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
        data += (-(10 ** (-(max_exponent_bits - 1) + i)) * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (2 ** total_bits - len(data))
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


def dynamic_map() -> Tensor:
    """float32 ``[256]``: the signed dynamic 8-bit map, ascending (the levels of double quantization)."""
    return _dynamic().clone()
