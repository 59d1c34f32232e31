"""The one Linear layer every quantized model of torchquant runs: packed integer weights, no float copy.

``QuantizedLinear`` holds a :class:`~torchquant.quantized_weight.QuantizedWeight`
as buffers (the packed codes, the grids, the lookup table and the column
permutation of act-order weights) and computes ``y = x W^T + b`` with the
run-time kernels, never forming the float weight:

* weight-only (``activations="float"``): float activations times the packed
  weight, ``torchquant.ops.quantized_linear``;
* W8A8 (``"int8_per_token"`` / ``"int8_per_tensor"``): int8 activations times
  int8 weights with int32 accumulation, ``torchquant.ops.w8a8_linear``; per
  token the kernel finds each row's grid, per tensor the grid is ``act_scale``
  (static, from calibration) or ``max|x| / 127.5`` of each input (dynamic);
* LLM.int8() (``"llm_int8"``): W8A8 per token, with the input columns that
  hold a value of magnitude ``>= outlier_threshold`` multiplied in float.

A weight with double-quantized scales (NF4 / FP4 for QLoRA) keeps its scales
in 8 bits (``scale_codes`` ...); each call forms the float32 grid first.

Every producer makes this module: QAT's ``convert()``, RTN, GPTQ, AWQ and
SmoothQuant. What varies is an attribute, not a subclass:

* ``input_scale`` ``[in]``: AWQ / SmoothQuant scales that nothing before the
  layer could absorb; the input is divided by it first;
* ``input_fake_quant`` / ``output_fake_quant``: the activation quantizers of
  a QAT model, frozen at conversion;
* ``layout``: the checkpoint layout of its ``state_dict``
  (:mod:`torchquant.layouts`): GPTQ, AWQ GEMM, W8A8 or torchquant's own. The
  state dict is written and read in that layout, repacking at load.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional, Union

import torch
from torch import Tensor

from torchquant import ops
from torchquant.layouts import CheckpointLayout, RuntimeLayout, TorchquantLayout, layout_from_config
from torchquant.layouts.w8a8 import check_int8_weight
from torchquant.nn.fake_quantize import FakeQuantize
from torchquant.nn.quantized import QuantizedModule, frozen_quantizer, spec_from_dict
from torchquant.quantized_weight import QuantizedScales, QuantizedWeight
from torchquant.spec import QuantSpec

__all__ = ["QuantizedLinear", "ACTIVATIONS"]

ACTIVATIONS = ("float", "int8_per_token", "int8_per_tensor", "llm_int8")
# LLM.int8()'s outlier threshold (Dettmers et al. 2022 and bitsandbytes use 6.0).
DEFAULT_OUTLIER_THRESHOLD = 6.0
# The symmetric int8 grid of activations: max|x| maps to 127.5 steps (as quantize_per_token's).
_INT8_HALF_RANGE = 127.5
_EPS = torch.finfo(torch.float32).eps
# Buffers the kernels read in float32 whatever the module's dtype: a dtype cast of the module moves them only.
_FLOAT32_BUFFERS = ("group_scales", "group_zeros", "code_table", "act_scale", "scale_absmax", "scale_offset",
                    "scale_code_map")
_WEIGHT_BUFFERS = ("packed_weight", "group_scales", "group_zeros", "code_table", "column_perm")
# The 8-bit form of double-quantized scales (QuantizedScales), in place of group_scales.
_SCALE_BUFFERS = ("scale_codes", "scale_absmax", "scale_offset", "scale_code_map")


def _check_vector(t, name: str, length: int, where: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{where}: {name} must be a Tensor of shape [{length}], got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{where}: {name} must be floating point, got {t.dtype}")
    if t.dim() != 1 or t.numel() != length:
        raise ValueError(f"{where}: {name} must have shape [{length}], got {list(t.shape)}")
    return t.detach()


def _check_positive(t: Tensor, name: str, where: str) -> None:
    if t.device.type != "meta" and (not bool(torch.isfinite(t).all()) or not bool((t > 0).all())):
        raise ValueError(f"{where}: {name} must be positive and finite")


class QuantizedLinear(QuantizedModule):
    """``y = x W^T + b`` from a packed integer weight (see the module docstring).

    Args:
        weight: the :class:`~torchquant.quantized_weight.QuantizedWeight`
            (its tensors become the module's buffers, not copied).
        bias: ``[out]`` float tensor (kept in its dtype, added in float32) or None.
        layout: the checkpoint layout of the state dict; by default the
            run-time tensors themselves (:class:`~torchquant.layouts.RuntimeLayout`).
        activations: ``"float"`` (weight-only), ``"int8_per_token"`` or
            ``"int8_per_tensor"`` (W8A8: needs 8-bit codes on a symmetric
            grid per output channel).
        act_scale: with ``"int8_per_tensor"``, a static activation scale
            (a number or a one-element tensor); None measures each input.
        input_scale: ``[in]`` positive scales dividing the input, or None.
        input_fq, output_fq: frozen activation quantizers (QAT), or None.
        outlier_threshold: with ``"llm_int8"``, the magnitude from which an
            input column is an outlier (default 6.0).
    """

    def __init__(self, weight: QuantizedWeight, bias: Optional[Tensor] = None, *,
                 layout: Optional[CheckpointLayout] = None, activations: str = "float",
                 act_scale: Union[float, Tensor, None] = None, input_scale: Optional[Tensor] = None,
                 input_fq: Optional[FakeQuantize] = None, output_fq: Optional[FakeQuantize] = None,
                 outlier_threshold: Optional[float] = None) -> None:
        super().__init__()
        kind = type(self).__name__
        if not isinstance(weight, QuantizedWeight):
            raise TypeError(f"{kind}: weight must be a QuantizedWeight, got {type(weight).__name__}")
        if activations not in ACTIVATIONS:
            raise ValueError(f"{kind}: activations must be one of {ACTIVATIONS}, got {activations!r}")
        if act_scale is not None and activations != "int8_per_tensor":
            raise ValueError(f"{kind}: act_scale is a static per-tensor activation scale: it needs "
                             f"activations='int8_per_tensor' (got {activations!r})")
        if outlier_threshold is not None and activations != "llm_int8":
            raise ValueError(f"{kind}: outlier_threshold is LLM.int8()'s: it needs activations='llm_int8' (got "
                             f"{activations!r})")
        if activations == "llm_int8":
            outlier_threshold = DEFAULT_OUTLIER_THRESHOLD if outlier_threshold is None else outlier_threshold
            if isinstance(outlier_threshold, bool) or not isinstance(outlier_threshold, (int, float)) or \
                    not math.isfinite(outlier_threshold) or outlier_threshold <= 0:
                raise ValueError(f"{kind}: outlier_threshold must be a positive finite number, got "
                                 f"{outlier_threshold!r}")
            outlier_threshold = float(outlier_threshold)
        self.outlier_threshold = outlier_threshold
        self.layout = RuntimeLayout.of(weight) if layout is None else layout
        if not isinstance(self.layout, CheckpointLayout):
            raise TypeError(f"{kind}: layout must be a CheckpointLayout, got {type(self.layout).__name__}")
        self.activations = activations
        self._set_weight(weight)
        device = weight.device
        if bias is not None:
            bias = _check_vector(bias, "bias", self.out_features, kind).to(device).clone()
        self._set_optional_buffer("bias", bias)
        if act_scale is not None:
            act_scale = torch.as_tensor(act_scale, dtype=torch.float32, device=device).detach().reshape(-1).clone()
            if act_scale.numel() != 1:
                raise ValueError(f"{kind}: act_scale must be a single number (one per-tensor scale), got "
                                 f"{act_scale.numel()} values")
            _check_positive(act_scale, "act_scale", kind)
        self._set_optional_buffer("act_scale", act_scale)
        if input_scale is not None:
            input_scale = _check_vector(input_scale, "input_scale", self.in_features, kind).to(device).clone()
            _check_positive(input_scale, "input_scale", kind)
        self._set_optional_buffer("input_scale", input_scale)
        self.input_fake_quant, self.output_fake_quant = input_fq, output_fq

    @classmethod
    def from_grid(cls, weight: Tensor, bias: Optional[Tensor], scale: Tensor, zero_point: Tensor, spec: QuantSpec,
                  input_fq: Optional[FakeQuantize] = None,
                  output_fq: Optional[FakeQuantize] = None) -> "QuantizedLinear":
        """A float weight ``[out, in]`` rounded on a QAT quantizer's grid (what :func:`torchquant.convert` does).

        Saved in torchquant's own layout; the activation quantizers (if any)
        are copied with their grids frozen.
        """
        layout = TorchquantLayout(spec)
        return cls(layout.quantize(weight, scale, zero_point), None if bias is None else bias.detach(),
                   layout=layout, input_fq=frozen_quantizer(input_fq), output_fq=frozen_quantizer(output_fq))

    @classmethod
    def _from_weight(cls, weight: QuantizedWeight, bias: Optional[Tensor], layout: CheckpointLayout,
                     **settings) -> "QuantizedLinear":
        """A ``cls`` built from a weight: what the constructors of the named subclasses (which build empty
        layers of a fixed layout) share."""
        layer = cls.__new__(cls)
        QuantizedLinear.__init__(layer, weight, bias, layout=layout, **settings)
        return layer

    # ---- the weight ----------------------------------------------------------------------------

    def _set_weight(self, weight: QuantizedWeight) -> None:
        self.layout.check_weight(weight)
        if self.activations != "float":
            check_int8_weight(weight, f"{type(self).__name__}: activations={self.activations!r} (W8A8)")
        dq = weight.quantized_scales
        tensors = (weight.packed, None if dq is not None else weight.scales, weight.stored_zeros, weight.lut,
                   weight.perm)
        for name, t in zip(_WEIGHT_BUFFERS, tensors):
            self._set_optional_buffer(name, t, persistent=False)
        for name, t in zip(_SCALE_BUFFERS, dq.tensors() if dq is not None else (None,) * len(_SCALE_BUFFERS)):
            self._set_optional_buffer(name, t, persistent=False)
        self.scale_block_size = dq.block_size if dq is not None else None
        self.num_groups = weight.num_groups
        self.bits, self.in_features, self.out_features = weight.bits, weight.in_features, weight.out_features
        self.packed_bits = weight.layout_bits

    def _set_optional_buffer(self, name: str, t: Optional[Tensor], persistent: bool = True) -> None:
        """A buffer, or a plain attribute None when absent.

        An absent tensor is not registered as a None buffer: torch.export pairs
        buffers with graph inputs by position and counts None buffers too.
        """
        if name in self._buffers:
            del self._buffers[name]
            self._non_persistent_buffers_set.discard(name)
        if t is None:
            self.__dict__[name] = None
        else:
            self.__dict__.pop(name, None)
            self.register_buffer(name, t, persistent=persistent)

    @property
    def quantized_weight(self) -> QuantizedWeight:
        """The layer's weight as a :class:`~torchquant.quantized_weight.QuantizedWeight` (its buffers, not copies)."""
        scales = self.group_scales
        if scales is None:
            scales = QuantizedScales(self.scale_codes, self.scale_absmax, self.scale_offset, self.scale_code_map,
                                     self.scale_block_size)
        return QuantizedWeight(self.packed_weight, scales, self.group_zeros, self.bits, self.in_features,
                               lut=self.code_table, perm=self.column_perm)

    @property
    def group_size(self) -> int:
        """Consecutive input columns per grid (``in_features`` for one grid per row)."""
        return self.in_features // self.num_groups

    def _grid_zeros(self, scales: Tensor) -> Tensor:
        """The float32 zero grid ``[N, G]`` the kernels read: the buffer, or zeros (lookup-table codes)."""
        return self.group_zeros if self.group_zeros is not None else torch.zeros_like(scales)

    def _grid_scales(self) -> Tensor:
        """The float32 scales ``[N, G]`` the kernels read: the buffer, or formed from the 8-bit form."""
        if self.group_scales is not None:
            return self.group_scales
        return ops.lut_dequantize(self.scale_codes, self.scale_absmax, self.scale_code_map,
                                  self.scale_block_size) + self.scale_offset

    @property
    def weight_spec(self) -> QuantSpec:
        return self.layout.weight_spec(self.in_features)

    @property
    def weight_shape(self):
        return (self.out_features, self.in_features)

    def checkpoint_tensor(self, key: str) -> Tensor:
        """The weight's tensor ``key`` as the state dict holds it (computed from the packed weight)."""
        return self.layout.to_state(self.quantized_weight)[key]

    def weight_codes(self) -> Tensor:
        """int32 codes ``[out, in]`` in the layout's code domain (``u + quant_min``), original column order."""
        return self.quantized_weight.codes(self.layout.quant_min)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``[out, in]`` float weight, computed afresh (references and checks; forward never forms it)."""
        return self.quantized_weight.dequantize(dtype)

    # ---- compute -------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        x = self._quantize_input(x)
        if self.input_scale is not None:
            # One rounding of the quotient, in the wider of the two dtypes, back to the input's dtype.
            x = (x / self.input_scale).to(x.dtype)
        if self.activations == "float":
            scales = self._grid_scales()
            y = ops.quantized_linear(x, self.packed_weight, scales, self._grid_zeros(scales), self.packed_bits,
                                     self.in_features, lut=self.code_table, perm=self.column_perm, bias=self.bias)
        elif self.activations == "llm_int8":
            y = ops.w8a8_linear(x, self.packed_weight, self.group_scales, bias=self.bias,
                                outlier_threshold=self.outlier_threshold)
        else:
            y = ops.w8a8_linear(x, self.packed_weight, self.group_scales, input_scale=self._activation_scale(x),
                                bias=self.bias)
        return self._quantize_output(y)

    def _check_input(self, x: Tensor) -> None:
        kind = type(self).__name__
        if not isinstance(x, Tensor):
            raise TypeError(f"{kind} expects a Tensor input, got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"{kind} expects a floating-point input, got {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"{kind} expects inputs [..., {self.in_features}], got shape {list(x.shape)}")
        if x.device != self.packed_weight.device:
            raise ValueError(f"{kind}: the input is on {x.device} but the layer's weight is on "
                             f"{self.packed_weight.device}; the input must be on the weight's device")

    def _activation_scale(self, x: Tensor) -> Optional[Tensor]:
        """The per-tensor activation scale handed to the W8A8 kernel; None per token (the kernel's own)."""
        if self.activations == "int8_per_token" or self.act_scale is not None:
            return self.act_scale
        # Dynamic per tensor: the grid of the whole input, as quantize_per_token finds one row's.
        if x.numel() == 0:  # no values: any positive scale will do
            return torch.ones(1, device=x.device)
        absmax = torch.linalg.vector_norm(x.detach(), float("inf"), dtype=torch.float32)
        return (absmax / _INT8_HALF_RANGE).clamp_min(_EPS).reshape(1)

    # ---- state dict: the checkpoint layout -------------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for key, t in self.layout.to_state(self.quantized_weight).items():
            destination[prefix + key] = t
        super()._save_to_state_dict(destination, prefix, keep_vars)  # bias, act_scale, input_scale

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # The base class runs the pre-hooks (which may rename keys) and loads bias / act_scale / input_scale.
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        keys = self.layout.state_keys()
        ours = {prefix + key for key in keys}
        unexpected_keys[:] = [k for k in unexpected_keys if k not in ours]
        absent = [prefix + key for key in keys if prefix + key not in state_dict]
        if absent:
            if strict:
                missing_keys.extend(absent)
            return
        tensors = {key: state_dict[prefix + key] for key in keys}
        try:
            weight = self.layout.from_state(tensors, self.in_features, self.out_features, prefix.rstrip("."))
            weight = weight.to(self.packed_weight.device)
            self._set_weight(weight)
        except (TypeError, ValueError) as error:
            error_msgs.append(f"{type(self).__name__} ({self.layout.name} layout): {error}")

    def _apply(self, fn, recurse=True):
        # Grids stay float32 under .half() / .to(bfloat16): they move, they are not cast.
        kept = {name: self._buffers[name] for name in _FLOAT32_BUFFERS if self._buffers.get(name) is not None}
        for name in kept:
            self._buffers[name] = None
        try:
            super()._apply(fn, recurse)
        finally:
            for name, t in kept.items():
                moved = fn(t)
                self._buffers[name] = moved if moved.dtype == t.dtype else t.to(moved.device)
        return self

    # ---- save_quantized / load_quantized ----------------------------------------------------------

    def _config(self) -> Dict[str, Any]:
        config: Dict[str, Any] = {}
        plain = isinstance(self.layout, TorchquantLayout) and not self.layout.act_order
        if not plain:
            config["layout"] = self.layout.config()
        if self.activations != "float":
            config["activations"] = self.activations
        if self.outlier_threshold is not None:
            config["outlier_threshold"] = self.outlier_threshold
        if self.act_scale is not None:
            config["act_scale"] = True
        if self.input_scale is not None:
            config["input_scale"] = str(self.input_scale.dtype).replace("torch.", "")
        return config

    @classmethod
    def from_metadata(cls, meta: Dict[str, Any], tensors: Dict[str, Tensor]) -> "QuantizedLinear":
        """Rebuild a layer saved with :meth:`quant_metadata` from its tensors (keys without prefix)."""
        config = meta.get("config") or {}
        layout = layout_from_config(config["layout"]) if "layout" in config else \
            TorchquantLayout(spec_from_dict(meta["weight_spec"]))
        out_features, in_features = meta["weight_shape"]
        needed = list(layout.state_keys()) + (["act_scale"] if config.get("act_scale") else []) + \
            (["input_scale"] if "input_scale" in config else [])
        for key in needed:
            if key not in tensors:
                raise KeyError(f"quantized checkpoint is missing {key!r} for a {cls.__name__}")
        weight = layout.from_state({k: tensors[k] for k in layout.state_keys()}, in_features, out_features)
        m = cls._from_weight(weight, tensors.get("bias"), layout, activations=config.get("activations", "float"),
                             act_scale=tensors.get("act_scale"), input_scale=tensors.get("input_scale"),
                             outlier_threshold=config.get("outlier_threshold"))
        m.folded_bn = meta.get("folded_bn")
        m._restore_activation_quant(meta, tensors)
        return m

    def extra_repr(self) -> str:
        columns = self.group_size
        text = (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={columns}, {self.layout.extra_repr()}")
        if self.column_perm is not None:
            text += ", act_order=True"
        if self.code_table is not None:
            text += ", lut=True"
        if self.scale_block_size is not None:
            text += ", double_quant=True"
        if self.activations != "float":
            text += f", activations={self.activations}" + (" (static)" if self.act_scale is not None else "")
        if self.outlier_threshold is not None:
            text += f", outlier_threshold={self.outlier_threshold:g}"
        if self.input_scale is not None:
            text += f", input_scale=[{self.in_features}]"
        return text + f", bias={self.bias is not None}"
