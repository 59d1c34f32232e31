"""Quantization-aware training workflow: config → prepare_qat → train → convert.

>>> config = torchquant.qat.W8A8()
>>> qat_model = torchquant.prepare_qat(model, config)      # swaps Linear / Conv / Embedding
>>> ...train qat_model as usual...
>>> int_model = torchquant.convert(qat_model)               # real integer weights
>>> torchquant.save_quantized(int_model, "model.safetensors")
"""
from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple, Type, Union

from torch import nn

from torchquant.nn.qat import QATConv1d, QATConv2d, QATConvBn2d, QATEmbedding, QATLinear, QATModule
from torchquant.nn.quantized import QuantizedConv1d, QuantizedConv2d, QuantizedEmbedding, QuantizedModule
from torchquant.nn.quantized_linear import QuantizedLinear
from torchquant.spec import QuantSpec

__all__ = [
    "LayerQuant", "QuantConfig", "W8A8", "W4A8", "W4A16", "W8", "prepare_qat", "convert", "qat_report",
    "parameter_bytes", "QAT_MODULES",
]

# Float module type -> QAT module type.
QAT_MODULES: Dict[Type[nn.Module], Type[QATModule]] = {
    nn.Linear: QATLinear,
    nn.Conv1d: QATConv1d,
    nn.Conv2d: QATConv2d,
    nn.Embedding: QATEmbedding,
}


@dataclass(frozen=True)
class LayerQuant:
    """The quantizers of one layer: weight, input activation and (optionally) output."""

    weight: QuantSpec
    activation: Optional[QuantSpec] = None
    output: Optional[QuantSpec] = None


ModuleKey = Union[str, Type[nn.Module]]


@dataclass
class QuantConfig:
    """Which layers to quantize, and how.

    A layer's :class:`LayerQuant` is the first match of: ``exclude`` (name
    patterns, ``fnmatch`` style: left alone, with everything inside),
    ``by_name`` (name pattern → LayerQuant, or ``None`` to leave it alone),
    ``by_type`` (exact module type → LayerQuant), then ``default`` for the
    supported types.
    ``fold_bn`` trains Conv2d + BatchNorm2d pairs (adjacent in an
    ``nn.Sequential``) with the BN folded into the quantized weight.
    """

    default: Optional[LayerQuant] = None
    by_type: Dict[Type[nn.Module], Optional[LayerQuant]] = field(default_factory=dict)
    by_name: Dict[str, Optional[LayerQuant]] = field(default_factory=dict)
    exclude: Sequence[str] = ()
    fold_bn: bool = False

    def __post_init__(self) -> None:
        for t in self.by_type:
            if not (isinstance(t, type) and issubclass(t, nn.Module)):
                raise TypeError(f"QuantConfig.by_type keys must be nn.Module subclasses, got {t!r}")
            # Exact types only: prepare_qat swaps a layer only when its type is
            # exactly a supported one (a subclass may change forward), so a
            # subclass key would be accepted and then silently match nothing.
            if t not in QAT_MODULES:
                raise ValueError(
                    f"QuantConfig.by_type: no QAT version of {t.__name__}; supported types are "
                    f"{', '.join(b.__name__ for b in QAT_MODULES)}"
                )
        for key, value in [*self.by_type.items(), *self.by_name.items(), ("default", self.default)]:
            if value is not None and not isinstance(value, LayerQuant):
                raise TypeError(f"QuantConfig entry {key!r} must be a LayerQuant or None, got {type(value).__name__}")

    def is_excluded(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.exclude)

    def for_module(self, name: str, module: nn.Module) -> Optional[LayerQuant]:
        if self.is_excluded(name):
            return None
        if _float_type(module) is None:
            return None
        for pattern, lq in self.by_name.items():
            if fnmatch.fnmatchcase(name, pattern):
                return lq
        for t, lq in self.by_type.items():
            if isinstance(module, t):
                return lq
        return self.default


def _float_type(module: nn.Module) -> Optional[Type[nn.Module]]:
    if isinstance(module, (QATModule, QuantizedModule)):
        return None
    for base in QAT_MODULES:
        if type(module) is base:
            return base
    return None


# ---- presets ------------------------------------------------------------------

def _activation(bits: int, learnable: bool) -> QuantSpec:
    return QuantSpec(bits=bits, symmetric=False, granularity="tensor", observer="moving_average_minmax",
                     learnable=learnable)


def W8A8(learnable: bool = True, **kwargs) -> QuantConfig:
    """int8 per-channel symmetric weights, int8 per-tensor asymmetric activations."""
    weight = QuantSpec(bits=8, granularity="channel", axis=0, learnable=learnable)
    return QuantConfig(default=LayerQuant(weight, _activation(8, learnable)), **kwargs)


def W4A8(group_size: int = 128, learnable: bool = True, **kwargs) -> QuantConfig:
    """int4 per-group symmetric weights, int8 per-tensor asymmetric activations."""
    weight = QuantSpec(bits=4, granularity="group", group_size=group_size, learnable=learnable)
    return QuantConfig(default=LayerQuant(weight, _activation(8, learnable)), **kwargs)


def W4A16(group_size: int = 128, learnable: bool = True, **kwargs) -> QuantConfig:
    """Weight-only int4 per-group; activations stay in floating point."""
    weight = QuantSpec(bits=4, granularity="group", group_size=group_size, learnable=learnable)
    return QuantConfig(default=LayerQuant(weight), **kwargs)


def W8(learnable: bool = True, **kwargs) -> QuantConfig:
    """Weight-only int8 per-channel."""
    return QuantConfig(default=LayerQuant(QuantSpec(bits=8, granularity="channel", axis=0, learnable=learnable)),
                       **kwargs)


# ---- prepare / convert --------------------------------------------------------

def _check_fits(name: str, module: nn.Module, lq: LayerQuant) -> None:
    spec = lq.weight
    if spec.granularity == "group":
        cols = module.weight[0].numel()
        if cols % spec.group_size:
            raise ValueError(
                f"layer {name!r}: group_size={spec.group_size} does not divide its {cols} input features; "
                f"pick another group_size or exclude the layer"
            )
    if spec.granularity == "channel" and not -module.weight.dim() <= spec.axis < module.weight.dim():
        raise ValueError(f"layer {name!r}: axis={spec.axis} is out of range for its weight {tuple(module.weight.shape)}")


def _to_qat(name: str, module: nn.Module, lq: LayerQuant) -> nn.Module:
    _check_fits(name, module, lq)
    qat_cls = QAT_MODULES[_float_type(module)]
    return qat_cls.from_float(module, lq.weight, lq.activation, lq.output)


def prepare_qat(model: nn.Module, config: QuantConfig, inplace: bool = False) -> nn.Module:
    """Replace the layers ``config`` selects by QAT modules; see :func:`qat_report` for what changed.

    Works on any nesting (``Sequential``, ``ModuleList``, ``ModuleDict``,
    attributes of custom modules). Layers already converted are left alone,
    so calling it twice changes nothing. When ``model`` is itself a supported
    layer, its QAT layer is returned (sharing its parameters).
    """
    if not isinstance(config, QuantConfig):
        raise TypeError(f"prepare_qat: config must be a QuantConfig, got {type(config).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    # A bare layer cannot be swapped inside a parent: the QAT layer is returned
    # (it trains the same parameters).
    lq = config.for_module("", model)
    if lq is not None:
        return _to_qat("", model, lq)
    _prepare_children(model, "", config)
    return model


def _prepare_children(parent: nn.Module, prefix: str, config: QuantConfig) -> None:
    children = list(parent.named_children())
    skip = set()
    for i, (child_name, child) in enumerate(children):
        if child_name in skip:
            continue
        full = f"{prefix}{child_name}"
        if config.is_excluded(full):
            continue  # an excluded module keeps its whole subtree in floating point
        lq = config.for_module(full, child)
        if lq is None:
            _prepare_children(child, full + ".", config)
            continue
        nxt = children[i + 1] if i + 1 < len(children) else None
        if (config.fold_bn and isinstance(parent, nn.Sequential) and type(child) is nn.Conv2d and nxt is not None
                and type(nxt[1]) is nn.BatchNorm2d):
            _check_fits(full, child, lq)
            qat = QATConvBn2d.from_float_pair(child, nxt[1], lq.weight, lq.activation, lq.output)
            qat.bn_float_name = nxt[0]  # relative to the parent: stays valid if the model is wrapped
            setattr(parent, nxt[0], nn.Identity())
            skip.add(nxt[0])
        else:
            qat = _to_qat(full, child, lq)
        setattr(parent, child_name, qat)


def qat_report(model: nn.Module) -> List[Tuple[str, str, str, str]]:
    """``(layer, module type, weight grid, activation grid)`` of every QAT or quantized layer."""
    rows = []
    for name, mod in model.named_modules():
        if isinstance(mod, (QATModule, QuantizedModule)):
            act = getattr(mod, "input_fake_quant", None)
            rows.append((name, type(mod).__name__, _describe(mod.weight_spec), _describe(act.spec) if act else "-"))
    return rows


def _describe(spec: QuantSpec) -> str:
    grid = {"tensor": "tensor", "channel": f"channel(axis={spec.axis})", "group": f"group({spec.group_size})"}
    sym = "sym" if spec.symmetric else "asym"
    return f"int{spec.bits} {sym} {grid[spec.granularity]}{' learnable' if spec.learnable else ''}"


def convert(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Replace every QAT module by its inference module with integer weights.

    Linear layers become :class:`~torchquant.nn.QuantizedLinear` layers that
    run from their packed codes (2 to 8 bits; wider weights are refused with
    a ``ValueError`` naming the layer); convolutions and embeddings keep
    packed codes and dequantize on each call. Raises ``RuntimeError`` naming
    the layer when an activation quantizer has not seen data yet. The
    converted model's outputs equal the QAT model's in eval mode: bit for bit
    for convolutions and embeddings, up to float rounding for Linear layers
    (the kernels sum in another order).
    """
    if not inplace:
        model = copy.deepcopy(model)
    if isinstance(model, QATModule):  # a bare QAT layer: nothing to swap it inside
        return _to_quantized(model).eval()
    found = _convert_children(model, "")
    if not found and not any(isinstance(m, QuantizedModule) for m in model.modules()):
        raise ValueError("convert: the model has no QAT modules; call prepare_qat(model, config) first")
    return model.eval()


def _convert_children(parent: nn.Module, prefix: str) -> int:
    count = 0
    for name, child in list(parent.named_children()):
        full = f"{prefix}{name}"
        if isinstance(child, QATModule):
            try:
                setattr(parent, name, _to_quantized(child))
            except (RuntimeError, ValueError) as e:
                raise type(e)(f"convert: layer {full!r}: {e}") from None
            count += 1
        else:
            count += _convert_children(child, full + ".")
    return count


def _to_quantized(m: QATModule) -> QuantizedModule:
    fq = m.weight_fake_quant
    scale, zero_point = fq.calculate_qparams()
    if isinstance(m, QATConvBn2d):
        weight, bias = m.folded_weight_and_bias()
    else:
        weight, bias = m.weight, getattr(m, "bias", None)
    weight = weight.detach()
    if isinstance(m, QATLinear):
        return QuantizedLinear.from_grid(weight, bias, scale, zero_point, m.weight_spec, m.input_fake_quant,
                                         m.output_fake_quant)
    if isinstance(m, (QATConv1d, QATConv2d)):
        cfg = {"stride": list(m.stride), "padding": m.padding if isinstance(m.padding, str) else list(m.padding),
               "dilation": list(m.dilation), "groups": m.groups}
        if m.padding_mode != "zeros":
            raise RuntimeError(f"padding_mode={m.padding_mode!r} is not supported by the quantized conv")
        cls = QuantizedConv2d if isinstance(m, QATConv2d) else QuantizedConv1d
        q = cls(weight, bias, scale, zero_point, m.weight_spec, cfg, m.input_fake_quant, m.output_fake_quant)
        # load_quantized needs to know which float BatchNorm was folded away.
        q.folded_bn = getattr(m, "bn_float_name", None)
        return q
    if isinstance(m, QATEmbedding):
        return QuantizedEmbedding(weight, scale, zero_point, m.weight_spec, {"padding_idx": m.padding_idx},
                                  m.output_fake_quant)
    raise TypeError(f"convert: no quantized module for {type(m).__name__}")


def parameter_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (what a checkpoint stores)."""
    seen = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t is None or id(t) in seen:
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total
