"""Test data for the fake-quantize ops: code ranges, quantization parameters
and inputs that exercise every branch (in range, exact rounding ties, clipped
below and above)."""
from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from reference import Granularity

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# (quant_min, quant_max), keyed by a readable id.
QUANT_RANGES = {
    "int8": (-128, 127),
    "uint8": (0, 255),
    "int4": (-8, 7),
    "uint4": (0, 15),
    "int2": (-2, 1),
    "int16": (-32768, 32767),
    "uint16": (0, 65535),
}


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_qparams(qparam_shape, quant_min: int, quant_max: int, gen: torch.Generator) -> Tuple[Tensor, Tensor]:
    """Positive float32 scales and integer-valued float32 zero-points in range.

    Every other entry is a power of two, for which ``(k + 0.5) * scale`` lands
    exactly on a rounding tie; the others are arbitrary. Scales stay below 1/4
    so that inputs of 16-bit codes still fit in float16.
    """
    n = int(torch.Size(qparam_shape).numel())
    arbitrary = torch.exp2(torch.empty(n).uniform_(-10.0, -2.0, generator=gen))
    power_of_two = torch.exp2(-torch.randint(2, 10, (n,), generator=gen).float())
    scale = torch.where(torch.arange(n) % 2 == 1, power_of_two, arbitrary)
    zero_point = torch.randint(quant_min, quant_max + 1, (n,), generator=gen).float()
    return scale.reshape(qparam_shape), zero_point.reshape(qparam_shape)


def make_input(shape, scale: Tensor, zero_point: Tensor, quant_min: int, quant_max: int, granularity: Granularity,
               dtype: torch.dtype, gen: torch.Generator) -> Tensor:
    """Values ``(code - zero_point + frac) * scale`` with codes reaching past
    both ends of the range and ``frac`` a tie (+-0.5: exact for power-of-two
    scales, within rounding of one otherwise), exactly 0 or anything in
    between."""
    span = quant_max - quant_min
    margin = span // 8 + 2
    code = torch.randint(quant_min - margin, quant_max + margin + 1, shape, generator=gen).float()
    # 1/8 each of +0.5, -0.5 and 0, the rest uniform.
    kind = torch.randint(0, 8, shape, generator=gen)
    frac = torch.empty(shape).uniform_(-0.5, 0.5, generator=gen)
    frac = torch.where(kind == 0, 0.5, torch.where(kind == 1, -0.5, torch.where(kind == 2, 0.0, frac)))
    s = granularity.expand(scale, shape)
    z = granularity.expand(zero_point, shape)
    return ((code - z + frac) * s).to(dtype)


def make_case(shape, granularity: Granularity, quant_range: Tuple[int, int], dtype: torch.dtype, seed: int = 0,
              device="cpu"):
    """(x, scale, zero_point) on `device`."""
    gen = generator(seed)
    qmin, qmax = quant_range
    scale, zero_point = make_qparams(granularity.qparam_shape(shape), qmin, qmax, gen)
    x = make_input(shape, scale, zero_point, qmin, qmax, granularity, dtype, gen)
    return x.to(device), scale.to(device), zero_point.to(device)


def make_grad_output(like: Tensor, seed: int = 1) -> Tensor:
    return torch.randn(like.shape, generator=generator(seed)).to(dtype=like.dtype, device=like.device)
