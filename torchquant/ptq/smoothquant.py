"""SmoothQuant (Xiao et al. 2022, arXiv 2211.10438) over a whole model, block by block, and W8A8 conversion.

>>> report = torchquant.ptq.smoothquant(model, batches, alpha=0.5)      # or alpha="search"
>>> print(report)     # per layer: alpha, activation and weight maxima before / after, W8A8 error before / after
>>> torchquant.ptq.quantize_w8a8(model, calibration_batches=batches)    # W8A8Linear layers, static activation scale

A few input channels of a transformer's activations are far larger than the
rest (the LayerNorm outputs of every LLM have them), so one int8 grid for a
whole activation tensor leaves the other channels a handful of levels.
SmoothQuant moves part of that range into the weights. For each group of
Linear layers reading one input (:func:`torchquant.ptq.scaling.scaling_groups`),
with ``a_j = max |X_j|`` over the calibration tokens and ``w_j`` the largest
``|W[:, j]|`` over the group's weights::

    s_j = a_j ** alpha / w_j ** (1 - alpha)          (the smoothquant_scales op)

and ``X / s``, ``W diag(s)`` replace ``X``, ``W``
(:func:`~torchquant.ptq.scaling.apply_scales`: folded into the norm or Linear
producing ``X``, or an online division by
:class:`~torchquant.nn.InputScaledLinear` where nothing can absorb it). The
float model computes the same function; the pass checks it after every group
(:func:`~torchquant.ptq.scaling.check_invariance` on the block's first
calibration batch). A channel that was 0 on every calibration token (a dead ReLU unit)
keeps ``s_j = 1``.

The walk is :func:`~torchquant.ptq.calibration.calibrate_blocks`: each
block's cached inputs run once with hooks gathering the per-channel maxima of
every Linear's input (real tokens only: the token mask keeps padding out),
then the block's groups are smoothed in forward order and the smoothed block
produces the next block's inputs.

**The W8A8 error** of a group is ``sum ||X W^T - Q(X / s) Q(W diag(s))^T||^2 /
sum ||X W^T||^2`` over its layers and the calibration tokens, with
:class:`~torchquant.nn.W8A8Linear`'s grids: symmetric int8 weights per output
channel, int8 activations with one static scale (``act_granularity="tensor"``,
``max |X / s| / 127.5`` over the calibration data, what
:func:`quantize_w8a8` installs: the setting where smoothing matters) or a
dynamic scale per token (``"token"``). It is measured for every group, with
``s`` and with ``s = 1`` (no smoothing), by one more run of the block that
streams the group's inputs batch by batch, on at most ``max_tokens`` of
them: every ``k``-th real token, ``k`` the smallest power of two that keeps
the count within bounds (the static scale still comes from every token).
``alpha="search"`` scores every ``alpha`` of ``alpha_grid`` the same way in
that run and keeps the best one per group (memory: one batch of inputs and
the group's int8 weights for each candidate).
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field, replace
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchquant import formats, ops
from torchquant.layouts.w8a8 import int8_weight_grid
from torchquant.nn.input_scaled_linear import InputScaledLinear
from torchquant.nn.w8a8_linear import W8A8Linear
from torchquant.observers import qparams_from_range
from torchquant.ptq.calibration import (BlockContext, BlockwisePass, CalibratedLayer, Device, TokenMask,
                                        calibrate_blocks, find_blocks, linear_layers, select_tokens)
from torchquant.ptq.convert import set_submodule
from torchquant.ptq.options import DEFAULT_EXCLUDE, exclude_patterns, is_excluded, is_number, layer_rows
from torchquant.ptq.report import EXCLUDED, NO_CALIBRATION_TOKENS, OUTSIDE_BLOCKS, QUANTIZED, LayerReport, PTQReport
from torchquant.ptq.scaling import (ScalingGroup, ScalingInvarianceError, apply_scales, block_outputs,
                                    check_invariance, scaling_groups)
from torchquant.spec import QuantSpec

__all__ = [
    "DEFAULT_ALPHA_GRID", "SmoothQuantConfig", "SmoothQuantReport", "SmoothedGroup", "quantize_w8a8", "smoothquant",
    "SMOOTHED", "SMOOTHED_ONLINE", "NO_FOLD", "ONLINE_SCALE_DISABLED", "GROUP_INCOMPLETE",
]

DEFAULT_ALPHA_GRID: Tuple[float, ...] = tuple(i / 20 for i in range(21))  # 0, 0.05, ..., 1

# Statuses of smoothed layers start with SMOOTHED; the others say why a layer was left as it was.
SMOOTHED = "smoothed"
SMOOTHED_ONLINE = "smoothed: online input scale"
NO_FOLD = "skipped: no fold for its input"
ONLINE_SCALE_DISABLED = "skipped: needs an online input scale (explicit=False)"
GROUP_INCOMPLETE = "skipped: a layer reading the same input got no calibration tokens"

_ACT_GRANULARITIES = ("tensor", "token")
_ACT_SPEC = QuantSpec(bits=8, symmetric=True)  # W8A8Linear's activation grid
_QMIN, _QMAX = _ACT_SPEC.quant_range


def _check_act_granularity(act_granularity) -> None:
    if act_granularity not in _ACT_GRANULARITIES:
        raise ValueError(f"act_granularity must be 'tensor' (one static int8 scale per activation tensor) or "
                         f"'token' (a dynamic scale per token), got {act_granularity!r}")


@dataclass(frozen=True)
class SmoothQuantConfig:
    """The settings of a SmoothQuant run (see :func:`smoothquant`); validated on creation."""

    alpha: Union[float, str] = 0.5
    alpha_grid: Tuple[float, ...] = DEFAULT_ALPHA_GRID
    act_granularity: str = "tensor"
    explicit: bool = True
    max_tokens: int = 2048
    exclude: Tuple[str, ...] = DEFAULT_EXCLUDE

    def __post_init__(self) -> None:
        alpha = self.alpha
        if isinstance(alpha, str):
            if alpha != "search":
                raise ValueError(f"alpha must be a number in [0, 1] or 'search', got {alpha!r}")
        elif not is_number(alpha):
            raise TypeError(f"alpha must be a number in [0, 1] or 'search', got {alpha!r}")
        elif not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha (the migration strength) must be in [0, 1], got {alpha!r}")
        else:
            object.__setattr__(self, "alpha", float(alpha))
        grid = self.alpha_grid
        if isinstance(grid, (str, bytes)) or not isinstance(grid, Iterable):
            raise TypeError(f"alpha_grid must be a sequence of numbers in [0, 1], got {grid!r}")
        grid = tuple(grid)
        if not grid:
            raise ValueError("alpha_grid must hold at least one alpha")
        for a in grid:
            if not is_number(a) or not 0.0 <= a <= 1.0:
                raise ValueError(f"alpha_grid must hold numbers in [0, 1], got {a!r}")
        object.__setattr__(self, "alpha_grid", tuple(float(a) for a in grid))
        _check_act_granularity(self.act_granularity)
        if not isinstance(self.explicit, bool):
            raise TypeError(f"explicit must be a bool, got {self.explicit!r}")
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        object.__setattr__(self, "exclude", exclude_patterns(self.exclude))

    @property
    def alphas(self) -> Tuple[float, ...]:
        """The candidates of each group: the grid when searching, else ``alpha`` alone."""
        return self.alpha_grid if self.alpha == "search" else (self.alpha,)

    def is_excluded(self, name: str) -> bool:
        return is_excluded(name, self.exclude)


@dataclass
class SmoothedGroup:
    """What happened to one scaling group.

    Attributes:
        name, kind, layers, prev_name: as in :class:`~torchquant.ptq.scaling.ScalingGroup`.
        alpha: the migration strength used (searched or given).
        scales: the smoothing factors ``s`` ``[in]`` (float32, CPU).
        act_max: ``max_j a_j``, the largest input channel maximum before
            smoothing; ``act_max_smoothed``: ``max_j a_j / s_j`` after.
        errors: the group's W8A8 error for ``s = 1`` (no smoothing), then for
            each candidate alpha (the grid when searching), float64 CPU.
        alphas: the candidate alphas, in the order of ``errors[1:]``.
        samples: calibration tokens seen.
        scored_tokens: the tokens the errors were measured on (``max_tokens``).
    """

    name: str
    kind: str
    layers: List[str]
    prev_name: Optional[str]
    alpha: float
    scales: Tensor
    act_max: float
    act_max_smoothed: float
    errors: Tensor
    alphas: Tuple[float, ...]
    samples: int
    scored_tokens: int


@dataclass
class SmoothQuantReport(PTQReport):
    """:class:`~torchquant.ptq.report.PTQReport` of a SmoothQuant run: no layer is quantized, layers are smoothed.

    Each smoothed layer's ``loss`` is its W8A8 error after smoothing (see
    the module doc) and its ``details``: ``kind``, ``alpha``, ``act_max``
    and ``act_max_smoothed`` (its input's largest channel maximum before and
    after), ``w_max`` and ``w_max_smoothed`` (its largest ``|weight|``), and
    ``loss_unsmoothed`` (its W8A8 error with ``s = 1``). ``groups`` holds
    each group's factors and errors by group name.
    """

    config: Optional[SmoothQuantConfig] = None
    groups: Dict[str, SmoothedGroup] = field(default_factory=dict)

    @property
    def smoothed(self) -> List[LayerReport]:
        return [layer for layer in self.layers if layer.status.startswith(SMOOTHED)]

    @property
    def skipped(self) -> List[LayerReport]:
        return [layer for layer in self.layers if not layer.status.startswith(SMOOTHED)]

    def summary(self) -> str:
        alpha = "" if self.config is None else \
            " (alpha searched)" if self.config.alpha == "search" else f" (alpha {self.config.alpha:g})"
        online = sum(layer.status == SMOOTHED_ONLINE for layer in self.layers)
        return (f"{self.method}{alpha}: {len(self.smoothed)} of {len(self.layers)} Linear layers smoothed "
                f"({online} by an online input scale) over {self._where()} in {self.seconds:.1f} s"
                + self._skipped_counts())


# ---------------------------------------------------------------------------- statistics

class _ChannelMax:
    """``max |x_j|`` per input channel over the rows seen (float32). The walk hands over what the weight
    multiplies: an :class:`~torchquant.nn.InputScaledLinear`'s input divided by its ``input_scale``."""

    def __init__(self, module: nn.Linear) -> None:
        self.absmax = torch.zeros(module.in_features, dtype=torch.float32, device=module.weight.device)

    def update(self, x: Tensor) -> None:
        x = x.reshape(-1, x.shape[-1])
        torch.maximum(self.absmax, x.abs().amax(dim=0).float(), out=self.absmax)  # NaN stays NaN


def _static_act_scale(absmax: Tensor) -> Tensor:
    """W8A8Linear's symmetric int8 grid over ``[-max, max]``: ``max / 127.5`` (``[1]``, float32)."""
    m = absmax.float().max().reshape(1)
    return qparams_from_range(-m, m, _ACT_SPEC)[0]


def _w8a8_weight(weight: Tensor, s: Tensor) -> Tensor:
    """float32: ``weight diag(s)`` (rounded to the weight's dtype, as the fold does) on W8A8Linear's weight
    grid, dequantized once for the search."""
    wide = torch.promote_types(weight.dtype, s.dtype)
    codes, scales = int8_weight_grid((weight.detach().to(wide) * s.to(wide)).to(weight.dtype))
    return formats.dequantize(codes, scales, torch.zeros_like(scales), axis=0)


def _w8a8_input(x: Tensor, act_scale: Optional[Tensor]) -> Tensor:
    """float32 ``x`` on W8A8Linear's activation grid: the static per-tensor one, or one per token."""
    if act_scale is not None:
        return ops.fake_quantize(x, act_scale, torch.zeros_like(act_scale), _QMIN, _QMAX)
    codes, scales = ops.quantize_per_token(x, _QMIN, _QMAX)  # codes * scales: fake_quantize on the same grid
    return codes.float() * scales


def _squared_norm(t: Tensor) -> Tensor:
    flat = t.reshape(-1)
    return torch.dot(flat, flat)


# ---------------------------------------------------------------------------- the pass

@dataclass
class _Block:
    index: int
    pending: List[ScalingGroup]
    reference: List[Tensor]  # the block's outputs on its first calibration batch before smoothing
    calibrated: Dict[str, CalibratedLayer] = field(default_factory=dict)


class _SmoothQuantPass(BlockwisePass):
    def __init__(self, model: nn.Module, config: SmoothQuantConfig) -> None:
        self.model = model
        self.config = config
        self.reports: Dict[str, LayerReport] = {}
        self.groups: Dict[str, SmoothedGroup] = {}
        self._block: Optional[_Block] = None

    def select(self, name: str, module: nn.Linear) -> bool:
        return not self.config.is_excluded(name)

    def new_statistics(self, name: str, module: nn.Linear) -> _ChannelMax:
        return _ChannelMax(module)

    def skip(self, block: BlockContext, layer: CalibratedLayer, reason: str) -> None:
        self.reports[layer.name] = LayerReport(layer.name, tuple(layer.module.weight.shape), NO_CALIBRATION_TOKENS)

    def process(self, block: BlockContext, layers: List[CalibratedLayer]) -> None:
        state = self._enter(block)
        for layer in layers:
            state.calibrated[layer.name] = layer
        for group in list(state.pending):
            if all(name in state.calibrated for name in group.names):
                state.pending.remove(group)
                self._smooth(block, state, group)

    def finish(self) -> None:
        """The groups of the last block that never got all their statistics."""
        if self._block is not None:
            for group in self._block.pending:
                for name, layer in group.layers:
                    self.reports.setdefault(name, LayerReport(name, tuple(layer.weight.shape), GROUP_INCOMPLETE))
        self._block = None

    # ---- per block ---------------------------------------------------------------------------

    def _enter(self, block: BlockContext) -> _Block:
        if self._block is not None and self._block.index == block.index:
            return self._block
        self.finish()
        # Before anything in the block changes: its groups (one run to find the layers sharing an input)
        # and the outputs every smoothed group is checked against (one batch shows a wrong rule).
        groups = self._plan(scaling_groups(self.model, block.name, block.module, block.inputs[:1]))
        grouped = {name for group in groups for name in group.names}
        for name, layer in linear_layers(block.module, block.name):
            if name not in grouped and self.select(name, layer):
                self.reports.setdefault(name, LayerReport(name, tuple(layer.weight.shape), NO_FOLD))
        self._block = _Block(block.index, groups, block_outputs(block.module, block.inputs[:1]))
        return self._block

    def _plan(self, groups: List[ScalingGroup]) -> List[ScalingGroup]:
        """The groups without excluded layers; a fold that would rescale an excluded layer becomes explicit."""
        planned = []
        for group in groups:
            kept = [(name, layer) for name, layer in group.layers if not self.config.is_excluded(name)]
            if not kept:
                continue
            touches_excluded = len(kept) < len(group.layers) or (
                group.kind == "linear" and self.config.is_excluded(group.prev_name))
            if touches_excluded and group.kind != "explicit":
                group = ScalingGroup(group.name, kept)  # each remaining layer divides its own input
            elif len(kept) < len(group.layers):
                group = replace(group, layers=kept)
            if group.kind == "explicit" and not self.config.explicit:
                for name, layer in group.layers:
                    self.reports[name] = LayerReport(name, tuple(layer.weight.shape), ONLINE_SCALE_DISABLED)
                continue
            planned.append(group)
        return planned

    # ---- per group ---------------------------------------------------------------------------

    def _smooth(self, block: BlockContext, state: _Block, group: ScalingGroup) -> None:
        block.set_postfix(group=group.name)
        start = time.perf_counter()
        members = [state.calibrated[name] for name in group.names]
        absmax = functools.reduce(torch.maximum, [m.statistics.absmax for m in members])
        samples = max(m.rows for m in members)
        _check_statistics(group, absmax, samples)
        alive = absmax > 0
        weights = [w.detach() for w in group.weights]
        candidates = [_factors(absmax, alive, weights, a) for a in self.config.alphas]
        errors, energy, scored = self._w8a8_errors(block, group, absmax, samples,
                                                   [torch.ones_like(candidates[0])] + candidates)
        totals = (errors * energy).sum(dim=1) / energy.sum().clamp(min=torch.finfo(torch.float64).tiny)
        best = int(totals[1:].argmin())
        s, alpha = candidates[best], self.config.alphas[best]
        w_max = [float(w.abs().max()) for w in weights]

        saved = _Snapshot(group)
        apply_scales(group, s)
        try:
            check_invariance(block.module, block.inputs[:1], state.reference, group=group)
        except ScalingInvarianceError:
            saved.restore()
            raise

        self.groups[group.name] = SmoothedGroup(
            group.name, group.kind, group.names, group.prev_name, alpha, s.detach().float().cpu(),
            float(absmax.max()), float((absmax / s).max()), totals.cpu(), self.config.alphas, samples, scored)
        if group.kind == "linear" and group.prev_name in self.reports:  # its output rows were just divided by s
            self.reports[group.prev_name].details["w_max_smoothed"] = float(group.prev.weight.detach().abs().max())
        status = SMOOTHED_ONLINE if group.kind == "explicit" else SMOOTHED
        seconds = (time.perf_counter() - start) / len(members)
        for k, (member, (name, layer)) in enumerate(zip(members, group.layers)):
            self.reports[name] = LayerReport(
                name, tuple(layer.weight.shape), status, samples=member.rows, loss=float(errors[best + 1, k]),
                seconds=seconds,
                details={"kind": group.kind, "alpha": alpha, "act_max": float(absmax.max()),
                         "act_max_smoothed": float((absmax / s).max()), "w_max": w_max[k],
                         "w_max_smoothed": float(layer.weight.detach().abs().max()),
                         "loss_unsmoothed": float(errors[0, k])})

    @torch.no_grad()
    def _w8a8_errors(self, block: BlockContext, group: ScalingGroup, absmax: Tensor, samples: int,
                     candidates: List[Tensor]) -> Tuple[Tensor, Tensor, int]:
        """``(errors [candidates, layers], energy [layers], tokens scored)``, float64 CPU: each layer's
        relative W8A8 output error for each ``s``, and ``sum ||X W^T||^2``, the denominator of its errors.

        Runs the block once; the first layer's inputs (every ``stride``-th real token) are scored as they come.
        """
        stride = 1
        while -(-samples // stride) > self.config.max_tokens:
            stride *= 2
        seen = [0, 0]  # real tokens passed, tokens scored
        static = self.config.act_granularity == "tensor"
        weights = [w.detach() for w in group.weights]
        grids = [(s, _static_act_scale(absmax / s) if static else None, [_w8a8_weight(w, s) for w in weights])
                 for s in candidates]
        device = weights[0].device
        err = torch.zeros(len(candidates), len(weights), dtype=torch.float64, device=device)
        energy = torch.zeros(len(weights), dtype=torch.float64, device=device)
        mask: List[Optional[Tensor]] = [None]

        def score(module, args, kwargs):
            x = args[0] if args else kwargs["input"]
            x = select_tokens(x.detach(), mask[0]).reshape(-1, x.shape[-1])
            first = -seen[0] % stride
            seen[0] += x.shape[0]
            x = x[first::stride].float()
            if not x.numel():
                return
            seen[1] += x.shape[0]
            refs = [F.linear(x, w.float()) for w in weights]
            for k, ref in enumerate(refs):
                energy[k] += _squared_norm(ref)
            for c, (s, act_scale, w_hat) in enumerate(grids):
                x_hat = _w8a8_input(x / s, act_scale)
                for k, ref in enumerate(refs):
                    err[c, k] += _squared_norm(torch.addmm(ref, x_hat, w_hat[k].t(), beta=-1))  # Ŷ - Y

        handle = group.layers[0][1].register_forward_pre_hook(score, with_kwargs=True)
        try:
            for inp in block.inputs:
                mask[0] = inp.token_mask
                inp.call(block.module)
        finally:
            handle.remove()
        return (err / energy.clamp(min=torch.finfo(torch.float64).tiny)).cpu(), energy.cpu(), seen[1]


def _check_statistics(group: ScalingGroup, absmax: Tensor, samples: int) -> None:
    bad = int((~torch.isfinite(absmax)).sum())
    if bad:
        raise ValueError(f"SmoothQuant: group {group.name!r}: {bad} input channels of {', '.join(group.names)} were "
                         "NaN or Inf on the calibration data; no smoothing factor can be computed")
    if not bool((absmax > 0).any()):
        raise ValueError(f"SmoothQuant: group {group.name!r}: every input channel of {', '.join(group.names)} was 0 "
                         f"on all {samples} calibration tokens, so no smoothing factor exists; calibrate on data that "
                         "reaches these layers, or exclude them (exclude=[...])")


def _factors(absmax: Tensor, alive: Tensor, weights: List[Tensor], alpha: float) -> Tensor:
    """The op's ``s`` for ``alpha``; a channel that was 0 on every token keeps ``s = 1``."""
    one = torch.ones_like(absmax)
    s = ops.smoothquant_scales(torch.where(alive, absmax, one), weights, alpha)
    return torch.where(alive, s, one.to(s.dtype))


class _Snapshot:
    """The tensors a group's scaling changes, to put back if the scaled block fails its invariance check."""

    def __init__(self, group: ScalingGroup) -> None:
        tensors = list(group.weights)
        if group.prev is not None:
            tensors += [t for t in (group.prev.weight, getattr(group.prev, "bias", None)) if isinstance(t, Tensor)]
        self.saved = [(t, t.detach().clone()) for t in tensors]
        self.layers = [layer for _, layer in group.layers] if group.kind == "explicit" else []

    @torch.no_grad()
    def restore(self) -> None:
        for t, copy in self.saved:
            t.data.copy_(copy)
        for layer in self.layers:  # now InputScaledLinear: dividing by 1 is the original layer again
            layer.input_scale.fill_(1.0)


# ---------------------------------------------------------------------------- the drivers

def _layers_in_blocks(model: nn.Module, blocks: Optional[str]) -> List[Tuple[str, nn.Linear]]:
    found = find_blocks(model, blocks)
    prefix, root = (found[0], found[1]) if found is not None else ("", model)
    return linear_layers(root, prefix)


def _check_model(model: nn.Module, what: str) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not linear_layers(model):
        raise ValueError(f"the model has no nn.Linear layers: nothing to {what}")


def smoothquant(model: nn.Module, calibration_batches: Iterable, *, alpha: Union[float, str] = 0.5,
                alpha_grid: Optional[Sequence[float]] = None, act_granularity: str = "tensor", explicit: bool = True,
                max_tokens: int = 2048, exclude: Union[str, Sequence[str]] = DEFAULT_EXCLUDE,
                blocks: Optional[str] = None, device: Device = None, token_mask: TokenMask = "auto",
                progress: bool = True) -> SmoothQuantReport:
    """Smooth the activation outliers of every ``nn.Linear`` in the blocks of ``model`` into its weights, in place.

    The float model computes the same function afterwards (checked after
    every group); quantize it with :func:`quantize_w8a8`.

    Args:
        model: a float model.
        calibration_batches: iterable of model inputs: tensors of input ids
            (``model(t)``), dicts of keyword arguments (``model(**d)``) or
            tuples (``model(*t)``). Read once. Padding positions stay out
            of the statistics (see ``token_mask``).
        alpha: the migration strength in ``[0, 1]`` (0.5 suits most models
            in the paper; larger moves more of the activations' range into
            the weights), or ``"search"``: per group, the ``alpha`` of
            ``alpha_grid`` with the smallest W8A8 error. A fixed alpha can
            make a layer worse than no smoothing when its weights have
            outlier columns of their own (each row's ``loss`` against its
            ``loss_unsmoothed`` shows it; all-MiniLM-L6-v2's feed-forward
            output layers at 0.5 are an example).
        alpha_grid: the candidates of the search (default 0, 0.05, ..., 1);
            only with ``alpha="search"``.
        act_granularity: the activation quantization the W8A8 errors (and the
            search) assume: ``"tensor"`` (one static scale, the default) or
            ``"token"`` (dynamic per token).
        explicit: where no fold exists (post-LN encoders, inputs after GELU),
            divide the input online (:class:`~torchquant.nn.InputScaledLinear`);
            ``False`` leaves those layers as they are.
        max_tokens: the most calibration tokens the W8A8 errors (and the
            search) are measured on per group, spread evenly over the data.
        exclude: fnmatch patterns of layers left untouched (default: the LM
            head). A fold that would rescale an excluded layer (a norm shared
            with it, an excluded producer) is replaced by online scales of
            the other layers.
        blocks: attribute path of the block list (e.g. ``"encoder.layer"``);
            found automatically when ``None``; a model without one is
            treated as one block.
        device: where blocks are calibrated (default: the model's device).
        token_mask: the real tokens of each batch (default: a dict batch's
            ``attention_mask``); see
            :func:`~torchquant.ptq.calibration.calibrate_blocks`.
        progress: a tqdm bar over the blocks, showing the current group.

    Returns:
        A :class:`SmoothQuantReport`: one row per Linear layer (smoothed by a
        fold or an online scale, or why not), and per group its ``alpha``,
        factors and W8A8 errors in ``report.groups``.

    Raises:
        ValueError: bad arguments, no calibration data, no Linear layer, a
            group whose inputs were all 0 (or NaN) on the calibration data,
            a model already holding InputScaledLinear layers.
        ScalingInvarianceError: a group's scaling changed the float block's
            outputs (a rule that does not hold for this model); that group is
            put back as it was, the groups before it stay smoothed.
    """
    if alpha_grid is not None and alpha != "search":
        raise ValueError(f"alpha_grid is the candidates of alpha='search'; with alpha={alpha!r} leave it None")
    config = SmoothQuantConfig(alpha, DEFAULT_ALPHA_GRID if alpha_grid is None else alpha_grid, act_granularity,
                               explicit, max_tokens, exclude)
    _check_model(model, "smooth")
    if calibration_batches is None:
        raise ValueError("smoothquant needs calibration_batches: the activation maxima it balances against the "
                         "weights are measured on them")
    selected = [(name, m) for name, m in _layers_in_blocks(model, blocks) if not config.is_excluded(name)]
    if not selected:
        raise ValueError(f"every nn.Linear in the blocks is excluded (exclude={config.exclude!r}): nothing to smooth")
    scaled = [name for name, m in selected if isinstance(m, InputScaledLinear)]
    if scaled:
        raise ValueError(f"the model was smoothed already: {scaled[0]!r} is an InputScaledLinear; run smoothquant "
                         "once, on the float model")

    pass_ = _SmoothQuantPass(model, config)
    start = time.perf_counter()
    run = calibrate_blocks(model, calibration_batches, pass_, blocks=blocks, device=device, sequential=False,
                           token_mask=token_mask, progress=progress, desc="SmoothQuant")
    pass_.finish()
    layers = layer_rows(model, pass_.reports, run.outside, config.is_excluded, "smoothquant", "smoothed")
    return SmoothQuantReport("SmoothQuant", layers, blocks=run.blocks, num_blocks=run.num_blocks,
                             seconds=time.perf_counter() - start, config=config, groups=pass_.groups)


class _ActRangePass(BlockwisePass):
    """Records the largest |input| of each selected layer; changes nothing."""

    def __init__(self, exclude: Tuple[str, ...]) -> None:
        self.exclude = exclude
        self.absmax: Dict[str, float] = {}
        self.rows: Dict[str, int] = {}

    def select(self, name: str, module: nn.Linear) -> bool:
        return not is_excluded(name, self.exclude)

    def new_statistics(self, name: str, module: nn.Linear) -> _ChannelMax:
        return _ChannelMax(module)

    def process(self, block: BlockContext, layers: List[CalibratedLayer]) -> None:
        for layer in layers:
            self.absmax[layer.name] = float(layer.statistics.absmax.max())
            self.rows[layer.name] = layer.rows


def quantize_w8a8(model: nn.Module, *, act_granularity: str = "tensor", calibration_batches: Optional[Iterable] = None,
                  static: Optional[bool] = None, exclude: Union[str, Sequence[str]] = DEFAULT_EXCLUDE,
                  blocks: Optional[str] = None, device: Device = None, token_mask: TokenMask = "auto",
                  progress: bool = True) -> PTQReport:
    """Replace every ``nn.Linear`` in the blocks of ``model`` by a :class:`~torchquant.nn.W8A8Linear`, in place.

    Weights: symmetric int8 per output channel; the layers run the int8
    kernel (``torchquant.ops.w8a8_linear``). An
    :class:`~torchquant.nn.InputScaledLinear` (SmoothQuant's online scale)
    becomes a W8A8Linear with its ``input_scale``: ``x / input_scale`` is
    what gets quantized.

    Args:
        model: a float model (smoothed or not).
        act_granularity: ``"tensor"``: one int8 scale per activation tensor;
            ``"token"``: a dynamic scale per token (row).
        calibration_batches: model inputs (as for :func:`smoothquant`) from
            which static per-tensor scales are measured: ``max |x| / 127.5``
            over the real tokens reaching each layer (for an
            InputScaledLinear, of ``x / input_scale``). Required when
            ``static``; not accepted otherwise.
        static: ``act_granularity="tensor"`` with scales fixed from
            calibration (default ``True`` for ``"tensor"``), or measured on
            each input (``False``). Per-token scales are always dynamic.
        exclude: fnmatch patterns of layers left in floating point (default:
            the LM head).
        blocks: attribute path of the block list; found automatically when
            ``None``; a model without one is treated as one block. Layers
            outside the blocks stay in floating point.
        device, token_mask, progress: of the calibration walk
            (:func:`~torchquant.ptq.calibration.calibrate_blocks`).

    Returns:
        A :class:`~torchquant.ptq.report.PTQReport` (``method="W8A8"``): per
        layer its status, the calibration tokens seen and, in ``details``,
        ``act_max`` and ``act_scale`` of a static grid and ``input_scale``
        (whether it divides its input online).
    """
    _check_act_granularity(act_granularity)
    if static is None:
        static = act_granularity == "tensor"
    if not isinstance(static, bool):
        raise TypeError(f"static must be a bool or None, got {static!r}")
    if static and act_granularity == "token":
        raise ValueError("per-token activation scales are dynamic: static=True needs act_granularity='tensor'")
    if static and calibration_batches is None:
        raise ValueError("static per-tensor activation scales are measured on calibration data: pass "
                         "calibration_batches, or use static=False (a scale per input) or act_granularity='token'")
    if not static and calibration_batches is not None:
        raise ValueError(f"calibration_batches is only used for static activation scales; with "
                         f"act_granularity={act_granularity!r} and static=False leave it None")
    patterns = exclude_patterns(exclude)
    _check_model(model, "quantize")
    in_blocks = _layers_in_blocks(model, blocks)
    selected = [(name, m) for name, m in in_blocks if not is_excluded(name, patterns)]
    if not selected:
        raise ValueError(f"every nn.Linear in the blocks is excluded (exclude={patterns!r}): nothing to quantize")
    if selected[0][0] == "":
        raise ValueError("the model is itself an nn.Linear, which cannot be replaced in place; wrap it in a module "
                         "(e.g. nn.Sequential(layer))")

    start = time.perf_counter()
    ranges = _ActRangePass(patterns)
    run_blocks, num_blocks = None, 1
    if static:
        run = calibrate_blocks(model, calibration_batches, ranges, blocks=blocks, device=device, sequential=False,
                               token_mask=token_mask, progress=progress, desc="W8A8 calibration")
        run_blocks, num_blocks = run.blocks, run.num_blocks
    else:
        found = find_blocks(model, blocks)
        run_blocks, num_blocks = (found[0], len(found[1])) if found is not None else (None, 1)

    reports: Dict[str, LayerReport] = {}
    for name, linear in selected:
        shape = tuple(linear.weight.shape)
        details: Dict[str, object] = {"input_scale": isinstance(linear, InputScaledLinear)}
        act_scale = None
        if static:
            if name not in ranges.absmax:
                reports[name] = LayerReport(name, shape, NO_CALIBRATION_TOKENS)
                continue
            m = ranges.absmax[name]
            if not m > 0 or m == float("inf"):
                raise ValueError(f"quantize_w8a8: layer {name!r}: the largest |input| on the calibration data is {m}; "
                                 "a static int8 scale needs a positive, finite one (calibrate on data that reaches "
                                 "the layer, exclude it, or use act_granularity='token')")
            act_scale = _static_act_scale(torch.tensor([m]))
            details.update(act_max=m, act_scale=float(act_scale))
        quantized = W8A8Linear.from_float(linear, act_granularity, act_scale)  # keeps an input_scale
        set_submodule(model, name, quantized)
        reports[name] = LayerReport(name, shape, QUANTIZED, samples=ranges.rows.get(name, 0), details=details)

    # Every layer handled here (now a W8A8Linear) or still a float Linear, in module order.
    float_names = {name for name, _ in linear_layers(model)}
    layers = []
    for name, module in model.named_modules():
        if name in reports:
            layers.append(reports[name])
        elif name in float_names:  # a selected layer in the blocks is in reports: this one is excluded or outside
            status = EXCLUDED if is_excluded(name, patterns) else OUTSIDE_BLOCKS
            layers.append(LayerReport(name, tuple(module.weight.shape), status))
    return PTQReport("W8A8", layers, blocks=run_blocks, num_blocks=num_blocks, seconds=time.perf_counter() - start)
