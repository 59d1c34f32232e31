"""References for the SmoothQuant ops and W8A8 layers, written from the paper
(Xiao et al. 2022, arXiv 2211.10438) with plain PyTorch, independent of
torchquant's code.

* smoothing factors (the paper's Eq. 4), computed in float64 so that they are
  a more accurate target than the float32 op:
  ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)``, with the clamps of the
  authors' code (weight maxima and result at >= 1e-5);
* folding: the producer of the input divided by ``s``, the consumers'
  columns multiplied by it, out of place;
* per-token symmetric quantization in the float32 arithmetic of the
  fake-quantize ops (multiply by ``1 / scale``, round half to even), for
  bit-for-bit comparison;
* the W8A8 product ``(codes_x @ codes_w^T) * s_x * s_w + b`` in float64,
  where it is exact up to one rounding of each scale product.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

EPS32 = torch.finfo(torch.float32).eps


def smoothing_scales(act_absmax: Tensor, weights: Sequence[Tensor], alpha: float, eps: float = 1e-5) -> Tensor:
    """float64 ``[in]``: Eq. 4 over every row of every weight that reads the input."""
    w_max = torch.cat([w.detach().double().abs() for w in weights], dim=0).amax(dim=0)
    w_max = torch.clamp(w_max, min=eps)
    s = act_absmax.double() ** alpha / w_max ** (1.0 - alpha)
    return torch.clamp(s, min=eps)


def fold(prev_weight: Tensor, prev_bias: Optional[Tensor], next_weights: Sequence[Tensor],
         scales: Tensor) -> Tuple[Tensor, Optional[Tensor], List[Tensor]]:
    """Folded copies, each computed in the wider of its dtype and ``scales``' and rounded once."""
    def wide(t: Tensor) -> torch.dtype:
        return torch.promote_types(t.dtype, scales.dtype)

    s = scales
    if prev_weight.dim() == 1:
        new_prev = (prev_weight.to(wide(prev_weight)) / s.to(wide(prev_weight))).to(prev_weight.dtype)
    else:
        new_prev = (prev_weight.to(wide(prev_weight)) / s.to(wide(prev_weight))[:, None]).to(prev_weight.dtype)
    new_bias = None
    if prev_bias is not None:
        new_bias = (prev_bias.to(wide(prev_bias)) / s.to(wide(prev_bias))).to(prev_bias.dtype)
    new_next = [(w.to(wide(w)) * s.to(wide(w))[None, :]).to(w.dtype) for w in next_weights]
    return new_prev, new_bias, new_next


def quantize_rows(x: Tensor, quant_min: int, quant_max: int) -> Tuple[Tensor, Tensor]:
    """Symmetric per-row codes (int64) and float32 scales ``[..., 1]``:
    ``scale = max(absmax / ((qmax - qmin) / 2), eps)``, ``code = clamp(round(x * (1 / scale)))``."""
    xf = x.float()
    if x.shape[-1] == 0:
        absmax = torch.zeros(*x.shape[:-1], 1)
    else:
        absmax = xf.abs().amax(dim=-1, keepdim=True)
    scale = torch.clamp(absmax / ((quant_max - quant_min) / 2), min=EPS32)
    codes = torch.clamp(torch.round(xf * torch.reciprocal(scale)), quant_min, quant_max)
    return codes.long(), scale


def quantize_with_scale(x: Tensor, scale: Tensor, quant_min: int = -128, quant_max: int = 127) -> Tensor:
    """int64 codes of ``x`` on fixed symmetric grids (``scale`` broadcasts against ``x``)."""
    return torch.clamp(torch.round(x.float() * torch.reciprocal(scale.float())), quant_min, quant_max).long()


def w8a8_product(codes_x: Tensor, scale_x: Tensor, codes_w: Tensor, scale_w: Tensor,
                 bias: Optional[Tensor]) -> Tensor:
    """float64 ``[M, N]``: the exact integer product, rescaled and biased in float64."""
    acc = codes_x.double() @ codes_w.double().t()  # exact: |sum| < 2^53
    y = acc * scale_x.double().reshape(-1, 1) * scale_w.double().reshape(1, -1)
    if bias is not None:
        y = y + bias.double()
    return y
