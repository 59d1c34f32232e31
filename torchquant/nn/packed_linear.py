"""What the Linear layers holding packed checkpoint weights (GPTQ, AWQ GEMM) have in common.

Each layout dequantizes its own buffers (``dequantized_weight``); computing
with the result is the same for all: the weight is formed once per compute
dtype and device and kept until the buffers change (a state dict is loaded,
the module is moved, or :meth:`PackedLinear.clear_cache` is called).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["PackedLinear", "is_int", "check_tensor", "check_packed_tensors", "unsigned_zero_points"]


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_tensor(t, name: str, shape: Optional[Tuple[int, ...]] = None, integer: Optional[bool] = None) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if integer is True and (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if integer is False and not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")


def check_packed_tensors(qweight, qzeros, scales, prefix: str = "") -> None:
    """Checkpoint tensors of the types both layouts store: int32 words and float16 scales, all 2-D."""
    expected = {"qweight": torch.int32, "qzeros": torch.int32, "scales": torch.float16}
    for key, t in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales)):
        check_tensor(t, prefix + key)
        if t.dtype != expected[key] or t.dim() != 2:
            raise ValueError(f"{prefix}{key} must be a 2-D {expected[key]} tensor, got {t.dtype} of shape "
                             f"{list(t.shape)}")


def unsigned_zero_points(zero_points: Tensor, quant_min: int, quant_max: int) -> Tensor:
    """Code-domain zero-points (floats holding integers in the code range) as int32 ``zero - quant_min``."""
    z = zero_points.double()
    if not bool(torch.isfinite(z).all()) or not bool((z == z.round()).all()):
        raise ValueError("zero_points must hold integers (the code-domain zero-point of each group)")
    if float(z.min()) < quant_min or float(z.max()) > quant_max:
        raise ValueError(f"zero_points must lie in [{quant_min}, {quant_max}], got values in "
                         f"[{float(z.min()):g}, {float(z.max()):g}]")
    return (z - quant_min).to(torch.int32)


class PackedLinear(nn.Module):
    """``y = x W^T + b`` with ``W`` dequantized from packed buffers and cached.

    A subclass registers the buffers ``qweight`` and ``bias`` (or None) and
    sets ``in_features``, ``out_features``, ``bits``, ``group_size`` (-1: one
    group per row), ``symmetric`` and ``quant_min``; it implements
    :meth:`dequantized_weight` and may add settings to the repr with
    :meth:`_extra_settings`.
    """

    def __init__(self) -> None:
        super().__init__()
        self._cache: Optional[Tuple[tuple, Tensor, Optional[Tensor]]] = None

    @property
    def quant_max(self) -> int:
        return self.quant_min + (1 << self.bits) - 1

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``[out, in]`` weight in ``dtype``, computed afresh (no cache)."""
        raise NotImplementedError

    def clear_cache(self) -> None:
        """Drop the cached dequantized weight (after editing a buffer in place)."""
        self._cache = None

    def _weight_and_bias(self, x: Tensor) -> Tuple[Tensor, Optional[Tensor]]:
        # A weight made under inference_mode cannot be saved for a backward, so that mode is part of the key.
        key = (x.dtype, self.qweight.device, torch.is_inference_mode_enabled())
        if self._cache is None or self._cache[0] != key:
            bias = None if self.bias is None else self.bias.to(x.dtype)
            self._cache = (key, self.dequantized_weight(x.dtype), bias)
        return self._cache[1], self._cache[2]

    def forward(self, x: Tensor) -> Tensor:
        kind = type(self).__name__
        if not x.dtype.is_floating_point:
            raise TypeError(f"{kind} expects a floating-point input, got {x.dtype}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"{kind} expects inputs [..., {self.in_features}], got shape {list(x.shape)}")
        weight, bias = self._weight_and_bias(x)
        return F.linear(x, weight, bias)

    # ---- nn.Module plumbing --------------------------------------------------------------

    def _load_from_state_dict(self, *args, **kwargs):
        self.clear_cache()
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self.clear_cache()
        return super()._apply(fn, *args, **kwargs)

    def _extra_settings(self) -> str:
        """Layout-specific settings for the repr, as ``", key=value"`` pairs."""
        return ""

    def extra_repr(self) -> str:
        gs = "none" if self.group_size == -1 else self.group_size
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={gs}, symmetric={self.symmetric}{self._extra_settings()}, bias={self.bias is not None}")
