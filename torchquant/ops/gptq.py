"""GPTQ ops (Frantar et al. 2022): Hessian accumulation and quantization, wrappers and fake kernels."""
from __future__ import annotations

import math
import warnings
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from torchquant.ops._common import _FLOAT_INPUTS, _OPS, _check_int, _check_tensor

__all__ = ['GPTQResult', 'gptq_accumulate_hessian', 'gptq_quantize']


class GPTQResult(NamedTuple):
    """What :func:`gptq_quantize` returns (all on the weight's device)."""

    weight_q: Tensor      # [out, in], weight's dtype: the dequantized weights
    codes: Tensor         # [out, in] int32 in [quant_min, quant_max], original column order
    scales: Tensor        # [out, n_groups] float32
    zero_points: Tensor   # [out, n_groups] float32 holding integers, in the code domain
    g_idx: Tensor         # [in] int32: the group of each input column
    loss: Tensor          # 0-d float32: tr((W - weight_q) H (W - weight_q)^T) / 2, undamped H
    damp: Tensor          # 0-d float32: damping added to the diagonal, -1 after a round-to-nearest fallback



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


# Fake kernels (output metadata only).

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
