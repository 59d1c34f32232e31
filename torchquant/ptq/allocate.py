"""Mixed precision: a bit width per Linear layer, chosen by sensitivity under a size budget.

>>> sens = torchquant.ptq.layer_sensitivity(model, batches, loss_fn, bits=(2, 3, 4, 8))        # measured
>>> sens = torchquant.ptq.layer_sensitivity(model, batches, bits=(2, 3, 4, 8), proxy="hessian")  # one pass
>>> plan = torchquant.ptq.allocate_bits(sens, average_bits=4.5)
>>> def run_gptq(spec, exclude):
...     report = torchquant.ptq.gptq(model, batches, spec, exclude=exclude)
...     torchquant.ptq.to_quantized_modules(model, report)
...     return report
>>> torchquant.ptq.quantize_mixed(model, plan, run_gptq)

Sensitivity of a layer at ``b`` bits is what quantizing that layer alone
costs:

* ``proxy=None`` (measured): the increase of ``loss_fn(model, batch)`` summed
  over the batches when only that layer is rounded to nearest at ``b`` bits;
* ``proxy="hessian"``: ``sum_j H_jj * sum_i (W_ij - Q(W)_ij)^2``, the output
  error the layer's rounding adds on the calibration inputs if their
  features were uncorrelated, with ``H_jj = sum_tokens x_j^2`` (the diagonal
  of GPTQ's Hessian ``X^T X``): one forward pass for every layer and width.

:func:`allocate_bits` then chooses one width per layer to minimise the summed
sensitivity under the budget, exactly: a multiple-choice knapsack solved by
dynamic programming over the layers' sizes in bits (divided by their common
factor). Sizes count weight bits plus each group's float16 scale and zero
point (``group_size``), as GPTQ checkpoints store them.
"""
from __future__ import annotations

import math
from functools import reduce
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from torchquant.ptq.calibration import find_blocks, linear_layers
from torchquant.ptq.rtn import rtn_result
from torchquant.spec import QuantSpec

__all__ = ["layer_sensitivity", "allocate_bits", "BitPlan", "quantize_mixed", "ALLOWED_BITS"]

ALLOWED_BITS = (2, 3, 4, 8)
# Float16 scale + zero point per group, as GPTQ checkpoints store them (zeros are packed there, a
# little less; the difference is the same for every allocation).
GRID_BITS_PER_GROUP = 32
# The dynamic program's table holds at most this many budget steps; larger problems are scaled down.
MAX_DP_STEPS = 200_000


def _spec(bits: int, group_size: int, in_features: int) -> QuantSpec:
    g = group_size if in_features % group_size == 0 else in_features
    return QuantSpec(bits=bits, symmetric=False, granularity="group", group_size=g)


def _check_bits(bits: Sequence[int]) -> Tuple[int, ...]:
    bits = tuple(bits)
    if not bits or any(isinstance(b, bool) or b not in ALLOWED_BITS for b in bits):
        raise ValueError(f"bits must be a non-empty subset of {ALLOWED_BITS}, got {bits!r}")
    return tuple(sorted(set(bits)))


def _layers(model: nn.Module, blocks: Optional[str], exclude: Sequence[str]) -> List[Tuple[str, nn.Linear]]:
    from torchquant.ptq.options import exclude_patterns, is_excluded
    found = find_blocks(model, blocks)
    prefix, root = found if found is not None else ("", model)
    patterns = exclude_patterns(exclude)
    layers = [(n, m) for n, m in linear_layers(root, prefix) if not is_excluded(n, patterns)]
    if not layers:
        raise ValueError("the model has no nn.Linear layer to allocate bits to (inside its blocks, not excluded)")
    return layers


@torch.no_grad()
def layer_sensitivity(model: nn.Module, batches: Iterable, loss_fn: Optional[Callable[[nn.Module, object], Tensor]] = None,
                      *, bits: Sequence[int] = ALLOWED_BITS, group_size: int = 128, proxy: Optional[str] = None,
                      blocks: Optional[str] = None, exclude: Sequence[str] = ("lm_head", "*.lm_head"),
                      progress: bool = False) -> Dict[str, Dict[int, float]]:
    """``{layer: {bits: sensitivity}}`` for every ``nn.Linear`` in the blocks (see the module docstring).

    Args:
        model: the float model (left unchanged).
        batches: calibration batches, each passed as ``model(**batch)`` (dict)
            or ``model(batch)``.
        loss_fn: ``loss_fn(model, batch) -> scalar`` for the measured
            sensitivity (e.g. the language-model loss); unused by the proxy.
        bits: the candidate widths, a subset of ``{2, 3, 4, 8}``.
        group_size: grid group size (a layer whose width it does not divide
            gets one grid per row).
        proxy: None (measured) or ``"hessian"``.
    """
    bits = _check_bits(bits)
    batches = list(batches)
    if not batches:
        raise ValueError("batches must hold at least one calibration batch")
    if proxy not in (None, "hessian"):
        raise ValueError(f"proxy must be None (measured) or 'hessian', got {proxy!r}")
    if proxy is None and loss_fn is None:
        raise ValueError("the measured sensitivity needs loss_fn(model, batch); or pass proxy='hessian'")
    layers = _layers(model, blocks, exclude)
    run = (lambda b: model(**b)) if isinstance(batches[0], dict) else model
    result: Dict[str, Dict[int, float]] = {}
    iterator = layers
    if progress:
        from tqdm import tqdm
        iterator = tqdm(layers, desc="sensitivity", unit="layer")
    if proxy == "hessian":
        diag = _hessian_diagonals(model, dict(layers), batches, run)
        for name, layer in iterator:
            w = layer.weight.detach().float()
            result[name] = {}
            for b in bits:
                error = (rtn_result(w, _spec(b, group_size, w.shape[1])).dequantize().float() - w) ** 2
                result[name][b] = float((error.sum(dim=0) * diag[name]).sum())
        return result
    base = sum(float(loss_fn(model, batch)) for batch in batches)
    for name, layer in iterator:
        original = layer.weight.detach().clone()
        result[name] = {}
        try:
            for b in bits:
                q = rtn_result(original, _spec(b, group_size, original.shape[1]))
                layer.weight.copy_(q.dequantize(original.dtype))
                result[name][b] = sum(float(loss_fn(model, batch)) for batch in batches) - base
        finally:
            layer.weight.copy_(original)
    return result


def _hessian_diagonals(model, layers: Dict[str, nn.Linear], batches, run) -> Dict[str, Tensor]:
    diag = {name: torch.zeros(m.in_features, dtype=torch.float64) for name, m in layers.items()}

    def hook(name):
        def record(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            diag[name] += (x * x).sum(dim=0).cpu()
        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in layers.items()]
    try:
        for batch in batches:
            run(batch)
    finally:
        for h in handles:
            h.remove()
    return {name: d.float() for name, d in diag.items()}


class BitPlan(dict):
    """``{layer: bits}`` with the sizes behind it: ``average_bits`` per weight (grids included) and ``bits_used``."""

    average_bits: float = 0.0
    total_bits: int = 0
    cost: float = 0.0


def _size_bits(numel: int, in_features: int, bits: int, group_size: int) -> int:
    g = group_size if in_features % group_size == 0 else in_features
    return numel * bits + (numel // g) * GRID_BITS_PER_GROUP


def allocate_bits(sensitivity: Dict[str, Dict[int, float]], model: nn.Module, *, average_bits: Optional[float] = None,
                  budget_bytes: Optional[int] = None, group_size: int = 128) -> BitPlan:
    """One width per layer minimising the summed sensitivity under the budget (module docstring).

    Args:
        sensitivity: :func:`layer_sensitivity`'s result.
        model: the model the layers belong to (for their sizes).
        average_bits: budget in bits per weight, grids included (e.g. 4.5);
            or ``budget_bytes``, the quantized layers' bytes. Exactly one.
        group_size: as in :func:`layer_sensitivity` (for the grids' bits).

    Raises:
        ValueError: a budget below the smallest possible model (every layer at
        its narrowest width), or an empty sensitivity table.
    """
    if not sensitivity:
        raise ValueError("sensitivity is empty: no layer to allocate bits to")
    if (average_bits is None) == (budget_bytes is None):
        raise ValueError("give exactly one budget: average_bits or budget_bytes")
    modules = dict(model.named_modules())
    names = list(sensitivity)
    sizes: List[Dict[int, int]] = []
    total_weights = 0
    for name in names:
        layer = modules.get(name)
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"sensitivity names {name!r}, which is not an nn.Linear of the model")
        total_weights += layer.weight.numel()
        sizes.append({b: _size_bits(layer.weight.numel(), layer.in_features, b, group_size) for b in sensitivity[name]})
    budget = int(math.floor(average_bits * total_weights)) if average_bits is not None else int(budget_bytes) * 8
    smallest = sum(min(s.values()) for s in sizes)
    if budget < smallest:
        raise ValueError(f"the budget ({budget / total_weights:.3f} bits per weight) is below the smallest possible "
                         f"model: {smallest / total_weights:.3f} bits per weight with every layer at its narrowest "
                         f"width")
    # Costs in units of their common factor, so the table is as small as the problem allows.
    unit = reduce(math.gcd, [c for s in sizes for c in s.values()])
    steps = budget // unit
    if steps > MAX_DP_STEPS:  # coarser units: every cost rounded up, so the plan stays within the budget
        unit = -(-budget // MAX_DP_STEPS)
        steps = budget // unit
    costs = [{b: -(-c // unit) for b, c in s.items()} for s in sizes]
    inf = float("inf")
    best = torch.full((steps + 1,), inf, dtype=torch.float64)
    best[0] = 0.0
    choices = []
    for i, name in enumerate(names):
        new = torch.full_like(best, inf)
        pick = torch.full((steps + 1,), -1, dtype=torch.int64)
        for b, c in costs[i].items():
            if c > steps:
                continue
            candidate = torch.full_like(best, inf)
            candidate[c:] = best[:steps + 1 - c] + sensitivity[name][b]
            better = candidate < new
            new = torch.where(better, candidate, new)
            pick = torch.where(better, torch.full_like(pick, b), pick)
        best = new
        choices.append(pick)
    end = int(torch.argmin(best))
    if not math.isfinite(float(best[end])):
        raise ValueError("no allocation fits the budget")
    plan = BitPlan()
    for i in range(len(names) - 1, -1, -1):
        b = int(choices[i][end])
        plan[names[i]] = b
        end -= costs[i][b]
    plan = BitPlan(reversed(list(plan.items())))
    plan.total_bits = sum(sizes[i][plan[n]] for i, n in enumerate(names))
    plan.average_bits = plan.total_bits / total_weights
    plan.cost = sum(sensitivity[n][plan[n]] for n in names)
    return plan


def quantize_mixed(model: nn.Module, plan: Dict[str, int],
                   quantize: Callable[[QuantSpec, List[str]], object], *, group_size: int = 128) -> List[object]:
    """Run ``quantize(spec, exclude)`` once per width of ``plan``, widest first.

    ``exclude`` lists every layer the run must leave alone (the other widths'
    layers, and everything the plan does not name), so any torchquant method
    taking ``exclude`` (GPTQ, RTN, AWQ) quantizes exactly the plan's layers of
    that width. Returns the runs' reports.
    """
    if not plan:
        raise ValueError("plan is empty")
    all_linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    unknown = sorted(set(plan) - set(all_linear))
    if unknown:
        raise ValueError(f"plan names layers the model does not have as nn.Linear: {unknown[:4]}")
    reports = []
    for b in sorted(set(plan.values()), reverse=True):
        keep = [n for n, w in plan.items() if w == b]
        exclude = [n for n in all_linear if n not in keep]
        g = group_size
        spec = QuantSpec(bits=b, symmetric=False, granularity="group", group_size=g)
        reports.append(quantize(spec, exclude))
    return reports
