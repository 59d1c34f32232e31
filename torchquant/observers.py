"""Observers: calibrate a quantization grid from the tensors that flow past.

Every observer works per tensor, per channel or per group, as its
:class:`~torchquant.spec.QuantSpec` says, and turns what it saw into a
``(scale, zero_point)`` pair with :meth:`Observer.calculate_qparams`:

* ``"minmax"``: running minimum and maximum;
* ``"moving_average_minmax"``: exponential moving average of each batch's
  min / max (``spec.averaging_constant``);
* ``"percentile"``: moving average of each batch's ``spec.percentile`` and
  ``100 - spec.percentile`` percentiles, which ignores rare outliers;
* ``"mse"``: running min / max, then the shrunk range that minimises the
  squared reconstruction error of the last observed tensor (the C++
  ``mse_clip_search`` op);
* ``"histogram"``: a histogram of ``|x|`` and the clipping threshold that
  minimises the KL divergence between the clipped and the quantized
  distributions (TensorRT's entropy calibration).

After ``spec.freeze_observer_after`` updates an observer stops changing.
"""
from __future__ import annotations

from typing import Dict, Tuple, Type

import torch
from torch import Tensor, nn

from torchquant import ops
from torchquant.spec import QuantSpec

__all__ = [
    "Observer",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "PercentileObserver",
    "MSEObserver",
    "HistogramObserver",
    "make_observer",
    "grid_rows",
    "qparams_from_range",
]

EPS = torch.finfo(torch.float32).eps


def _fake_quant_granularity(spec: QuantSpec) -> Dict[str, int]:
    if spec.granularity == "channel":
        return {"axis": spec.axis}
    if spec.granularity == "group":
        return {"group_size": spec.group_size}
    return {}


def grid_rows(x: Tensor, spec: QuantSpec) -> Tuple[Tensor, Tuple[int, ...]]:
    """``x`` as float32 rows, one per grid, and the shape of the grid tensors.

    Per-tensor: one row; per-channel: one row per index of ``spec.axis``;
    per-group: one row per group of ``spec.group_size`` elements of the last
    dimension (grid shape ``x.shape[:-1] + (x.shape[-1] // group_size,)``).
    """
    x = x.detach().float()
    if spec.granularity == "tensor":
        return x.reshape(1, -1), (1,)
    if spec.granularity == "channel":
        if not -x.dim() <= spec.axis < x.dim():
            raise ValueError(f"QuantSpec.axis={spec.axis} is out of range for an input with {x.dim()} dimensions")
        return x.movedim(spec.axis, 0).reshape(x.shape[spec.axis], -1), (x.shape[spec.axis],)
    g = spec.group_size
    if x.dim() == 0 or x.shape[-1] % g != 0:
        raise ValueError(
            f"QuantSpec.group_size={g} must divide the last dimension of the input, got shape {tuple(x.shape)}"
        )
    shape = (*x.shape[:-1], x.shape[-1] // g)
    return x.reshape(-1, g), shape


def qparams_from_range(lo: Tensor, hi: Tensor, spec: QuantSpec, eps: float = EPS) -> Tuple[Tensor, Tensor]:
    """Scale and zero-point covering ``[lo, hi]``, widened to include 0 so 0 is exact.

    Symmetric: ``scale = max(|lo|, |hi|) / ((qmax - qmin) / 2)``, zero-point 0,
    as PyTorch's observers do. Asymmetric: ``scale = (hi - lo) / (qmax - qmin)``
    and the zero-point that maps ``lo`` to ``qmin``. The C++ clip search uses
    the same formulas.
    """
    qmin, qmax = spec.quant_range
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    if spec.symmetric:
        scale = torch.clamp(torch.maximum(-lo, hi) / ((qmax - qmin) / 2), min=eps)
        zero_point = torch.zeros_like(scale)
    else:
        scale = torch.clamp((hi - lo) / (qmax - qmin), min=eps)
        zero_point = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax)
    return scale, zero_point


class Observer(nn.Module):
    """Base class: tracks ``min_val`` / ``max_val`` per grid; subclasses decide how."""

    def __init__(self, spec: QuantSpec) -> None:
        super().__init__()
        self.spec = spec
        self.register_buffer("min_val", torch.empty(0))
        self.register_buffer("max_val", torch.empty(0))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    @property
    def is_calibrated(self) -> bool:
        return self.min_val.numel() > 0

    @property
    def frozen(self) -> bool:
        n = self.spec.freeze_observer_after
        return n is not None and int(self.steps) >= n

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        if self.frozen:
            return x
        if not torch.isfinite(x).all():
            raise ValueError(f"{type(self).__name__}: the input contains NaN or Inf; cannot calibrate a grid on it")
        rows, shape = grid_rows(x, self.spec)
        lo, hi = self._batch_range(rows)
        lo, hi = lo.reshape(shape), hi.reshape(shape)
        if not self.is_calibrated or self.min_val.shape != lo.shape:
            self.min_val, self.max_val = lo.clone(), hi.clone()
        else:
            self._merge(lo, hi)
        self._after_update(x)
        self.steps += 1
        return x

    def _batch_range(self, rows: Tensor) -> Tuple[Tensor, Tensor]:
        return torch.aminmax(rows, dim=1)

    def _merge(self, lo: Tensor, hi: Tensor) -> None:
        torch.minimum(self.min_val, lo, out=self.min_val)
        torch.maximum(self.max_val, hi, out=self.max_val)

    def _after_update(self, x: Tensor) -> None:
        pass

    def calculate_qparams(self) -> Tuple[Tensor, Tensor]:
        """``(scale, zero_point)`` for what was observed (float32, shaped per grid)."""
        if not self.is_calibrated:
            raise RuntimeError(f"{type(self).__name__}.calculate_qparams: no data observed yet; "
                               "run calibration batches through the model first")
        return qparams_from_range(self.min_val, self.max_val, self.spec)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Observed statistics take the shape they were saved with.
        for name in ("min_val", "max_val"):
            key = prefix + name
            if key in state_dict and state_dict[key].shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(state_dict[key]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"spec={self.spec}"


class MinMaxObserver(Observer):
    """Running minimum and maximum."""


class MovingAverageMinMaxObserver(Observer):
    """Exponential moving average of each batch's min / max."""

    def _merge(self, lo: Tensor, hi: Tensor) -> None:
        c = self.spec.averaging_constant
        self.min_val.add_(c * (lo - self.min_val))
        self.max_val.add_(c * (hi - self.max_val))


class PercentileObserver(MovingAverageMinMaxObserver):
    """Moving average of each batch's low / high percentiles (``spec.percentile``)."""

    def _batch_range(self, rows: Tensor) -> Tuple[Tensor, Tensor]:
        n = rows.shape[1]
        q = self.spec.percentile / 100.0
        # kthvalue, unlike torch.quantile, has no input size limit.
        k_hi = min(n, max(1, int(round(q * n))))
        k_lo = min(n, max(1, n - k_hi + 1))
        lo = torch.kthvalue(rows, k_lo, dim=1).values
        hi = torch.kthvalue(rows, k_hi, dim=1).values
        return lo, hi


class MSEObserver(Observer):
    """Running min / max; the grid is the MSE-optimal shrink of that range on the last tensor seen."""

    def __init__(self, spec: QuantSpec, steps: int = 100, max_shrink: float = 0.8) -> None:
        super().__init__(spec)
        self.search_steps = steps
        self.max_shrink = max_shrink
        self.register_buffer("scale", torch.empty(0))
        self.register_buffer("zero_point", torch.empty(0))

    def _after_update(self, x: Tensor) -> None:
        self.scale, self.zero_point = ops.mse_clip_search(
            x.detach().float(), self.min_val, self.max_val, self.spec.quant_min, self.spec.quant_max,
            self.spec.symmetric, steps=self.search_steps, max_shrink=self.max_shrink, norm=2.0,
            **_fake_quant_granularity(self.spec),
        )

    def calculate_qparams(self) -> Tuple[Tensor, Tensor]:
        super().calculate_qparams()  # raises if nothing was observed
        return self.scale.clone(), self.zero_point.clone()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("scale", "zero_point"):
            key = prefix + name
            if key in state_dict and state_dict[key].shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(state_dict[key]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class HistogramObserver(Observer):
    """Entropy (KL) calibration on a histogram of ``|x|``, per grid.

    The histogram covers ``[0, range)`` with ``bins`` bins; when a batch
    exceeds the range, the range doubles and pairs of bins merge, so earlier
    batches are kept without storing them.
    """

    def __init__(self, spec: QuantSpec, bins: int = 2048) -> None:
        super().__init__(spec)
        if bins < 16 or bins % 2:
            raise ValueError(f"HistogramObserver: bins must be an even number >= 16, got {bins}")
        self.bins = bins
        self.register_buffer("histogram", torch.empty(0))
        self.register_buffer("hist_range", torch.empty(0))

    def _after_update(self, x: Tensor) -> None:
        rows, _ = grid_rows(x, self.spec)
        amax = rows.abs().amax(dim=1)
        if self.histogram.numel() == 0 or self.histogram.shape[0] != rows.shape[0]:
            self.histogram = torch.zeros(rows.shape[0], self.bins)
            self.hist_range = torch.clamp(amax, min=EPS)
        while bool((amax > self.hist_range).any()):
            grow = amax > self.hist_range
            merged = self.histogram.view(-1, self.bins // 2, 2).sum(-1)
            widened = torch.cat([merged, torch.zeros_like(merged)], dim=1)
            self.histogram = torch.where(grow[:, None], widened, self.histogram)
            self.hist_range = torch.where(grow, self.hist_range * 2, self.hist_range)
        idx = (rows.abs() / self.hist_range[:, None] * self.bins).long().clamp_(max=self.bins - 1)
        self.histogram.scatter_add_(1, idx, torch.ones_like(rows))

    def _thresholds(self) -> Tensor:
        """Per grid, the |x| threshold minimising KL(P || Q)."""
        hist = self.histogram
        levels = (self.spec.quant_max - self.spec.quant_min + 1) // 2 if self.spec.symmetric else \
            self.spec.quant_max - self.spec.quant_min + 1
        levels = max(2, min(levels, self.bins))
        best = torch.full((hist.shape[0],), float("inf"))
        best_i = torch.full((hist.shape[0],), self.bins, dtype=torch.long)
        step = max(1, (self.bins - levels) // 256)
        for i in range(levels, self.bins + 1, step):
            p = hist[:, :i].clone()
            p[:, -1] += hist[:, i:].sum(1)  # clipped mass goes to the edge bin
            q = self._quantize_distribution(hist[:, :i], levels)
            kl = _kl_divergence(p, q)
            better = kl < best
            best = torch.where(better, kl, best)
            best_i = torch.where(better, torch.full_like(best_i, i), best_i)
        return best_i.float() / self.bins * self.hist_range

    @staticmethod
    def _quantize_distribution(p: Tensor, levels: int) -> Tensor:
        """Merge ``p``'s bins into ``levels`` buckets, then spread each bucket over its non-empty bins."""
        n = p.shape[1]
        bucket = torch.div(torch.arange(n) * levels, n, rounding_mode="floor")
        nonzero = (p > 0).float()
        mass = torch.zeros(p.shape[0], levels).index_add_(1, bucket, p)
        count = torch.zeros(p.shape[0], levels).index_add_(1, bucket, nonzero)
        return torch.where(nonzero > 0, mass[:, bucket] / count[:, bucket].clamp(min=1), torch.zeros_like(p))

    def calculate_qparams(self) -> Tuple[Tensor, Tensor]:
        super().calculate_qparams()
        shape = self.min_val.shape
        t = self._thresholds().reshape(shape)
        lo = torch.maximum(self.min_val, -t)
        hi = torch.minimum(self.max_val, t)
        return qparams_from_range(lo, hi, self.spec)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("histogram", "hist_range"):
            key = prefix + name
            if key in state_dict and state_dict[key].shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(state_dict[key]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _kl_divergence(p: Tensor, q: Tensor) -> Tensor:
    p = p / p.sum(1, keepdim=True).clamp(min=1e-12)
    q = q / q.sum(1, keepdim=True).clamp(min=1e-12)
    mask = p > 0
    # Where P has mass but Q has none the divergence is infinite; a small
    # floor keeps the search ranking such thresholds last instead of NaN.
    ratio = p / q.clamp(min=1e-12)
    return torch.where(mask, p * torch.log(ratio), torch.zeros_like(p)).sum(1)


OBSERVERS: Dict[str, Type[Observer]] = {
    "minmax": MinMaxObserver,
    "moving_average_minmax": MovingAverageMinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "histogram": HistogramObserver,
}


def make_observer(spec: QuantSpec) -> Observer:
    """The observer ``spec.observer`` names."""
    try:
        cls = OBSERVERS[spec.observer]
    except KeyError:
        raise ValueError(f"unknown observer {spec.observer!r}; expected one of {sorted(OBSERVERS)}") from None
    return cls(spec)
