"""Gradients of fake_quantize (straight-through dx, LSQ+ dscale / dzero)
against PyTorch's fake-quant ops and the plain reference, through the
backward ops directly and through autograd."""
import pytest
import torch

from cases import FLOAT_DTYPES, QUANT_RANGES, make_case, make_grad_output
from checks import assert_bitwise_equal, assert_equal_values, assert_sums_close
from reference import (PER_TENSOR, fake_quantize_grads_reference, per_channel, per_group, torch_fake_quantize,
                       torch_learnable_backward_disagrees, torch_learnable_grads)
from torchquant.ops import fake_quantize, fake_quantize_backward, fake_quantize_learnable_backward

CONV_SHAPE = (5, 6, 7, 20)
# PyTorch knows per-tensor and per-channel; per-group goes through it as
# per-channel rows (see reference._as_torch_layout).
LAYOUTS = [
    (CONV_SHAPE, PER_TENSOR),
    (CONV_SHAPE, per_channel(0)),
    (CONV_SHAPE, per_channel(1)),
    (CONV_SHAPE, per_channel(-1)),
    ((300, 67), per_channel(-1)),
    ((6, 40), per_group(8)),
    ((3, 4, 30), per_group(5)),
    ((2, 3, 64), per_group(64)),
    ((40000,), PER_TENSOR),
]
RANGES = ["int8", "uint4", "int2", "uint16"]
GRAD_FACTOR = 0.37  # not 1, so that a dropped or misapplied factor shows


def _layout_id(layout):
    shape, granularity = layout
    return f"{granularity}-{'x'.join(map(str, shape))}"


def _learnable_backward(dy, x, scale, zero_point, quant_range, granularity):
    return fake_quantize_learnable_backward(dy, x, scale, zero_point, *quant_range, **granularity.op_kwargs(),
                                            grad_factor=GRAD_FACTOR)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("range_name", RANGES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=_layout_id)
def test_learnable_backward_matches_torch(device, layout, range_name, dtype):
    shape, granularity = layout
    quant_range = QUANT_RANGES[range_name]
    # Integer-valued zero-points, >= 0 for per-tensor: see reference.torch_learnable_fake_quantize.
    x, scale, zero_point = make_case(shape, granularity, quant_range, dtype, seed=3, device=device)
    if granularity.kind == "tensor":
        zero_point = zero_point.clamp(min=0)
    # Elements on which PyTorch's learnable backward disagrees with its own
    # forward get no gradient, so that they drop out of every comparison.
    dy = make_grad_output(x).masked_fill(torch_learnable_backward_disagrees(x, scale, zero_point, granularity), 0)

    dx, dscale, dzero = _learnable_backward(dy, x, scale, zero_point, quant_range, granularity)

    expected_dx, expected_dscale, expected_dzero = torch_learnable_grads(dy, x, scale, zero_point, *quant_range,
                                                                         granularity, GRAD_FACTOR)
    magnitudes = fake_quantize_grads_reference(dy, x, scale, zero_point, *quant_range, granularity, GRAD_FACTOR)
    assert_equal_values(dx, expected_dx)
    assert dscale.dtype == dzero.dtype == torch.float32
    assert_sums_close(dscale, expected_dscale, magnitudes.dscale_abs, "dscale")
    assert_sums_close(dzero, expected_dzero, magnitudes.dzero_abs, "dzero")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("range_name", RANGES)
@pytest.mark.parametrize("layout", [((6, 40), per_group(g)) for g in (1, 4, 8, 40)]
                         + [((3, 4, 30), per_group(g)) for g in (3, 10, 30)]
                         + [((48, 1030), per_group(515)), (CONV_SHAPE, per_channel(2))], ids=_layout_id)
def test_learnable_backward_matches_plain_reference(device, layout, range_name, dtype):
    shape, granularity = layout
    quant_range = QUANT_RANGES[range_name]
    x, scale, zero_point = make_case(shape, granularity, quant_range, dtype, seed=4, device=device)
    dy = make_grad_output(x)

    dx, dscale, dzero = _learnable_backward(dy, x, scale, zero_point, quant_range, granularity)

    expected = fake_quantize_grads_reference(dy, x, scale, zero_point, *quant_range, granularity, GRAD_FACTOR)
    assert_bitwise_equal(dx, expected.dx)
    assert dscale.shape == scale.shape and dzero.shape == zero_point.shape
    assert_sums_close(dscale, expected.dscale, expected.dscale_abs, "dscale")
    assert_sums_close(dzero, expected.dzero, expected.dzero_abs, "dzero")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("range_name", RANGES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=_layout_id)
def test_straight_through_backward_matches_torch(device, layout, range_name, dtype):
    shape, granularity = layout
    quant_range = QUANT_RANGES[range_name]
    x, scale, zero_point = make_case(shape, granularity, quant_range, dtype, seed=5, device=device)
    dy = make_grad_output(x)

    dx = fake_quantize_backward(dy, x, scale, zero_point, *quant_range, **granularity.op_kwargs())

    leaf = x.detach().requires_grad_(True)
    torch_fake_quantize(leaf, scale, zero_point, *quant_range, granularity).backward(dy)
    assert_equal_values(dx, leaf.grad)


# Which of (input, scale, zero_point) require grad.
_NEEDS_GRAD = [(True, False, False), (True, True, False), (False, True, True), (True, True, True),
               (False, False, True)]


@pytest.mark.parametrize("needs_grad", _NEEDS_GRAD, ids=lambda n: "".join("xsz"[i] for i in range(3) if n[i]))
@pytest.mark.parametrize("layout", [(CONV_SHAPE, per_channel(1)), ((6, 40), per_group(8)), ((3, 50), PER_TENSOR)],
                         ids=_layout_id)
def test_autograd_gives_the_backward_ops_results(device, layout, needs_grad):
    shape, granularity = layout
    quant_range = QUANT_RANGES["int4"]
    x, scale, zero_point = make_case(shape, granularity, quant_range, torch.float32, seed=6, device=device)
    dy = make_grad_output(x)
    leaves = [t.detach().clone().requires_grad_(n) for t, n in zip((x, scale, zero_point), needs_grad)]

    fake_quantize(*leaves, *quant_range, **granularity.op_kwargs(), grad_factor=GRAD_FACTOR).backward(dy)

    dx, dscale, dzero = _learnable_backward(dy, x, scale, zero_point, quant_range, granularity)
    for leaf, needs, expected in zip(leaves, needs_grad, (dx, dscale, dzero)):
        if needs:
            assert_bitwise_equal(leaf.grad, expected)
        else:
            assert leaf.grad is None
    if needs_grad == (True, False, False):  # the cheaper straight-through op must agree too
        assert_bitwise_equal(leaves[0].grad, fake_quantize_backward(dy, x, scale, zero_point, *quant_range,
                                                                    **granularity.op_kwargs()))


def test_integer_zero_point_with_learnable_scale(device):
    x, scale, zero_point = make_case((4, 33), per_channel(0), QUANT_RANGES["uint8"], torch.float32, device=device)
    dy = make_grad_output(x)
    s = scale.clone().requires_grad_(True)
    fake_quantize(x, s, zero_point.to(torch.int32), 0, 255, axis=0).backward(dy)
    expected = fake_quantize_learnable_backward(dy, x, scale, zero_point, 0, 255, axis=0)[1]
    assert_bitwise_equal(s.grad, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_grad_output_of_another_dtype_is_converted(device, dtype):
    x, scale, zero_point = make_case((8, 24), per_group(6), QUANT_RANGES["int4"], dtype, device=device)
    dy = make_grad_output(x.float())
    as_float = fake_quantize_learnable_backward(dy, x, scale, zero_point, -8, 7, group_size=6)
    as_input_dtype = fake_quantize_learnable_backward(dy.to(dtype), x, scale, zero_point, -8, 7, group_size=6)
    for actual, expected in zip(as_float, as_input_dtype):
        assert_bitwise_equal(actual, expected)


def test_empty_input_has_zero_qparam_gradients(device):
    x = torch.empty(0, 5, device=device)
    scale = torch.full((5,), 0.1, device=device)
    dx, dscale, dzero = fake_quantize_learnable_backward(x, x, scale, torch.zeros(5, device=device), -8, 7, axis=1)
    assert dx.shape == (0, 5)
    assert_bitwise_equal(dscale, torch.zeros(5, device=device))
    assert_bitwise_equal(dzero, torch.zeros(5, device=device))
