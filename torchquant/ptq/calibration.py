"""Block-by-block calibration: the walk every post-training pass shares.

A transformer is a stack of identical blocks. Quantizing it one block at a
time needs, for each block, only the inputs that block receives, so the
whole model never runs on the calibration data more than once:

1. find the block list (:func:`find_blocks`);
2. run the model on each calibration batch until it calls the first block,
   keep that call's arguments (hidden states, attention mask, position
   embeddings...) and stop the forward there (:func:`capture_block_inputs`);
3. for each block: run the cached inputs through it with hooks on its
   ``nn.Linear`` layers that feed each layer's inputs to a statistics object
   of the pass (GPTQ: a Hessian; AWQ / SmoothQuant: activation magnitudes),
   let the pass transform the layers, then run the transformed block once
   more: its outputs are the next block's inputs, so every block is
   calibrated on what the quantized model upstream of it produces.

With ``sequential=True`` the layers of a block are handled in groups, in
forward order: for a decoder block ``[q, k, v]``, ``[o]``, ``[gate, up]``,
``[down]``. The block is run again before each group, so a layer's
statistics see the already transformed layers before it. The groups are
found from the first run: layers are ordered by their first call and layers
called on the same input tensor form one group. A layer that receives no
rows in that run (an expert no token was routed to) is put in a last group,
and is handed to :meth:`BlockwisePass.skip` if it still gets no rows there.

Padding never enters the statistics. Each batch may come with a token mask
``[B, T]`` (True: a real token): by default the ``attention_mask`` of a dict
batch (the Hugging Face convention, 1 = real token), or what a
``token_mask`` callable returns for other conventions. A layer input shaped
``[B, T, ..., features]`` then reaches the statistics as its real-token rows
only (``x[mask]``) and a layer's sample count is its number of real-token
rows. Inputs whose leading dimensions are not ``[B, T]`` (tokens flattened
to ``[B * T, features]``, the routed tokens of an MoE expert) are passed
whole; a debug message on the ``torchquant.ptq.calibration`` logger names
each such layer once per walk. The mask assumes batch-major activations
(``[B, T, ...]``, as in Hugging Face models); a time-major model (``[T, B,
...]``) needs ``token_mask=None``. Passes comparing block outputs use
:func:`select_tokens` with each input's :attr:`BlockInput.token_mask`.

Only one group's statistics are alive at a time. The walk runs under
``torch.no_grad()`` with every module in eval mode (restored afterwards),
each block moved to ``device`` while it is worked on and moved back after.

A model without a block list (a plain MLP) is calibrated as a single block:
the model itself, fed the calibration batches.
"""
from __future__ import annotations

import itertools
import logging
import warnings
from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from torchquant.nn.qat import QATModule

__all__ = [
    "BlockInput", "BlockContext", "BlockwisePass", "BlockwiseRun", "CalibratedLayer", "CalibrationWarning",
    "TokenMask", "calibrate_blocks", "capture_block_inputs", "find_blocks", "linear_layers", "prepare_batches",
    "select_tokens",
]

Device = Union[str, torch.device, None]
# "auto" (a dict batch's attention_mask), None (every position counts) or batch -> [B, T] mask (or None).
TokenMask = Union[str, None, Callable[[Any], Optional[Tensor]]]

_log = logging.getLogger(__name__)


class CalibrationWarning(UserWarning):
    """A layer could not be calibrated (e.g. it received no tokens) and was left as it was."""


class _StopForward(Exception):
    """Raised by the first block's pre-hook: the rest of the model need not run."""


# ---------------------------------------------------------------------------- inputs

@dataclass
class BlockInput:
    """The arguments of one call of a block (one calibration batch).

    ``token_mask``: bool ``[B, T]``, True at the real tokens of the batch,
    or ``None`` when every position counts (no mask, or no padding).
    """

    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]
    token_mask: Optional[Tensor] = None

    @property
    def hidden(self) -> Tensor:
        """The hidden states: the first positional argument, or ``hidden_states=``."""
        if self.args:
            return self.args[0]
        return self.kwargs["hidden_states"]

    def with_hidden(self, hidden: Tensor) -> "BlockInput":
        """The same call with other hidden states (the previous block's output)."""
        if self.args:
            return BlockInput((hidden,) + tuple(self.args[1:]), self.kwargs, self.token_mask)
        return BlockInput(self.args, {**self.kwargs, "hidden_states": hidden}, self.token_mask)

    def call(self, module: nn.Module) -> Any:
        return module(*self.args, **self.kwargs)


def _to_device(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor inside (nested tuples, lists, dicts) on ``device``, detached."""
    if isinstance(value, Tensor):
        return value.detach().to(device)
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # NamedTuple
        return type(value)(*(_to_device(v, device) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(_to_device(v, device) for v in value)
    if isinstance(value, Mapping):
        return {k: _to_device(v, device) for k, v in value.items()}
    return value


def select_tokens(x: Tensor, mask: Optional[Tensor]) -> Tensor:
    """The real-token rows of ``x``: ``x[mask]`` (``[n_real, ..., features]``) when ``x`` is
    ``[B, T, ..., features]`` and ``mask`` a bool ``[B, T]``; ``x`` itself when ``mask`` is
    ``None`` or the leading dimensions of ``x`` are not ``[B, T]``."""
    if mask is None or not _leads_with(x, mask):
        return x
    return x[mask.to(x.device)]


def _leads_with(x: Tensor, mask: Tensor) -> bool:
    # At least [B, T, features]: a 2-D input's leading dimensions are [rows] only.
    return x.dim() >= 3 and tuple(x.shape[:2]) == tuple(mask.shape)


def _check_token_mask_option(token_mask: TokenMask) -> None:
    if token_mask is None or callable(token_mask) or (isinstance(token_mask, str) and token_mask == "auto"):
        return
    raise TypeError("token_mask must be 'auto' (a dict batch's attention_mask, 1 = real token), None (every "
                    f"position counts) or a callable(batch) -> [batch, tokens] mask, got {token_mask!r}")


def _as_token_mask(mask: Any, index: int, source: str) -> Optional[Tensor]:
    """``mask`` as bool ``[B, T]``; ``None`` when it keeps every position (nothing to select)."""
    where = f"calibration batch {index}: {source}"
    if not isinstance(mask, Tensor):
        raise TypeError(f"{where} must be a [batch, tokens] tensor of 0/1 (1 = real token), got "
                        f"{type(mask).__name__}")
    if mask.dim() != 2:
        raise ValueError(f"{where} must be a [batch, tokens] tensor of 0/1 (1 = real token), got shape "
                         f"{list(mask.shape)}; pass token_mask=callable(batch) for another layout")
    if mask.dtype != torch.bool:
        if mask.dtype.is_complex or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{where} must hold only 0 and 1 (1 = real token); found other values. Pass "
                             "token_mask=callable(batch) returning such a mask for another convention")
        mask = mask != 0
    return None if bool(mask.all()) else mask


def _token_mask_of(batch: Any, index: int, token_mask: TokenMask) -> Optional[Tensor]:
    if token_mask is None:
        return None
    if not callable(token_mask):  # "auto"
        mask = batch.get("attention_mask") if isinstance(batch, Mapping) else None
        if mask is None:
            return None
        if isinstance(mask, Tensor) and mask.dim() != 2:
            _log.debug("calibration batch %d: its attention_mask has shape %s, not [batch, tokens]; every position "
                       "counts (pass token_mask=callable(batch) to mask padding)", index, list(mask.shape))
            return None
        ids = batch.get("input_ids")
        if isinstance(ids, Tensor) and isinstance(mask, Tensor) and ids.dim() == 2 and ids.shape != mask.shape:
            raise ValueError(f"calibration batch {index}: attention_mask has shape {list(mask.shape)} but input_ids "
                             f"has shape {list(ids.shape)}")
        return _as_token_mask(mask, index, "its attention_mask")
    mask = token_mask(batch)
    return None if mask is None else _as_token_mask(mask, index, "token_mask(batch)")


def prepare_batches(calibration_batches: Iterable, device: Device = None,
                    token_mask: TokenMask = "auto") -> List[BlockInput]:
    """The calibration batches as model calls: a tensor is ``model(t)``, a dict
    ``model(**d)`` and a tuple or list ``model(*t)``.

    The iterable is read once; its tensors are moved to ``device`` when given.
    Each call gets the batch's token mask (see :func:`calibrate_blocks`).
    """
    _check_token_mask_option(token_mask)
    if isinstance(calibration_batches, (Tensor, Mapping, str, bytes)) or not isinstance(calibration_batches,
                                                                                         Iterable):
        raise TypeError(
            "calibration_batches must be an iterable of batches (tensors of input ids, dicts of keyword "
            f"arguments or tuples of positional arguments), got a {type(calibration_batches).__name__}; "
            "wrap a single batch in a list")
    target = torch.device(device) if device is not None else None
    calls = []
    for i, batch in enumerate(calibration_batches):
        if target is not None:
            batch = _to_device(batch, target)
        if isinstance(batch, Tensor):
            call = BlockInput((batch,), {})
        elif isinstance(batch, Mapping):
            if not all(isinstance(k, str) for k in batch):
                raise TypeError(f"calibration batch {i}: a dict batch must have string keys (the model's "
                                f"keyword arguments), got keys {list(batch)!r}")
            call = BlockInput((), dict(batch))
        elif isinstance(batch, (tuple, list)):
            call = BlockInput(tuple(batch), {})
        else:
            raise TypeError(f"calibration batch {i} must be a Tensor, a dict of keyword arguments or a tuple of "
                            f"positional arguments, got {type(batch).__name__}")
        call.token_mask = _token_mask_of(batch, i, token_mask)
        calls.append(call)
    if not calls:
        raise ValueError("no calibration data: calibration_batches is empty")
    return calls


# ---------------------------------------------------------------------------- model structure

def linear_layers(module: nn.Module, prefix: str = "") -> List[Tuple[str, nn.Linear]]:
    """``(full name, layer)`` of every float ``nn.Linear`` in ``module`` (QAT layers excluded)."""
    found = []
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear) and not isinstance(m, QATModule):
            full = f"{prefix}.{name}" if prefix and name else (prefix or name)
            found.append((full, m))
    return found


def find_blocks(model: nn.Module, path: Optional[str] = None) -> Optional[Tuple[str, nn.Module]]:
    """``(attribute path, block list)`` of a transformer-style model, or ``None`` if it has none.

    With ``path`` (e.g. ``"model.layers"``, ``"encoder.layer"``) that
    submodule, which must be an ``nn.ModuleList`` or ``nn.Sequential`` of
    blocks. Otherwise the longest ``nn.ModuleList`` whose elements all have
    the same type and hold ``nn.Linear`` layers, among those not nested in
    another such list (so the experts of an MoE block are not taken for the
    blocks); the first one on ties. A model with several stacks (encoder and
    decoder) needs ``path``.
    """
    if path is not None:
        if not isinstance(path, str):
            raise TypeError(f"blocks must be an attribute path string such as 'model.layers', got "
                            f"{type(path).__name__}")
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"blocks={path!r}: the model has no submodule of that name") from None
        if not isinstance(blocks, (nn.ModuleList, nn.Sequential)) or len(blocks) == 0:
            got = f"an empty {type(blocks).__name__}" if isinstance(blocks, (nn.ModuleList, nn.Sequential)) \
                else f"a {type(blocks).__name__}"
            raise ValueError(f"blocks={path!r} must name a non-empty nn.ModuleList or nn.Sequential of blocks, "
                             f"got {got}")
        if len({id(b) for b in blocks}) < len(blocks):
            # One module called as several blocks would be calibrated and transformed several times.
            raise ValueError(f"blocks={path!r} holds the same module more than once; give the path of a list of "
                             "distinct blocks")
        return path, blocks
    candidates = []
    for name, m in model.named_modules():
        if (isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(b) for b in m}) == 1
                and len({id(b) for b in m}) == len(m) and linear_layers(m)):
            candidates.append((name, m))
    outer = [(name, m) for name, m in candidates
             if not any(other != name and (other == "" or name.startswith(other + ".")) for other, _ in candidates)]
    if not outer:
        return None
    return max(outer, key=lambda c: len(c[1]))  # max keeps the first of equal lengths


def _model_device(model: nn.Module) -> torch.device:
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    raise ValueError("the model has no parameters or buffers: nothing to calibrate")


@contextmanager
def _on_device(modules: Iterable[nn.Module], device: torch.device) -> Iterator[None]:
    """Moves each module's own tensors to ``device``, and back to where they were on exit."""
    moved = []
    try:
        for m in modules:
            own = [t for t in itertools.chain(m._parameters.values(), m._buffers.values()) if t is not None]
            if own and any(t.device != device for t in own):
                original = own[0].device
                m._apply(lambda t: t.to(device), recurse=False)
                moved.append((m, original))
        yield
    finally:
        for m, original in reversed(moved):
            m._apply(lambda t, d=original: t.to(d), recurse=False)


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


# ---------------------------------------------------------------------------- capture

def capture_block_inputs(model: nn.Module, first_block: nn.Module, batches: Sequence[BlockInput],
                         device: torch.device) -> List[BlockInput]:
    """The arguments ``first_block`` receives for each batch, on ``device``.

    The model runs on each batch until it calls ``first_block``; a pre-hook
    records the call (with the batch's token mask) and raises, so nothing
    after the first block runs.
    """
    cache: List[BlockInput] = []
    batch: Optional[BlockInput] = None

    def hook(module, args, kwargs):
        mask = None if batch.token_mask is None else batch.token_mask.to(device)
        cache.append(BlockInput(_to_device(tuple(args), device), _to_device(dict(kwargs), device), mask))
        raise _StopForward

    handle = first_block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i, batch in enumerate(batches):
            before = len(cache)
            try:
                batch.call(model)
            except _StopForward:
                pass
            if len(cache) == before:
                raise RuntimeError(
                    f"calibration batch {i}: the model's forward returned without calling its first block; "
                    "name the block list the forward runs with blocks='attribute.path'")
    finally:
        handle.remove()
    return cache


# ---------------------------------------------------------------------------- the pass interface

@dataclass
class CalibratedLayer:
    """A layer of the block being worked on and what was gathered from its inputs."""

    name: str
    module: nn.Linear
    statistics: Any
    rows: int = 0  # input rows (tokens) seen


class BlockwisePass:
    """What a post-training pass plugs into :func:`calibrate_blocks`.

    Subclasses implement :meth:`new_statistics` and :meth:`process`, and may
    narrow :meth:`select` and extend :meth:`skip`.
    """

    def select(self, name: str, module: nn.Linear) -> bool:
        """Whether the pass handles this layer (hooks are placed only on selected layers)."""
        return True

    def new_statistics(self, name: str, module: nn.Linear) -> Any:
        """A fresh statistics object for a layer: anything with ``update(inputs)``,
        called with the real-token rows of each input ``[..., in_features]``
        that has any (see :func:`calibrate_blocks` on padding)."""
        raise NotImplementedError

    def process(self, block: "BlockContext", layers: List[CalibratedLayer]) -> None:
        """Transform the layers of one group (all of them saw rows), in place."""
        raise NotImplementedError

    def skip(self, block: "BlockContext", layer: CalibratedLayer, reason: str) -> None:
        """A selected layer that is left as it is (``reason``: why); a warning was already issued."""


class BlockContext:
    """The block being worked on, handed to :meth:`BlockwisePass.process`.

    ``inputs`` are this block's cached calls; :meth:`run` evaluates the
    block (as transformed so far) on them, which is what a pass searching
    for scales compares against (on the real tokens only:
    ``select_tokens(output, inputs[i].token_mask)``).
    """

    def __init__(self, index: int, count: int, name: str, module: nn.Module, inputs: List[BlockInput],
                 device: torch.device, progress_bar, tokens: Optional["_RealTokens"] = None) -> None:
        self.index = index
        self.count = count
        self.name = name
        self.module = module
        self.inputs = inputs
        self.device = device
        self._bar = progress_bar
        self._tokens = tokens if tokens is not None else _RealTokens()

    def run(self) -> List[Any]:
        """The block's output for every cached input."""
        return [inp.call(self.module) for inp in self.inputs]

    def set_postfix(self, **values: Any) -> None:
        """Shown after the progress bar (e.g. the layer being quantized)."""
        self._bar.set_postfix(values, refresh=True)


@dataclass
class BlockwiseRun:
    """Where :func:`calibrate_blocks` went: the block list (``None``: the whole
    model as one block), how many blocks, and the ``nn.Linear`` layers it did
    not walk because they lie outside the blocks."""

    blocks: Optional[str]
    num_blocks: int
    outside: List[str] = field(default_factory=list)


# ---------------------------------------------------------------------------- the walk

def _input_of(args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> Tensor:
    return args[0] if args else kwargs["input"]


def _rows(x: Tensor) -> int:
    return x.numel() // x.shape[-1] if x.dim() > 0 and x.shape[-1] > 0 else 0


@contextmanager
def _hooked(layers: Iterable[Tuple[nn.Module, Callable[[Tensor], None]]]) -> Iterator[None]:
    """Calls ``fn(input)`` on each call of each layer, for the duration."""
    handles = []
    try:
        for module, fn in layers:
            handles.append(module.register_forward_hook(
                lambda m, args, kwargs, out, fn=fn: fn(_input_of(args, kwargs).detach()), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


class _RealTokens:
    """The real-token rows of a layer input, for the batch being run (``mask``, set by :func:`_run`)."""

    def __init__(self) -> None:
        self.mask: Optional[Tensor] = None
        self._noted: set = set()  # layers whose inputs did not lead with [B, T]: told once per walk

    def __call__(self, name: str, x: Tensor) -> Tensor:
        mask = self.mask
        if mask is not None and name not in self._noted and not _leads_with(x, mask):
            self._noted.add(name)
            _log.debug("%s: input of shape %s does not lead with the token mask's [batch, tokens] = %s; all its "
                       "rows, padding included, enter the statistics", name, list(x.shape), list(mask.shape))
        return select_tokens(x, mask)


def _run(block: BlockContext, before_call: Optional[Callable[[int], None]] = None) -> None:
    """Runs the block on each cached input, with that input's token mask in force."""
    try:
        for i, inp in enumerate(block.inputs):
            block._tokens.mask = inp.token_mask
            if before_call is not None:
                before_call(i)
            inp.call(block.module)
    finally:
        block._tokens.mask = None


def _weight_input(module: nn.Module, x: Tensor) -> Tensor:
    """What the layer's weight multiplies.

    A layer scaled with nothing before it to absorb ``1 / s``
    (:class:`~torchquant.nn.InputScaledLinear`, AWQ / SmoothQuant) divides
    its input by its ``input_scale`` buffer inside its forward, which the
    hooks do not see: its statistics must be those of the quotient.
    """
    scale = getattr(module, "input_scale", None)
    return (x / scale).to(x.dtype) if isinstance(scale, Tensor) else x


def _feed(layer: CalibratedLayer, tokens: _RealTokens) -> Callable[[Tensor], None]:
    def fn(x: Tensor) -> None:
        x = tokens(layer.name, _weight_input(layer.module, x))
        rows = _rows(x)
        if rows:
            layer.rows += rows
            layer.statistics.update(x)
    return fn


def _collect(block: BlockContext, group: List[CalibratedLayer]) -> None:
    with _hooked((layer.module, _feed(layer, block._tokens)) for layer in group):
        _run(block)


class _GroupTracer:
    """First run of a block in sequential mode: finds the groups and feeds the first one.

    A layer's group key is (batch, identity of its input tensor) at the
    first call in which it receives rows (padding included: grouping is
    about the forward, not the statistics). The inputs are kept alive until
    the batch is done, so a freed tensor's address cannot be reused by
    another input and merge unrelated groups.
    """

    def __init__(self, selected: Dict[str, nn.Linear], make_layer: Callable[[str, nn.Linear], CalibratedLayer],
                 tokens: _RealTokens):
        self.selected = selected
        self.make_layer = make_layer
        self.tokens = tokens
        self.group_of: Dict[str, Tuple] = {}
        self.groups: Dict[Tuple, List[str]] = {}  # insertion order = order of first call
        self.first_key: Optional[Tuple] = None
        self.first: Dict[str, CalibratedLayer] = {}
        self.batch = 0
        self._alive: List[Tensor] = []

    def new_batch(self, index: int) -> None:
        self.batch = index
        self._alive.clear()

    def hook(self, name: str) -> Callable[[Tensor], None]:
        def fn(x: Tensor) -> None:
            if not _rows(x):
                return
            if name not in self.group_of:
                self._alive.append(x)
                key = (self.batch, x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x.device)
                self.group_of[name] = key
                self.groups.setdefault(key, []).append(name)
                if self.first_key is None:
                    self.first_key = key
                if key == self.first_key:
                    self.first[name] = self.make_layer(name, self.selected[name])
            if name in self.first:
                _feed(self.first[name], self.tokens)(x)
        return fn

    def run(self, block: BlockContext) -> None:
        with _hooked((module, self.hook(name)) for name, module in self.selected.items()):
            _run(block, self.new_batch)
        self._alive.clear()

    def later_groups(self) -> List[List[str]]:
        """The groups after the first, then the layers that never got rows."""
        later = [names for key, names in self.groups.items() if key != self.first_key]
        unseen = [name for name in self.selected if name not in self.group_of]
        return later + ([unseen] if unseen else [])


def _finish_group(block: BlockContext, group: List[CalibratedLayer], pass_: BlockwisePass) -> None:
    for layer in group:
        if layer.rows == 0:
            reason = "no calibration tokens"
            warnings.warn(f"{layer.name}: {reason} reached this layer; it was not quantized and keeps its "
                          "float weights", CalibrationWarning)
            pass_.skip(block, layer, reason)
    seen = [layer for layer in group if layer.rows > 0]
    if seen:
        pass_.process(block, seen)


def _calibrate_block(block: BlockContext, pass_: BlockwisePass, selected: Dict[str, nn.Linear],
                     sequential: bool) -> None:
    def make_layer(name: str, module: nn.Linear) -> CalibratedLayer:
        return CalibratedLayer(name, module, pass_.new_statistics(name, module))

    if not selected:
        return
    if not sequential:
        group = [make_layer(name, module) for name, module in selected.items()]
        _collect(block, group)
        _finish_group(block, group, pass_)
        return
    tracer = _GroupTracer(selected, make_layer, block._tokens)
    tracer.run(block)
    _finish_group(block, list(tracer.first.values()), pass_)
    later = tracer.later_groups()
    del tracer  # drops the first group's statistics
    for names in later:
        group = [make_layer(name, selected[name]) for name in names]
        _collect(block, group)
        _finish_group(block, group, pass_)
        del group


def _block_output_hidden(out: Any, index: int) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"block {index} returned {type(out).__name__}; expected a Tensor or a tuple whose first "
                    "element is the hidden states")


@torch.no_grad()
def _check_something_selected(model: nn.Module, found, pass_: BlockwisePass) -> None:
    """A pass that would quantize no layer is an error, not a silent no-op (a report of '0 of N')."""
    if found is None:
        candidates = linear_layers(model)
    else:
        path, block_list = found
        candidates = [pair for i, block in enumerate(block_list) for pair in linear_layers(block, f"{path}.{i}")]
    if any(pass_.select(name, m) for name, m in candidates):
        return
    total = len(linear_layers(model))
    where = f"inside the blocks {found[0]!r}" if found is not None else "in the model"
    raise ValueError(f"nothing to quantize: no nn.Linear layer {where} is selected ({len(candidates)} found there, "
                     f"{total} in the whole model; the others are excluded or outside the blocks). Models whose "
                     "projections are not nn.Linear (GPT-2's Conv1D) need torchquant.lm.conv1d_to_linear(model) "
                     "first; or check exclude= and blocks=")


def calibrate_blocks(model: nn.Module, calibration_batches: Iterable, pass_: BlockwisePass, *,
                     blocks: Optional[str] = None, device: Device = None, sequential: bool = True,
                     token_mask: TokenMask = "auto", progress: bool = True,
                     desc: str = "calibrating") -> BlockwiseRun:
    """Walk ``model`` block by block, letting ``pass_`` gather statistics and transform each block.

    Args:
        model: the float model; modified in place by ``pass_``.
        calibration_batches: iterable of model inputs: tensors (``model(t)``),
            dicts (``model(**d)``) or tuples (``model(*t)``). Read once.
            Batches should not make the model use a KV cache (pass
            ``use_cache=False`` to Hugging Face models): blocks are run
            several times on the same inputs.
        pass_: what to gather and how to transform (see :class:`BlockwisePass`).
        blocks: attribute path of the block list; found automatically when
            ``None`` (see :func:`find_blocks`); a model without one is
            calibrated as a single block.
        device: where blocks run and cached inputs live (default: the device
            of the model's first parameter). Each block is moved there while
            it is worked on and moved back after; the modules before the
            first block are moved there while the inputs are captured.
        sequential: handle each block's layers group by group in forward
            order, re-running the block before each group (see module doc).
        token_mask: which positions of a batch are real tokens, so that
            padding stays out of the statistics and the sample counts
            (see the module doc):
            ``"auto"``: the ``attention_mask`` ``[B, T]`` of a dict batch
            (Hugging Face convention: 1 = real token, 0 = padding); tensor
            and tuple batches, and dicts without one, count every position.
            ``None``: every position counts.
            A callable: called with each batch as given (after the move to
            ``device``), returns a ``[B, T]`` bool or 0/1 tensor, 1 = real
            token (e.g. ``lambda b: b["input_ids"] != pad_id``), or ``None``
            for a batch without padding.
        progress: show a tqdm bar over the blocks.

    Memory: the cached inputs of one block for every batch (on ``device``),
    one block, and the statistics of one block (``sequential=False``) or of
    one group of layers (``sequential=True``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(pass_, BlockwisePass):
        raise TypeError(f"pass_ must be a BlockwisePass, got {type(pass_).__name__}")
    target = torch.device(device) if device is not None else _model_device(model)
    found = find_blocks(model, blocks)
    _check_something_selected(model, found, pass_)
    batches = prepare_batches(calibration_batches, target, token_mask)
    tokens = _RealTokens()

    with _eval_mode(model):
        if found is None:
            block_list, path, count = [model], None, 1
            names = [""]
            inputs = batches
        else:
            path, block_list = found
            count = len(block_list)
            names = [f"{path}.{i}" for i in range(count)]
            inside = {id(m) for m in block_list.modules()}
            with _on_device((m for m in model.modules() if id(m) not in inside), target):
                inputs = capture_block_inputs(model, block_list[0], batches, target)
            del batches
            if count > 1 and not all(isinstance(inp.args[0] if inp.args else inp.kwargs.get("hidden_states"),
                                                Tensor) for inp in inputs):
                raise TypeError("the first block was not called with the hidden states as its first positional "
                                "argument or as hidden_states=; cannot feed one block's output to the next")

        walked = set()
        with tqdm(total=count, desc=desc, unit="block", disable=not progress, dynamic_ncols=True) as bar:
            for i, (name, block) in enumerate(zip(names, block_list)):
                selected = {full: m for full, m in linear_layers(block, name) if pass_.select(full, m)}
                walked.update(full for full, _ in linear_layers(block, name))
                with _on_device(block.modules(), target):
                    ctx = BlockContext(i, count, name, block, inputs, target, bar, tokens)
                    _calibrate_block(ctx, pass_, selected, sequential)
                    if i + 1 < count:
                        inputs = [inp.with_hidden(_block_output_hidden(inp.call(block), i)) for inp in inputs]
                    del ctx
                bar.update(1)
    outside = [full for full, _ in linear_layers(model) if full not in walked]
    return BlockwiseRun(path, count, outside)
