"""AWQ ops (Lin et al. 2023): scale and clip searches, wrappers and fake kernels."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from torchquant.ops._common import _FLOAT_INPUTS, _OPS, _check_int, _check_tensor

__all__ = ['AWQClip', 'AWQScales', 'awq_apply_clip', 'awq_search_clip', 'awq_search_scales']


# ---------------------------------------------------------------------------
# AWQ (Lin et al. 2023, arXiv 2306.00978): the activation-aware scale search
# and the clipping search, their result types, the clamp that applies a clip,
# and their fake kernels.



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
