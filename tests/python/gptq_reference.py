"""GPTQ (Frantar et al. 2022, arXiv 2210.17323) in plain PyTorch, from the paper.

The reference the ``torchquant.gptq_quantize`` op is tested and benchmarked
against. It is written for reading, column by column, with the textbook
formulation of each step:

1. Columns whose Hessian diagonal is zero never see a non-zero input: their
   weights are set to zero and their diagonal to one.
2. The grid of a group is a min/max grid over the group's weights (widened to
   contain 0), optionally shrunk by an MSE search; without groups every row has
   one grid over the whole row. With ``static_groups`` every group's grid is
   taken up front from the original weights; otherwise when the first column
   of a group is reached, from the weights as they are at the start of the
   current block of columns (lazy updates of earlier blocks applied).
3. ``act_order`` processes columns by decreasing Hessian diagonal.
4. The damped Hessian ``H + damp * I`` (``damp = percdamp * mean diag(H)``,
   multiplied by 10 while the Cholesky factorization fails and the relative
   damping stays at most 1) gives the upper Cholesky factor ``U`` of its
   inverse: ``U^T U = (H + damp I)^-1``, computed as the paper's code does,
   ``cholesky(cholesky_inverse(cholesky(H)), upper=True)``.
5. Column ``j`` is quantized, its error divided by ``U[j, j]`` and spread over
   the columns after it with row ``j`` of ``U``. Within a block of
   ``block_size`` columns this is done immediately; the columns after the block
   receive the block's accumulated update at once (one matrix product).
6. The loss is ``tr((W - Q) H (W - Q)^T) / 2`` with the undamped Hessian, in
   float64.

Quantization follows torchquant's conventions: ``code = clamp(round(w * (1 /
scale)) + zero, qmin, qmax)`` with round half to even, ``q = (code - zero) *
scale``; a symmetric grid has zero 0 and ``scale = max|w| / ((qmax - qmin) /
2)``, an asymmetric one maps the minimum to ``qmin``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

EPS = torch.finfo(torch.float32).eps


class Result(NamedTuple):
    weight_q: Tensor
    codes: Tensor
    scales: Tensor
    zero_points: Tensor
    g_idx: Tensor
    loss: Tensor
    damp: Tensor


class CholeskyFailed(RuntimeError):
    pass


def min_max_grid(lo: Tensor, hi: Tensor, quant_min: int, quant_max: int, symmetric: bool) -> Tuple[Tensor, Tensor]:
    """Scale and zero-point covering ``[lo, hi]`` widened to contain 0, in float32."""
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    if symmetric:
        scale = torch.clamp(torch.maximum(-lo, hi) / ((quant_max - quant_min) / 2), min=EPS)
        return scale, torch.zeros_like(scale)
    scale = torch.clamp((hi - lo) / (quant_max - quant_min), min=EPS)
    return scale, torch.clamp(quant_min - torch.round(lo / scale), quant_min, quant_max)


def fake_quantize_rows(x: Tensor, scale: Tensor, zero: Tensor, quant_min: int, quant_max: int) -> Tensor:
    """Quantize-dequantize ``x`` ([rows, n] or [rows]) on per-row grids ``scale`` / ``zero`` ([rows])."""
    if x.dim() == 2:
        scale, zero = scale[:, None], zero[:, None]
    code = torch.clamp(torch.round(x * torch.reciprocal(scale)) + zero, quant_min, quant_max)
    return (code - zero) * scale


def row_grid(cols: Tensor, quant_min: int, quant_max: int, symmetric: bool, clip_search_steps: int,
             clip_max_shrink: float) -> Tuple[Tensor, Tensor]:
    """The grid of each row of ``cols`` ([rows, n]): min/max, or the best shrunk range by squared error."""
    lo, hi = cols.amin(1), cols.amax(1)
    if clip_search_steps == 0:
        return min_max_grid(lo, hi, quant_min, quant_max, symmetric)
    best_scale = best_zero = best_err = None
    for k in range(clip_search_steps):
        # The shrink factor in float32, in the op's order of operations.
        f = 1.0 - torch.tensor(float(k)) * torch.tensor(clip_max_shrink, dtype=torch.float32) / float(clip_search_steps)
        scale, zero = min_max_grid(lo * f, hi * f, quant_min, quant_max, symmetric)
        err = (fake_quantize_rows(cols, scale, zero, quant_min, quant_max) - cols).double().pow(2).sum(1)
        if best_err is None:
            best_scale, best_zero, best_err = scale, zero, err
        else:
            better = err < best_err  # ties keep the wider range
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
            best_err = torch.where(better, err, best_err)
    return best_scale, best_zero


def inverse_hessian_factor(h: Tensor, percdamp: float) -> Tuple[Tensor, float]:
    """Upper ``U`` with ``U^T U = (h + damp I)^-1`` and the damping used.

    The damping starts at ``percdamp * mean(diag(h))`` and is multiplied by
    10 after each failed factorization, as long as it stays at most the mean
    diagonal. Raises :class:`CholeskyFailed` when every attempt fails.
    """
    mean_diag = h.diagonal().mean().item()
    relative = percdamp
    while True:
        damp = relative * mean_diag
        damped = h + damp * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
        lower, info = torch.linalg.cholesky_ex(damped)
        if info.item() == 0:
            u, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(lower), upper=True)
            if info.item() == 0 and torch.isfinite(u).all():
                return u, damp
        relative *= 10.0
        if relative > 1.0 * (1 + 1e-6):
            raise CholeskyFailed(f"the damped Hessian is not positive definite (last damping {damp})")


def gptq_reference(
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
    rtn: bool = False,
    loss_dtype: torch.dtype = torch.float64,
) -> Result:
    """GPTQ of ``weight`` ([out, in]) against ``hessian`` ([in, in]).

    ``rtn`` rounds to nearest instead (the same grids, no error feedback);
    ``loss_dtype`` is the precision of the loss (float64 for tests, float32
    where only speed is compared).
    """
    w_orig = weight.detach().float()
    h_orig = hessian.detach().float()
    rows, cols = w_orig.shape
    grid_args = (quant_min, quant_max, symmetric, clip_search_steps, clip_max_shrink)

    # 1. Dead inputs.
    w = w_orig.clone()
    h = h_orig.clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    g = group_size if group_size is not None else cols
    n_groups = cols // g
    scales = torch.zeros(rows, n_groups, device=w.device)
    zeros = torch.zeros(rows, n_groups, device=w.device)

    # 2. Static grids, from the weights in their original order.
    if static_groups:
        for k in range(n_groups):
            scales[:, k], zeros[:, k] = row_grid(w[:, k * g:(k + 1) * g], *grid_args)

    # 3. Processing order.
    if act_order:
        order = torch.argsort(h.diagonal(), descending=True, stable=True)
    else:
        order = torch.arange(cols, device=w.device)
    w = w[:, order]
    h = h[order][:, order]
    # The group of each processed column, and of each original column.
    if static_groups:
        group_of_step = order // g
        g_idx = torch.arange(cols, device=w.device) // g
    else:
        group_of_step = torch.arange(cols, device=w.device) // g
        g_idx = torch.empty(cols, dtype=torch.long, device=w.device)
        g_idx[order] = group_of_step

    # 4. Inverse Hessian factor.
    if rtn:
        u, damp = torch.eye(cols, device=w.device), -1.0
    else:
        u, damp = inverse_hessian_factor(h, percdamp)

    # 5. Column by column, lazy updates per block.
    q = torch.zeros_like(w)
    for b0 in range(0, cols, block_size):
        b1 = min(b0 + block_size, cols)
        block = w[:, b0:b1].clone()
        q_block = torch.zeros_like(block)
        scaled_err = torch.zeros_like(block)
        for j in range(b0, b1):
            k = int(group_of_step[j])
            if not static_groups and j % g == 0:
                # The grid from the weights as of the start of this block.
                scales[:, k], zeros[:, k] = row_grid(w[:, j:j + g], *grid_args)
            i = j - b0
            col = block[:, i]
            q_block[:, i] = fake_quantize_rows(col, scales[:, k], zeros[:, k], quant_min, quant_max)
            e = (col - q_block[:, i]) / u[j, j]
            block[:, i:] -= torch.outer(e, u[j, j:b1])
            scaled_err[:, i] = e
        q[:, b0:b1] = q_block
        w[:, b1:] -= scaled_err @ u[b0:b1, b1:]

    # Back to the original column order.
    inverse = torch.argsort(order)
    q = q[:, inverse]
    col_scale = scales[:, g_idx]
    col_zero = zeros[:, g_idx]
    codes = torch.round(q * torch.reciprocal(col_scale)) + col_zero

    # 6. Loss with the undamped Hessian.
    e = (w_orig - q).to(loss_dtype)
    loss = 0.5 * ((e @ h_orig.to(loss_dtype)) * e).sum(dtype=torch.float64)
    return Result(
        weight_q=q.to(weight.dtype),
        codes=codes.to(torch.int32),
        scales=scales,
        zero_points=zeros,
        g_idx=g_idx.to(torch.int32),
        loss=loss.float(),
        damp=torch.tensor(damp, dtype=torch.float32),
    )


def rtn_loss(weight: Tensor, hessian: Tensor, quant_min: int, quant_max: int, symmetric: bool,
             group_size: Optional[int] = None) -> float:
    """Loss of plain round-to-nearest on the same grids (min/max per group, or per row)."""
    w = weight.detach().float()
    g = group_size if group_size is not None else w.shape[1]
    groups = w.reshape(w.shape[0], -1, g)
    scale, zero = min_max_grid(groups.amin(2), groups.amax(2), quant_min, quant_max, symmetric)
    q = fake_quantize_rows(groups.reshape(-1, g), scale.reshape(-1), zero.reshape(-1), quant_min, quant_max)
    e = (w - q.reshape(w.shape)).double()
    return 0.5 * ((e @ hessian.double()) * e).sum().item()
