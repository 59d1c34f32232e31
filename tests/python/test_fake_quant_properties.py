"""Properties of fake_quantize over random shapes, granularities, 2- to
16-bit signed and unsigned ranges, scales and zero-points."""
from dataclasses import dataclass
from math import prod

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

from cases import FLOAT_DTYPES, generator, make_input
from checks import assert_bitwise_equal, assert_sums_close
from reference import (PER_TENSOR, Granularity, fake_quantize_grads_reference, fake_quantize_reference,
                       in_range_mask, per_channel, per_group)
from torchquant.ops import fake_quantize, fake_quantize_backward, fake_quantize_learnable_backward, quant_range

PROPERTY_SETTINGS = settings(max_examples=80, deadline=None)
FLOAT16_MAX = 65504.0


@dataclass
class Case:
    x: Tensor
    scale: Tensor
    zero_point: Tensor
    quant_min: int
    quant_max: int
    granularity: Granularity

    def op_args(self):
        return self.scale, self.zero_point, self.quant_min, self.quant_max

    def op_kwargs(self):
        return self.granularity.op_kwargs()

    def to(self, device):
        return Case(self.x.to(device), self.scale.to(device), self.zero_point.to(device), self.quant_min,
                    self.quant_max, self.granularity)


@st.composite
def granularities(draw, shape):
    kind = draw(st.sampled_from(["tensor", "channel", "group"]))
    if kind == "channel":
        return per_channel(draw(st.integers(-len(shape), len(shape) - 1)))
    if kind == "group":
        last = shape[-1]
        return per_group(draw(st.sampled_from([g for g in range(1, last + 1) if last % g == 0])))
    return PER_TENSOR


@st.composite
def cases(draw, dtypes=FLOAT_DTYPES):
    shape = tuple(draw(st.lists(st.integers(1, 9), min_size=1, max_size=4)))
    granularity = draw(granularities(shape))
    qmin, qmax = quant_range(draw(st.integers(2, 16)), signed=draw(st.booleans()))
    dtype = draw(st.sampled_from(dtypes))
    # The whole grid, and the clipped inputs beyond it, must fit in float16.
    max_scale = 16.0 if dtype != torch.float16 else FLOAT16_MAX / (1.5 * (qmax - qmin) + 4)
    n = prod(granularity.qparam_shape(shape))
    scale = draw(st.lists(st.floats(2.0**-12, max_scale), min_size=n, max_size=n))
    zero_point = draw(st.lists(st.integers(qmin, qmax), min_size=n, max_size=n))
    qshape = granularity.qparam_shape(shape)
    scale = torch.tensor(scale).reshape(qshape)
    zero_point = torch.tensor(zero_point, dtype=torch.float32).reshape(qshape)
    x = make_input(shape, scale, zero_point, qmin, qmax, granularity, dtype, generator(draw(st.integers(0, 2**31))))
    return Case(x, scale, zero_point, qmin, qmax, granularity)


@PROPERTY_SETTINGS
@given(case=cases())
def test_matches_plain_reference(device, case):
    c = case.to(device)
    assert_bitwise_equal(fake_quantize(c.x, *c.op_args(), **c.op_kwargs()),
                         fake_quantize_reference(c.x, *c.op_args(), c.granularity))


# Rounding the result to float16 / bfloat16 moves it off the grid by up to half
# an ulp, so the next two properties are about float32 results.


@PROPERTY_SETTINGS
@given(case=cases(dtypes=[torch.float32]))
def test_output_lies_on_the_grid(device, case):
    c = case.to(device)
    y = fake_quantize(c.x, *c.op_args(), **c.op_kwargs())
    steps = y.double() / c.granularity.expand(c.scale.double(), y.shape)
    codes = steps + c.granularity.expand(c.zero_point.double(), y.shape)
    # y = fl(n * scale) is within 2**-24 relative of n * scale.
    assert bool(((codes - codes.round()).abs() <= steps.abs() * 2.0**-23).all())
    assert bool(((codes.round() >= c.quant_min) & (codes.round() <= c.quant_max)).all())


@PROPERTY_SETTINGS
@given(case=cases(dtypes=[torch.float32]))
def test_is_idempotent(device, case):
    c = case.to(device)
    once = fake_quantize(c.x, *c.op_args(), **c.op_kwargs())
    assert_bitwise_equal(fake_quantize(once, *c.op_args(), **c.op_kwargs()), once)


@PROPERTY_SETTINGS
@given(case=cases(), grad_factor=st.floats(0.01, 2.0))
def test_gradients_match_reference(device, case, grad_factor):
    c = case.to(device)
    dy = torch.randn(c.x.shape, generator=generator(0)).to(c.x)
    masked_dy = torch.where(in_range_mask(c.x, *c.op_args(), c.granularity), dy, torch.zeros_like(dy))

    assert_bitwise_equal(fake_quantize_backward(dy, c.x, *c.op_args(), **c.op_kwargs()), masked_dy)
    dx, dscale, dzero = fake_quantize_learnable_backward(dy, c.x, *c.op_args(), **c.op_kwargs(),
                                                         grad_factor=grad_factor)
    assert_bitwise_equal(dx, masked_dy)
    expected = fake_quantize_grads_reference(dy, c.x, *c.op_args(), c.granularity, grad_factor)
    assert_sums_close(dscale, expected.dscale, expected.dscale_abs, "dscale")
    assert_sums_close(dzero, expected.dzero, expected.dzero_abs, "dzero")
