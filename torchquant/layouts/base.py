"""What every checkpoint layout of a quantized Linear weight provides, and the checks they share.

A layout is a save / load adapter: a :class:`~torchquant.nn.QuantizedLinear`
computes from a :class:`~torchquant.quantized_weight.QuantizedWeight` in the
run-time layout, and its ``state_dict`` holds the weight as one ecosystem
stores it (GPTQ, AWQ GEMM, W8A8, torchquant's own). The layout turns one
into the other, exactly both ways, and checks what a checkpoint hands it.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from torchquant.quantized_weight import QuantizedWeight
from torchquant.spec import QuantSpec

__all__ = ["CheckpointLayout", "is_int", "check_tensor", "check_packed_tensors", "unsigned_zero_points",
           "check_fp16_range", "check_devices", "prefixed", "FP16_MAX"]

FP16_MAX = torch.finfo(torch.float16).max


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
    """Checkpoint tensors of the types GPTQ and AWQ store: int32 words and float16 scales, all 2-D."""
    expected = {"qweight": torch.int32, "qzeros": torch.int32, "scales": torch.float16}
    for key, t in (("qweight", qweight), ("qzeros", qzeros), ("scales", scales)):
        check_tensor(t, prefix + key)
        if t.dtype != expected[key] or t.dim() != 2:
            raise ValueError(f"{prefix}{key} must be a 2-D {expected[key]} tensor, got {t.dtype} of shape "
                             f"{list(t.shape)}")


def unsigned_zero_points(zero_points: Tensor, quant_min: int, quant_max: int, name: str = "zero_points") -> Tensor:
    """Code-domain zero-points (floats holding integers in the code range) as int32 ``zero - quant_min``."""
    z = zero_points.double()
    if not bool(torch.isfinite(z).all()) or not bool((z == z.round()).all()):
        raise ValueError(f"{name} must hold integers (the code-domain zero-point of each group)")
    if z.numel() and (float(z.min()) < quant_min or float(z.max()) > quant_max):
        raise ValueError(f"{name} must lie in [{quant_min}, {quant_max}], got values in "
                         f"[{float(z.min()):g}, {float(z.max()):g}]")
    return (z - quant_min).to(torch.int32)


def check_fp16_range(t: Tensor, name: str, positive: bool, fmt: str) -> None:
    """Finite, representable in float16 (the checkpoint's dtype) and, for scales, positive and not underflowing."""
    f = t.float()
    if not bool(torch.isfinite(f).all()) or bool((f.abs() > FP16_MAX).any()):
        raise ValueError(f"{name} must be finite and within float16 range ({fmt} checkpoints store it as float16)")
    if positive and (bool((f <= 0).any()) or bool((t.to(torch.float16) == 0).any())):
        raise ValueError(f"{name} must be positive and not underflow float16; found values in "
                         f"[{f.min().item():.3g}, {f.max().item():.3g}]")


def check_devices(tensors: Dict[str, Optional[Tensor]], reference: str, prefix: str = "") -> None:
    """Every tensor on the device of ``tensors[reference]``."""
    device = tensors[reference].device
    for key, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{prefix}{key} is on {t.device} but {prefix}{reference} is on {device}")


class CheckpointLayout:
    """How one checkpoint format stores a quantized Linear weight (one subclass per format).

    Subclasses set :attr:`name` and implement :meth:`state_keys`,
    :meth:`to_state`, :meth:`from_state`, :meth:`config` and
    :meth:`weight_spec`. :meth:`from_state` checks what a checkpoint holds
    and raises ``TypeError`` / ``ValueError`` naming the tensor (as
    ``<where>.<key>``).
    """

    name: str = ""
    quant_min: int = 0

    def state_keys(self) -> Tuple[str, ...]:
        """The state-dict keys of the weight, in the order they are written."""
        raise NotImplementedError

    def to_state(self, weight: QuantizedWeight) -> Dict[str, Tensor]:
        """The weight's tensors in this format (new tensors)."""
        raise NotImplementedError

    def from_state(self, tensors: Dict[str, Tensor], in_features: int, out_features: int,
                   where: str = "") -> QuantizedWeight:
        """The weight a checkpoint's tensors hold (keys without prefix), after checking them."""
        raise NotImplementedError

    def check_weight(self, weight: QuantizedWeight) -> None:
        """Refuses a weight this format cannot write back exactly (bits, grids, act-order ...)."""

    def empty_weight(self, in_features: int, out_features: int, device=None) -> QuantizedWeight:
        """Zero codes of the shapes this format expects, for a layer a state dict will fill."""
        raise NotImplementedError

    def config(self) -> Dict[str, Any]:
        """JSON-able settings (``{"name": ..., ...}``) from which :func:`layout_from_config` rebuilds the layout."""
        raise NotImplementedError

    def weight_spec(self, in_features: int) -> QuantSpec:
        """The :class:`~torchquant.spec.QuantSpec` of the weight's grid."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"layout={self.name}"

    def __eq__(self, other) -> bool:
        return type(other) is type(self) and other.config() == self.config()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config()})"


def prefixed(where: str) -> str:
    return f"{where}." if where else ""
