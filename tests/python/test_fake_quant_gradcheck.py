"""Finite-difference checks of the LSQ / LSQ+ gradient formulas.

What can and cannot be gradchecked: fake quantization is piecewise constant
in the input and the scale, so finite differences of the op itself see zero
almost everywhere and jumps at the rounding boundaries; the straight-through
estimator is a *definition* of its gradient, not a derivative. The op also
only takes float32 / float16 / bfloat16 inputs (float64 is rejected, see
test_fake_quant_errors.py), too coarse for finite differences anyway.

What is checked instead, in float64: ``reference.lsq_surrogate``, the op with
its rounding residual frozen at the evaluation point, is smooth around that
point (away from the clamp's corners); ``torch.autograd.gradcheck`` confirms
its autograd derivatives, and the op's gradients at the same point must equal
them. The data keeps every element at least one code away from
``quant_min`` / ``quant_max`` (the clamp's corners) and a tenth of a step away
from a rounding tie (where float32 and float64 could pick different codes).
"""
import pytest
import torch

from cases import generator
from checks import assert_equal_values, assert_sums_close
from reference import PER_TENSOR, fake_quantize_grads_reference, lsq_surrogate, per_channel, per_group
from torchquant.ops import fake_quantize_learnable_backward

QMIN, QMAX = -8, 7
LAYOUTS = [((6, 9), PER_TENSOR), ((4, 3, 5), per_channel(1)), ((4, 6), per_channel(-1)), ((3, 12), per_group(4))]


def _layout_id(layout):
    shape, granularity = layout
    return f"{granularity}-{'x'.join(map(str, shape))}"


def _point(shape, granularity, clipped: bool, seed=0):
    """(x, scale, zero_point) float32, with codes off the clamp's corners and off the ties."""
    gen = generator(seed)
    qshape = granularity.qparam_shape(shape)
    scale = torch.empty(qshape).uniform_(0.05, 0.3, generator=gen)
    zero_point = torch.randint(-2, 3, qshape, generator=gen).float()
    code = torch.randint(QMIN + 1, QMAX, shape, generator=gen)
    if clipped:
        beyond = torch.randint(2, 6, shape, generator=gen)
        side = torch.randint(0, 3, shape, generator=gen)
        code = torch.where(side == 0, QMIN - beyond, torch.where(side == 1, QMAX + beyond, code))
    frac = torch.empty(shape).uniform_(-0.4, 0.4, generator=gen)
    s = granularity.expand(scale, shape)
    z = granularity.expand(zero_point, shape)
    return ((code - z + frac) * s).float(), scale, zero_point


@pytest.mark.parametrize("clipped", [False, True], ids=["in_range", "with_clipping"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=_layout_id)
def test_surrogate_derivatives_pass_gradcheck(layout, clipped):
    shape, granularity = layout
    x, scale, zero_point = _point(shape, granularity, clipped)
    f = lsq_surrogate(x, scale, zero_point, QMIN, QMAX, granularity)
    inputs = tuple(t.double().requires_grad_(True) for t in (x, scale, zero_point))
    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("clipped", [False, True], ids=["in_range", "with_clipping"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=_layout_id)
def test_op_gradients_are_the_surrogate_derivatives(device, layout, clipped):
    shape, granularity = layout
    x, scale, zero_point = _point(shape, granularity, clipped)
    dy = torch.randn(shape, generator=generator(1))
    grad_factor = 0.5

    x64, s64, z64 = (t.double().requires_grad_(True) for t in (x, scale, zero_point))
    f = lsq_surrogate(x, scale, zero_point, QMIN, QMAX, granularity)
    f(x64, s64, z64).backward(dy.double())

    dx, dscale, dzero = fake_quantize_learnable_backward(
        dy.to(device), x.to(device), scale.to(device), zero_point.to(device), QMIN, QMAX,
        **granularity.op_kwargs(), grad_factor=grad_factor)

    magnitudes = fake_quantize_grads_reference(dy, x, scale, zero_point, QMIN, QMAX, granularity, grad_factor)
    assert_equal_values(dx.cpu(), x64.grad.float())  # exactly dy or 0
    assert_sums_close(dscale.cpu(), s64.grad * grad_factor, magnitudes.dscale_abs, "dscale")
    assert_sums_close(dzero.cpu(), z64.grad * grad_factor, magnitudes.dzero_abs, "dzero")
    if not clipped:
        assert not dzero.any(), "the zero-point gets no gradient from unclipped elements"
