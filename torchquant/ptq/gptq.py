"""GPTQ over a whole model (Frantar et al. 2022, arXiv 2210.17323), block by block.

>>> report = torchquant.ptq.gptq(model, batches, QuantSpec(bits=4, granularity="group", group_size=128))
>>> print(report)                      # per-layer loss, damping, rows seen, status
>>> report.results["model.layers.0.self_attn.q_proj"].codes   # int32 codes, grids in .scales / .zero_points
>>> torchquant.ptq.save_gptq(model, "model-gptq", report=report)  # GPTQLinear layers, then a GPTQ checkpoint

The walk is :func:`torchquant.ptq.calibration.calibrate_blocks`; per layer,
the Hessian ``H = 2/n sum x x^T`` of its inputs is accumulated by the
``gptq_accumulate_hessian`` op and the weight is quantized by the
``gptq_quantize`` op (damped Cholesky of H^-1, lazy block updates, groups,
act-order, static groups). Each quantized weight is replaced in place by its
dequantized value, so the model stays a float model computing with the
quantized weights; the codes and grids go into the report for a checkpoint
(:func:`torchquant.ptq.checkpoint.to_gptq_modules`, ``save_gptq(...,
report=report)``). Only the real tokens of padded batches enter the
Hessians (``token_mask``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from torchquant import ops
from torchquant.ptq.calibration import (BlockContext, BlockwisePass, CalibratedLayer, Device, TokenMask,
                                        calibrate_blocks)
from torchquant.ptq.options import (DEFAULT_EXCLUDE, check_group_size, exclude_patterns, is_excluded, is_int,
                                    layer_rows)
from torchquant.ptq.report import (NO_CALIBRATION_TOKENS, QUANTIZED, RTN_FALLBACK, LayerReport, LayerResult,
                                   PTQReport)
from torchquant.spec import QuantSpec

__all__ = ["gptq", "GPTQConfig", "GPTQReport", "DEFAULT_EXCLUDE"]

_GRID_OBSERVERS = ("minmax", "mse")
_DEFAULT_MSE_STEPS = 100


@dataclass(frozen=True)
class GPTQConfig:
    """The GPTQ settings of a run (see :func:`gptq` for their meaning); validated on creation."""

    block_size: int = 128
    percdamp: float = 0.01
    act_order: bool = False
    static_groups: bool = False
    sequential: bool = True
    clip_search_steps: int = 0
    clip_max_shrink: float = 0.8
    rtn_fallback: bool = False
    exclude: Tuple[str, ...] = DEFAULT_EXCLUDE

    def __post_init__(self) -> None:
        if not is_int(self.block_size) or self.block_size <= 0:
            raise ValueError(f"block_size must be a positive integer, got {self.block_size!r}")
        if isinstance(self.percdamp, bool) or not isinstance(self.percdamp, (int, float)) or \
                not 0.0 < self.percdamp <= 1.0:
            raise ValueError(f"percdamp must be a number in (0, 1] (a fraction of the mean Hessian diagonal), "
                             f"got {self.percdamp!r}")
        for name in ("act_order", "static_groups", "sequential", "rtn_fallback"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if not is_int(self.clip_search_steps) or self.clip_search_steps < 0:
            raise ValueError(f"clip_search_steps must be a non-negative integer, got {self.clip_search_steps!r}")
        if isinstance(self.clip_max_shrink, bool) or not isinstance(self.clip_max_shrink, (int, float)) or \
                not 0.0 < self.clip_max_shrink < 1.0:
            raise ValueError(f"clip_max_shrink must be in (0, 1), got {self.clip_max_shrink!r}")
        object.__setattr__(self, "exclude", exclude_patterns(self.exclude))

    def is_excluded(self, name: str) -> bool:
        """Whether ``name`` or a module containing it matches a pattern of ``exclude``."""
        return is_excluded(name, self.exclude)


@dataclass
class GPTQReport(PTQReport):
    """:class:`~torchquant.ptq.report.PTQReport` of a GPTQ run, with its spec and settings.

    ``results`` holds a :class:`~torchquant.ptq.report.LayerResult` per
    quantized layer (codes, scales, zero-points, g_idx on CPU); each layer's
    ``details["damp"]`` is the absolute damping added to the Hessian
    diagonal, or ``None`` when it fell back to round-to-nearest.
    """

    spec: Optional[QuantSpec] = None
    config: Optional[GPTQConfig] = None


def _grid(spec: QuantSpec) -> Tuple[int, int, Optional[int]]:
    """``(quant_min, quant_max, group_size)`` of the op for ``spec``, or a clear error."""
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a torchquant.QuantSpec, got {type(spec).__name__}")
    if spec.bits > 8:
        raise ValueError(f"GPTQ quantizes to at most 8 bits, got spec.bits={spec.bits}")
    if spec.granularity == "tensor":
        raise ValueError("GPTQ gives each output row its own grid: spec.granularity must be 'channel' (axis=0) or "
                         "'group', got 'tensor'")
    if spec.granularity == "channel" and spec.axis != 0:
        raise ValueError(f"GPTQ grids are per output row: spec.axis must be 0 for granularity='channel', "
                         f"got {spec.axis}")
    if spec.learnable:
        raise ValueError("GPTQ computes its grids from the weights; spec.learnable=True (trained grids) cannot "
                         "apply")
    if spec.observer not in _GRID_OBSERVERS:
        raise ValueError(f"GPTQ grids are min/max ('minmax') or MSE-searched ('mse'); spec.observer must be one "
                         f"of {_GRID_OBSERVERS}, got {spec.observer!r}")
    quant_min, quant_max = ops.quant_range(spec.bits, signed=spec.symmetric)
    return quant_min, quant_max, spec.group_size if spec.granularity == "group" else None


class _Hessian:
    """``H = 2/n X^T X`` over the rows seen, accumulated in float32 on the layer's device."""

    def __init__(self, module: nn.Linear) -> None:
        self.hessian = torch.zeros(module.in_features, module.in_features, dtype=torch.float32,
                                   device=module.weight.device)
        self.count = 0

    def update(self, inputs: Tensor) -> None:
        self.count = ops.gptq_accumulate_hessian(self.hessian, inputs, self.count)


class _GPTQPass(BlockwisePass):
    def __init__(self, spec: QuantSpec, config: GPTQConfig) -> None:
        self.spec = spec
        self.config = config
        self.quant_min, self.quant_max, self.group_size = _grid(spec)
        if config.static_groups and self.group_size is None:
            raise ValueError("static_groups=True fixes the grids of groups: it needs spec.granularity='group'")
        self.reports = {}
        self.results = {}

    def select(self, name: str, module: nn.Linear) -> bool:
        return not self.config.is_excluded(name)

    def new_statistics(self, name: str, module: nn.Linear) -> _Hessian:
        return _Hessian(module)

    def skip(self, block: BlockContext, layer: CalibratedLayer, reason: str) -> None:
        self.reports[layer.name] = LayerReport(layer.name, tuple(layer.module.weight.shape), NO_CALIBRATION_TOKENS)

    def process(self, block: BlockContext, layers: List[CalibratedLayer]) -> None:
        c = self.config
        for layer in layers:
            block.set_postfix(layer=layer.name)
            start = time.perf_counter()
            weight = layer.module.weight
            result = ops.gptq_quantize(
                weight.detach(), layer.statistics.hessian, self.quant_min, self.quant_max, self.spec.symmetric,
                group_size=self.group_size, act_order=c.act_order, static_groups=c.static_groups,
                block_size=c.block_size, percdamp=c.percdamp, clip_search_steps=c.clip_search_steps,
                clip_max_shrink=c.clip_max_shrink, rtn_fallback=c.rtn_fallback, layer_name=layer.name)
            weight.data.copy_(result.weight_q)
            damp = float(result.damp)  # -1: the op fell back to round-to-nearest (and warned)
            self.results[layer.name] = LayerResult.from_codes(
                result.codes, result.scales, result.zero_points, result.g_idx, self.spec, c.act_order, c.static_groups)
            self.reports[layer.name] = LayerReport(
                layer.name, tuple(weight.shape), RTN_FALLBACK if damp < 0 else QUANTIZED, samples=layer.rows,
                loss=float(result.loss), seconds=time.perf_counter() - start,
                details={"damp": damp if damp >= 0 else None})


def gptq(model: nn.Module, calibration_batches: Iterable, spec: QuantSpec, *, block_size: int = 128,
         percdamp: float = 0.01, act_order: bool = False, static_groups: bool = False, sequential: bool = True,
         clip_search_steps: Optional[int] = None, clip_max_shrink: float = 0.8, rtn_fallback: bool = False,
         exclude: Union[str, Sequence[str]] = DEFAULT_EXCLUDE, blocks: Optional[str] = None, device: Device = None,
         token_mask: TokenMask = "auto", progress: bool = True) -> GPTQReport:
    """Quantize every ``nn.Linear`` in the blocks of ``model`` with GPTQ, in place.

    Args:
        model: a float model; its quantized layers' weights are replaced by
            their dequantized values (same dtype and device).
        calibration_batches: iterable of model inputs: tensors of input ids
            (``model(t)``), dicts of keyword arguments (``model(**d)``, e.g.
            a tokenizer's output) or tuples (``model(*t)``). Read once.
            Padding positions stay out of the Hessians (see ``token_mask``).
        spec: the weight grid: ``bits`` (2 to 8), ``symmetric``, and
            ``granularity="channel"`` (``axis=0``: one grid per output row)
            or ``"group"`` (``group_size`` consecutive input columns per
            grid; it must divide the in_features of every quantized layer:
            exclude the layers it does not). ``observer="mse"``
            searches each grid's clipping (``clip_search_steps`` defaults
            to 100 then).
        block_size: columns quantized per lazy batch update.
        percdamp: damping added to the Hessian diagonal, as a fraction of its
            mean; raised by the op when the Cholesky factorization fails.
        act_order: quantize columns by decreasing Hessian diagonal.
        static_groups: with ``act_order``, compute the group grids before
            reordering (so ``g_idx`` stays monotone and kernels stay fast).
        sequential: handle each block's layers in forward order, each group
            calibrated on the outputs of the already quantized ones ("true
            sequential"); ``False``: all layers of a block on the float
            block's inputs.
        clip_search_steps, clip_max_shrink: MSE search of each grid's range
            over that many shrink factors down to ``clip_max_shrink``
            (``0``: min/max grids). ``None``: 100 for ``spec.observer ==
            "mse"``, else 0.
        rtn_fallback: round a layer to nearest, with a warning, if its Hessian
            stays singular, instead of raising (the layer's status then says so).
        exclude: fnmatch patterns of layer or module names left in floating
            point (default: the LM head).
        blocks: attribute path of the block list (e.g. ``"model.layers"``);
            found automatically when ``None``; a model without one is
            treated as one block holding all its Linear layers.
        device: where blocks are calibrated (default: the model's device);
            see :func:`~torchquant.ptq.calibration.calibrate_blocks`.
        token_mask: the real tokens of each batch, the only rows that enter
            the Hessians and the ``samples`` counts: ``"auto"`` (default)
            takes a dict batch's ``attention_mask`` (1 = real token),
            ``None`` counts every position, a callable ``batch -> [B, T]
            mask`` serves other conventions; see
            :func:`~torchquant.ptq.calibration.calibrate_blocks`.
        progress: a tqdm bar over the blocks, showing the current layer.

    Returns:
        A :class:`GPTQReport`: one row per Linear layer (quantized,
        excluded, outside the blocks, or skipped because no calibration
        token reached it, e.g. an unused MoE expert, which also warns), and
        ``results[name]``, the codes and grids of each quantized layer on CPU.
        Memory: one byte per quantized weight plus two float32 per grid
        (about a quarter of the float32 model).
    """
    if clip_search_steps is None:
        clip_search_steps = _DEFAULT_MSE_STEPS if isinstance(spec, QuantSpec) and spec.observer == "mse" else 0
    config = GPTQConfig(block_size, percdamp, act_order, static_groups, sequential, clip_search_steps,
                        clip_max_shrink, rtn_fallback, exclude)
    pass_ = _GPTQPass(spec, config)
    check_group_size(model, blocks, pass_, pass_.group_size)
    start = time.perf_counter()
    run = calibrate_blocks(model, calibration_batches, pass_, blocks=blocks, device=device, sequential=sequential,
                           token_mask=token_mask, progress=progress, desc="GPTQ")
    layers = layer_rows(model, pass_.reports, run.outside, config.is_excluded, "gptq", "quantized")
    return GPTQReport("GPTQ", layers, blocks=run.blocks, num_blocks=run.num_blocks,
                      seconds=time.perf_counter() - start, results=pass_.results, spec=spec, config=config)
