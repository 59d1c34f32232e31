"""SmoothQuant ops (Xiao et al. 2022) and per-token quantization: wrappers and fake kernels."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from torchquant.ops._common import _FLOAT_INPUTS, _OPS, _check_int, _check_tensor

__all__ = ['quantize_per_token', 'smoothquant_fold_', 'smoothquant_scales']


# ---------------------------------------------------------------------------
# SmoothQuant (Xiao et al. 2022, arXiv 2211.10438): the smoothing scales,
# their folding into the surrounding layers, the per-token activation
# quantization of W8A8 layers, and their fake kernels.



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
