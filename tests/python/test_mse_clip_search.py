"""torchquant.mse_clip_search: the per-grid MSE-optimal clipping search.

The reference is a brute-force search in plain PyTorch written from the op's
definition: the same candidate shrink factors (in float32, as the kernel
computes them), each candidate's grid from the min/max formulas, the
candidate's reconstruction error summed in float64. The op must return, for
every grid, one of the candidate grids bit for bit, and one whose error is
the smallest up to the rounding of the sums.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import pytest
import torch
from torch import Tensor
from torch.library import opcheck

from torchquant import ops

EPS = torch.finfo(torch.float32).eps

# Relative tolerance between errors summed by the op (float32 blocks, then
# double) and by the reference (float64): near-ties may go either way.
ERROR_RTOL = 1e-5


# ---------------------------------------------------------------------------
# Brute-force reference (also used by the observer tests).


def reference_rows(x: Tensor, axis: Optional[int], group_size: Optional[int]) -> Tensor:
    """``x`` as float32 rows, one per grid, in the order of the grid tensors."""
    x = x.float()
    if group_size is not None:
        return x.reshape(-1, group_size)
    if axis is not None:
        return x.movedim(axis, 0).reshape(x.shape[axis], -1)
    return x.reshape(1, -1)


def grid_from_range(lo: Tensor, hi: Tensor, quant_min: int, quant_max: int, symmetric: bool):
    """Scale and zero-point covering ``[lo, hi]`` widened to contain 0, in float32."""
    lo = torch.clamp(lo, max=0.0)
    hi = torch.clamp(hi, min=0.0)
    if symmetric:
        scale = torch.clamp(torch.maximum(-lo, hi) / ((quant_max - quant_min) / 2), min=EPS)
        return scale, torch.zeros_like(scale)
    scale = torch.clamp((hi - lo) / (quant_max - quant_min), min=EPS)
    return scale, torch.clamp(quant_min - torch.round(lo / scale), quant_min, quant_max)


def shrink_factors(steps: int, max_shrink: float) -> Tensor:
    """``1 - k * max_shrink / steps`` for k = 0 .. steps-1, in float32 operation by operation."""
    k = torch.arange(steps, dtype=torch.float32)
    return 1.0 - k * torch.tensor(max_shrink, dtype=torch.float32) / torch.tensor(float(steps))


def grid_errors(rows: Tensor, scale: Tensor, zero: Tensor, quant_min: int, quant_max: int, norm: float) -> Tensor:
    """``sum |fake_quantize(row) - row| ** norm`` (float64) of each row on each of its grids.

    ``rows`` is ``[grids, n]``; ``scale`` / ``zero`` are ``[grids, candidates]``.
    """
    x = rows[:, None, :]
    s, z = scale[..., None], zero[..., None]
    y = (torch.clamp(torch.round(x * torch.reciprocal(s)) + z, quant_min, quant_max) - z) * s
    return (y - x).double().abs().pow(norm).sum(-1)


class Search(NamedTuple):
    scale: Tensor   # [grids, steps] float32, every candidate's grid
    zero: Tensor
    error: Tensor   # [grids, steps] float64


def brute_force_clip_search(rows: Tensor, lo: Tensor, hi: Tensor, quant_min: int, quant_max: int, symmetric: bool,
                            steps: int = 100, max_shrink: float = 0.8, norm: float = 2.0) -> Search:
    """Every candidate of every grid (rows ``[grids, n]``, ``lo`` / ``hi`` ``[grids]``) with its error."""
    f = shrink_factors(steps, max_shrink)
    scale, zero = grid_from_range(lo.reshape(-1, 1) * f, hi.reshape(-1, 1) * f, quant_min, quant_max, symmetric)
    return Search(scale, zero, grid_errors(rows, scale, zero, quant_min, quant_max, norm))


def chosen_candidates(search: Search, scale: Tensor, zero: Tensor) -> Tensor:
    """Per grid, the first candidate whose grid equals ``(scale, zero)`` bit for bit; fails if there is none."""
    s, z = scale.reshape(-1, 1), zero.reshape(-1, 1)
    match = (search.scale == s) & (search.zero == z)
    missing = ~match.any(1)
    assert not bool(missing.any()), (
        f"grids {missing.nonzero().flatten().tolist()[:5]} are not among the candidates: "
        f"scale {s[missing].flatten()[:3].tolist()}, zero {z[missing].flatten()[:3].tolist()}")
    return match.int().argmax(1)


def assert_optimal(search: Search, scale: Tensor, zero: Tensor) -> Tensor:
    """``(scale, zero)`` is, per grid, a candidate of minimal error; returns its index."""
    k = chosen_candidates(search, scale, zero)
    error = search.error.gather(1, k[:, None]).squeeze(1)
    best = search.error.min(1).values
    worse = error > best * (1 + ERROR_RTOL) + 1e-30
    assert not bool(worse.any()), (
        f"{int(worse.sum())} grids are not optimal, e.g. error {error[worse][:3].tolist()} "
        f"vs best {best[worse][:3].tolist()}")
    return k


# ---------------------------------------------------------------------------
# Cases


def heavy_tailed(shape, seed: int) -> Tensor:
    """Gaussian bulk with per-row scales, plus a few large outliers: clipping pays off."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * torch.exp(torch.randn(shape[0], *([1] * (len(shape) - 1)), generator=gen))
    outliers = torch.rand(shape, generator=gen) < 0.01
    return torch.where(outliers, x * 8, x)


class Layout(NamedTuple):
    name: str
    shape: tuple
    axis: Optional[int] = None
    group_size: Optional[int] = None

    def grid_shape(self):
        if self.group_size is not None:
            return (*self.shape[:-1], self.shape[-1] // self.group_size)
        return (self.shape[self.axis],) if self.axis is not None else (1,)


LAYOUTS = [
    Layout("tensor", (300,)),
    Layout("channel0", (6, 40), axis=0),
    Layout("channel1", (3, 5, 16), axis=1),
    Layout("group", (4, 3, 32), group_size=8),
]
RANGES = {(bits, sym): ops.quant_range(bits, signed=sym) for bits in (2, 4, 8) for sym in (True, False)}


def observed_range(x: Tensor, layout: Layout):
    lo, hi = torch.aminmax(reference_rows(x, layout.axis, layout.group_size), dim=1)
    return lo.reshape(layout.grid_shape()), hi.reshape(layout.grid_shape())


def run_op(x, lo, hi, layout, quant_min, quant_max, symmetric, **kwargs):
    return ops.mse_clip_search(x, lo, hi, quant_min, quant_max, symmetric, axis=layout.axis,
                               group_size=layout.group_size, **kwargs)


# ---------------------------------------------------------------------------
# Against the reference


@pytest.mark.parametrize("norm", [2.0, 2.4])
@pytest.mark.parametrize("bits,symmetric", list(RANGES), ids=[f"{'int' if s else 'uint'}{b}" for b, s in RANGES])
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: l.name)
def test_matches_brute_force(layout, bits, symmetric, norm):
    qmin, qmax = RANGES[bits, symmetric]
    x = heavy_tailed(layout.shape, seed=bits)
    lo, hi = observed_range(x, layout)
    scale, zero = run_op(x, lo, hi, layout, qmin, qmax, symmetric, norm=norm)
    assert scale.shape == zero.shape == lo.shape and scale.dtype == zero.dtype == torch.float32

    rows = reference_rows(x, layout.axis, layout.group_size)
    search = brute_force_clip_search(rows, lo, hi, qmin, qmax, symmetric, norm=norm)
    k = assert_optimal(search, scale, zero)
    # Never worse than the unshrunk (min/max) grid; at 2 and 4 bits clipping
    # this heavy-tailed input pays off somewhere (so the search is exercised).
    assert bool((search.error.gather(1, k[:, None]).squeeze(1) <= search.error[:, 0] * (1 + ERROR_RTOL)).all())
    if bits <= 4:
        assert bool((k > 0).any()), "no grid was clipped on a heavy-tailed input"


@pytest.mark.parametrize("steps,max_shrink", [(1, 0.5), (7, 0.5), (250, 0.95), (40, 0.0)])
def test_steps_and_max_shrink(steps, max_shrink):
    layout = LAYOUTS[1]
    x = heavy_tailed(layout.shape, seed=3)
    lo, hi = observed_range(x, layout)
    scale, zero = run_op(x, lo, hi, layout, -8, 7, True, steps=steps, max_shrink=max_shrink)
    search = brute_force_clip_search(reference_rows(x, 0, None), lo, hi, -8, 7, True, steps=steps,
                                     max_shrink=max_shrink)
    assert_optimal(search, scale, zero)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_input(dtype):
    """Low-precision inputs are searched in float32 arithmetic on their exact values."""
    layout = LAYOUTS[3]
    x = heavy_tailed(layout.shape, seed=5).to(dtype)
    lo, hi = observed_range(x, layout)
    scale, zero = run_op(x, lo, hi, layout, 0, 15, False)
    rows = reference_rows(x, layout.axis, layout.group_size)
    assert_optimal(brute_force_clip_search(rows, lo, hi, 0, 15, False), scale, zero)


@pytest.mark.parametrize("symmetric", [True, False])
def test_ties_keep_the_widest_range(symmetric):
    """0 is exact on every candidate grid: with an all-zero input every error is 0 and k=0 must win."""
    qmin, qmax = ops.quant_range(4, signed=symmetric)
    x = torch.zeros(5, 12)
    lo = -torch.linspace(0.5, 3.0, 5)
    hi = torch.linspace(1.0, 2.0, 5)
    scale, zero = ops.mse_clip_search(x, lo, hi, qmin, qmax, symmetric, axis=0)
    widest_scale, widest_zero = grid_from_range(lo, hi, qmin, qmax, symmetric)
    assert torch.equal(scale, widest_scale) and torch.equal(zero, widest_zero)


def test_one_sided_and_degenerate_ranges():
    """All-positive rows, all-negative rows and a constant row (lo == hi): grids still contain 0."""
    x = torch.stack([torch.linspace(0.1, 2.0, 50), -torch.linspace(0.1, 3.0, 50), torch.full((50,), 0.7)])
    lo, hi = torch.aminmax(x, dim=1)
    for symmetric in (True, False):
        qmin, qmax = ops.quant_range(8, signed=symmetric)
        scale, zero = ops.mse_clip_search(x, lo, hi, qmin, qmax, symmetric, axis=0)
        assert_optimal(brute_force_clip_search(x, lo, hi, qmin, qmax, symmetric), scale, zero)
        assert bool(((zero >= qmin) & (zero <= qmax)).all())


# ---------------------------------------------------------------------------
# opcheck and errors


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda l: l.name)
def test_opcheck(layout):
    x = heavy_tailed(layout.shape, seed=1)
    lo, hi = observed_range(x, layout)
    opcheck(torch.ops.torchquant.mse_clip_search.default, (x, lo, hi, -128, 127, True),
            {"axis": layout.axis, "group_size": layout.group_size, "steps": 10})


def _bad_call(**changes):
    args = {"input": torch.randn(4, 6), "min_val": -torch.ones(4), "max_val": torch.ones(4), "quant_min": -8,
            "quant_max": 7, "symmetric": True, "axis": 0}
    args.update(changes)
    return lambda: ops.mse_clip_search(**args)


@pytest.mark.parametrize("changes,error,names", [
    ({"steps": 0}, ValueError, "steps"),
    ({"steps": -3}, ValueError, "steps"),
    ({"max_shrink": 1.0}, ValueError, "max_shrink"),
    ({"max_shrink": -0.1}, ValueError, "max_shrink"),
    ({"norm": 0.0}, ValueError, "norm"),
    ({"norm": -2.0}, ValueError, "norm"),
    ({"norm": float("inf")}, ValueError, "norm"),
    ({"min_val": torch.full((4,), 2.0)}, ValueError, "min_val"),
    ({"min_val": torch.tensor([-1.0, float("nan"), -1.0, -1.0])}, ValueError, "min_val"),
    ({"max_val": torch.tensor([1.0, float("inf"), 1.0, 1.0])}, ValueError, "max_val"),
    ({"min_val": -torch.ones(6)}, ValueError, "min_val"),
    ({"min_val": -torch.ones(4, 1)}, ValueError, "min_val"),
    ({"max_val": torch.ones(4, dtype=torch.float64)}, TypeError, "max_val"),
    ({"input": torch.randint(-5, 5, (4, 6))}, TypeError, "input"),
    ({"quant_min": 7, "quant_max": -8}, ValueError, "quant_min"),
    ({"axis": 2}, ValueError, "axis"),
    ({"axis": None, "group_size": 4, "min_val": -torch.ones(4, 1), "max_val": torch.ones(4, 1)}, ValueError,
     "group_size"),
])
def test_bad_arguments(changes, error, names):
    with pytest.raises(error, match=names):
        _bad_call(**changes)()


@pytest.mark.parametrize("granularity", [{}, {"axis": 0}, {"axis": 1}, {"group_size": 32}])
@pytest.mark.parametrize("symmetric", [True, False])
def test_device_matches_cpu(device, granularity, symmetric):
    """Every backend picks the same grids: the candidates are computed with the
    same float32 arithmetic, only the error sums may round differently."""
    torch.manual_seed(7)
    x = torch.randn(48, 96) * torch.rand(48, 1) * 3
    if "axis" in granularity:
        lo, hi = torch.aminmax(x.movedim(granularity["axis"], 0).reshape(x.shape[granularity["axis"]], -1), dim=1)
    elif "group_size" in granularity:
        lo, hi = torch.aminmax(x.reshape(48, 3, 32), dim=-1)
    else:
        lo, hi = torch.aminmax(x)
        lo, hi = lo.reshape(1), hi.reshape(1)
    qmin, qmax = (-8, 7) if symmetric else (0, 15)
    cpu = ops.mse_clip_search(x, lo, hi, qmin, qmax, symmetric, **granularity)
    dev = ops.mse_clip_search(x.to(device), lo.to(device), hi.to(device), qmin, qmax, symmetric, **granularity)
    for a, b in zip(cpu, dev):
        torch.testing.assert_close(b.cpu(), a, rtol=0, atol=0)
