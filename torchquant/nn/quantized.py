"""Inference modules holding real integer weights (what :func:`torchquant.convert` produces).

:class:`QuantizedModule` is what every quantized layer shares: input and
output quantizers frozen at conversion time, and the description
:func:`torchquant.save_quantized` writes to rebuild it. Linear layers run
from packed integers through the quantized-linear kernels
(:class:`torchquant.nn.QuantizedLinear`). Convolutions and embeddings store
packed unsigned codes (``qweight``, see :mod:`torchquant.formats`) with
float32 ``scale`` / ``zero_point`` per grid, and dequantize the weight on
each call, keeping no float copy; their outputs match the QAT model in eval
mode bit for bit.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchquant import formats
from torchquant.nn.fake_quantize import FakeQuantize
from torchquant.spec import QuantSpec

__all__ = ["QuantizedConv1d", "QuantizedConv2d", "QuantizedEmbedding", "QuantizedModule", "frozen_quantizer"]


def spec_to_dict(spec: QuantSpec) -> Dict[str, Any]:
    return dict(spec.__dict__)


def spec_from_dict(d: Dict[str, Any]) -> QuantSpec:
    return QuantSpec(**d)


class QuantizedModule(nn.Module):
    """What every quantized layer shares: frozen activation quantizers and its description for a checkpoint.

    A subclass has ``weight_spec``, ``weight_shape``, the submodules (or
    None) ``input_fake_quant`` / ``output_fake_quant``, and implements
    :meth:`from_metadata`.
    """

    # Name of the BatchNorm sibling folded into this conv (Conv+BN QAT), which
    # the float architecture still has and a loaded checkpoint must drop.
    folded_bn: Optional[str] = None

    def _init_activation_quant(self, input_fq: Optional[FakeQuantize], output_fq: Optional[FakeQuantize]) -> None:
        self.input_fake_quant = frozen_quantizer(input_fq)
        self.output_fake_quant = frozen_quantizer(output_fq)

    def _quantize_input(self, x: Tensor) -> Tensor:
        return self.input_fake_quant(x) if self.input_fake_quant is not None else x

    def _quantize_output(self, y: Tensor) -> Tensor:
        return self.output_fake_quant(y) if self.output_fake_quant is not None else y

    def quant_metadata(self) -> Dict[str, Any]:
        """What :func:`torchquant.load_quantized` needs to rebuild this module."""
        meta = {"kind": type(self).__name__, "weight_spec": spec_to_dict(self.weight_spec),
                "weight_shape": list(self.weight_shape), "config": self._config(),
                "folded_bn": self.folded_bn}
        for name in ("input_fake_quant", "output_fake_quant"):
            fq = getattr(self, name)
            meta[name] = spec_to_dict(fq.spec) if fq is not None else None
        return meta

    def _config(self) -> Dict[str, Any]:
        return {}

    @classmethod
    def from_metadata(cls, meta: Dict[str, Any], tensors: Dict[str, Tensor]) -> "QuantizedModule":
        """Rebuild a module saved with :meth:`quant_metadata` from its tensors (keys without prefix)."""
        raise NotImplementedError

    def _restore_activation_quant(self, meta: Dict[str, Any], tensors: Dict[str, Tensor]) -> None:
        for name in ("input_fake_quant", "output_fake_quant"):
            spec = meta.get(name)
            fq = None
            if spec is not None:
                fq = FakeQuantize(spec_from_dict(spec)).disable_observer().eval()
                sub = {k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")}
                fq.load_state_dict(sub)
            setattr(self, name, fq)


class _DequantizingModule(QuantizedModule):
    """Packed codes and grids of a conv or embedding weight, dequantized on each call (no float copy is kept)."""

    def _store_weight(self, weight: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec) -> None:
        self.weight_spec = spec
        self.weight_shape = tuple(weight.shape)
        view = self._grid_view(weight)
        codes = formats.quantize(view, scale, zero_point, spec.quant_min, spec.quant_max, **self._grid_kwargs())
        self.register_buffer("qweight", formats.pack_codes(codes, spec.bits, spec.quant_min))
        self.register_buffer("scale", scale.detach().float().clone())
        self.register_buffer("zero_point", zero_point.detach().float().round().clone())

    def _grid_view(self, weight: Tensor) -> Tensor:
        if self.weight_spec.granularity == "group" and weight.dim() > 2:
            return weight.reshape(weight.shape[0], -1)
        return weight

    def _grid_kwargs(self) -> Dict[str, Optional[int]]:
        s = self.weight_spec
        return {"axis": s.axis if s.granularity == "channel" else None,
                "group_size": s.group_size if s.granularity == "group" else None}

    def weight_codes(self) -> Tensor:
        """The integer codes (int32) in the shape of the quantizer's view of the weight."""
        numel = 1
        for d in self.weight_shape:
            numel *= d
        codes = formats.unpack_codes(self.qweight, self.weight_spec.bits, self.weight_spec.quant_min, numel)
        view_shape = self._grid_view(torch.empty(self.weight_shape, device="meta")).shape
        return codes.reshape(view_shape)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        w = formats.dequantize(self.weight_codes(), self.scale, self.zero_point, dtype=dtype, **self._grid_kwargs())
        return w.reshape(self.weight_shape)

    @classmethod
    def from_metadata(cls, meta: Dict[str, Any], tensors: Dict[str, Tensor]) -> "QuantizedModule":
        """Rebuild a module saved with :meth:`quant_metadata` from its tensors (keys without prefix)."""
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.weight_spec = spec_from_dict(meta["weight_spec"])
        m.weight_shape = tuple(meta["weight_shape"])
        m.folded_bn = meta.get("folded_bn")
        m._restore_config(meta["config"])
        for name in ("qweight", "scale", "zero_point"):
            if name not in tensors:
                raise KeyError(f"quantized checkpoint is missing {name!r} for a {cls.__name__}")
            m.register_buffer(name, tensors[name])
        if "bias" in tensors or cls is not QuantizedEmbedding:
            m.register_buffer("bias", tensors.get("bias"))
        m._restore_activation_quant(meta, tensors)
        return m

    def _restore_config(self, config: Dict[str, Any]) -> None:
        pass

    def extra_repr(self) -> str:
        return f"weight={self.weight_shape}, bits={self.weight_spec.bits}, granularity={self.weight_spec.granularity}"


def frozen_quantizer(fq: Optional[FakeQuantize]) -> Optional[FakeQuantize]:
    """A copy of a calibrated quantizer with its grid fixed (observer off, eval mode), or None."""
    if fq is None:
        return None
    if not fq.is_calibrated:
        raise RuntimeError("an activation quantizer has observed no data: calibrate (run a few batches in training "
                           "mode) before convert()")
    frozen = FakeQuantize(fq.spec.with_(learnable=False), grad_factor=fq.grad_factor)
    scale, zero_point = fq.calculate_qparams()
    frozen.observer.min_val, frozen.observer.max_val = fq.min_val.detach().clone(), fq.max_val.detach().clone()
    frozen.scale, frozen.zero_point = scale, zero_point
    return frozen.disable_observer().eval()


class _QuantizedConvNd(_DequantizingModule):
    _conv = None

    def __init__(self, weight: Tensor, bias: Optional[Tensor], scale: Tensor, zero_point: Tensor, spec: QuantSpec,
                 conv_config: Dict[str, Any], input_fq: Optional[FakeQuantize] = None,
                 output_fq: Optional[FakeQuantize] = None) -> None:
        super().__init__()
        self.conv_config = dict(conv_config)
        self._store_weight(weight, scale, zero_point, spec)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._init_activation_quant(input_fq, output_fq)

    def _config(self) -> Dict[str, Any]:
        return self.conv_config

    def _restore_config(self, config: Dict[str, Any]) -> None:
        self.conv_config = dict(config)

    def forward(self, x: Tensor) -> Tensor:
        c = self.conv_config
        w = self.dequantized_weight(x.dtype)
        y = type(self)._conv(self._quantize_input(x), w, self.bias, c["stride"], c["padding"], c["dilation"],
                             c["groups"])
        return self._quantize_output(y)


class QuantizedConv1d(_QuantizedConvNd):
    _conv = staticmethod(F.conv1d)


class QuantizedConv2d(_QuantizedConvNd):
    _conv = staticmethod(F.conv2d)


class QuantizedEmbedding(_DequantizingModule):
    def __init__(self, weight: Tensor, scale: Tensor, zero_point: Tensor, spec: QuantSpec,
                 embedding_config: Dict[str, Any], output_fq: Optional[FakeQuantize] = None) -> None:
        super().__init__()
        self.embedding_config = dict(embedding_config)
        self._store_weight(weight, scale, zero_point, spec)
        self._init_activation_quant(None, output_fq)

    def _config(self) -> Dict[str, Any]:
        return self.embedding_config

    def _restore_config(self, config: Dict[str, Any]) -> None:
        self.embedding_config = dict(config)

    def forward(self, idx: Tensor) -> Tensor:
        c = self.embedding_config
        return self._quantize_output(F.embedding(idx, self.dequantized_weight(), c["padding_idx"]))
