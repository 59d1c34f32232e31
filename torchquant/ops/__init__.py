"""Typed Python entry points of torchquant's C++ operators.

Each function is a thin wrapper over ``torch.ops.torchquant.<name>``: the C++
op checks its arguments (raising ``TypeError`` / ``ValueError`` that name the
argument) and autograd is registered in C++. This module also registers the
fake (shape-only) kernels that let ``torch.compile(fullgraph=True)`` and
``torch.export`` trace the ops without running them.
"""
from __future__ import annotations

import math
import warnings
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

__all__ = [
    "GPTQResult",
    "fake_quantize",
    "fake_quantize_backward",
    "fake_quantize_learnable_backward",
    "gptq_accumulate_hessian",
    "gptq_quantize",
    "mse_clip_search",
    "quant_range",
]

_OPS = torch.ops.torchquant


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


class GPTQResult(NamedTuple):
    """What :func:`gptq_quantize` returns (all on the weight's device)."""

    weight_q: Tensor      # [out, in], weight's dtype: the dequantized weights
    codes: Tensor         # [out, in] int32 in [quant_min, quant_max], original column order
    scales: Tensor        # [out, n_groups] float32
    zero_points: Tensor   # [out, n_groups] float32 holding integers, in the code domain
    g_idx: Tensor         # [in] int32: the group of each input column
    loss: Tensor          # 0-d float32: tr((W - weight_q) H (W - weight_q)^T) / 2, undamped H
    damp: Tensor          # 0-d float32: damping added to the diagonal, -1 after a round-to-nearest fallback


def _check_int(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        expected = "an int or None" if allow_none else "an int"
        raise TypeError(f"{name} must be {expected}, got {value!r}")


def _check_tensor(op: str, name: str, value) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(value).__name__}")


def gptq_accumulate_hessian(hessian: Tensor, inputs: Tensor, num_seen: int) -> int:
    """Adds a batch of a layer's inputs to its GPTQ Hessian, in place.

    ``hessian`` (float32 ``[in, in]``) becomes the running average of
    ``2 x x^T`` over every input row seen so far::

        H <- H * num_seen / (num_seen + n) + 2 / (num_seen + n) * X^T X

    where ``X`` is ``inputs`` (any float dtype, shape ``[..., in]``) viewed as
    ``[n, in]`` in float32. Start from ``torch.zeros(in, in)`` and
    ``num_seen=0``; returns the new count ``num_seen + n``. NaN or Inf in
    ``inputs`` raises ``ValueError``.
    """
    op = "torchquant.gptq_accumulate_hessian"
    _check_tensor(op, "hessian", hessian)
    _check_tensor(op, "inputs", inputs)
    _check_int("num_seen", num_seen)
    _OPS.gptq_accumulate_hessian(hessian, inputs, num_seen)
    return num_seen + math.prod(inputs.shape[:-1])


def gptq_quantize(
    weight: Tensor,
    hessian: Tensor,
    quant_min: int,
    quant_max: int,
    symmetric: bool,
    group_size: Optional[int] = None,
    act_order: bool = False,
    static_groups: bool = False,
    block_size: int = 128,
    percdamp: float = 0.01,
    clip_search_steps: int = 0,
    clip_max_shrink: float = 0.8,
    rtn_fallback: bool = False,
    layer_name: str = "",
) -> GPTQResult:
    """GPTQ (Frantar et al. 2022): quantize ``weight`` column by column with error feedback.

    Minimises ``tr((W - Q) H (W - Q)^T)`` approximately: each column is rounded
    on its grid and its error, weighted by the inverse Hessian, is spread over
    the columns not yet quantized.

    Args:
        weight: ``[out, in]`` float32, float16 or bfloat16 (flatten a
            convolution's weight to 2-D first). Not modified.
        hessian: ``[in, in]`` float32, e.g. from :func:`gptq_accumulate_hessian`.
            Not modified.
        quant_min, quant_max: the code range (:func:`quant_range`); a symmetric
            grid needs a signed range.
        symmetric: zero-point 0 and ``scale = max|w| / ((qmax - qmin) / 2)``;
            otherwise the min/max range is mapped onto the code range.
        group_size: columns per grid (must divide ``in``); None: one grid per row.
        act_order: quantize columns by decreasing Hessian diagonal.
        static_groups: take every group's grid from the original weights up
            front (needs ``group_size``); otherwise a group's grid is taken
            when the block holding its first column starts.
        block_size: columns per lazy-update block.
        percdamp: damping added to the Hessian diagonal, as a fraction of its
            mean; multiplied by 10 per failed Cholesky factorization while it
            stays at most 1.
        clip_search_steps: 0 for min/max grids; otherwise the MSE-best of that
            many shrunk ranges down to ``1 - clip_max_shrink`` (as
            :func:`mse_clip_search`).
        rtn_fallback: when the Hessian cannot be factorized even with the most
            damping, warn and round to nearest (``damp = -1``) instead of
            raising ``torch.linalg.LinAlgError``.
        layer_name: named in errors and warnings.

    Returns:
        :class:`GPTQResult`. ``weight_q == (codes - zero_points[:, g_idx]) *
        scales[:, g_idx]`` exactly (in float32, then cast to weight's dtype).
    """
    op = "torchquant.gptq_quantize"
    _check_tensor(op, "weight", weight)
    _check_tensor(op, "hessian", hessian)
    for name, value in (("quant_min", quant_min), ("quant_max", quant_max), ("block_size", block_size),
                        ("clip_search_steps", clip_search_steps)):
        _check_int(name, value)
    _check_int("group_size", group_size, allow_none=True)
    if not isinstance(layer_name, str):
        raise TypeError(f"layer_name must be a str, got {type(layer_name).__name__}")
    # Quantization is not differentiable: a Parameter is read as plain data.
    args = (weight.detach(), hessian.detach(), quant_min, quant_max, bool(symmetric), group_size, bool(act_order),
            bool(static_groups), block_size, float(percdamp), clip_search_steps, float(clip_max_shrink),
            bool(rtn_fallback), layer_name)
    if torch.compiler.is_compiling():
        return GPTQResult(*_OPS.gptq_quantize(*args))
    # The op's round-to-nearest warning (TORCH_WARN) reaches Python as a
    # UserWarning only where torch.ops translates C++ warnings; elsewhere it
    # goes to stderr, and the fallback is reported here from damp == -1.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = GPTQResult(*_OPS.gptq_quantize(*args))
    for w in caught:
        warnings.warn(w.message, w.category, stacklevel=2)
    if float(result.damp) == -1.0 and not any("round-to-nearest" in str(w.message) for w in caught):
        where = f" (layer '{layer_name}')" if layer_name else ""
        warnings.warn(f"{op}{where}: the damped Hessian is not positive definite even with the most damping; "
                      f"fell back to round-to-nearest for this layer (damp = -1)", UserWarning, stacklevel=2)
    return result


# ---------------------------------------------------------------------------
# Fake kernels: output metadata only. They repeat the checks a shape alone can
# decide, so a bad call fails at trace time with the same message as eager.

_FLOAT_INPUTS = (torch.float32, torch.float16, torch.bfloat16)


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


@torch.library.register_fake("torchquant::gptq_accumulate_hessian")
def _gptq_accumulate_hessian_fake(hessian, inputs, num_seen):
    op = "torchquant.gptq_accumulate_hessian"
    torch._check(hessian.dtype == torch.float32, lambda: f"{op}: hessian must be float32, got {hessian.dtype}")
    torch._check(hessian.dim() == 2 and hessian.shape[0] == hessian.shape[1],
                 lambda: f"{op}: hessian must be a square matrix, got shape {tuple(hessian.shape)}")
    torch._check(inputs.dim() >= 1 and inputs.shape[-1] == hessian.shape[0],
                 lambda: f"{op}: inputs must have shape [..., {hessian.shape[0]}], got {tuple(inputs.shape)}")
    return None


@torch.library.register_fake("torchquant::gptq_quantize")
def _gptq_quantize_fake(weight, hessian, quant_min, quant_max, symmetric, group_size=None, act_order=False,
                        static_groups=False, block_size=128, percdamp=0.01, clip_search_steps=0,
                        clip_max_shrink=0.8, rtn_fallback=False, layer_name=""):
    op = "torchquant.gptq_quantize"
    torch._check(weight.dtype in _FLOAT_INPUTS,
                 lambda: f"{op}: weight must be float32, float16 or bfloat16, got {weight.dtype}")
    torch._check(weight.dim() == 2, lambda: f"{op}: weight must be 2-D, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    torch._check(hessian.dtype == torch.float32, lambda: f"{op}: hessian must be float32, got {hessian.dtype}")
    torch._check(hessian.device == weight.device,
                 lambda: f"{op}: hessian must be on the device of weight ({weight.device}), got {hessian.device}")
    torch._check(tuple(hessian.shape) == (cols, cols),
                 lambda: f"{op}: hessian must be [{cols}, {cols}], got shape {tuple(hessian.shape)}")
    torch._check(quant_min < quant_max,
                 lambda: f"{op}: quant_min must be less than quant_max, got {quant_min} and {quant_max}")
    if group_size is not None:
        torch._check(group_size > 0 and cols % group_size == 0,
                     lambda: f"{op}: group_size ({group_size}) must be positive and divide in_features ({cols})")
    n_groups = 1 if group_size is None else cols // group_size
    f32 = dict(dtype=torch.float32, device=weight.device)
    return (
        weight.new_empty((rows, cols)),
        weight.new_empty((rows, cols), dtype=torch.int32),
        weight.new_empty((rows, n_groups), **f32),
        weight.new_empty((rows, n_groups), **f32),
        weight.new_empty((cols,), dtype=torch.int32),
        weight.new_empty((), **f32),
        weight.new_empty((), **f32),
    )


# ---------------------------------------------------------------------------
# AWQ (Lin et al. 2023, arXiv 2306.00978): the activation-aware scale search
# and the clipping search, their result types, the clamp that applies a clip,
# and their fake kernels.

__all__ += ["AWQClip", "AWQScales", "awq_apply_clip", "awq_search_clip", "awq_search_scales"]


class AWQScales(NamedTuple):
    """What :func:`awq_search_scales` returns (on the input's device)."""

    scales: Tensor  # [in] float32: multiply the weights' input columns by it, divide the inputs by it
    losses: Tensor  # [grid] float32: the output error of each grid point alpha = i / grid


class AWQClip(NamedTuple):
    """What :func:`awq_search_clip` returns: the range each group is clamped to."""

    min_val: Tensor  # [out, n_groups] float32
    max_val: Tensor  # [out, n_groups] float32


def _awq_group_size(group_size: Optional[int]) -> int:
    """None is one group per row, spelled -1 by the ops (and the AWQ config)."""
    if group_size is None:
        return -1
    _check_int("group_size", group_size)
    return group_size


def awq_search_scales(
    x: Tensor,
    weights,
    biases,
    quant_min: int,
    quant_max: int,
    symmetric: bool,
    group_size: Optional[int],
    grid: int = 20,
    duo_scaling: bool = False,
) -> AWQScales:
    """AWQ's activation-aware scale search for the Linear layers that read ``x``.

    Scaling input channel ``j`` of the weights up by ``s_j`` (and the input
    down by it) protects the channels with large activations from rounding.
    For each grid point ``alpha = i / grid`` (``i = 0 .. grid-1``)::

        s = mean|x|^alpha                                   (duo_scaling=False)
        s = mean|x|^alpha / (w_mean^(1 - alpha) + 1e-4)     (duo_scaling=True)
        s = clamp(s, min=1e-4);  s = s / sqrt(max(s) * min(s))
        loss = sum_k mean(((x / s) @ Q(W_k * s)^T - x @ W_k^T) ** 2)

    where ``mean|x|`` is per input channel over the rows of ``x``, ``w_mean``
    is AutoAWQ's: every weight divided by its group's ``max|W|`` (+1e-6), then
    the mean over all rows of all ``weights``; and ``Q`` quantizes on a
    min/max grid per group of ``group_size`` input columns (torchquant's grid:
    see :func:`torchquant.observers.qparams_from_range`). The ``s`` of the
    smallest loss is returned (the first, i.e. smallest ``alpha``, on ties).
    Without duo scaling ``alpha = 0`` is ``s = 1``: ``losses[0]`` is the error
    of plain round-to-nearest, so the result is never worse than RTN on this
    objective.

    Args:
        x: ``[tokens, in]`` float32/16/bf16 calibration inputs, finite.
        weights: list of ``[out_k, in]`` weights (e.g. q, k and v).
        biases: None, or one ``[out_k]`` bias per weight. Checked, but they
            cancel in the error and do not change the result.
        quant_min, quant_max: the code range (:func:`quant_range`); a
            symmetric grid needs a signed range.
        symmetric: zero-point 0; otherwise the group's min/max is mapped onto
            the code range.
        group_size: input columns per grid (must divide ``in``); None or -1:
            one grid per row.
        grid: number of ``alpha`` values tried (at least 1).
        duo_scaling: also divide by the weight magnitude (AutoAWQ's option).

    Returns:
        :class:`AWQScales` ``(scales [in], losses [grid])``, float32.

    The error is computed as ``mean((x @ dW^T) ** 2)`` with
    ``dW = Q(W * s) / s - W``, or through ``x^T x`` when ``x`` has more rows
    than columns: the same quantity with fewer multiplications.
    """
    op = "torchquant.awq_search_scales"
    _check_tensor(op, "x", x)
    if not isinstance(weights, (list, tuple)):
        raise TypeError(f"{op}: weights must be a list of Tensors, got {type(weights).__name__}")
    for k, w in enumerate(weights):
        _check_tensor(op, f"weights[{k}]", w)
    if biases is not None:
        if not isinstance(biases, (list, tuple)):
            raise TypeError(f"{op}: biases must be None or a list of Tensors, got {type(biases).__name__}")
        for k, b in enumerate(biases):
            _check_tensor(op, f"biases[{k}]", b)
        biases = list(biases)
    for name, value in (("quant_min", quant_min), ("quant_max", quant_max), ("grid", grid)):
        _check_int(name, value)
    scales, losses = _OPS.awq_search_scales(x, list(weights), biases, quant_min, quant_max, bool(symmetric),
                                            _awq_group_size(group_size), grid, bool(duo_scaling))
    return AWQScales(scales, losses)


def awq_search_clip(
    x: Tensor,
    weight: Tensor,
    quant_min: int,
    quant_max: int,
    symmetric: bool,
    group_size: Optional[int],
    steps: int = 20,
    max_shrink: float = 0.5,
    max_tokens: int = 512,
    out_chunk: int = 256,
) -> AWQClip:
    """AWQ's clipping search: the range each group of ``weight`` is clamped to before quantization.

    For every output channel and group of ``group_size`` input columns, with
    ``lo, hi`` the group's ``-max|w|, max|w|`` (symmetric, as AutoAWQ) or its
    min and max (asymmetric), tries the shrink factors
    ``f = 1 - k * max_shrink / steps`` (``k = 0 .. steps-1``, as
    :func:`mse_clip_search`): the weight clamped to ``[f * lo, f * hi]`` and
    quantized on its min/max grid, ``q``. It keeps the ``f`` minimising the
    group's output error ``sum_t (x_t . (q - w)) ** 2`` over the sampled
    tokens ``x[::max(1, tokens // max_tokens)]`` (AutoAWQ's sampling). ``f = 1``
    (no clipping) is a candidate and wins ties, so clipping never increases
    this error.

    AutoAWQ's own grid (``1 - i / 20`` for ``i < 10``) is ``steps=10,
    max_shrink=0.5``; the default ``steps=20`` tries those and the points
    between them. AutoAWQ clamps asymmetric groups to ``[-f max|w|, f max|w|]``
    too; here both ends of an asymmetric group's own range shrink.

    Args:
        x: ``[tokens, in]`` inputs of the layer (after any AWQ scaling).
        weight: ``[out, in]`` (after any AWQ scaling).
        quant_min, quant_max, symmetric, group_size: the weight's grid, as in
            :func:`awq_search_scales`.
        steps: candidates, at least 1.
        max_shrink: in ``(0, 1)``.
        max_tokens: the token sample's target size (AutoAWQ's 512).
        out_chunk: output channels searched at a time (bounds memory).

    Returns:
        :class:`AWQClip` ``(min_val, max_val)``, each ``[out, in / group_size]``
        float32; apply with :func:`awq_apply_clip`.
    """
    op = "torchquant.awq_search_clip"
    _check_tensor(op, "x", x)
    _check_tensor(op, "weight", weight)
    for name, value in (("quant_min", quant_min), ("quant_max", quant_max), ("steps", steps),
                        ("max_tokens", max_tokens), ("out_chunk", out_chunk)):
        _check_int(name, value)
    min_val, max_val = _OPS.awq_search_clip(x, weight, quant_min, quant_max, bool(symmetric),
                                            _awq_group_size(group_size), steps, float(max_shrink), max_tokens,
                                            out_chunk)
    return AWQClip(min_val, max_val)


def awq_apply_clip(weight: Tensor, min_val: Tensor, max_val: Tensor) -> Tensor:
    """``weight [out, in]`` clamped to ``[min_val, max_val]`` group by group (a new tensor, weight's dtype).

    ``min_val`` / ``max_val`` are ``[out, n_groups]`` (from
    :func:`awq_search_clip`); a group is ``in / n_groups`` consecutive input
    columns. The clamp is done in float32, where the bounds were searched.
    """
    op = "torchquant.awq_apply_clip"
    for name, t in (("weight", weight), ("min_val", min_val), ("max_val", max_val)):
        _check_tensor(op, name, t)
    if weight.dim() != 2:
        raise ValueError(f"{op}: weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
    out, cols = weight.shape
    if min_val.dim() != 2 or min_val.shape[0] != out or min_val.shape[1] == 0 or cols % min_val.shape[1]:
        raise ValueError(f"{op}: min_val must be [out={out}, n_groups] with n_groups dividing in={cols}, "
                         f"got shape {tuple(min_val.shape)}")
    if max_val.shape != min_val.shape:
        raise ValueError(f"{op}: max_val must have the shape of min_val {tuple(min_val.shape)}, "
                         f"got {tuple(max_val.shape)}")
    for name, t in (("min_val", min_val), ("max_val", max_val)):
        if t.device != weight.device:
            raise ValueError(f"{op}: {name} is on {t.device} but weight is on {weight.device}")
    if bool((min_val > max_val).any()):
        raise ValueError(f"{op}: min_val must not exceed max_val")
    n_groups = min_val.shape[1]
    w = weight.detach().float().reshape(out, n_groups, cols // n_groups)
    clipped = torch.clamp(w, min_val.float().unsqueeze(-1), max_val.float().unsqueeze(-1))
    return clipped.reshape(out, cols).to(weight.dtype)


def _awq_check_meta_common(op: str, x: Tensor, quant_min: int, quant_max: int) -> None:
    torch._check(x.dtype in _FLOAT_INPUTS, lambda: f"{op}: x must be float32, float16 or bfloat16, got {x.dtype}")
    torch._check(x.dim() == 2, lambda: f"{op}: x must be 2-D [tokens, in_features], got shape {tuple(x.shape)}")
    torch._check(quant_min < quant_max,
                 lambda: f"{op}: quant_min must be less than quant_max, got {quant_min} and {quant_max}")


def _awq_meta_weight(op: str, name: str, w: Tensor, x: Tensor) -> None:
    torch._check(w.dtype in _FLOAT_INPUTS, lambda: f"{op}: {name} must be float32, float16 or bfloat16, got {w.dtype}")
    torch._check(w.dim() == 2 and w.shape[1] == x.shape[1],
                 lambda: f"{op}: {name} must be [out_features, {x.shape[1]}], got shape {tuple(w.shape)}")


def _awq_meta_groups(op: str, in_features, group_size: int):
    if group_size == -1:
        return 1
    torch._check(group_size > 0 and in_features % group_size == 0,
                 lambda: f"{op}: group_size ({group_size}) must be positive (or -1) and divide in_features "
                         f"({in_features})")
    return in_features // group_size


@torch.library.register_fake("torchquant::awq_search_scales")
def _awq_search_scales_fake(x, weights, biases, quant_min, quant_max, symmetric, group_size, grid=20,
                            duo_scaling=False):
    op = "torchquant.awq_search_scales"
    _awq_check_meta_common(op, x, quant_min, quant_max)
    torch._check(len(weights) >= 1, lambda: f"{op}: weights must hold at least one weight")
    for k, w in enumerate(weights):
        _awq_meta_weight(op, f"weights[{k}]", w, x)
    if biases is not None:
        torch._check(len(biases) == len(weights),
                     lambda: f"{op}: biases must hold one bias per weight ({len(weights)}), got {len(biases)}")
    _awq_meta_groups(op, x.shape[1], group_size)
    torch._check(grid >= 1, lambda: f"{op}: grid must be at least 1, got {grid}")
    return x.new_empty((x.shape[1],), dtype=torch.float32), x.new_empty((grid,), dtype=torch.float32)


@torch.library.register_fake("torchquant::awq_search_clip")
def _awq_search_clip_fake(x, weight, quant_min, quant_max, symmetric, group_size, steps=20, max_shrink=0.5,
                          max_tokens=512, out_chunk=256):
    op = "torchquant.awq_search_clip"
    _awq_check_meta_common(op, x, quant_min, quant_max)
    _awq_meta_weight(op, "weight", weight, x)
    n_groups = _awq_meta_groups(op, x.shape[1], group_size)
    torch._check(steps >= 1, lambda: f"{op}: steps must be at least 1, got {steps}")
    torch._check(0.0 < max_shrink < 1.0, lambda: f"{op}: max_shrink must be in (0, 1), got {max_shrink}")
    shape = (weight.shape[0], n_groups)
    return x.new_empty(shape, dtype=torch.float32), x.new_empty(shape, dtype=torch.float32)


# ---------------------------------------------------------------------------
# SmoothQuant (Xiao et al. 2022, arXiv 2211.10438): the smoothing scales,
# their folding into the surrounding layers, the per-token activation
# quantization of W8A8 layers, and their fake kernels.

__all__ += ["quantize_per_token", "smoothquant_fold_", "smoothquant_scales"]


def _check_tensor_list(op: str, name: str, value) -> list:
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{op}: {name} must be a list of Tensors, got {type(value).__name__}")
    for k, t in enumerate(value):
        _check_tensor(op, f"{name}[{k}]", t)
    return list(value)


def smoothquant_scales(act_absmax: Tensor, weights, alpha: float = 0.5, eps: float = 1e-5) -> Tensor:
    """SmoothQuant's per-input-channel smoothing factors for the Linear layers reading one input.

    ::

        s_j = act_absmax[j] ** alpha / w_j ** (1 - alpha),   w_j = max(max_k,i |weights[k][i, j]|, eps)

    clamped below at ``eps``. Dividing input channel ``j`` by ``s_j`` and
    multiplying column ``j`` of every weight by it (:func:`smoothquant_fold_`)
    leaves the products unchanged and gives both sides the same per-channel
    maximum ``(act_absmax[j] * w_j) ** 0.5`` at ``alpha = 0.5``; a larger
    ``alpha`` moves more of the activation outliers into the weights.

    Args:
        act_absmax: ``[in]``, the largest ``|x_j|`` of each input channel over
            the calibration data; finite and positive (a zero means the
            channel never fired: calibrate on more data).
        weights: the ``[out_k, in]`` weights of every Linear that reads the
            input (e.g. q, k and v after one LayerNorm): the maximum runs over
            all their rows.
        alpha: migration strength in ``[0, 1]`` (0.5 in the paper for most models).
        eps: clamp of the weight maxima and of the result, as in the reference
            implementation; it only matters for an input column that every
            weight ignores.

    Returns:
        ``[in]`` float32 (float64 when ``act_absmax`` is float64).
    """
    op = "torchquant.smoothquant_scales"
    _check_tensor(op, "act_absmax", act_absmax)
    weights = _check_tensor_list(op, "weights", weights)
    for name, value in (("alpha", alpha), ("eps", eps)):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TypeError(f"{op}: {name} must be a float, got {value!r}")
    return _OPS.smoothquant_scales(act_absmax.detach(), [w.detach() for w in weights], float(alpha), float(eps))


def smoothquant_fold_(prev_weight: Tensor, prev_bias: Optional[Tensor], next_weights, scales: Tensor) -> None:
    """Folds SmoothQuant's scales into the layers around one input, in place.

    The input ``x`` of the next Linear layers becomes ``x / scales``: the
    layer that produces it is rescaled, and every next weight's input column
    ``j`` is multiplied by ``scales[j]``, so the float model computes the same
    function (up to rounding).

    Args:
        prev_weight: the producer's weight, either ``[in]`` (a LayerNorm /
            RMSNorm weight: ``x = norm(h) * weight + bias``) or ``[in, prev_in]``
            (a Linear's weight: its output rows are the channels of ``x``).
        prev_bias: the producer's bias ``[in]``, or None.
        next_weights: the ``[out_k, in]`` weights of every Linear reading ``x``.
        scales: ``[in]``, positive and finite (:func:`smoothquant_scales`).

    Each tensor keeps its dtype and is rounded once: the arithmetic runs in
    the wider of its dtype and ``scales``' dtype. ``nn.Parameter`` arguments
    are edited as data (no autograd history); a graph that saved them will
    refuse to backpropagate, as after any in-place edit.
    """
    op = "torchquant.smoothquant_fold_"
    _check_tensor(op, "prev_weight", prev_weight)
    if prev_bias is not None:
        _check_tensor(op, "prev_bias", prev_bias)
    next_weights = _check_tensor_list(op, "next_weights", next_weights)
    _check_tensor(op, "scales", scales)
    _OPS.smoothquant_fold_(prev_weight, prev_bias, next_weights, scales.detach())


def quantize_per_token(x: Tensor, quant_min: int = -128, quant_max: int = 127) -> Tuple[Tensor, Tensor]:
    """Dynamic symmetric quantization of each row (token) of ``x`` ``[..., in]``.

    ::

        scales = max(max_j |x[..., j]| / ((quant_max - quant_min) / 2), float32 eps)   # [..., 1]
        codes  = clamp(round(x * (1 / scales)), quant_min, quant_max)                   # round half to even

    the grid of torchquant's symmetric observers
    (:func:`torchquant.observers.qparams_from_range`), so ``codes * scales``
    equals ``fake_quantize(x.reshape(-1, in), scales.reshape(-1), 0,
    quant_min, quant_max, axis=0)`` bit for bit. ``[-128, 127]`` gives
    ``scale = absmax / 127.5``; ``[-127, 127]`` gives the ``absmax / 127`` of
    LLM.int8() and of SmoothQuant's reference code. A row of zeros gets the
    smallest scale and zero codes.

    Args:
        x: float32, float16 or bfloat16, at least 1-D. On the CPU NaN / Inf
            raise ``ValueError``; on a GPU (no host synchronisation) such a
            row gets a NaN / Inf scale, which makes its dequantized values NaN.
        quant_min, quant_max: a signed range (``quant_min < 0 < quant_max``),
            2 to 16 bits.

    Returns:
        ``(codes, scales)``: codes shaped like ``x``, int8 when the range fits
        in int8 and int32 otherwise; scales float32 ``[..., 1]``.
    """
    op = "torchquant.quantize_per_token"
    _check_tensor(op, "x", x)
    _check_int("quant_min", quant_min)
    _check_int("quant_max", quant_max)
    codes, scales = _OPS.quantize_per_token(x.detach(), quant_min, quant_max)
    return codes, scales


_SMOOTHQUANT_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _smoothquant_meta_weight(op: str, name: str, w: Tensor, in_features, ref_name: str) -> None:
    torch._check_type(w.dtype in _SMOOTHQUANT_FLOATS,
                      lambda: f"{op}: {name} must be float32, float64, float16 or bfloat16, got {w.dtype}")
    torch._check_value(w.dim() == 2,
                       lambda: f"{op}: {name} must be a 2-D Linear weight [out_features, in_features], got shape "
                               f"{tuple(w.shape)}")
    torch._check_value(w.shape[1] == in_features,
                       lambda: f"{op}: {name} must have in_features = {ref_name}.numel() = {in_features} columns, "
                               f"got shape {tuple(w.shape)}")


@torch.library.register_fake("torchquant::smoothquant_scales")
def _smoothquant_scales_fake(act_absmax, weights, alpha, eps=1e-5):
    op = "torchquant.smoothquant_scales"
    torch._check_value(0.0 <= alpha <= 1.0,
                       lambda: f"{op}: alpha (the migration strength) must be in [0, 1], got {alpha}")
    torch._check_type(act_absmax.dtype in _SMOOTHQUANT_FLOATS,
                      lambda: f"{op}: act_absmax must be float32, float64, float16 or bfloat16, got {act_absmax.dtype}")
    torch._check_value(act_absmax.dim() == 1,
                       lambda: f"{op}: act_absmax must be 1-D [in_features], got shape {tuple(act_absmax.shape)}")
    torch._check_value(len(weights) >= 1, lambda: f"{op}: weights must hold at least one Linear weight")
    for k, w in enumerate(weights):
        _smoothquant_meta_weight(op, f"weights[{k}]", w, act_absmax.shape[0], "act_absmax")
    dtype = torch.float64 if act_absmax.dtype == torch.float64 else torch.float32
    return act_absmax.new_empty(act_absmax.shape, dtype=dtype)


@torch.library.register_fake("torchquant::smoothquant_fold_")
def _smoothquant_fold_fake(prev_weight, prev_bias, next_weights, scales):
    op = "torchquant.smoothquant_fold_"
    torch._check_value(scales.dim() == 1, lambda: f"{op}: scales must be 1-D [in_features], got shape "
                                                  f"{tuple(scales.shape)}")
    n = scales.shape[0]
    torch._check_value(prev_weight.dim() in (1, 2) and prev_weight.shape[0] == n,
                       lambda: f"{op}: prev_weight must be [{n}] or [{n}, prev_in_features], got shape "
                               f"{tuple(prev_weight.shape)}")
    if prev_bias is not None:
        torch._check_value(tuple(prev_bias.shape) == (n,),
                           lambda: f"{op}: prev_bias must have shape [{n}], got {tuple(prev_bias.shape)}")
    torch._check_value(len(next_weights) >= 1, lambda: f"{op}: next_weights must hold at least one weight")
    for k, w in enumerate(next_weights):
        _smoothquant_meta_weight(op, f"next_weights[{k}]", w, n, "scales")
    return None


@torch.library.register_fake("torchquant::quantize_per_token")
def _quantize_per_token_fake(x, quant_min, quant_max):
    op = "torchquant.quantize_per_token"
    torch._check_type(x.dtype in _FLOAT_INPUTS,
                      lambda: f"{op}: x must be float32, float16 or bfloat16, got {x.dtype}")
    torch._check_value(x.dim() >= 1, lambda: f"{op}: x must have at least one dimension [..., in_features]")
    torch._check_value(quant_min < 0 < quant_max,
                       lambda: f"{op}: quant_min must be negative and quant_max positive, got "
                               f"[{quant_min}, {quant_max}]")
    codes_dtype = torch.int8 if quant_min >= -128 and quant_max <= 127 else torch.int32
    return x.new_empty(x.shape, dtype=codes_dtype), x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)

# Weight-only quantized linear ops (packed low-bit weights at run time).
from .linear import (  # noqa: E402
    dequantize_weight,
    pack_weight,
    packed_row_bytes,
    quantized_linear,
    quantized_linear_grad_input,
    unpack_weight,
)

__all__ += ["dequantize_weight", "pack_weight", "packed_row_bytes", "quantized_linear",
            "quantized_linear_grad_input", "unpack_weight"]

# W8A8 linear (int8 activations x int8 weights).
from .int8 import w8a8_linear  # noqa: E402

__all__ += ["w8a8_linear"]
