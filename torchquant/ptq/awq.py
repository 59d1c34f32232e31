"""AWQ over a whole model (Lin et al. 2023, arXiv 2306.00978), block by block.

>>> spec = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=128)
>>> report = torchquant.ptq.awq(model, batches, spec)
>>> print(report)                        # per layer: alpha, loss vs round-to-nearest, clip, seconds
>>> save_awq(to_awq_modules(model, report), "model-awq")   # AutoAWQ's GEMM checkpoint layout

The walk is :func:`torchquant.ptq.calibration.calibrate_blocks` in its
sequential mode: each block's layers are handled group by group in forward
order (``[q, k, v]``, ``[o]``, ``[gate, up]``, ``[down]``), the block being
run again before each group, so a group's inputs are those of the model as
transformed so far. For each group of layers reading one input:

1. **scales**: the scaling groups of :func:`torchquant.ptq.scaling.scaling_groups`
   among those layers get their input-channel scales ``s`` from the
   ``awq_search_scales`` op: ``s = mean|x|^alpha`` for ``alpha = i / grid``,
   the one minimising the layers' output error after round-to-nearest
   (without ``duo_scaling``, ``alpha = 0`` is ``s = 1``, plain round-to-nearest,
   so the search never does worse on that objective). :func:`torchquant.ptq.scaling.apply_scales`
   then multiplies the weights' input columns by ``s`` and divides their
   input by ``s``: folded into the norm or Linear layer producing it, or, where
   no fold keeps the model unchanged (post-LN encoders, an input nothing can be
   folded into), by :class:`~torchquant.nn.InputScaledLinear`'s online
   division. :func:`~torchquant.ptq.scaling.check_invariance` proves on one
   calibration batch that the float block still computes what it did;
2. **clipping**: the ``awq_search_clip`` op picks, per output row and group,
   how far to shrink the weight's range, on the layer's scaled inputs
   ``x / s``; query and key projections are not clipped (:data:`NO_CLIP`:
   their errors pass through the softmax, which an output-error objective on
   the layer does not see, as in AutoAWQ);
3. **quantization** (``apply_quantization=True``): each weight is rounded to
   nearest on its groups' min/max grids and replaced by its dequantized value,
   so the model stays a float model computing with the quantized weights; the
   codes and grids go into ``report.results`` for a checkpoint
   (:func:`to_awq_modules`, then :func:`torchquant.ptq.awq_format.save_awq`).

With ``apply_quantization=False`` only steps 1 and 2 run: the model is the
AWQ-scaled (and clipped) float model, ready for another quantizer, which is
how AWQ and GPTQ combine (:func:`awq_then_gptq`).

When a scale is folded into a Linear layer that was already quantized (the
``v -> o`` and ``up -> down`` folds of a decoder: ``v`` and ``up`` come
first), that layer's output rows are divided by ``s``. Every group of a row
then has its grid scale divided by the same ``s`` with unchanged codes, so the
layer stays exactly representable; its recorded scales are updated and its
weight is set to their dequantized value again.

Inputs enter the statistics as their real tokens only (``token_mask``). The
scale search sees at most ``max_tokens`` rows per layer, spread over the
calibration data: every ``k``-th real token, ``k`` the smallest power of two
that keeps the count within bounds (deterministic; memory of one group's
``max_tokens x in_features`` rows per layer). The clip search samples
``max_clip_tokens`` of those rows (AutoAWQ's ``x[::n // 512]``).
"""
from __future__ import annotations

import dataclasses
import fnmatch
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from torchquant import formats, ops
from torchquant.nn.awq_linear import AWQLinear
from torchquant.nn.input_scaled_linear import InputScaledLinear
from torchquant.observers import qparams_from_range
from torchquant.ptq import scaling
from torchquant.layouts.awq import BITS as AWQ_FORMAT_BITS
from torchquant.layouts.awq import PACK as AWQ_FORMAT_PACK
from torchquant.ptq.calibration import (BlockContext, BlockwisePass, CalibratedLayer, Device, TokenMask,
                                        calibrate_blocks)
from torchquant.ptq.convert import check_holds_codes, check_weight_is_result, report_layers, set_submodule
from torchquant.ptq.gptq import GPTQReport, gptq
from torchquant.ptq.options import (DEFAULT_EXCLUDE, check_group_size, exclude_patterns, is_excluded, is_int,
                                    is_number, layer_rows)
from torchquant.ptq.report import NO_CALIBRATION_TOKENS, QUANTIZED, LayerReport, LayerResult, PTQReport
from torchquant.spec import QuantSpec

__all__ = ["awq", "awq_then_gptq", "to_awq_modules", "AWQConfig", "AWQReport", "AWQGroup", "AWQThenGPTQ", "NO_CLIP",
           "SCALED", "SUPPORTED_BITS"]

SUPPORTED_BITS = (3, 4)
# Layers whose last name component matches one of these are not clipped (AutoAWQ's avoid_clipping:
# query and key projections, and fused projections holding them).
NO_CLIP: Tuple[str, ...] = ("q_proj", "k_proj", "query", "key", "qkv_proj", "Wqkv")
# Status of a layer scaled (and clipped) but left in float (apply_quantization=False).
SCALED = "scaled: float weights (apply_quantization=False)"


@dataclass(frozen=True)
class AWQConfig:
    """The AWQ settings of a run (see :func:`awq` for their meaning); validated on creation."""

    grid: int = 20
    duo_scaling: bool = False
    clip: bool = True
    clip_steps: int = 20
    clip_max_shrink: float = 0.5
    max_clip_tokens: int = 512
    max_tokens: int = 8192
    apply_quantization: bool = True
    exclude: Tuple[str, ...] = DEFAULT_EXCLUDE

    def __post_init__(self) -> None:
        for name in ("grid", "clip_steps", "max_clip_tokens", "max_tokens"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("duo_scaling", "clip", "apply_quantization"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if not is_number(self.clip_max_shrink) or not 0.0 < self.clip_max_shrink < 1.0:
            raise ValueError(f"clip_max_shrink must be in (0, 1) (the largest fraction a range is shrunk by), "
                             f"got {self.clip_max_shrink!r}")
        object.__setattr__(self, "exclude", exclude_patterns(self.exclude))

    def is_excluded(self, name: str) -> bool:
        """Whether ``name`` or a module containing it matches a pattern of ``exclude``."""
        return is_excluded(name, self.exclude)


@dataclass
class AWQGroup:
    """The scale search of one scaling group.

    Attributes:
        name: the group's name (:class:`~torchquant.ptq.scaling.ScalingGroup`).
        kind: where ``1 / s`` went: ``"norm"``, ``"linear"`` (folded into
            ``prev``) or ``"explicit"`` (:class:`~torchquant.nn.InputScaledLinear`).
        layers: the layers whose weight columns were multiplied by ``s``.
        prev_name: the module ``1 / s`` was folded into (``None`` when explicit).
        alpha: the chosen exponent, ``best / grid``.
        scales: ``s``, float32 ``[in]`` on CPU.
        losses: float32 ``[grid]`` on CPU, the output error of each ``alpha``
            summed over the searched layers; ``losses[0]`` is plain
            round-to-nearest (without duo scaling).
        rows: input rows the search saw.
    """

    name: str
    kind: str
    layers: List[str]
    prev_name: Optional[str]
    alpha: float
    scales: Tensor
    losses: Tensor
    rows: int

    @property
    def loss(self) -> float:
        """The output error at the chosen ``alpha``."""
        return float(self.losses.min())

    @property
    def rtn_loss(self) -> float:
        """The output error at ``alpha = 0``."""
        return float(self.losses[0])


@dataclass
class AWQReport(PTQReport):
    """:class:`~torchquant.ptq.report.PTQReport` of an AWQ run, with its spec, settings and scales.

    Per layer: ``loss`` is the layer's output error ``mean((x W'^T - x W^T)^2)``
    on its calibration rows, ``W'`` its final (scaled, clipped, rounded)
    weight over ``s`` and ``W`` its float weight before AWQ (with
    ``apply_quantization=False``: the error rounding to nearest would give
    now); ``details``: ``alpha`` (of its scaling group, ``None`` when not
    scaled), ``rtn_loss`` (the same error for plain round-to-nearest of
    ``W``), ``clip`` (``"applied"``, ``"off"`` or ``"skipped: query/key"``)
    and ``scaling`` (the group's kind). ``groups`` holds each scaling group's
    search (:class:`AWQGroup`), ``results`` the codes and grids of each
    quantized layer (empty with ``apply_quantization=False``).
    """

    spec: Optional[QuantSpec] = None
    config: Optional[AWQConfig] = None
    groups: Dict[str, AWQGroup] = field(default_factory=dict)


def _awq_grid(spec: QuantSpec) -> Tuple[int, int, int]:
    """``(quant_min, quant_max, group_size)`` for ``spec``, or a clear error."""
    if not isinstance(spec, QuantSpec):
        raise TypeError(f"spec must be a torchquant.QuantSpec, got {type(spec).__name__}")
    if spec.granularity != "group":
        raise ValueError(f"AWQ quantizes weights group-wise: spec.granularity must be 'group' (with group_size, "
                         f"e.g. 128), got {spec.granularity!r}")
    if spec.bits not in SUPPORTED_BITS:
        raise ValueError(f"AWQ is a low-bit weight method: spec.bits must be one of {SUPPORTED_BITS}, got "
                         f"{spec.bits} (8-bit weights need no activation-aware scaling: round to nearest)")
    if spec.learnable:
        raise ValueError("AWQ computes its grids from the weights; spec.learnable=True (trained grids) cannot apply")
    if spec.observer != "minmax":
        raise ValueError(f"AWQ grids are each group's min/max after its clip search (clip=True); spec.observer must "
                         f"be 'minmax', got {spec.observer!r}")
    return spec.quant_min, spec.quant_max, spec.group_size


class _TokenSample:
    """Up to ``limit`` rows of a layer's inputs, spread evenly over all it was fed.

    Keeps the rows whose running index is a multiple of ``stride``; when more
    than ``limit`` are kept, ``stride`` doubles and every other kept row goes.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.stride = 1
        self.seen = 0
        self.parts: List[Tensor] = []
        self.kept = 0

    def update(self, inputs: Tensor) -> None:
        x = inputs.reshape(-1, inputs.shape[-1])
        first = (-self.seen) % self.stride
        self.seen += x.shape[0]
        part = x[first::self.stride].clone()
        self.parts.append(part)
        self.kept += part.shape[0]
        while self.kept > self.limit:
            rows = torch.cat(self.parts)[::2].clone()
            self.parts, self.kept, self.stride = [rows], rows.shape[0], self.stride * 2

    def rows(self) -> Tensor:
        if len(self.parts) > 1:
            self.parts = [torch.cat(self.parts)]
        return self.parts[0]


def _output_error(x: Tensor, delta: Tensor) -> float:
    """``mean((x @ delta^T)^2)`` over rows and outputs, in float32."""
    return float((x.float() @ delta.float().T).square().mean())


def _no_clip(name: str) -> bool:
    last = name.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(last, pattern) for pattern in NO_CLIP)


class _AWQPass(BlockwisePass):
    def __init__(self, model: nn.Module, spec: QuantSpec, config: AWQConfig) -> None:
        self.model = model
        self.spec = spec
        self.config = config
        self.quant_min, self.quant_max, self.group_size = _awq_grid(spec)
        self.reports: Dict[str, LayerReport] = {}
        self.results: Dict[str, LayerResult] = {}
        self.groups: Dict[str, AWQGroup] = {}
        self.skipped: set = set()

    # ---- the BlockwisePass interface ---------------------------------------------------------

    def select(self, name: str, module: nn.Linear) -> bool:
        return not self.config.is_excluded(name)

    def new_statistics(self, name: str, module: nn.Linear) -> _TokenSample:
        return _TokenSample(self.config.max_tokens)

    def skip(self, block: BlockContext, layer: CalibratedLayer, reason: str) -> None:
        self.skipped.add(layer.name)
        self.reports[layer.name] = LayerReport(layer.name, tuple(layer.module.weight.shape), NO_CALIBRATION_TOKENS)

    def process(self, block: BlockContext, layers: List[CalibratedLayer]) -> None:
        by_name = {layer.name: layer for layer in layers}
        done = set()
        for group in self._groups_among(block, by_name):
            members = [by_name[name] for name, _ in group.layers if name in by_name]
            start = time.perf_counter()
            x = members[0].statistics.rows()
            originals = {m.name: m.module.weight.detach().clone() for m in members}
            searched = self._search_and_apply(block, group, [m.name for m in members], x)
            elapsed = (time.perf_counter() - start) / len(members)
            for m in members:
                self._finish_layer(block, m, x, originals[m.name], searched, elapsed)
                done.add(m.name)
        for layer in layers:
            if layer.name not in done:  # no scaling group: clipped and rounded as it is
                start = time.perf_counter()
                original = layer.module.weight.detach().clone()
                self._finish_layer(block, layer, layer.statistics.rows(), original, None,
                                   time.perf_counter() - start)

    # ---- scales ----------------------------------------------------------------------------

    def _groups_among(self, block: BlockContext, by_name: Dict[str, CalibratedLayer]) -> List[scaling.ScalingGroup]:
        """The scaling groups of the block holding layers of this call (the layers of one input).

        A group whose other calibrated layers read another input is an error, unless its scaling is
        explicit (each layer divides its own input), when it is narrowed to this call's layers.
        """
        found = []
        for group in scaling.scaling_groups(self.model, block.name, block.module):
            here = [name for name, _ in group.layers if name in by_name]
            if not here:
                continue
            elsewhere = [name for name, module in group.layers if name not in by_name and self.select(name, module)
                         and name not in self.skipped]
            if elsewhere:
                if group.kind != "explicit":
                    raise RuntimeError(f"AWQ: scaling group {group.name!r} holds layers {here} and {elsewhere}, "
                                       "which the calibration walk saw reading different inputs; one scale cannot "
                                       "serve them")
                group = dataclasses.replace(group, layers=[(n, m) for n, m in group.layers if n in by_name])
            found.append(group)
        return found

    def _search_and_apply(self, block: BlockContext, group: scaling.ScalingGroup, searched: List[str],
                          x: Tensor) -> AWQGroup:
        c = self.config
        block.set_postfix(group=group.name)
        weights = [module.weight.detach() for name, module in group.layers if name in searched]
        result = ops.awq_search_scales(x, weights, None, self.quant_min, self.quant_max, self.spec.symmetric,
                                       self.group_size, c.grid, c.duo_scaling)
        s = result.scales.to(weights[0].device)
        probe = block.inputs[:1]
        before = [inp.call(block.module) for inp in probe]
        scaling.apply_scales(group, s)
        scaling.check_invariance(block.module, probe, before, group=group)
        if group.kind == "linear" and group.prev_name in self.results:
            self._rescale_quantized_rows(group.prev_name, s)
        losses = result.losses.detach().cpu()
        found = AWQGroup(group.name, group.kind, [name for name, _ in group.layers], group.prev_name,
                         int(losses.argmin()) / c.grid, s.detach().float().cpu(), losses, x.shape[0])
        self.groups[group.name] = found
        return found

    def _rescale_quantized_rows(self, name: str, s: Tensor) -> None:
        """The already quantized ``name`` had its output rows divided by ``s``: same codes, scales / s."""
        q = self.results[name]
        q = dataclasses.replace(q, scales=q.scales / s.detach().float().cpu()[:, None])
        self.results[name] = q
        weight = self.model.get_submodule(name).weight
        weight.data.copy_(q.dequantize(weight.dtype).to(weight.device))

    # ---- clipping and rounding ---------------------------------------------------------------

    def _rtn(self, w: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(codes, scales, zero_points, dequantized)`` of ``w`` on its groups' min/max grids."""
        g = self.group_size
        groups = w.detach().float().reshape(w.shape[0], -1, g)
        scale, zero = qparams_from_range(groups.amin(-1), groups.amax(-1), self.spec)
        codes = formats.quantize(w, scale, zero, self.quant_min, self.quant_max, group_size=g)
        return codes, scale, zero, formats.dequantize(codes, scale, zero, group_size=g, dtype=w.dtype)

    def _finish_layer(self, block: BlockContext, layer: CalibratedLayer, x: Tensor, original: Tensor,
                      group: Optional[AWQGroup], search_seconds: float) -> None:
        """Clip and round one layer (its weight already scaled by its group's ``s``, if any)."""
        c = self.config
        start = time.perf_counter()
        block.set_postfix(layer=layer.name)
        weight = layer.module.weight
        xs = x.float() if group is None else x.float() / group.scales.to(x.device)
        if not c.clip:
            clip = "off"
        elif _no_clip(layer.name):
            clip = "skipped: query/key"
        else:
            bounds = ops.awq_search_clip(xs, weight.detach(), self.quant_min, self.quant_max, self.spec.symmetric,
                                         self.group_size, c.clip_steps, c.clip_max_shrink, c.max_clip_tokens)
            weight.data.copy_(ops.awq_apply_clip(weight.detach(), bounds.min_val, bounds.max_val))
            clip = "applied"
        scaled_float = original.float() if group is None else original.float() * group.scales.to(original.device)
        codes, scale, zero, dequantized = self._rtn(weight)
        loss = _output_error(xs, dequantized.float() - scaled_float)
        rtn_loss = _output_error(x, self._rtn(original)[3].float() - original.float())
        if c.apply_quantization:
            weight.data.copy_(dequantized)
            g_idx = torch.arange(weight.shape[1], dtype=torch.int32) // self.group_size
            self.results[layer.name] = LayerResult.from_codes(codes, scale, zero, g_idx, self.spec)
        self.reports[layer.name] = LayerReport(
            layer.name, tuple(weight.shape), QUANTIZED if c.apply_quantization else SCALED, samples=layer.rows,
            loss=loss, seconds=search_seconds + time.perf_counter() - start,
            details={"alpha": None if group is None else group.alpha, "rtn_loss": rtn_loss, "clip": clip,
                     "scaling": None if group is None else group.kind})


def awq(model: nn.Module, calibration_batches: Iterable, spec: QuantSpec, *, grid: int = 20,
        duo_scaling: bool = False, clip: bool = True, clip_steps: int = 20, clip_max_shrink: float = 0.5,
        max_clip_tokens: int = 512, max_tokens: int = 8192, apply_quantization: bool = True,
        exclude: Union[str, Sequence[str]] = DEFAULT_EXCLUDE, blocks: Optional[str] = None, device: Device = None,
        token_mask: TokenMask = "auto", progress: bool = True) -> AWQReport:
    """Quantize every ``nn.Linear`` in the blocks of ``model`` with AWQ, in place.

    Args:
        model: a float model. Its weights are scaled (and the scales'
            inverses folded into the layers before them, or installed as
            :class:`~torchquant.nn.InputScaledLinear`), clipped, and
            replaced by their dequantized values (same dtype and device).
        calibration_batches: iterable of model inputs: tensors of input ids
            (``model(t)``), dicts of keyword arguments (``model(**d)``) or
            tuples (``model(*t)``). Read once. Padding positions stay out of
            every statistic (see ``token_mask``).
        spec: the weight grid: ``granularity="group"`` with a ``group_size``
            dividing the in_features of every quantized layer, ``bits`` 3 or
            4, ``symmetric`` (``False``: AWQ's zero-point grids; only 4-bit
            results have a checkpoint layout, :func:`to_awq_modules`).
        grid: number of ``alpha = i / grid`` tried by the scale search.
        duo_scaling: divide the candidate scales by the weights' magnitude
            too (AutoAWQ's option).
        clip, clip_steps, clip_max_shrink, max_clip_tokens: the clip search
            (``clip=False``: none) over ``clip_steps`` shrink factors down to
            ``1 - clip_max_shrink``, on ``max_clip_tokens`` sampled rows.
        max_tokens: input rows kept per layer for the scale search (see the
            module doc); bounds memory to one group's rows.
        apply_quantization: round the weights to nearest after scaling and
            clipping, recording codes and grids; ``False``: leave the scaled
            and clipped float weights for another quantizer (:func:`awq_then_gptq`).
        exclude: fnmatch patterns of layer or module names left unquantized
            (default: the LM head). An excluded layer that shares its input
            with scaled layers is scaled with them (in float), so that the
            model is unchanged.
        blocks: attribute path of the block list (e.g. ``"model.layers"``);
            found automatically when ``None``; a model without one is
            treated as one block holding all its Linear layers.
        device: where blocks are calibrated (default: the model's device).
        token_mask: the real tokens of each batch (``"auto"``: a dict
            batch's ``attention_mask``); see
            :func:`~torchquant.ptq.calibration.calibrate_blocks`.
        progress: a tqdm bar over the blocks, showing the current group.

    Returns:
        An :class:`AWQReport`: one row per Linear layer (quantized or scaled,
        excluded, outside the blocks, or skipped because no calibration
        token reached it), each scaling group's search in ``groups``, and
        with ``apply_quantization`` the codes and grids of each quantized
        layer in ``results`` (on CPU).
    """
    config = AWQConfig(grid, duo_scaling, clip, clip_steps, clip_max_shrink, max_clip_tokens, max_tokens,
                       apply_quantization, exclude)
    pass_ = _AWQPass(model, spec, config)
    check_group_size(model, blocks, pass_, pass_.group_size)
    start = time.perf_counter()
    run = calibrate_blocks(model, calibration_batches, pass_, blocks=blocks, device=device, sequential=True,
                           token_mask=token_mask, progress=progress, desc="AWQ")
    layers = layer_rows(model, pass_.reports, run.outside, config.is_excluded, "awq", "processed")
    return AWQReport("AWQ", layers, blocks=run.blocks, num_blocks=run.num_blocks,
                     seconds=time.perf_counter() - start, results=pass_.results, spec=spec, config=config,
                     groups=pass_.groups)


# ---- AWQ, then GPTQ ------------------------------------------------------------------------------

class AWQThenGPTQ(NamedTuple):
    """The reports of :func:`awq_then_gptq`."""

    awq: AWQReport
    gptq: GPTQReport


def awq_then_gptq(model: nn.Module, calibration_batches: Iterable, spec: QuantSpec,
                  awq_kwargs: Optional[Dict[str, Any]] = None,
                  gptq_kwargs: Optional[Dict[str, Any]] = None) -> AWQThenGPTQ:
    """AWQ's scales, then GPTQ's rounding, on the same calibration data, in place.

    The two calls, one after the other::

        awq(model, batches, spec, apply_quantization=False, clip=False, **awq_kwargs)  # scaled float model
        gptq(model, batches, spec, **gptq_kwargs)                  # quantizes the scaled weights

    Layers that divide their input online
    (:class:`~torchquant.nn.InputScaledLinear`, AWQ's scaling where nothing
    can absorb ``1 / s``) hand GPTQ ``x / input_scale``, the input their
    scaled weight multiplies: the calibration walk feeds every pass that
    quotient.

    AWQ's clipping is off unless ``awq_kwargs`` turns it on: it clamps the
    float weights, and GPTQ then reconstructs the clamped weights, so the
    clamping error becomes part of GPTQ's target instead of something it
    compensates. On the tiny decoders of the tests (3 and 4 bits, symmetric
    or not, with and without salient channels), the output error of the
    combination was 1.4 to 3.1 times GPTQ's alone with clipping and 0.7 to
    1.6 times without; on all-MiniLM-L6-v2 at W4 g128 the two variants were
    about equal (mean cosine to fp32 0.9798 with clipping, 0.9793 without).

    Args:
        model: a float model.
        calibration_batches: as for :func:`awq`; read once into a list, as
            both passes walk it.
        spec: the weight grid of both passes (see :func:`awq`).
        awq_kwargs: keyword arguments of :func:`awq` (not
            ``apply_quantization``, which is ``False`` here; ``clip``
            defaults to ``False``).
        gptq_kwargs: keyword arguments of :func:`~torchquant.ptq.gptq`.

    Returns:
        :class:`AWQThenGPTQ` ``(awq, gptq)``: the AWQ report (scales, clip
        decisions; no results) and the GPTQ report (codes and grids of the
        quantized layers, for a checkpoint).
    """
    awq_kwargs = dict(awq_kwargs or {})
    gptq_kwargs = dict(gptq_kwargs or {})
    if "apply_quantization" in awq_kwargs:
        raise ValueError("awq_kwargs must not set apply_quantization: AWQ only scales and clips here, GPTQ rounds")
    if isinstance(calibration_batches, (Tensor, Mapping, str, bytes)) or not isinstance(calibration_batches,
                                                                                         Iterable):
        raise TypeError("calibration_batches must be an iterable of batches (tensors of input ids, dicts of keyword "
                        f"arguments or tuples of positional arguments), got a {type(calibration_batches).__name__}; "
                        "wrap a single batch in a list")
    awq_kwargs.setdefault("clip", False)
    batches = list(calibration_batches)
    awq_report = awq(model, batches, spec, apply_quantization=False, **awq_kwargs)
    gptq_report = gptq(model, batches, spec, **gptq_kwargs)
    return AWQThenGPTQ(awq_report, gptq_report)


# ---- a checkpoint -------------------------------------------------------------------------------

def to_awq_modules(model: nn.Module, report: PTQReport) -> nn.Module:
    """Replace each quantized ``nn.Linear`` of ``model`` by the :class:`~torchquant.nn.AWQLinear` of its codes.

    Then :func:`torchquant.ptq.awq_format.save_awq` writes the model as an
    AutoAWQ GEMM checkpoint, which :func:`~torchquant.ptq.awq_format.load_awq`
    reads back into a fresh float model computing exactly what the converted
    model computes::

        report = torchquant.ptq.awq(model, batches, spec)
        save_awq(to_awq_modules(model, report), "out")
        fresh = load_awq(make_float_model(), "out")

    The layout stores scales and biases in float16, so the converted model
    differs from the float model ``awq()`` left by that rounding: each
    weight element moves by ``|code - zero| * |scale - fp16(scale)|`` (at
    most ``2^-11 * |code - zero| * scale`` in float16's normal range); the
    codes and zero-points are kept exactly.

    Args:
        model: the model the pass quantized (each quantized layer must hold
            the dequantized weight of the report's codes; this is checked).
        report: the pass's report (:func:`awq`); every layer of
            ``report.results`` is converted, on its weight's device, with
            its bias.

    The layout holds 4-bit codes on group-wise grids (one group index per
    column in order), ``out_features`` a multiple of 8, and no input
    scaling: a layer that divides its input online
    (:class:`~torchquant.nn.InputScaledLinear`, where no fold was possible)
    has no AWQ GEMM form, and is refused. Every layer is checked and built
    before any is replaced: on an error the model is unchanged. Layers that
    already are the AWQLinear of their codes are left as they are.
    Returns ``model``.
    """
    layers = report_layers(model, report, "to_awq_modules", "torchquant.ptq.awq(...)",
                           "; awq(..., apply_quantization=False) leaves float weights")
    built: Dict[str, AWQLinear] = {}
    for name, module, q in layers:
        if isinstance(module, AWQLinear):
            got = module.unpack()
            check_holds_codes((got.codes, got.zero_points, got.scales), q,
                              f"to_awq_modules: {name!r} is already an AWQLinear")
            continue
        _check_convertible(name, module, q)
        bias = None if module.bias is None else module.bias.detach()
        device = module.weight.device
        try:
            built[name] = AWQLinear.from_codes(q.codes.to(device), q.scales.to(device), q.zero_points.to(device),
                                               bias, q.group_size, q.quant_min, q.spec.symmetric, q.bits)
        except ValueError as error:  # what float16 cannot hold (scales, bias)
            raise ValueError(f"to_awq_modules: layer {name!r}: {error}") from None
    for name, layer in built.items():
        set_submodule(model, name, layer)
    return model


def _check_convertible(name: str, module: nn.Module, q: LayerResult) -> None:
    where = f"to_awq_modules: layer {name!r}"
    if not isinstance(module, nn.Linear):
        raise ValueError(f"{where} is a {type(module).__name__} in the model; only nn.Linear layers become AWQLinear")
    if isinstance(module, InputScaledLinear):
        raise ValueError(f"{where} divides its input by input_scale (AWQ scales with no layer before it to fold "
                         "into); the AWQ GEMM layout has no input scaling. Keep the model in torchquant's own layout "
                         "(torchquant.ptq.to_quantized_modules: its state dict holds input_scale) or exclude such "
                         "layers from awq()")
    if q.bits != AWQ_FORMAT_BITS:
        raise ValueError(f"{where} has {q.bits}-bit codes; the AWQ GEMM layout holds {AWQ_FORMAT_BITS}-bit codes only "
                         "(a 3-bit result can be stored in the GPTQ layout: torchquant.ptq.to_gptq_modules)")
    if q.spec.granularity != "group" or q.act_order:
        raise ValueError(f"{where} was quantized with granularity={q.spec.granularity!r}"
                         f"{' and act-order' if q.act_order else ''}; the AWQ GEMM layout holds group-wise grids "
                         "over consecutive columns")
    if module.out_features % AWQ_FORMAT_PACK:
        raise ValueError(f"{where} has out_features={module.out_features}, not a multiple of {AWQ_FORMAT_PACK} (the "
                         f"layout packs {AWQ_FORMAT_PACK} output columns per int32 word)")
    if tuple(module.weight.shape) != tuple(q.unsigned_codes.shape):
        raise ValueError(f"{where} has weight shape {list(module.weight.shape)} but the report's codes are "
                         f"{list(q.unsigned_codes.shape)}")
    check_weight_is_result(module.weight, q, f"{where}: its weight")
