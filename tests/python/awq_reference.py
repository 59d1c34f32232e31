"""AWQ (Lin et al. 2023, arXiv 2306.00978) in plain PyTorch, from the paper and AutoAWQ.

The reference the ``torchquant.awq_search_scales`` / ``awq_search_clip`` ops
are tested and timed against. It follows AutoAWQ's ``AwqQuantizer``
(``_search_best_scale`` / ``_compute_best_scale`` and ``_compute_best_clip``)
step by step, written for reading rather than speed:

* scales: ``x_mean = mean|x|`` per input channel; with duo scaling ``w_mean``
  is the mean over all rows of the concatenated weights of ``|W|`` divided by
  its group's ``max|W| + 1e-6``. For ``ratio = i / grid``:
  ``s = x_mean^ratio`` (duo: ``x_mean^ratio / (w_mean^(1 - ratio) + 1e-4)``),
  ``clamp(min=1e-4)``, ``s / sqrt(max(s) * min(s))``, non-finite entries set
  to 1; the loss of ``s`` is the paper's objective evaluated literally,
  ``mean(((x / s) @ Q(W * s)^T + b - (x @ W^T + b))^2)`` per layer, in
  float64, summed over the layers. The first smallest loss wins.
* clipping: AutoAWQ's token sample ``x[::max(1, n // n_sample_token)]``; each
  group's range (``+-max|w|`` when symmetric, as AutoAWQ; the group's own
  min / max otherwise) is shrunk by ``f``; the weight is clamped to the
  shrunk range and quantized on the min / max grid *of the clamped weight*
  (AutoAWQ's ``pseudo_quantize_tensor(cur_w)``), and the error is AutoAWQ's
  per-group output difference ``(x_g * q_g).sum(-1) - (x_g * w_g).sum(-1)``
  squared and summed over the sampled tokens, in float64. The shrink
  factors are torchquant's ``1 - k * max_shrink / steps`` in float32.

Quantization follows torchquant's conventions rather than AutoAWQ's own
(``scale = max|w| / ((qmax - qmin) / 2)`` on a symmetric grid, ranges widened
to contain 0, multiplication by the reciprocal of the scale, round half to
even), so that the op and this reference quantize identically.
"""
from __future__ import annotations

from typing import List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor

EPS = torch.finfo(torch.float32).eps


# ---- the quantizer ------------------------------------------------------------------------

def minmax_grid(lo: Tensor, hi: Tensor, quant_min: int, quant_max: int, symmetric: bool):
    """Scale and zero-point of the range ``[lo, hi]`` widened to contain 0 (float32)."""
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    if symmetric:
        scale = torch.clamp(torch.maximum(-lo, hi) / ((quant_max - quant_min) / 2), min=EPS)
        zero = torch.zeros_like(scale)
    else:
        scale = torch.clamp((hi - lo) / (quant_max - quant_min), min=EPS)
        zero = torch.clamp(quant_min - torch.round(lo / scale), quant_min, quant_max)
    return scale, zero


def pseudo_quantize(w: Tensor, quant_min: int, quant_max: int, symmetric: bool, group_size: int) -> Tensor:
    """``w [out, in]`` quantized and dequantized on each group's own min/max grid (float32)."""
    out, cols = w.shape
    wg = w.float().reshape(out, cols // group_size, group_size)
    scale, zero = minmax_grid(wg.amin(-1, keepdim=True), wg.amax(-1, keepdim=True), quant_min, quant_max,
                              symmetric)
    codes = torch.clamp(torch.round(wg * (1.0 / scale)) + zero, quant_min, quant_max)
    return ((codes - zero) * scale).reshape(out, cols)


def _group(group_size: Optional[int], cols: int) -> int:
    return cols if group_size in (None, -1) else group_size


# ---- the scale search ---------------------------------------------------------------------

class ScaleSearch(NamedTuple):
    scales: Tensor  # [in] float32, the best candidate
    losses: Tensor  # [grid] float64
    best: int  # index of the best grid point
    candidates: Tensor  # [grid, in] float32, every candidate's scales


def weight_mean(weights: Sequence[Tensor], group_size: int) -> Tensor:
    """AutoAWQ's w_mean: |W| over its group's max (+1e-6), averaged over all rows of all weights."""
    weight = torch.cat([w.float() for w in weights], dim=0)
    a = weight.abs().view(-1, group_size)
    return (a / (a.amax(dim=1, keepdim=True) + 1e-6)).view(weight.shape).mean(0)


def candidate_scales(x_mean: Tensor, w_mean: Optional[Tensor], ratio: float) -> Tensor:
    if w_mean is not None:
        s = (x_mean.pow(ratio) / (w_mean.pow(1 - ratio) + 1e-4)).clamp(min=1e-4)
    else:
        s = x_mean.pow(ratio).clamp(min=1e-4)
    s = s / (s.max() * s.min()).sqrt()
    s[~torch.isfinite(s)] = 1
    return s


def layer_error(x: Tensor, w: Tensor, b: Optional[Tensor], s: Tensor, quant_min: int, quant_max: int,
                symmetric: bool, group_size: int, dtype: torch.dtype = torch.float64) -> float:
    """mean(((x / s) Q(W s)^T + b - (x W^T + b))^2), the products in ``dtype``."""
    q = pseudo_quantize(w.float() * s, quant_min, quant_max, symmetric, group_size)
    xd, wd = x.to(dtype), w.to(dtype)
    bias = 0.0 if b is None else b.to(dtype)
    y_float = xd @ wd.T + bias
    y_quant = (xd / s.to(dtype)) @ q.to(dtype).T + bias
    return float((y_quant - y_float).pow(2).mean(dtype=torch.float64))


def search_scales(x: Tensor, weights: Sequence[Tensor], biases: Optional[Sequence[Tensor]], quant_min: int,
                  quant_max: int, symmetric: bool, group_size: Optional[int], grid: int = 20,
                  duo_scaling: bool = False, dtype: torch.dtype = torch.float64) -> ScaleSearch:
    """The search; ``dtype`` is that of the output products (float32 for timing, as AutoAWQ runs it)."""
    g = _group(group_size, x.shape[1])
    x_mean = x.float().abs().mean(0)
    w_mean = weight_mean(weights, g) if duo_scaling else None
    biases = biases if biases is not None else [None] * len(weights)
    losses: List[float] = []
    candidates = []
    best, best_loss = -1, float("inf")
    for i in range(grid):
        s = candidate_scales(x_mean, w_mean, i / grid)
        loss = sum(layer_error(x, w, b, s, quant_min, quant_max, symmetric, g, dtype)
                   for w, b in zip(weights, biases))
        if loss < best_loss:
            best, best_loss = i, loss
        losses.append(loss)
        candidates.append(s)
    stacked = torch.stack(candidates)
    return ScaleSearch(stacked[best], torch.tensor(losses, dtype=torch.float64), best, stacked)


def rtn_error(x: Tensor, weights: Sequence[Tensor], quant_min: int, quant_max: int, symmetric: bool,
              group_size: Optional[int]) -> float:
    """Round-to-nearest on min/max grids: the objective with no scaling at all."""
    g = _group(group_size, x.shape[1])
    total = 0.0
    for w in weights:
        q = pseudo_quantize(w, quant_min, quant_max, symmetric, g)
        total += float((x.double() @ (q.double() - w.double()).T).pow(2).mean())
    return total


# ---- the clipping search ------------------------------------------------------------------

class ClipSearch(NamedTuple):
    min_val: Tensor  # [out, n_groups] float32
    max_val: Tensor  # [out, n_groups] float32
    errors: Tensor  # [steps, out, n_groups] float64, the error of every candidate
    factors: Tensor  # [steps] float32
    lo: Tensor  # [out, n_groups] float32, the unshrunk range
    hi: Tensor


def shrink_factors(steps: int, max_shrink: float, device=None) -> Tensor:
    """``1 - k * max_shrink / steps`` in float32, in that order of operations."""
    k = torch.arange(steps, dtype=torch.float32, device=device)
    return 1.0 - k * torch.tensor(max_shrink, dtype=torch.float32) / torch.tensor(float(steps))


def sample_tokens(x: Tensor, max_tokens: int) -> Tensor:
    return x[:: max(1, x.shape[0] // max_tokens)]


def search_clip(x: Tensor, weight: Tensor, quant_min: int, quant_max: int, symmetric: bool,
                group_size: Optional[int], steps: int = 20, max_shrink: float = 0.5,
                max_tokens: int = 512) -> ClipSearch:
    out, cols = weight.shape
    g = _group(group_size, cols)
    xs = sample_tokens(x.float(), max_tokens)
    # w [out, 1, n_groups, g], x [1, tokens, n_groups, g] as AutoAWQ lays them out.
    xg = xs.reshape(1, xs.shape[0], cols // g, g).double()
    w = weight.float().reshape(out, 1, cols // g, g)
    if symmetric:
        hi = w.abs().amax(dim=-1, keepdim=True)
        lo = -hi
    else:
        lo, hi = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
    reference_out = (xg * w.double()).sum(dim=-1)  # [out, tokens, n_groups]
    factors = shrink_factors(steps, max_shrink, x.device)
    errors = []
    for f in factors:
        clipped = torch.clamp(w, lo * f, hi * f)
        q = pseudo_quantize(clipped.reshape(out, cols), quant_min, quant_max, symmetric, g)
        q = q.reshape(out, 1, cols // g, g).double()
        errors.append(((xg * q).sum(dim=-1) - reference_out).pow(2).sum(dim=1))  # [out, n_groups]
    errors = torch.stack(errors)
    best = errors.argmin(dim=0)  # the first of equal errors: the widest range
    f_best = factors[best]
    lo, hi = lo.reshape(out, -1), hi.reshape(out, -1)
    return ClipSearch(lo * f_best, hi * f_best, errors, factors, lo, hi)
