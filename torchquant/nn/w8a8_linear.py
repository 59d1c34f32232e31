"""W8A8 Linear layer: int8 weights and int8 activations, as SmoothQuant deploys them.

* weight: int8 codes per output channel on a symmetric grid
  (``scale = max|w_row| / 127.5``, torchquant's symmetric min/max grid:
  :func:`torchquant.observers.qparams_from_range`);
* activations, quantized on every call:

  - ``act_granularity="token"``: one dynamic grid per row (token), the
    ``torchquant.ops.quantize_per_token`` op (SmoothQuant's O1 setting);
  - ``act_granularity="tensor"``: one grid for the whole input, dynamic
    (O2) or, given ``act_scale`` from calibration, static (O3).

The product is computed in one of two ways that give the same number up to
float rounding:

* **int8**: ``torch._int_mm(codes_x [M, K], codes_w^T [K, N]) -> int32``,
  exact (``|sum| <= 2^14 K < 2^31`` for K below 2^17; wider layers take the
  fake path), then ``y = acc * s_x * s_w + bias`` in float32: at most four
  roundings per element;
* **fake** (the reference semantics): the dequantized input
  (``torchquant.fake_quantize``, which also passes straight-through gradients
  to the input) times the dequantized weight with ``F.linear`` in float32,
  whose accumulation rounds.

``compute`` picks: ``"int8"`` uses ``torch._int_mm`` wherever it takes the
shape (CUDA: more than 16 rows, K and N multiples of 8; CPU: any shape) and
falls back to the fake path elsewhere; ``"fake"`` always computes the fake
path; ``"auto"`` (the default) is ``"int8"`` on CUDA and ``"fake"`` on other
devices, because torch 2.13's CPU ``_int_mm`` is a plain loop: for a 4096 x
4096 layer on 512 tokens it took 6.3 s against 0.34 s for a float32
``F.linear`` (the fake path: 0.65 s) on a 2-core x86 machine. An input that
requires grad (with grad mode on) takes the fake path.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchquant import formats, ops
from torchquant.observers import qparams_from_range
from torchquant.spec import QuantSpec

__all__ = ["W8A8Linear"]

_QMIN, _QMAX = -128, 127
_WEIGHT_SPEC = QuantSpec(bits=8, symmetric=True, granularity="channel", axis=0)
_ACT_SPEC = QuantSpec(bits=8, symmetric=True)
_ACT_GRANULARITIES = ("token", "tensor")
_COMPUTE = ("auto", "int8", "fake")


def _int_mm_accepts(device: torch.device, m: int, k: int, n: int) -> bool:
    """Whether ``torch._int_mm`` takes an ``[m, k] x [k, n]`` product on ``device``."""
    if not hasattr(torch, "_int_mm") or min(m, k, n) <= 0:
        return False
    if k * _QMIN * _QMIN >= 2 ** 31:  # the int32 accumulator could overflow
        return False
    if device.type == "cuda":
        return m > 16 and k % 8 == 0 and n % 8 == 0
    return device.type == "cpu"


def _static_scale(act_scale, device) -> Tensor:
    scale = torch.as_tensor(act_scale, dtype=torch.float32, device=device).detach().reshape(-1).clone()
    if scale.numel() != 1:
        raise ValueError(f"act_scale must be a single number (one per-tensor scale), got {scale.numel()} values")
    if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        raise ValueError(f"act_scale must be positive and finite, got {scale.item()!r}")
    return scale


class W8A8Linear(nn.Module):
    """``y = x W^T + b`` with int8 weights and int8 activations (see the module docstring).

    Build one with :meth:`from_float`; the constructor makes a layer of the
    right shapes (zero codes) for ``load_state_dict``.

    Buffers: ``weight_codes`` int8 ``[out, in]``, ``weight_scales`` float32
    ``[out]`` (``W ~ weight_codes * weight_scales[:, None]``), ``bias`` in the
    original layer's dtype (or None), ``act_scale`` float32 ``[1]`` for a
    static per-tensor activation grid (else None).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, act_granularity: str = "token",
                 act_scale: Union[float, Tensor, None] = None, compute: str = "auto", *, device=None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if act_granularity not in _ACT_GRANULARITIES:
            raise ValueError(f"act_granularity must be one of {_ACT_GRANULARITIES}, got {act_granularity!r}")
        if act_scale is not None and act_granularity != "tensor":
            raise ValueError("act_scale is a static per-tensor scale: it needs act_granularity='tensor' "
                             f"(got act_granularity={act_granularity!r})")
        if compute not in _COMPUTE:
            raise ValueError(f"compute must be one of {_COMPUTE}, got {compute!r}")
        self.in_features, self.out_features = in_features, out_features
        self.act_granularity, self.compute = act_granularity, compute
        self.register_buffer("weight_codes", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("weight_scales", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        self.register_buffer("act_scale", None if act_scale is None else _static_scale(act_scale, device))

    @classmethod
    def from_float(cls, linear: nn.Linear, act_granularity: str = "token",
                   act_scale: Union[float, Tensor, None] = None, compute: str = "auto") -> "W8A8Linear":
        """A W8A8 layer from a float ``nn.Linear`` (e.g. after SmoothQuant's folding).

        Args:
            linear: the layer; its weight is quantized per output channel.
            act_granularity: ``"token"`` (dynamic per row) or ``"tensor"``.
            act_scale: with ``"tensor"``, a static scale from calibration
                (e.g. ``max|x| / 127.5``); None quantizes each input on its
                own range.
            compute: ``"auto"``, ``"int8"`` or ``"fake"`` (see the module docstring).
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"W8A8Linear.from_float expects an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        if not bool(torch.isfinite(w).all()):
            raise ValueError("W8A8Linear.from_float: the weight contains NaN or Inf")
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None,
                    act_granularity=act_granularity, act_scale=act_scale, compute=compute, device=w.device,
                    dtype=w.dtype)
        if w.numel() > 0:
            lo, hi = torch.aminmax(w.float(), dim=1)
            scales, zero = qparams_from_range(lo, hi, _WEIGHT_SPEC)
            layer.weight_codes.copy_(formats.quantize(w, scales, zero, _QMIN, _QMAX, axis=0))
            layer.weight_scales.copy_(scales)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach())
        return layer

    def int8_matmul_applies(self, x: Tensor) -> bool:
        """Whether a call on ``x`` computes the product with ``torch._int_mm``."""
        if self.compute == "fake" or (self.compute == "auto" and x.device.type != "cuda"):
            return False
        if x.requires_grad and torch.is_grad_enabled():
            return False
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        return _int_mm_accepts(x.device, rows, self.in_features, self.out_features)

    def forward(self, x: Tensor) -> Tensor:
        if not x.dtype.is_floating_point:
            raise TypeError(f"W8A8Linear expects a floating-point input, got {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"W8A8Linear expects inputs [..., {self.in_features}], got shape {list(x.shape)}")
        x2 = x.reshape(-1, self.in_features)
        if self.int8_matmul_applies(x):
            y = self._int8_product(x2)
        else:
            y = self._fake_product(x2)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    # ---- the two products ----------------------------------------------------------------

    def _int8_product(self, x2: Tensor) -> Tensor:
        if self.act_granularity == "token":
            codes, scale = ops.quantize_per_token(x2, _QMIN, _QMAX)  # scale [M, 1]
        elif self.act_scale is None:
            # Per-tensor dynamic: the whole input as one "token".
            codes, scale = ops.quantize_per_token(x2.reshape(1, -1), _QMIN, _QMAX)
            codes = codes.reshape(x2.shape)
        else:
            scale = self.act_scale
            codes = formats.quantize(x2.detach(), scale, torch.zeros_like(scale), _QMIN, _QMAX).to(torch.int8)
        acc = torch._int_mm(codes, self.weight_codes.t())
        y = acc.to(torch.float32).mul_(scale).mul_(self.weight_scales)
        if self.bias is not None:
            y.add_(self.bias)
        return y

    def _fake_product(self, x2: Tensor) -> Tensor:
        xf = x2.float()
        scale, zero, axis = self._activation_grid(xf)
        x_hat = ops.fake_quantize(xf, scale, zero, _QMIN, _QMAX, axis=axis)
        w_hat = formats.dequantize(self.weight_codes, self.weight_scales, torch.zeros_like(self.weight_scales),
                                   axis=0)
        bias = None if self.bias is None else self.bias.float()
        return F.linear(x_hat, w_hat, bias)

    def _activation_grid(self, xf: Tensor) -> Tuple[Tensor, Tensor, Optional[int]]:
        """(scale, zero_point, axis) of the fake-quantize call: the grids of the int8 path."""
        if self.act_scale is not None:
            return self.act_scale, torch.zeros_like(self.act_scale), None
        x = xf.detach()
        if x.numel() == 0:
            rows = x.shape[0] if self.act_granularity == "token" else 1
            return torch.ones(rows, device=x.device), torch.zeros(rows, device=x.device), 0
        if self.act_granularity == "token":
            lo, hi = torch.aminmax(x, dim=1)
            scale, zero = qparams_from_range(lo, hi, _ACT_SPEC)
            return scale, zero, 0
        lo, hi = torch.aminmax(x)
        scale, zero = qparams_from_range(lo.reshape(1), hi.reshape(1), _ACT_SPEC)
        return scale, zero, None

    def extra_repr(self) -> str:
        act = self.act_granularity + (" (static)" if self.act_scale is not None else "")
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, act_granularity={act}, compute={self.compute}")
