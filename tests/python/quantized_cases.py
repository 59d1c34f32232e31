"""Random quantized weights and plain-PyTorch references for the QuantizedWeight / QuantizedLinear tests.

The references are written from the formula ``W[n, k] = (v(u) - zero_u) * scale`` of the group of column
``k`` (``g_idx[k]``), with ``v(u) = u`` or ``lut[u]``, never calling the ops under test.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

# Unit roundoff of each output dtype: the kernels compute in float32 and round the result once.
UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
# NF4's 16 levels (QLoRA), a lookup table the 4-bit path must take.
NF4_LEVELS = torch.tensor([-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
                           0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0])


class Codes(NamedTuple):
    """A weight in torchquant's code domain."""

    codes: Tensor  # int32 [N, K] in [quant_min, quant_min + 2^bits - 1]
    scales: Tensor  # float32 [N, G]
    zero_points: Tensor  # float32 [N, G], code domain
    g_idx: Tensor  # int32 [K]
    bits: int
    quant_min: int
    lut: Optional[Tensor] = None


def random_codes(out_features: int, in_features: int, bits: int, groups: int = 1, *, signed: bool = False,
                 act_order: bool = False, lut: bool = False, seed: int = 0) -> Codes:
    gen = torch.Generator().manual_seed(seed)
    qmin = -(1 << (bits - 1)) if signed and not lut else 0
    qmax = qmin + (1 << bits) - 1
    codes = torch.randint(qmin, qmax + 1, (out_features, in_features), generator=gen, dtype=torch.int32)
    scales = torch.empty(out_features, groups).uniform_(1e-3, 2e-2, generator=gen)
    if lut:
        zero_points = torch.zeros(out_features, groups)
    else:
        zero_points = torch.randint(qmin, qmax + 1, (out_features, groups), generator=gen).float()
    g_idx = torch.arange(in_features, dtype=torch.int32) // (in_features // groups)
    if act_order:
        g_idx = g_idx[torch.randperm(in_features, generator=gen)]
    return Codes(codes, scales, zero_points, g_idx, bits, qmin, NF4_LEVELS.clone() if lut else None)


def reference_weight(c: Codes) -> Tensor:
    """float32 ``[N, K]``: ``(v(u) - zero_u) * scale`` column by column, from the formula."""
    g = c.g_idx.long()
    u = (c.codes - c.quant_min).float()
    v = c.lut[u.long()] if c.lut is not None else u
    return (v - (c.zero_points - c.quant_min)[:, g]) * c.scales[:, g]


def weight_magnitude(c: Codes) -> Tensor:
    """float64 ``[N, K]``: ``(|v(u)| + |zero_u|) * scale``, what bounds the rounding of one dequantized element
    whichever way a kernel forms it (``(v - z) * s`` or ``v * s - z * s``)."""
    g = c.g_idx.long()
    u = (c.codes - c.quant_min).double()
    v = c.lut.double()[u.long()] if c.lut is not None else u
    return (v.abs() + (c.zero_points - c.quant_min).double().abs()[:, g]) * c.scales.double()[:, g]


def assert_close_to_reference(y: Tensor, reference: Tensor, abs_terms: Tensor, dtype: torch.dtype,
                              k: int) -> None:
    """``y`` equals the float64 ``reference`` up to the rounding of a float32 kernel.

    A kernel may dequantize and accumulate the ``k`` terms of each output in
    float32 in any order (blocks, SIMD lanes, threads): that moves the result
    by at most ``(k + 2) * 2^-24 * sum |terms|`` (``abs_terms``, computed
    with :func:`weight_magnitude`); it then rounds once to the output dtype,
    ``unit_roundoff(dtype) * |y|`` more (twice that, for the bias addition).
    """
    tol = (k + 2) * 2.0 ** -24 * abs_terms + 2 * UNIT_ROUNDOFF[dtype] * reference.abs() + 1e-30
    diff = (y.double() - reference).abs()
    bad = diff > tol
    assert not bool(bad.any()), (f"{int(bad.sum())} of {bad.numel()} outputs off; worst |diff| "
                                 f"{diff.max().item():.3g}, tolerance there "
                                 f"{tol.flatten()[diff.flatten().argmax()].item():.3g}")


def linear_reference(x: Tensor, c: Codes, bias: Optional[Tensor] = None):
    """``(reference, abs_terms, k)`` of ``x W^T + bias`` in float64 for the weight ``c`` (x in its own dtype)."""
    x64 = x.double().reshape(-1, x.shape[-1])
    reference = x64 @ reference_weight(c).double().t()
    terms = x64.abs() @ weight_magnitude(c).t()
    if bias is not None:
        reference, terms = reference + bias.double(), terms + bias.double().abs()
    shape = (*x.shape[:-1], reference.shape[-1])
    return reference.reshape(shape), terms.reshape(shape), x.shape[-1]


def assert_linear_close(y: Tensor, x: Tensor, c: Codes, bias: Optional[Tensor] = None) -> None:
    """``y`` is ``x W^T + bias`` up to the rounding of a float32 kernel (:func:`assert_close_to_reference`)."""
    reference, terms, k = linear_reference(x, c, bias)
    assert_close_to_reference(y, reference, terms, y.dtype, k)
