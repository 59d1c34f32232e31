"""Input-channel scaling of Linear layers that leaves the float model unchanged.

SmoothQuant and AWQ both multiply the input columns of the Linear layers
that read one input by a per-channel factor ``s`` (``W' = W diag(s)``) and
divide that input by ``s``. Where the division can go depends on what
produces the input; a :class:`ScalingGroup` says it with its ``kind``:

* ``"norm"``: into the LayerNorm / RMSNorm producing the input, whose
  output feeds nothing else (pre-LN blocks): its weight and bias are divided
  by ``s``;
* ``"linear"``: into the Linear producing the input (its output rows and
  bias), when everything in between is linear per channel: attention's
  weighted sum of V (``v_proj -> o_proj``), the product with a gate
  (``up_proj -> down_proj``), ReLU, which is positively homogeneous (OPT's
  ``fc1 -> fc2``);
* ``"explicit"``: nowhere offline. Each layer becomes an
  :class:`~torchquant.nn.InputScaledLinear`, which divides its input at run
  time. This is the fallback for inputs that also feed a residual connection
  (the LayerNorms of post-LN encoders such as BERT), inputs that come out of
  GELU or SiLU, and blocks whose structure is not recognised.

The groups of a block come from rules on module names relative to the block
(:func:`scaling_groups`)::

    LLaMA / Mistral / Qwen2 (pre-LN)
      input_layernorm -> self_attn.{q,k,v}_proj          norm
      self_attn.v_proj -> self_attn.o_proj               linear, if v_proj is as wide as o_proj's input
                                                         (grouped-query attention: o_proj stays unscaled)
      post_attention_layernorm -> mlp.{gate,up}_proj     norm
      mlp.up_proj -> mlp.down_proj                       linear, if mlp.gate_proj exists
    OPT (pre-LN unless its config says do_layer_norm_before=False: then q, k, v, fc1 go explicit)
      self_attn_layer_norm -> self_attn.{q,k,v}_proj     norm
      self_attn.v_proj -> self_attn.out_proj             linear, widths as above
      final_layer_norm -> fc1                            norm
      fc1 -> fc2                                         linear, if activation_fn is ReLU (else fc2 stays
                                                         unscaled)
    BERT-style post-LN encoders (all-MiniLM-L6-v2, RoBERTa)
      attention.self.{query,key,value}                   explicit (their input also feeds the residual)
      attention.self.value -> attention.output.dense     linear
      intermediate.dense; output.dense                   explicit

The layers of a producer -> layers rule that does not hold (grouped-query
attention, a non-ReLU activation) are left out of every group: no offline
fold exists for them in an architecture that otherwise folds everything, and
their inputs are not LayerNorm outputs, where the outliers live. Every other ``nn.Linear`` of a
block goes into an explicit group with the layers that read the same input
tensor: found by running the block once when ``inputs`` are given, otherwise
each such layer is a group of its own.

A rule that does not hold for a model (a norm computing ``x̂ * (1 + w)``, a
norm whose output also feeds the residual connection) would change the
float model: :func:`check_invariance` runs the block again and says which
group moved its outputs. The drivers call it after every group.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from torchquant import ops
from torchquant.nn.input_scaled_linear import InputScaledLinear, check_scales
from torchquant.ptq.calibration import BlockInput, linear_layers, select_tokens

__all__ = ["KINDS", "ScalingGroup", "ScalingInvarianceError", "apply_scales", "block_outputs", "check_invariance",
           "scaling_groups"]

KINDS = ("norm", "linear", "explicit")


@dataclass
class ScalingGroup:
    """Linear layers reading one input, scaled by one ``s``, and where ``1 / s`` goes.

    Attributes:
        name: e.g. ``"model.layers.0.self_attn.qkv"`` (block name and rule label).
        layers: ``(full name, layer)`` of each ``nn.Linear`` reading the input.
        prev: the module producing the input, into which ``1 / s`` is folded
            (a norm for ``"norm"``, an ``nn.Linear`` for ``"linear"``);
            ``None`` for ``"explicit"``.
        prev_name: its full name.
        kind: ``"norm"``, ``"linear"`` or ``"explicit"`` (see the module doc).
    """

    name: str
    layers: List[Tuple[str, nn.Linear]]
    prev: Optional[nn.Module] = None
    prev_name: Optional[str] = None
    kind: str = "explicit"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"ScalingGroup {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if not self.layers:
            raise ValueError(f"ScalingGroup {self.name!r}: layers must hold at least one nn.Linear")
        for name, layer in self.layers:
            if not isinstance(layer, nn.Linear):
                raise TypeError(f"ScalingGroup {self.name!r}: layer {name!r} is a {type(layer).__name__}, not an "
                                "nn.Linear")
        widths = {layer.in_features for _, layer in self.layers}
        if len(widths) != 1:
            raise ValueError(f"ScalingGroup {self.name!r}: its layers read inputs of different widths "
                             f"{sorted(widths)}; one scale vector cannot serve them")
        if (self.prev is None) != (self.kind == "explicit"):
            raise ValueError(f"ScalingGroup {self.name!r}: kind {self.kind!r} "
                             + ("takes no prev (the layers divide their own input)" if self.kind == "explicit"
                                else "needs prev, the module its 1/s is folded into"))

    @property
    def in_features(self) -> int:
        return self.layers[0][1].in_features

    @property
    def names(self) -> List[str]:
        return [name for name, _ in self.layers]

    @property
    def weights(self) -> List[Tensor]:
        return [layer.weight for _, layer in self.layers]


# ---------------------------------------------------------------------------- rules

# condition(model, block) -> whether the rule holds for this model.
Condition = Callable[[nn.Module, nn.Module], bool]


@dataclass(frozen=True)
class _Rule:
    label: str
    layers: Tuple[str, ...]
    kind: str
    prev: Optional[str] = None
    condition: Optional[Condition] = None


def _pre_layer_norm(model: nn.Module, block: nn.Module) -> bool:
    # OPT-350m normalises after the residual addition (post-LN) and says so in its config.
    return getattr(getattr(model, "config", None), "do_layer_norm_before", True) is not False


def _relu_activation(model: nn.Module, block: nn.Module) -> bool:
    return isinstance(getattr(block, "activation_fn", None), nn.ReLU)


def _gated_mlp(model: nn.Module, block: nn.Module) -> bool:
    # down_proj(act(gate_proj(x)) * up_proj(x)) is linear in up_proj's output, channel by channel.
    return isinstance(_submodule(block, "mlp.gate_proj"), nn.Linear)


_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_RULES: Tuple[_Rule, ...] = (
    # LLaMA / Mistral / Qwen2.
    _Rule("self_attn.qkv", _QKV, "norm", "input_layernorm"),
    _Rule("self_attn.o_proj", ("self_attn.o_proj",), "linear", "self_attn.v_proj"),
    _Rule("mlp.gate_up", ("mlp.gate_proj", "mlp.up_proj"), "norm", "post_attention_layernorm"),
    _Rule("mlp.down_proj", ("mlp.down_proj",), "linear", "mlp.up_proj", _gated_mlp),
    # OPT.
    _Rule("self_attn.qkv", _QKV, "norm", "self_attn_layer_norm", _pre_layer_norm),
    _Rule("self_attn.out_proj", ("self_attn.out_proj",), "linear", "self_attn.v_proj"),
    _Rule("fc1", ("fc1",), "norm", "final_layer_norm", _pre_layer_norm),
    _Rule("fc2", ("fc2",), "linear", "fc1", _relu_activation),
    # BERT-style post-LN encoders: the LayerNorm outputs also feed the residual connections.
    _Rule("attention.self.qkv", ("attention.self.query", "attention.self.key", "attention.self.value"), "explicit"),
    _Rule("attention.output.dense", ("attention.output.dense",), "linear", "attention.self.value"),
    _Rule("intermediate.dense", ("intermediate.dense",), "explicit"),
    _Rule("output.dense", ("output.dense",), "explicit"),
)


def _submodule(module: nn.Module, path: str) -> Optional[nn.Module]:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def _foldable_norm(module: nn.Module, width: int) -> bool:
    """A norm layer with an elementwise affine ``[width]`` weight (and optional bias) to fold into."""
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    return (not isinstance(module, nn.Linear) and isinstance(weight, Tensor) and weight.dim() == 1
            and weight.numel() == width and (bias is None or (isinstance(bias, Tensor) and bias.shape == weight.shape)))


def _match(rule: _Rule, model: nn.Module, block: nn.Module) -> Optional[Tuple[List[nn.Linear], Optional[nn.Module]]]:
    layers = [_submodule(block, path) for path in rule.layers]
    if not all(isinstance(m, nn.Linear) for m in layers) or len({m.in_features for m in layers}) != 1:
        return None
    width = layers[0].in_features
    prev = None
    if rule.prev is not None:
        prev = _submodule(block, rule.prev)
        if rule.kind == "norm" and (prev is None or not _foldable_norm(prev, width)):
            return None
        if rule.kind == "linear" and not (isinstance(prev, nn.Linear) and prev.out_features == width):
            return None
    if rule.condition is not None and not rule.condition(model, block):
        return None
    return layers, prev


# ---------------------------------------------------------------------------- groups of a block

def _shared_inputs(block: nn.Module, layers: Dict[str, nn.Linear], call: BlockInput) -> Tuple[Dict[str, int],
                                                                                             Dict[str, Tuple]]:
    """One run of ``block``: each layer's first-call index and the identity of the input tensor it read."""
    order: Dict[str, int] = {}
    key: Dict[str, Tuple] = {}
    alive: List[Tensor] = []  # a freed input's address could be reused by an unrelated one

    def hook(name: str):
        def fn(module, args, kwargs):
            x = args[0] if args else kwargs.get("input")
            if name in order or not isinstance(x, Tensor):
                return
            alive.append(x)
            order[name] = len(order)
            key[name] = (x.data_ptr(), tuple(x.shape), x.stride(), x.dtype, x.device)
        return fn

    handles = [m.register_forward_pre_hook(hook(name), with_kwargs=True) for name, m in layers.items()]
    try:
        with torch.no_grad():
            call.call(block)
    finally:
        for h in handles:
            h.remove()
    return order, key


def _explicit_name(names: List[str]) -> str:
    """``"attn.wq+wk+wv"`` for layers under one parent, the layer's own name for one layer."""
    if len(names) == 1:
        return names[0]
    parts = [n.split(".") for n in names]
    common = 0
    while all(len(p) > common + 1 and p[common] == parts[0][common] for p in parts):
        common += 1
    prefix = ".".join(parts[0][:common])
    joined = "+".join(".".join(p[common:]) for p in parts)
    return f"{prefix}.{joined}" if prefix else joined


def scaling_groups(model: nn.Module, block_name: str, block: nn.Module,
                   inputs: Optional[Sequence[BlockInput]] = None) -> List[ScalingGroup]:
    """The scaling groups of one block; a layer is in one group at most.

    Args:
        model: the whole model (its ``config`` may decide a rule, e.g. OPT's
            ``do_layer_norm_before``).
        block_name: the block's full name (``"model.layers.3"``); ``""`` when
            the block is the model itself.
        block: the block.
        inputs: calls of the block (e.g. ``BlockContext.inputs``). When given,
            the block runs once on the first, so that Linear layers no rule
            covers are grouped by the input tensor they share, and the groups
            come in forward order; otherwise each such layer is a group of its
            own and the rule groups come first.

    Returns:
        The groups (see the module doc for the rules). Not in any group: QAT
        layers (:func:`~torchquant.ptq.calibration.linear_layers`) and the
        layers of a Linear -> Linear rule that does not hold (``o_proj``
        under grouped-query attention).
    """
    if not isinstance(block, nn.Module):
        raise TypeError(f"block must be an nn.Module, got {type(block).__name__}")

    def full(rel: str) -> str:
        return f"{block_name}.{rel}" if block_name and rel else (block_name or rel)

    linears = dict(linear_layers(block))
    claimed: set = set()
    unscaled: set = set()  # the layers of a Linear -> Linear rule that does not hold here
    groups: List[ScalingGroup] = []
    for rule in _RULES:
        if claimed.intersection(rule.layers):
            continue
        found = _match(rule, model, block)
        if found is None:
            if rule.kind == "linear" and all(path in linears for path in rule.layers):
                unscaled.update(rule.layers)
            continue
        layers, prev = found
        groups.append(ScalingGroup(full(rule.label), [(full(p), m) for p, m in zip(rule.layers, layers)], prev,
                                   full(rule.prev) if rule.prev is not None else None, rule.kind))
        claimed.update(rule.layers)

    rest = [rel for rel in linears if rel not in claimed and rel not in unscaled]
    order: Dict[str, int] = {}
    if inputs:
        order, key = _shared_inputs(block, linears, inputs[0])
        by_input: Dict[Any, List[str]] = {}
        for rel in rest:
            by_input.setdefault(key.get(rel, ("not called", rel)), []).append(rel)
        shared = list(by_input.values())
    else:
        shared = [[rel] for rel in rest]
    for names in shared:
        groups.append(ScalingGroup(full(_explicit_name(names)), [(full(n), linears[n]) for n in names]))
    if order:
        prefix = len(block_name) + 1 if block_name else 0
        never = len(order)
        groups.sort(key=lambda g: min(order.get(n[prefix:], never) for n in g.names))
    return groups


# ---------------------------------------------------------------------------- applying

@torch.no_grad()
def apply_scales(group: ScalingGroup, s: Tensor) -> None:
    """Multiplies the input columns of the group's layers by ``s`` and divides their input by ``s``, in place.

    ``"norm"`` and ``"linear"``: the SmoothQuant fold op divides the
    producer's weight (a norm's ``[in]`` weight, a Linear's output rows) and
    bias by ``s`` and multiplies the layers' columns by it. ``"explicit"``:
    each layer becomes an :class:`~torchquant.nn.InputScaledLinear`
    (:meth:`~torchquant.nn.InputScaledLinear.convert_`; the module objects
    stay the same). Each tensor keeps its dtype and is rounded once.

    Args:
        group: a :class:`ScalingGroup`.
        s: ``[in_features]``, positive and finite.
    """
    if not isinstance(group, ScalingGroup):
        raise TypeError(f"group must be a ScalingGroup, got {type(group).__name__}")
    s = check_scales(s, group.in_features, f"apply_scales (group {group.name!r})")
    if group.kind == "explicit":
        for _, layer in group.layers:
            InputScaledLinear.convert_(layer, s)
        return
    weight = group.prev.weight
    bias = getattr(group.prev, "bias", None)
    ops.smoothquant_fold_(weight, bias if isinstance(bias, Tensor) else None, group.weights, s.to(weight.device))


# ---------------------------------------------------------------------------- checking

class ScalingInvarianceError(RuntimeError):
    """Scaling a group changed the float model's outputs: its rule does not hold for this model."""


def _hidden(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"a block output must be a Tensor or a tuple whose first element is the hidden states, got "
                    f"{type(out).__name__}")


def block_outputs(block: nn.Module, inputs: Sequence[BlockInput]) -> List[Tensor]:
    """The block's hidden-state output for each call, restricted to the call's real tokens."""
    with torch.no_grad():
        return [select_tokens(_hidden(inp.call(block)), inp.token_mask) for inp in inputs]


_DEFAULT_RTOL = {torch.float16: 3e-2, torch.bfloat16: 1e-1}


def _hint(group: ScalingGroup) -> str:
    layers = ", ".join(group.names)
    if group.kind == "norm":
        return (f"the output of {group.prev_name} must feed only {layers} and be normalised(x) * weight + bias: in a "
                "post-LN block it also feeds the residual connection, and some norms compute "
                "normalised(x) * (1 + weight)")
    if group.kind == "linear":
        return (f"everything between {group.prev_name} and {layers} must be linear channel by channel (attention's "
                "weighted sum of V, a product with a gate, ReLU)")
    return f"{layers} must compute F.linear(x / input_scale, weight, bias)"


def check_invariance(block: nn.Module, inputs: Sequence[BlockInput], outputs_before: Sequence[Any],
                     rtol: Optional[float] = None, *, group: Optional[ScalingGroup] = None) -> float:
    """Runs ``block`` on ``inputs`` again; raises if its float outputs moved.

    Args:
        block: the block, after scaling.
        inputs: its calls (:class:`~torchquant.ptq.calibration.BlockInput`).
        outputs_before: the block's outputs on the same calls before scaling,
            as the block returned them (a tensor or a tuple led by the hidden
            states) or from :func:`block_outputs`.
        rtol: the largest allowed ``max |after - before| / max |before|``
            over the real tokens; default ``1e-3`` for float32 and float64
            outputs, ``3e-2`` for float16, ``1e-1`` for bfloat16 (a few
            roundings of the scaled weights, far below what a wrong rule
            causes).
        group: the group just scaled, named in the error.

    Returns:
        The relative deviation measured.

    Raises:
        ScalingInvarianceError: naming the group and the rule's assumption.
    """
    if len(outputs_before) != len(inputs):
        raise ValueError(f"check_invariance: {len(outputs_before)} outputs_before for {len(inputs)} inputs")
    before = [select_tokens(_hidden(out).detach(), inp.token_mask) for out, inp in zip(outputs_before, inputs)]
    after = block_outputs(block, inputs)
    err, ref = 0.0, 0.0
    for a, b in zip(after, before):
        if a.shape != b.shape:
            raise ScalingInvarianceError(f"check_invariance: the block's output shape changed from {list(b.shape)} "
                                         f"to {list(a.shape)}")
        if b.numel():
            err = max(err, float((a.double() - b.double()).abs().max()))
            ref = max(ref, float(b.double().abs().max()))
    tol = rtol if rtol is not None else _DEFAULT_RTOL.get(before[0].dtype if before else torch.float32, 1e-3)
    rel = err / ref if ref > 0 else err
    if not rel <= tol:  # NaN fails too
        what = (f"scaling group {group.name!r} ({group.kind})" if group is not None else "scaling")
        hint = f" The rule's assumption: {_hint(group)}." if group is not None else ""
        raise ScalingInvarianceError(
            f"{what} changed the float block's outputs: max |after - before| = {err:.3g}, {rel:.3g} of max |before| "
            f"(tolerance {tol:.1g}).{hint}")
    return rel
