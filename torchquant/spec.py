"""One description of "how to quantize", shared by QAT modules, convert() and
every post-training pass."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, Optional, Tuple

Granularity = Literal["tensor", "channel", "group"]

_GRANULARITIES = ("tensor", "channel", "group")
_OBSERVERS = ("minmax", "moving_average_minmax", "percentile", "mse", "histogram")


def _is_int(value) -> bool:
    # bool is an int subclass, but True is never a meaningful width or index.
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized.

    Attributes:
        bits: width of the integer code, 2 to 16.
        symmetric: symmetric grids have zero-point 0 and a signed code range
            ``[-2^(b-1), 2^(b-1) - 1]``; asymmetric grids use the unsigned
            range ``[0, 2^b - 1]`` and a zero-point.
        granularity: ``"tensor"``, ``"channel"`` (one grid per index of
            ``axis``) or ``"group"`` (groups of ``group_size`` consecutive
            elements of the last dimension).
        axis: the channel dimension for ``granularity="channel"``.
        group_size: the group length for ``granularity="group"``.
        observer: how the grid is calibrated: ``"minmax"`` (running min/max),
            ``"moving_average_minmax"``, ``"percentile"``, ``"mse"``
            (MSE-optimal clipping) or ``"histogram"`` (KL / entropy); see
            :mod:`torchquant.observers`.
        averaging_constant: weight of a new batch in the moving averages.
        percentile: for ``observer="percentile"``, the upper percentile kept
            (the lower one is ``100 - percentile``).
        freeze_observer_after: stop updating the observer after this many
            batches (``None``: never).
        learnable: train scale and zero-point with LSQ / LSQ+ gradients.
    """

    bits: int = 8
    symmetric: bool = True
    granularity: Granularity = "tensor"
    axis: int = 0
    group_size: Optional[int] = None
    observer: str = "minmax"
    averaging_constant: float = 0.01
    percentile: float = 99.99
    freeze_observer_after: Optional[int] = None
    learnable: bool = False

    def __post_init__(self) -> None:
        if not _is_int(self.bits) or not 2 <= self.bits <= 16:
            raise ValueError(f"QuantSpec.bits must be an integer in [2, 16], got {self.bits!r}")
        if self.granularity not in _GRANULARITIES:
            raise ValueError(f"QuantSpec.granularity must be one of {_GRANULARITIES}, got {self.granularity!r}")
        if self.granularity == "group":
            if not _is_int(self.group_size) or self.group_size <= 0:
                raise ValueError(
                    f"QuantSpec.group_size must be a positive integer for granularity='group', got {self.group_size!r}"
                )
        elif self.group_size is not None:
            raise ValueError(
                f"QuantSpec.group_size is only meaningful for granularity='group' (got granularity="
                f"{self.granularity!r} with group_size={self.group_size!r})"
            )
        if not _is_int(self.axis):
            raise ValueError(f"QuantSpec.axis must be an integer, got {self.axis!r}")
        if self.observer not in _OBSERVERS:
            raise ValueError(f"QuantSpec.observer must be one of {_OBSERVERS}, got {self.observer!r}")
        if not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"QuantSpec.percentile must be in (50, 100], got {self.percentile!r}")
        if self.freeze_observer_after is not None and (
            not _is_int(self.freeze_observer_after) or self.freeze_observer_after < 1
        ):
            raise ValueError(
                f"QuantSpec.freeze_observer_after must be a positive integer or None, got {self.freeze_observer_after!r}"
            )
        if not 0.0 < self.averaging_constant <= 1.0:
            raise ValueError(f"QuantSpec.averaging_constant must be in (0, 1], got {self.averaging_constant!r}")

    @property
    def quant_min(self) -> int:
        return -(1 << (self.bits - 1)) if self.symmetric else 0

    @property
    def quant_max(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.symmetric else (1 << self.bits) - 1

    @property
    def quant_range(self) -> Tuple[int, int]:
        return self.quant_min, self.quant_max

    def with_(self, **changes) -> "QuantSpec":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)
