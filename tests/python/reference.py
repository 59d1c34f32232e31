"""References for the fake-quantize ops, independent of torchquant's kernels.

Two kinds:

* plain PyTorch, written from the op's definition with elementwise tensor
  ops, in the same float32 arithmetic (multiply by ``1 / scale``, round half
  to even) so that forwards can be compared bit for bit; gradients are summed
  in float64 so they are a more accurate target than either implementation;
* PyTorch's own fake-quant ops (``torch.fake_quantize_*`` and the learnable
  ``torch._fake_quantize_learnable_*``), behind one signature.

Granularity describes how scale / zero-point entries map onto input elements.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor


@dataclass(frozen=True)
class Granularity:
    """per-tensor (neither set), per-channel (``axis``) or per-group (``group_size``)."""

    axis: Optional[int] = None
    group_size: Optional[int] = None

    @property
    def kind(self) -> str:
        if self.group_size is not None:
            return "group"
        return "tensor" if self.axis is None else "channel"

    def __str__(self) -> str:
        if self.kind == "group":
            return f"group{self.group_size}"
        return "tensor" if self.kind == "tensor" else f"channel{self.axis}"

    def op_kwargs(self) -> dict:
        return {"axis": self.axis, "group_size": self.group_size}

    def qparam_shape(self, input_shape) -> Tuple[int, ...]:
        if self.kind == "group":
            return tuple(input_shape[:-1]) + (input_shape[-1] // self.group_size,)
        if self.kind == "channel":
            return (input_shape[self.axis],)
        return (1,)

    def expand(self, qparam: Tensor, input_shape) -> Tensor:
        """The qparam broadcast to one entry per input element."""
        if self.kind == "group":
            return qparam.repeat_interleave(self.group_size, dim=-1)
        if self.kind == "channel":
            view = [1] * len(input_shape)
            view[self.axis] = -1
            return qparam.reshape(view).expand(input_shape)
        return qparam.reshape(()).expand(input_shape)

    def reduce(self, terms: Tensor, qparam_shape) -> Tensor:
        """Sums per-element terms over the elements that share each qparam entry."""
        if self.kind == "group":
            return terms.reshape(*terms.shape[:-1], -1, self.group_size).sum(-1).reshape(qparam_shape)
        if self.kind == "channel":
            axis = self.axis % terms.dim()
            others = [d for d in range(terms.dim()) if d != axis]
            return (terms.sum(others) if others else terms).reshape(qparam_shape)
        return terms.sum().reshape(qparam_shape)


PER_TENSOR = Granularity()


def per_channel(axis: int) -> Granularity:
    return Granularity(axis=axis)


def per_group(group_size: int) -> Granularity:
    return Granularity(group_size=group_size)


# ---------------------------------------------------------------------------
# Plain PyTorch, from the definition.


@dataclass
class _Grid:
    """Per-element float32 grid and unclamped integer code of an input."""

    x: Tensor       # input as float32
    scale: Tensor   # expanded
    zero: Tensor    # expanded, rounded half to even
    code: Tensor    # round(x * (1 / scale)) + zero, before clamping


def _grid(x: Tensor, scale: Tensor, zero_point: Tensor, granularity: Granularity) -> _Grid:
    xf = x.float()
    s = granularity.expand(scale.float(), x.shape)
    z = granularity.expand(zero_point.float().round(), x.shape)
    return _Grid(xf, s, z, torch.round(xf * torch.reciprocal(s)) + z)


def fake_quantize_reference(x: Tensor, scale: Tensor, zero_point: Tensor, quant_min: int, quant_max: int,
                            granularity: Granularity) -> Tensor:
    g = _grid(x, scale, zero_point, granularity)
    return ((g.code.clamp(quant_min, quant_max) - g.zero) * g.scale).to(x.dtype)


def in_range_mask(x: Tensor, scale: Tensor, zero_point: Tensor, quant_min: int, quant_max: int,
                  granularity: Granularity) -> Tensor:
    """True where the code is not clipped (where the straight-through gradient passes)."""
    code = _grid(x, scale, zero_point, granularity).code
    return (code >= quant_min) & (code <= quant_max)


@dataclass
class ReferenceGrads:
    dx: Tensor          # dtype of the input
    dscale: Tensor      # float64, shaped like scale, times grad_factor
    dzero: Tensor       # float64, shaped like zero_point, times grad_factor
    dscale_abs: Tensor  # float64: sum of |terms| of dscale, the scale of its rounding error
    dzero_abs: Tensor


def fake_quantize_grads_reference(grad_output: Tensor, x: Tensor, scale: Tensor, zero_point: Tensor,
                                  quant_min: int, quant_max: int, granularity: Granularity,
                                  grad_factor: float = 1.0) -> ReferenceGrads:
    """LSQ / LSQ+ gradients: straight-through for x, the rounding residual for scale in range,
    the clipping bound for scale and -scale for the zero-point where clipped.

    The in-range scale term ``dy * (x^ - x) / scale`` is evaluated exactly, as
    ``dy * ((code - zero_point) - x / scale)`` in float64, with x^ the grid
    point itself. (Rounding x^ to float32 first, as the op's output is, would
    cost up to |code| * 2**-24 per element: with 16-bit codes more than the
    tolerance of a small group's sum. PyTorch's kernels and torchquant's keep
    x^ - x exact with a fused multiply-add.)
    """
    g = _grid(x, scale, zero_point, granularity)
    inside = (g.code >= quant_min) & (g.code <= quant_max)
    dy = grad_output.to(x.dtype).double()
    s, z = g.scale.double(), g.zero.double()
    steps = g.code.clamp(quant_min, quant_max).double() - z
    dscale_terms = dy * torch.where(inside, steps - g.x.double() / s, steps) * grad_factor
    dzero_terms = torch.where(inside, torch.zeros_like(dy), -dy * s) * grad_factor
    return ReferenceGrads(
        dx=torch.where(inside, grad_output.to(x.dtype), torch.zeros((), dtype=x.dtype, device=x.device)),
        dscale=granularity.reduce(dscale_terms, scale.shape),
        dzero=granularity.reduce(dzero_terms, zero_point.shape),
        dscale_abs=granularity.reduce(dscale_terms.abs(), scale.shape),
        dzero_abs=granularity.reduce(dzero_terms.abs(), zero_point.shape),
    )


def lsq_surrogate(x: Tensor, scale: Tensor, zero_point: Tensor, quant_min: int, quant_max: int,
                  granularity: Granularity):
    """A smooth stand-in for fake quantization around the point (x, scale, zero_point).

    Fake quantization is piecewise constant in x and scale, so it has no useful
    derivative: its LSQ gradients are a definition (the straight-through
    estimator: d round(u) / du := 1), not something finite differences can
    check. What *is* differentiable is the function with the rounding residual
    ``round(u) - u`` frozen at the point, ``u = x / scale + zero_point``:

        f(x, s, z) = (clamp(x / s + z + residual, quant_min, quant_max) - z) * s

    It equals fake quantization at the point, is linear in x and smooth in
    (s, z) away from the clamp's corners, and its exact derivatives are the
    LSQ / LSQ+ formulas. Returns f as a function of float64 (x, s, z).
    """
    x64 = x.double()
    s64 = granularity.expand(scale.double(), x.shape)
    z64 = granularity.expand(zero_point.double().round(), x.shape)
    u = x64 / s64 + z64
    residual = torch.round(u) - u

    def f(x_: Tensor, scale_: Tensor, zero_: Tensor) -> Tensor:
        s = granularity.expand(scale_, x_.shape)
        z = granularity.expand(zero_, x_.shape)
        return ((x_ / s + z + residual).clamp(quant_min, quant_max) - z) * s

    return f


# ---------------------------------------------------------------------------
# PyTorch's own fake-quant ops. They know per-tensor and per-channel; a
# per-group layout is the per-channel one of the input viewed as rows of
# `group_size` elements, one row per group.


def _as_torch_layout(x: Tensor, scale: Tensor, zero_point: Tensor, granularity: Granularity):
    if granularity.kind == "group":
        return x.reshape(-1, granularity.group_size), scale.reshape(-1), zero_point.reshape(-1), 0
    if granularity.kind == "channel":
        return x, scale.reshape(-1), zero_point.reshape(-1), granularity.axis % x.dim()
    return x, scale.reshape(1), zero_point.reshape(1), None


def torch_fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, quant_min: int, quant_max: int,
                        granularity: Granularity) -> Tensor:
    """``torch.fake_quantize_per_{tensor,channel}_affine`` (int32 zero-point)."""
    xt, s, z, axis = _as_torch_layout(x, scale, zero_point, granularity)
    z = z.round().to(torch.int32)
    if axis is None:
        y = torch.fake_quantize_per_tensor_affine(xt, s.reshape(()), z.reshape(()), quant_min, quant_max)
    else:
        y = torch.fake_quantize_per_channel_affine(xt, s, z, axis, quant_min, quant_max)
    return y.reshape(x.shape)


def torch_learnable_fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, quant_min: int, quant_max: int,
                                  granularity: Granularity, grad_factor: float = 1.0) -> Tensor:
    """``torch._fake_quantize_learnable_per_{tensor,channel}_affine`` (float zero-point).

    Its forward rounds the zero-point half to even but its backward computes
    ``int(zero_point + 0.5)``, so the two agree only for integer zero-points:
    compare against it with integer-valued zero-points only. The per-tensor
    backward also truncates that towards zero, which moves a negative
    zero-point up by one (-2 becomes -1): compare per-tensor gradients with
    zero-points >= 0 only.
    """
    xt, s, z, axis = _as_torch_layout(x, scale, zero_point, granularity)
    if axis is None:
        y = torch._fake_quantize_learnable_per_tensor_affine(xt, s, z, quant_min, quant_max, grad_factor)
    else:
        y = torch._fake_quantize_learnable_per_channel_affine(xt, s, z, axis, quant_min, quant_max, grad_factor)
    return y.reshape(x.shape)


def torch_learnable_backward_disagrees(x: Tensor, scale: Tensor, zero_point: Tensor,
                                      granularity: Granularity) -> Tensor:
    """Where PyTorch's learnable backward may use another code than its own forward.

    Its forward computes ``round(x * (1 / scale)) + zero_point`` (as torchquant
    does) but its backward ``round(zero_point + x * (1 / scale))``: at a tie
    with an odd zero-point (``round(0.5) + 1 = 1`` but ``round(1.5) = 2``), or
    where the float32 addition carries a value across a tie, the backward then
    masks / clips an element that the forward kept, or the other way round.
    Whether that multiply-add is fused depends on how PyTorch was compiled, so
    both roundings count.
    """
    g = _grid(x, scale, zero_point, granularity)
    inv_scale = torch.reciprocal(g.scale)
    unfused = torch.round(g.zero + g.x * inv_scale)
    fused = torch.round((g.x.double() * inv_scale.double() + g.zero.double()).float())
    return (unfused != g.code) | (fused != g.code)


def torch_learnable_grads(grad_output: Tensor, x: Tensor, scale: Tensor, zero_point: Tensor, quant_min: int,
                          quant_max: int, granularity: Granularity,
                          grad_factor: float = 1.0) -> Tuple[Tensor, Tensor, Tensor]:
    """(dx, dscale, dzero) of PyTorch's learnable fake-quant, by autograd.

    PyTorch's learnable backward has no float16 kernel, and its CUDA kernels
    are float32 only: such inputs go through it upcast to float32 (exact), and
    dx is cast back (also exact: dx is grad_output or zero).
    """
    upcast = x.dtype == torch.float16 or (x.dtype == torch.bfloat16 and x.is_cuda)
    xt = (x.float() if upcast else x).detach().requires_grad_(True)
    s = scale.detach().float().requires_grad_(True)
    z = zero_point.detach().float().requires_grad_(True)
    y = torch_learnable_fake_quantize(xt, s, z, quant_min, quant_max, granularity, grad_factor)
    y.backward(grad_output.to(y.dtype))
    return xt.grad.to(x.dtype), s.grad, z.grad
