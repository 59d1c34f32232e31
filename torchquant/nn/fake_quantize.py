"""FakeQuantize: observe a tensor's range, then fake-quantize it with the C++ op."""
from __future__ import annotations

import math
from typing import Tuple, Union

import torch
from torch import Tensor, nn

from torchquant import ops
from torchquant.observers import Observer, make_observer, qparams_from_range, resize_to_saved
from torchquant.spec import QuantSpec

__all__ = ["FakeQuantize", "qparams_from_range"]


def _straight_through(x: Tensor, value: Tensor) -> Tensor:
    """``value`` in the forward, the gradient of ``x`` in the backward."""
    return x + (value - x).detach()


class FakeQuantize(nn.Module):
    """Fake-quantizes its input with a grid described by a :class:`QuantSpec`.

    While observing (training mode and ``enable_observer(True)``, the default),
    each batch goes through the observer ``spec.observer`` names (see
    :mod:`torchquant.observers`) and the grid is recomputed from it.
    With ``spec.learnable`` the grid is initialised from the first batch and
    then trained: ``scale`` (and, for asymmetric grids, ``zero_point``) are
    ``nn.Parameter``s receiving LSQ / LSQ+ gradients scaled by ``grad_factor``
    (``"lsq"``: ``1 / sqrt(elements_per_grid * quant_max)``). ``eval()``
    freezes the observer.

    Create optimizers after the first forward (or after loading a state
    dict): the first batch gives the parameters their per-channel shape.
    """

    def __init__(self, spec: QuantSpec = QuantSpec(), grad_factor: Union[str, float] = "lsq",
                 eps: float = torch.finfo(torch.float32).eps) -> None:
        super().__init__()
        if not (grad_factor == "lsq" or (isinstance(grad_factor, (int, float)) and grad_factor > 0)):
            raise ValueError(f"grad_factor must be 'lsq' or a positive number, got {grad_factor!r}")
        self.spec = spec
        self.grad_factor = grad_factor
        self.eps = eps
        self.observer_enabled = True
        self.fake_quant_enabled = True
        self.observer: Observer = make_observer(spec)
        scale = torch.ones(1)
        zero_point = torch.zeros(1)
        if spec.learnable:
            self.scale = nn.Parameter(scale)
            if spec.symmetric:
                self.register_buffer("zero_point", zero_point)
            else:
                self.zero_point = nn.Parameter(zero_point)
        else:
            self.register_buffer("scale", scale)
            self.register_buffer("zero_point", zero_point)

    # ---- switches -------------------------------------------------------------
    def enable_observer(self, enabled: bool = True) -> "FakeQuantize":
        self.observer_enabled = bool(enabled)
        return self

    def disable_observer(self) -> "FakeQuantize":
        return self.enable_observer(False)

    def enable_fake_quant(self, enabled: bool = True) -> "FakeQuantize":
        self.fake_quant_enabled = bool(enabled)
        return self

    def disable_fake_quant(self) -> "FakeQuantize":
        return self.enable_fake_quant(False)

    @property
    def quant_min(self) -> int:
        return self.spec.quant_min

    @property
    def quant_max(self) -> int:
        return self.spec.quant_max

    @property
    def is_calibrated(self) -> bool:
        return self.observer.is_calibrated

    @property
    def min_val(self) -> Tensor:
        return self.observer.min_val

    @property
    def max_val(self) -> Tensor:
        return self.observer.max_val

    # ---- calibration ------------------------------------------------------------
    @torch.no_grad()
    def observe(self, x: Tensor) -> None:
        """Feed ``x`` to the observer and recompute the grid from it."""
        first = not self.is_calibrated
        self.observer(x)
        if first or not self.spec.learnable:
            self._set_qparams(*self.observer.calculate_qparams())

    def _set_qparams(self, scale: Tensor, zero_point: Tensor) -> None:
        scale = scale.to(self.scale.device, torch.float32)
        zero_point = zero_point.to(self.zero_point.device, torch.float32)
        if self.scale.shape == scale.shape:
            self.scale.copy_(scale)
            self.zero_point.copy_(zero_point)
        else:
            # Assigning .data keeps the Parameter objects (and any optimizer
            # holding them) while giving them their per-channel shape.
            self.scale.data = scale
            self.zero_point.data = zero_point

    def calculate_qparams(self) -> Tuple[Tensor, Tensor]:
        """The grid in use: positive scale and integer zero-point, detached."""
        if not self.is_calibrated:
            raise RuntimeError("FakeQuantize has not observed any data yet; run calibration batches first")
        scale, zero_point = self._effective_qparams()
        return scale.detach().clone(), zero_point.detach().round()

    def _effective_qparams(self) -> Tuple[Tensor, Tensor]:
        scale, zero_point = self.scale, self.zero_point
        if self.spec.learnable:
            # Keep a trained grid valid without touching the parameters in place
            # (which would break graph capture): |s| at least eps, the
            # zero-point inside the code range. The clamps pass gradients
            # straight through, so a parameter that drifted past a bound is
            # still pulled back by its gradient instead of freezing there.
            scale = _straight_through(scale.abs(), scale.abs().clamp_min(self.eps))
            if isinstance(zero_point, nn.Parameter):
                zero_point = _straight_through(zero_point, zero_point.clamp(self.quant_min, self.quant_max))
        return scale, zero_point

    def _grad_factor(self, x: Tensor) -> float:
        if self.grad_factor != "lsq":
            return float(self.grad_factor)
        per_grid = max(1, x.numel() // max(1, self.scale.numel()))
        return 1.0 / math.sqrt(per_grid * self.quant_max)

    # ---- forward ----------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        # LSQ: for a learnable grid the observer only initialises it (or a
        # loaded checkpoint does); from then on training moves it.
        if self.training and self.observer_enabled and not (self.spec.learnable and self.is_calibrated):
            self.observe(x)
        if not self.fake_quant_enabled:
            return x
        if not self.is_calibrated:
            raise RuntimeError(
                "FakeQuantize: no grid yet. Run at least one batch in training mode with the observer enabled "
                "(or load a calibrated state dict) before fake-quantizing."
            )
        scale, zero_point = self._effective_qparams()
        spec = self.spec
        return ops.fake_quantize(
            x, scale, zero_point, spec.quant_min, spec.quant_max,
            axis=spec.axis if spec.granularity == "channel" else None,
            group_size=spec.group_size if spec.granularity == "group" else None,
            grad_factor=self._grad_factor(x),
        )

    # ---- state dict: buffers/parameters take the shapes they were saved with --
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # The grid takes the shape it was saved with (the observer does the same
        # for its statistics).
        resize_to_saved(self, state_dict, prefix, ("scale", "zero_point"))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        s = self.spec
        grid = {"tensor": "per-tensor", "channel": f"per-channel(axis={s.axis})",
                "group": f"per-group(group_size={s.group_size})"}[s.granularity]
        kind = "symmetric" if s.symmetric else "asymmetric"
        return (f"bits={s.bits}, {kind}, {grid}, range=[{self.quant_min}, {self.quant_max}], "
                f"learnable={s.learnable}, observer={s.observer}, "
                f"observer_enabled={self.observer_enabled}, fake_quant_enabled={self.fake_quant_enabled}")
