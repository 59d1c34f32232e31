"""QAT modules: the float layers with fake-quantized weights and activations.

Each QAT module subclasses the float module it replaces, so it keeps its
parameters, their names and its state_dict keys; the quantizers add their own
state under ``weight_fake_quant.*``, ``input_fake_quant.*`` and
``output_fake_quant.*``. A float checkpoint loads into a QAT module (the
quantizer state is then calibrated from data), and
:func:`float_state_dict` gives back a checkpoint a float model loads.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchquant.nn.fake_quantize import FakeQuantize
from torchquant.spec import QuantSpec

__all__ = [
    "QATModule",
    "QATLinear",
    "QATConv1d",
    "QATConv2d",
    "QATConvBn2d",
    "QATEmbedding",
    "float_state_dict",
    "sibling_name",
]

_QUANTIZER_NAMES = ("weight_fake_quant", "input_fake_quant", "output_fake_quant")


class QATModule:
    """Mixin holding the quantizers of a QAT layer."""

    weight_fake_quant: FakeQuantize
    input_fake_quant: Optional[FakeQuantize]
    output_fake_quant: Optional[FakeQuantize]

    def _init_quantizers(self, weight: Optional[QuantSpec], activation: Optional[QuantSpec],
                         output: Optional[QuantSpec]) -> None:
        if weight is None:
            raise ValueError(f"{type(self).__name__} needs a weight QuantSpec, got None")
        self.weight_spec = weight
        self.weight_fake_quant = _weight_quantizer(weight)
        self.input_fake_quant = FakeQuantize(activation) if activation is not None else None
        self.output_fake_quant = FakeQuantize(output) if output is not None else None
        # The weight is known now: calibrate its grid at once, so learnable
        # grids have their final shape before an optimizer or DDP sees them.
        with torch.no_grad():
            was_training = self.weight_fake_quant.training
            self.weight_fake_quant.train()
            self.weight_fake_quant(self._weight_for_quant(self.weight.detach()))
            self.weight_fake_quant.train(was_training)

    def _weight_for_quant(self, weight: Tensor) -> Tensor:
        """The weight as the quantizer sees it: per-group grids group a 2-D view."""
        if self.weight_spec.granularity == "group" and weight.dim() > 2:
            return weight.reshape(weight.shape[0], -1)
        return weight

    def quantized_weight(self, weight: Optional[Tensor] = None) -> Tensor:
        """The fake-quantized weight used in the forward."""
        w = self.weight if weight is None else weight
        return self.weight_fake_quant(self._weight_for_quant(w)).reshape(w.shape)

    def _quantize_input(self, x: Tensor) -> Tensor:
        return self.input_fake_quant(x) if self.input_fake_quant is not None else x

    def _quantize_output(self, y: Tensor) -> Tensor:
        return self.output_fake_quant(y) if self.output_fake_quant is not None else y

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        # A float checkpoint has no quantizer state: recalibrate the weight
        # grid on the loaded weight instead of reporting keys as missing.
        quant_prefix = prefix + "weight_fake_quant."
        if not any(k.startswith(quant_prefix) for k in state_dict) and (prefix + "weight") in state_dict:
            with torch.no_grad():
                fq = self.weight_fake_quant
                fresh = _weight_quantizer(fq.spec, grad_factor=fq.grad_factor).to(self.weight.device)
                fresh(self._weight_for_quant(state_dict[prefix + "weight"].detach()))
                fq.load_state_dict(fresh.state_dict())

    def extra_repr(self) -> str:  # pragma: no cover - cosmetic
        return super().extra_repr() + f", weight_spec={self.weight_spec}"


def _weight_quantizer(spec: QuantSpec, grad_factor="lsq") -> FakeQuantize:
    """A weight's quantizer. Its observer stays local to the rank: data-parallel
    replicas hold the same weight, so there is nothing to all-reduce, and
    calibrating a weight (at construction, on loading a checkpoint) must not
    wait on other ranks."""
    fq = FakeQuantize(spec, grad_factor=grad_factor)
    fq.observer.sync_distributed = False
    return fq


def _allow_missing_quantizer_keys(module: nn.Module) -> None:
    """Lets float checkpoints load strictly into a QAT module."""

    def hook(mod, incompatible_keys):
        incompatible_keys.missing_keys[:] = [
            k for k in incompatible_keys.missing_keys if not any(q in k for q in _QUANTIZER_NAMES)
        ]

    module.register_load_state_dict_post_hook(hook)


class QATLinear(QATModule, nn.Linear):
    """``nn.Linear`` with a fake-quantized weight and (optionally) input / output."""

    @classmethod
    def from_float(cls, mod: nn.Linear, weight: QuantSpec, activation: Optional[QuantSpec] = None,
                   output: Optional[QuantSpec] = None) -> "QATLinear":
        qat = cls(mod.in_features, mod.out_features, bias=mod.bias is not None,
                  device=mod.weight.device, dtype=mod.weight.dtype)
        return _adopt(qat, mod, weight, activation, output)

    def forward(self, x: Tensor) -> Tensor:
        return self._quantize_output(F.linear(self._quantize_input(x), self.quantized_weight(), self.bias))


class _QATConvNd(QATModule):
    @classmethod
    def from_float(cls, mod, weight: QuantSpec, activation: Optional[QuantSpec] = None,
                   output: Optional[QuantSpec] = None):
        qat = cls(mod.in_channels, mod.out_channels, mod.kernel_size, stride=mod.stride, padding=mod.padding,
                  dilation=mod.dilation, groups=mod.groups, bias=mod.bias is not None,
                  padding_mode=mod.padding_mode, device=mod.weight.device, dtype=mod.weight.dtype)
        return _adopt(qat, mod, weight, activation, output)

    def forward(self, x: Tensor) -> Tensor:
        return self._quantize_output(self._conv_forward(self._quantize_input(x), self.quantized_weight(), self.bias))


class QATConv1d(_QATConvNd, nn.Conv1d):
    """``nn.Conv1d`` with a fake-quantized weight and (optionally) input / output."""


class QATConv2d(_QATConvNd, nn.Conv2d):
    """``nn.Conv2d`` with a fake-quantized weight and (optionally) input / output."""


class QATConvBn2d(QATConv2d):
    """Conv2d followed by BatchNorm2d, trained with the BN scale folded into the weight.

    As in PyTorch's ``ConvBn2d``: the weight seen by the quantizer is
    ``w * gamma / sqrt(running_var + eps)``, so the grid learnt during QAT is
    the grid of the weight that :func:`torchquant.convert` will store. The
    convolution's output is then un-scaled and normalised with the batch
    statistics while training (the running ones in eval), which keeps BN's
    training dynamics.
    """

    @classmethod
    def from_float_pair(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d, weight: QuantSpec,
                        activation: Optional[QuantSpec] = None, output: Optional[QuantSpec] = None) -> "QATConvBn2d":
        qat = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                  dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                  padding_mode=conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)
        qat.bn = bn  # before _adopt: the weight grid is calibrated on the BN-folded weight
        return _adopt(qat, conv, weight, activation, output)

    def _bn_scale(self) -> Tensor:
        return self.bn.weight / torch.sqrt(self.bn.running_var + self.bn.eps)

    def _weight_for_quant(self, weight: Tensor) -> Tensor:
        if hasattr(self, "bn"):
            weight = weight * self._bn_scale().detach().reshape(-1, 1, 1, 1)
        return super()._weight_for_quant(weight)

    def folded_weight_and_bias(self) -> tuple[Tensor, Tensor]:
        """The float weight and bias of the conv with the BN folded in (for convert())."""
        bn_scale = self._bn_scale()
        bias = self.bias if self.bias is not None else torch.zeros_like(self.bn.running_mean)
        folded_bias = (bias - self.bn.running_mean) * bn_scale + self.bn.bias
        return self.weight * bn_scale.reshape(-1, 1, 1, 1), folded_bias

    def forward(self, x: Tensor) -> Tensor:
        bn_scale = self._bn_scale()
        folded = self.quantized_weight()
        y = self._conv_forward(self._quantize_input(x), folded, None)
        y = y / bn_scale.reshape(1, -1, 1, 1)
        if self.bias is not None:
            y = y + self.bias.reshape(1, -1, 1, 1)
        return self._quantize_output(self.bn(y))


class QATEmbedding(QATModule, nn.Embedding):
    """``nn.Embedding`` with a fake-quantized table (activations are indices: not quantized)."""

    @classmethod
    def from_float(cls, mod: nn.Embedding, weight: QuantSpec, activation: Optional[QuantSpec] = None,
                   output: Optional[QuantSpec] = None) -> "QATEmbedding":
        qat = cls(mod.num_embeddings, mod.embedding_dim, padding_idx=mod.padding_idx, max_norm=mod.max_norm,
                  norm_type=mod.norm_type, scale_grad_by_freq=mod.scale_grad_by_freq, sparse=mod.sparse,
                  device=mod.weight.device, dtype=mod.weight.dtype)
        return _adopt(qat, mod, weight, None, output)

    def forward(self, idx: Tensor) -> Tensor:
        out = F.embedding(idx, self.quantized_weight(), self.padding_idx, self.max_norm, self.norm_type,
                          self.scale_grad_by_freq, self.sparse)
        return self._quantize_output(out)


def _adopt(qat, mod: nn.Module, weight: QuantSpec, activation: Optional[QuantSpec],
           output: Optional[QuantSpec]):
    """Finish a QAT module built from ``mod``: its parameters, its quantizers, float checkpoints."""
    _share_parameters(qat, mod)
    qat._init_quantizers(weight, activation, output)
    _allow_missing_quantizer_keys(qat)
    return qat


def _share_parameters(qat: nn.Module, mod: nn.Module) -> None:
    """The QAT module trains the float module's own parameters (same tensors)."""
    for name, p in mod.named_parameters(recurse=False):
        setattr(qat, name, p)
    for name, b in mod.named_buffers(recurse=False):
        qat.register_buffer(name, b)
    qat.train(mod.training)


def sibling_name(name: str, sibling: str) -> str:
    """Full name of the module called ``sibling`` in the parent of the module ``name``."""
    parent = name.rpartition(".")[0]
    return f"{parent}.{sibling}" if parent else sibling


def float_state_dict(model: nn.Module) -> Dict[str, Tensor]:
    """``model.state_dict()`` without quantizer state: loads strictly into the float model.

    A folded Conv+BN keeps its BatchNorm under ``<conv>.bn.*``; its entries
    go back to the BatchNorm's name in the float model (``bn_float_name``,
    the name of the conv's sibling that held it).
    """
    renames = {}
    for name, mod in model.named_modules():
        if isinstance(mod, QATConvBn2d) and getattr(mod, "bn_float_name", None):
            renames[f"{name}.bn." if name else "bn."] = sibling_name(name, mod.bn_float_name) + "."
    out = {}
    for key, value in model.state_dict().items():
        if any(f"{q}." in key for q in _QUANTIZER_NAMES):
            continue
        for old, new in renames.items():
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    return out
