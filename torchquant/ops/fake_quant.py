"""Fake-quantize ops and the MSE clipping search: wrappers and fake kernels."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from torchquant.ops._common import _FLOAT_INPUTS, _OPS

__all__ = ['fake_quantize', 'fake_quantize_backward', 'fake_quantize_learnable_backward', 'mse_clip_search', 'quant_range']


def quant_range(bits: int, signed: bool = True) -> Tuple[int, int]:
    """The integer range ``(quant_min, quant_max)`` of a ``bits``-wide code.

    >>> quant_range(8)
    (-128, 127)
    >>> quant_range(4, signed=False)
    (0, 15)
    """
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 16:
        raise ValueError(f"bits must be an integer in [2, 16], got {bits!r}")
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def fake_quantize(
    input: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    quant_min: int,
    quant_max: int,
    axis: Optional[int] = None,
    group_size: Optional[int] = None,
    grad_factor: float = 1.0,
) -> Tensor:
    """Affine fake quantization: quantize to integers and back, in one op.

    ``q = clamp(round(input / scale) + zero_point, quant_min, quant_max)`` and
    the result is ``(q - zero_point) * scale``, rounding half to even like
    ``torch.round``. The forward is bit-identical to
    ``torch.fake_quantize_per_tensor_affine`` / ``..._per_channel_affine``.

    Granularity:
        * per-tensor: ``axis=None, group_size=None``; scale has one element;
        * per-channel: ``axis=k``; scale has shape ``[input.shape[k]]``;
        * per-group: ``group_size=g``; groups of ``g`` consecutive elements
          along the last dimension; scale has shape
          ``input.shape[:-1] + (input.shape[-1] // g,)``.

    Args:
        input: float32, float16 or bfloat16 tensor, any layout.
        scale: float32, positive and finite.
        zero_point: float32 (rounded half to even) or integer tensor of the
            same shape as ``scale``; must lie in ``[quant_min, quant_max]``.
        quant_min, quant_max: the integer code range, 2 to 16 bits
            (see :func:`quant_range`).
        grad_factor: multiplies the gradients of ``scale`` and ``zero_point``
            (LSQ's gradient scale, e.g. ``1 / sqrt(numel * quant_max)``).

    Gradients: straight-through for ``input`` (zero where clipped); when
    ``scale`` / ``zero_point`` require grad, the LSQ / LSQ+ gradients, computed
    in the same pass over the input.

    On CPU invalid scale / zero-point values raise ``ValueError``; on CUDA
    they are not checked (that would synchronise with the host) and the
    affected outputs are NaN.
    """
    return _OPS.fake_quantize(input, scale, zero_point, quant_min, quant_max, axis, group_size, grad_factor)


def fake_quantize_backward(
    grad_output: Tensor,
    input: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    quant_min: int,
    quant_max: int,
    axis: Optional[int] = None,
    group_size: Optional[int] = None,
) -> Tensor:
    """Straight-through gradient of :func:`fake_quantize` with respect to ``input``."""
    return _OPS.fake_quantize_backward(grad_output, input, scale, zero_point, quant_min, quant_max, axis, group_size)


def fake_quantize_learnable_backward(
    grad_output: Tensor,
    input: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    quant_min: int,
    quant_max: int,
    axis: Optional[int] = None,
    group_size: Optional[int] = None,
    grad_factor: float = 1.0,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of :func:`fake_quantize` for ``input``, ``scale`` and ``zero_point``.

    The scale and zero-point gradients (float32, shaped like ``scale`` and
    ``zero_point``) are the LSQ+ ones multiplied by ``grad_factor``.
    """
    return _OPS.fake_quantize_learnable_backward(
        grad_output, input, scale, zero_point, quant_min, quant_max, axis, group_size, grad_factor
    )


def mse_clip_search(
    input: Tensor,
    min_val: Tensor,
    max_val: Tensor,
    quant_min: int,
    quant_max: int,
    symmetric: bool,
    axis: Optional[int] = None,
    group_size: Optional[int] = None,
    steps: int = 100,
    max_shrink: float = 0.8,
    norm: float = 2.0,
) -> Tuple[Tensor, Tensor]:
    """The grid of each tensor / channel / group that best reconstructs ``input``.

    Tries the ranges ``[f * min_val, f * max_val]`` for shrink factors
    ``f = 1 - k * max_shrink / steps`` (``k = 0 .. steps-1``), builds each
    one's grid as the min/max observers do (symmetric or asymmetric, widened
    to contain 0), and keeps, per grid, the one minimising
    ``sum |fake_quantize(input) - input| ** norm``. Ties keep the wider range.

    ``min_val`` / ``max_val`` are float32 and shaped like the scale of the
    granularity (see :func:`fake_quantize`). Returns ``(scale, zero_point)``
    of that shape, ready for :func:`fake_quantize`.
    """
    return _OPS.mse_clip_search(
        input, min_val, max_val, quant_min, quant_max, symmetric, axis, group_size, steps, max_shrink, norm
    )




# ---------------------------------------------------------------------------
# Fake kernels: output metadata only. They repeat the checks a shape alone can
# decide, so a bad call fails at trace time with the same message as eager.



def _check_meta(op: str, input: Tensor, scale: Tensor, zero_point: Tensor, quant_min: int, quant_max: int,
                axis: Optional[int], group_size: Optional[int]) -> None:
    torch._check(input.dtype in _FLOAT_INPUTS,
                 lambda: f"{op}: input must be float32, float16 or bfloat16, got {input.dtype}")
    torch._check(scale.dtype == torch.float32, lambda: f"{op}: scale must be float32, got {scale.dtype}")
    torch._check(quant_min < quant_max,
                 lambda: f"{op}: quant_min must be less than quant_max, got {quant_min} and {quant_max}")
    torch._check(scale.shape == zero_point.shape or scale.numel() == zero_point.numel(),
                 lambda: f"{op}: zero_point must have the shape of scale {tuple(scale.shape)}, "
                         f"got {tuple(zero_point.shape)}")
    if group_size is not None:
        torch._check(input.dim() >= 1 and group_size > 0,
                     lambda: f"{op}: per-group quantization needs group_size > 0 and a non-scalar input")


@torch.library.register_fake("torchquant::fake_quantize")
def _fake_quantize_fake(input, scale, zero_point, quant_min, quant_max, axis=None, group_size=None, grad_factor=1.0):
    _check_meta("torchquant.fake_quantize", input, scale, zero_point, quant_min, quant_max, axis, group_size)
    return input.new_empty(input.shape)


@torch.library.register_fake("torchquant::fake_quantize_backward")
def _fake_quantize_backward_fake(grad_output, input, scale, zero_point, quant_min, quant_max, axis=None,
                                 group_size=None):
    _check_meta("torchquant.fake_quantize_backward", input, scale, zero_point, quant_min, quant_max, axis,
                group_size)
    return input.new_empty(input.shape)


@torch.library.register_fake("torchquant::fake_quantize_learnable_backward")
def _fake_quantize_learnable_backward_fake(grad_output, input, scale, zero_point, quant_min, quant_max, axis=None,
                                           group_size=None, grad_factor=1.0):
    _check_meta("torchquant.fake_quantize_learnable_backward", input, scale, zero_point, quant_min, quant_max,
                axis, group_size)
    return (
        input.new_empty(input.shape),
        scale.new_empty(scale.shape, dtype=torch.float32),
        zero_point.new_empty(zero_point.shape, dtype=torch.float32),
    )


@torch.library.register_fake("torchquant::mse_clip_search")
def _mse_clip_search_fake(input, min_val, max_val, quant_min, quant_max, symmetric, axis=None, group_size=None,
                          steps=100, max_shrink=0.8, norm=2.0):
    _check_meta("torchquant.mse_clip_search", input, min_val, max_val, quant_min, quant_max, axis, group_size)
    return min_val.new_empty(min_val.shape), min_val.new_empty(min_val.shape)
