"""Plain-PyTorch references of block-wise lookup-table codes and of LLM.int8(), written from their definitions."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

EPS = torch.finfo(torch.float32).eps


def lut_quantize(x: Tensor, lut: Tensor, block_size: int) -> Tuple[Tensor, Tensor]:
    """Codes (nearest level of x / absmax, a midpoint going to the lower level) and absmax per block."""
    flat = x.reshape(-1).float()
    n = flat.numel()
    blocks = -(-n // block_size)
    padded = torch.zeros(blocks * block_size)
    padded[:n] = flat
    absmax = padded.view(blocks, block_size).abs().amax(dim=1)
    scaled = padded.view(blocks, block_size) * (1.0 / absmax.clamp(min=1e-38)).view(-1, 1)
    scaled = scaled.clamp(-1, 1).reshape(-1)[:n]
    order = torch.sort(lut, stable=True).indices
    midpoints = (lut[order[:-1]] + lut[order[1:]]) / 2
    codes = order[torch.bucketize(scaled, midpoints)]
    return codes.to(torch.uint8).reshape(x.shape), absmax


def lut_dequantize(codes: Tensor, absmax: Tensor, lut: Tensor, block_size: int) -> Tensor:
    flat = codes.reshape(-1).long()
    blocks = torch.arange(flat.numel()) // block_size
    return (lut[flat] * absmax[blocks]).reshape(codes.shape)


def llm_int8_linear(x: Tensor, q_w: Tensor, w_scales: Tensor, threshold: float,
                    bias: Optional[Tensor] = None) -> Tensor:
    """LLM.int8(): per-token int8 grids over the values below the threshold, outlier columns in float.

    q_w: int8 codes [N, K]; w_scales: float32 [N, 1]. The int8 part is exact
    (float64 products of integers); the float part is x's dtype.
    """
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    xf = x2.float()
    a = xf.abs()
    outlier = a >= threshold
    columns = outlier.any(dim=0)
    inlier_max = torch.where(outlier, torch.zeros_like(a), a).amax(dim=1, keepdim=True)
    s_x = torch.clamp(inlier_max / 127.5, min=EPS)
    codes = torch.clamp(torch.round(xf * (1.0 / s_x)), -128, 127)
    codes[:, columns] = 0
    acc = codes.double() @ q_w.double().T
    y = acc.float() * s_x * w_scales.T
    if bias is not None:
        y = y + bias.float()
    y = y.to(x.dtype)
    if bool(columns.any()):
        w_cols = (q_w[:, columns].float() * w_scales).to(x.dtype)
        y = y + x2[:, columns] @ w_cols.T
    return y.reshape(*x.shape[:-1], -1)
