"""Comparisons used by the fake-quantize tests."""
from __future__ import annotations

import torch
from torch import Tensor

_SAME_WIDTH_INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}

# Relative tolerance of the scale / zero-point gradients (see assert_sums_close).
REDUCTION_RTOL = 1e-6


def assert_bitwise_equal(actual: Tensor, expected: Tensor) -> None:
    """Same dtype, shape and bits (so +0.0 and -0.0 differ)."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    bits = _SAME_WIDTH_INT[actual.dtype]
    assert torch.equal(actual.contiguous().view(bits), expected.contiguous().view(bits)), "sign of zero differs"


def assert_equal_values(actual: Tensor, expected: Tensor) -> None:
    """Same dtype, shape and values; +0.0 equals -0.0 (a masked gradient is
    ``dy * 0`` in one implementation and ``0`` in another)."""
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def assert_sums_close(actual: Tensor, expected: Tensor, abs_terms: Tensor, name: str) -> None:
    """Compares a gradient that is a sum of per-element terms.

    Implementations add the terms in different orders (vector lanes, thread
    pieces, pairwise sums), so the float32 results differ by rounding: by up to
    a few ulps of the partial sums, not of the result. Where terms cancel, the
    result is much smaller than its partial sums and a purely relative
    tolerance would be meaningless, so the tolerance is
    ``rtol * |expected| + rtol * sum(|terms|)`` with rtol = 1e-6.
    """
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual.double() - expected.double()).abs()
    tol = REDUCTION_RTOL * expected.double().abs() + REDUCTION_RTOL * abs_terms.double()
    bad = diff > tol
    assert not bool(bad.any()), (
        f"{name}: {int(bad.sum())} of {bad.numel()} entries differ; worst |diff| {diff.max().item():.3g} "
        f"(tolerance there {tol.flatten()[diff.flatten().argmax()].item():.3g}); "
        f"actual {actual.flatten()[:4].tolist()} expected {expected.flatten()[:4].tolist()}")
