"""W8A8 linear: int8 activations times int8 weights, int32 accumulation.

The weight ``W [N, K]`` is the 8-bit packed layout of :mod:`torchquant.ops.linear`:
uint8 ``packed [N, packed_row_bytes(K, 8)]`` holding ``u = q + 128`` for the signed
int8 codes ``q`` (rows zero-padded to a multiple of 16 bytes), with float32
per-channel ``scales [N, 1]``, so ``W[n, k] = (u[n, k] - 128) * scales[n]``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .linear import packed_row_bytes

__all__ = ["w8a8_linear"]

_OP = "torchquant.w8a8_linear"
_FLOAT_INPUTS = (torch.float32, torch.float16, torch.bfloat16)
_BIAS_DTYPES = _FLOAT_INPUTS + (torch.float64,)


def w8a8_linear(input: Tensor, packed: Tensor, scales: Tensor, input_scale: Optional[Tensor] = None,
                bias: Optional[Tensor] = None, outlier_threshold: Optional[float] = None) -> Tensor:
    """``y = x W^T + bias`` with ``x`` quantized to int8 and integer accumulation.

    ::

        s_x   = max(max_k |x[m, k]| / 127.5, float32 eps)    # input_scale None: per token
              = input_scale                                  # else: one static grid
        q_x   = clamp(round_half_even(x * (1 / s_x)), -128, 127)
        acc   = sum_k q_x[m, k] * (u[n, k] - 128)            # exact, int32
        y     = acc * s_x[m] * scales[n] + bias[n]           # float32, returned in x's dtype

    The dynamic grid is :func:`torchquant.ops.quantize_per_token`'s (same codes,
    same scales). On CPU the product runs on AVX-512 VNNI, AVX2 or portable
    kernels picked for the running CPU (``TORCHQUANT_CPU_ISA=default`` or ``avx2``
    caps the choice). Autograd gives ``input`` the straight-through gradient
    ``dy W`` and ``bias`` its sum; the weight gets none.

    ``outlier_threshold > 0`` is LLM.int8()'s mixed-precision decomposition
    (Dettmers et al. 2022): in one pass over each token row, the kernel finds
    the grid from max ``|x|`` over the values below the threshold and flags
    the column of every value at or above it (in any token). Those outlier
    columns leave the int8 product and are multiplied in ``input``'s dtype
    against the same columns of the dequantized weight::

        y = int8 product over the other columns + x[:, outliers] W[:, outliers]^T

    Inf values are outliers too (their columns give Inf, as a float layer would).

    Args:
        input: float32, float16 or bfloat16 ``[..., K]``, finite (NaN / Inf raise
            ``ValueError`` on CPU).
        packed: uint8 ``[N, packed_row_bytes(K, 8)]``.
        scales: float32 ``[N, 1]``.
        input_scale: optional float32 ``[1]`` (or 0-d), positive (a SmoothQuant static scale).
        bias: optional float ``[N]``, added in float32.
        outlier_threshold: None or 0 (plain W8A8), or positive and finite
            with ``input_scale=None`` (LLM.int8(); 6.0 in the paper).

    Returns:
        ``[..., N]`` in ``input``'s dtype.
    """
    if outlier_threshold is None:
        # Not read at all: under torch.compile(dynamic=True) reading a float argument makes it a
        # symbolic float, which costs an extra graph.
        return torch.ops.torchquant.w8a8_linear(input, packed, scales, input_scale, bias)
    return torch.ops.torchquant.w8a8_linear(input, packed, scales, input_scale, bias, outlier_threshold)


def _check_device(name: str, t: Tensor, device: torch.device) -> None:
    torch._check_value(t.device == device,
                       lambda: f"{_OP}: {name} must be on input's device ({device}), got {t.device}")


@torch.library.register_fake("torchquant::w8a8_linear")
def _w8a8_linear_fake(input, packed, scales, input_scale=None, bias=None, outlier_threshold=0.0):
    # The same checks, in the same order and with the same kind of error, as
    # the C++ kernels: a wrong call fails while tracing, not at run time.
    torch._check_type(input.dtype in _FLOAT_INPUTS,
                      lambda: f"{_OP}: input must be float32, float16 or bfloat16, got {input.dtype}")
    torch._check_value(input.dim() >= 1 and input.shape[-1] >= 1,
                       lambda: f"{_OP}: input must have shape [..., in_features] with in_features >= 1, got "
                               f"{tuple(input.shape)}")
    torch._check_type(packed.dtype == torch.uint8,
                      lambda: f"{_OP}: packed must be uint8 (the 8-bit packed weight), got {packed.dtype}")
    _check_device("packed", packed, input.device)
    k = input.shape[-1]
    row_bytes = packed_row_bytes(k, 8)
    torch._check_value(packed.dim() == 2 and packed.shape[1] == row_bytes,
                       lambda: f"{_OP}: packed must be [out_features, packed_row_bytes(in_features, 8)] = "
                               f"[N, {row_bytes}] for input's last dimension in_features = {k}, got packed of "
                               f"shape {tuple(packed.shape)}")
    n = packed.shape[0]
    torch._check_type(scales.dtype == torch.float32, lambda: f"{_OP}: scales must be float32, got {scales.dtype}")
    _check_device("scales", scales, input.device)
    torch._check_value(tuple(scales.shape) == (n, 1),
                       lambda: f"{_OP}: scales must be [out_features, 1] = [{n}, 1], got {tuple(scales.shape)}")
    if input_scale is not None:
        torch._check_type(input_scale.dtype == torch.float32,
                          lambda: f"{_OP}: input_scale must be float32, got {input_scale.dtype}")
        _check_device("input_scale", input_scale, input.device)
        torch._check_value(input_scale.numel() == 1 and input_scale.dim() <= 1,
                           lambda: f"{_OP}: input_scale must have shape [1], got {tuple(input_scale.shape)}")
    if bias is not None:
        torch._check_type(bias.dtype in _BIAS_DTYPES,
                          lambda: f"{_OP}: bias must be a floating-point tensor, got {bias.dtype}")
        _check_device("bias", bias, input.device)
        torch._check_value(tuple(bias.shape) == (n,),
                           lambda: f"{_OP}: bias must be [out_features] = [{n}], got {tuple(bias.shape)}")
    torch._check_value(outlier_threshold >= 0 and math.isfinite(outlier_threshold),
                       lambda: f"{_OP}: outlier_threshold must be 0 (no LLM.int8() decomposition) or positive and "
                               f"finite, got {outlier_threshold}")
    torch._check_value(outlier_threshold == 0 or input_scale is None,
                       lambda: f"{_OP}: outlier_threshold needs per-token activation grids (input_scale=None)")
    return input.new_empty((*input.shape[:-1], n))
