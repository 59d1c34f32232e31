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

import math
from typing import Dict, Tuple, Type

import torch
import torch.distributed as dist
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


def _world_size() -> int:
    """Number of ranks of the default process group (1 without torch.distributed)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


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


def resize_to_saved(module: nn.Module, state_dict, prefix: str, names) -> None:
    """Give ``module``'s tensors ``names`` the shapes they have in ``state_dict``.

    Grids and statistics take their per-channel shape from the first data
    seen, so a fresh module must adopt the saved shapes before loading. The
    tensor objects are kept (``.data`` is replaced), so Parameters stay the
    Parameters an optimizer holds.
    """
    for name in names:
        saved = state_dict.get(prefix + name)
        current = getattr(module, name)
        if saved is not None and current is not None and saved.shape != current.shape:
            current.data = torch.empty_like(saved, device=current.device, dtype=current.dtype)


class Observer(nn.Module):
    """Base class: tracks ``min_val`` / ``max_val`` per grid; subclasses decide how.

    Under ``torch.distributed`` (a process group is initialized and has more
    than one rank) each rank sees a different batch; the batch's range is
    all-reduced before it is merged, so that every rank calibrates the same
    grid and data-parallel replicas stay identical. Every rank must then run
    the same calibrating forwards. ``sync_distributed = False`` keeps an
    observer local (for tensors that are identical on every rank, such as
    replicated weights, or deliberately different, such as shards).
    """

    sync_distributed: bool = True

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
        # Data-dependent checks and collectives would break the graph under
        # torch.compile; they run in eager mode only.
        compiling = torch.compiler.is_compiling()
        if not compiling and not torch.isfinite(x).all():
            raise ValueError(f"{type(self).__name__}: the input contains NaN or Inf; cannot calibrate a grid on it")
        rows, shape = grid_rows(x, self.spec)
        lo, hi = self._batch_range(rows)
        lo, hi = lo.reshape(shape), hi.reshape(shape)
        if self.sync_distributed and not compiling and _world_size() > 1:
            lo, hi = self._all_reduce_range(lo, hi)
        if not self.is_calibrated or self.min_val.shape != lo.shape:
            self.min_val, self.max_val = lo.clone(), hi.clone()
        else:
            self._merge(lo, hi)
        self._after_update(x)
        self.steps += 1
        return x

    def _batch_range(self, rows: Tensor) -> Tuple[Tensor, Tensor]:
        return torch.aminmax(rows, dim=1)

    def _all_reduce_range(self, lo: Tensor, hi: Tensor) -> Tuple[Tensor, Tensor]:
        """The range of the whole distributed batch: the minimum and maximum over ranks."""
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        return lo, hi

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

    # Buffers whose shape depends on the data seen; a loaded checkpoint gives them theirs.
    _data_shaped_buffers: Tuple[str, ...] = ("min_val", "max_val")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        resize_to_saved(self, state_dict, prefix, self._data_shaped_buffers)
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
    """Moving average of each batch's low / high percentiles (``spec.percentile``).

    Percentiles as ``torch.quantile`` defines them (linear interpolation
    between order statistics), computed with ``kthvalue``, which unlike
    ``torch.quantile`` has no input size limit.
    """

    def _batch_range(self, rows: Tensor) -> Tuple[Tensor, Tensor]:
        q = self.spec.percentile / 100.0
        return _quantile(rows, 1.0 - q), _quantile(rows, q)

    def _all_reduce_range(self, lo: Tensor, hi: Tensor) -> Tuple[Tensor, Tensor]:
        # Percentiles of the union are not the extremes of the ranks'
        # percentiles; their mean is the usual estimate.
        world = _world_size()
        dist.all_reduce(lo, op=dist.ReduceOp.SUM)
        dist.all_reduce(hi, op=dist.ReduceOp.SUM)
        return lo / world, hi / world


def _quantile(rows: Tensor, q: float) -> Tensor:
    """``torch.quantile(rows, q, dim=1)``: ``q`` and the interpolation weight in
    float32 as there, so that the results agree bit for bit."""
    n = rows.shape[1]
    position = torch.tensor(q, dtype=torch.float32) * (n - 1)
    below = int(position)
    below_value = torch.kthvalue(rows, below + 1, dim=1).values
    if below + 1 >= n:
        return below_value
    above_value = torch.kthvalue(rows, below + 2, dim=1).values
    return torch.lerp(below_value, above_value, position - below)


class MSEObserver(Observer):
    """Running min / max; the grid is the MSE-optimal shrink of that range on the last tensor seen."""

    _data_shaped_buffers = Observer._data_shaped_buffers + ("scale", "zero_point")

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



class HistogramObserver(Observer):
    """Entropy (KL) calibration on a histogram of ``|x|``, per grid.

    The histogram covers ``[0, range)`` with ``bins`` bins; when a batch
    exceeds the range, the range doubles and pairs of bins merge, so earlier
    batches are kept without storing them.
    """

    _data_shaped_buffers = Observer._data_shaped_buffers + ("histogram", "hist_range")

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
        """Per grid, the |x| threshold minimising KL(P || Q) (see :func:`_kl_per_threshold`)."""
        levels = (self.spec.quant_max - self.spec.quant_min + 1) // 2 if self.spec.symmetric else \
            self.spec.quant_max - self.spec.quant_min + 1
        levels = max(2, min(levels, self.bins))
        step = max(1, (self.bins - levels) // 256)
        kept = torch.arange(levels, self.bins + 1, step)
        # The unclipped range is always a candidate, whatever the stride.
        if int(kept[-1]) != self.bins:
            kept = torch.cat([kept, torch.tensor([self.bins])])
        kl = _kl_per_threshold(self.histogram, kept, levels)
        # argmin keeps the first (smallest) of equal divergences.
        best_i = kept[kl.argmin(dim=1)]
        return best_i.float() / self.bins * self.hist_range

    def calculate_qparams(self) -> Tuple[Tensor, Tensor]:
        super().calculate_qparams()
        shape = self.min_val.shape
        t = self._thresholds().reshape(shape)
        lo = torch.maximum(self.min_val, -t)
        hi = torch.minimum(self.max_val, t)
        return qparams_from_range(lo, hi, self.spec)



# A bin where P has mass but Q has none (the last kept bin, when it is empty
# but receives the clipped mass) would make the divergence infinite; Q is
# floored there so such thresholds rank last instead of NaN.
_Q_FLOOR = 1e-12


def _kl_per_threshold(hist: Tensor, kept: Tensor, levels: int) -> Tensor:
    """KL(P || Q) of every row of ``hist`` for every number of kept bins ``i`` in ``kept``.

    TensorRT's entropy calibration: P is the histogram cut after bin ``i``
    with the clipped mass added to its last kept bin; Q merges the kept bins
    into ``levels`` buckets (bin ``j`` into bucket ``j * levels // i``) and
    spreads each bucket's mass evenly over its non-empty bins. Both are
    normalised. Instead of building P and Q for each ``i``, the divergence is
    assembled from prefix sums of the histogram, O(levels) per threshold
    instead of O(bins). With ``C`` the total count and ``C_i`` the kept one:

        C * KL = sum_{j<i} h_j log(h_j / C) - sum_b mass_b log(mass_b / count_b / C_i)
                 + (the last kept bin's term redone with the clipped mass added)

    Returns ``[rows, len(kept)]`` (float64).
    """
    hist = hist.double()
    # Prefix sums, transposed so that gathering bucket edges copies contiguous
    # rows: [bins + 1, grids]; entry j sums bins 0 .. j-1.
    def prefix(values: Tensor) -> Tensor:
        return torch.cat([values.new_zeros(values.shape[0], 1), values.cumsum(1)], dim=1).t().contiguous()

    mass_before = prefix(hist)
    nonzero_before = prefix((hist > 0).double())
    hlogh_before = prefix(torch.xlogy(hist, hist))
    hist_t = hist.t()
    # Candidates in chunks of ~4M bucket values: bounded memory for many grids.
    chunk = max(1, (1 << 22) // max(1, hist.shape[0] * (levels + 1)))
    return torch.cat([
        _kl_chunk(hist_t, mass_before, nonzero_before, hlogh_before, part, levels) for part in kept.split(chunk)
    ]).t()


def _kl_chunk(hist_t: Tensor, mass_before: Tensor, nonzero_before: Tensor, hlogh_before: Tensor, kept: Tensor,
              levels: int) -> Tensor:
    """:func:`_kl_per_threshold` for some thresholds, from the prefix sums: ``[len(kept), grids]``."""
    total = mass_before[-1].clamp(min=_Q_FLOOR)                           # [grids]
    kept_mass = mass_before[kept]                                        # [K, grids]
    log_kept = torch.log(kept_mass.clamp(min=_Q_FLOOR))

    # Bucket b holds bins [ceil(b * i / levels), ceil((b + 1) * i / levels)).
    b = torch.arange(levels + 1)
    edges = ((b[None, :] * kept[:, None] + levels - 1) // levels).flatten()
    shape = (len(kept), levels + 1, mass_before.shape[1])
    bucket_mass = mass_before.index_select(0, edges).view(shape).diff(dim=1)  # [K, levels, grids]
    bucket_count = nonzero_before.index_select(0, edges).view(shape).diff(dim=1).clamp_(min=1)
    # sum_b mass_b log(mass_b / count_b / C_i); the bucket masses add up to C_i.
    bucket_term = torch.xlogy(bucket_mass, bucket_mass / bucket_count).sum(1) - kept_mass * log_kept
    kl = hlogh_before[kept] - kept_mass * torch.log(total) - bucket_term

    # The last kept bin (always in the last bucket) holds the clipped mass in P.
    last = hist_t[kept - 1]
    clipped = mass_before[-1] - kept_mass
    log_q_last = torch.where(
        last > 0, torch.log(bucket_mass[:, -1] / bucket_count[:, -1]) - log_kept, math.log(_Q_FLOOR))
    p_last = last + clipped
    kl = kl + torch.xlogy(p_last, p_last / total) - torch.xlogy(last, last / total) - clipped * log_q_last
    return kl / total


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
