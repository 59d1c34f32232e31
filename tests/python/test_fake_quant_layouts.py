"""Non-contiguous tensors (transposed, permuted, sliced with a step,
expanded) give exactly the results of their contiguous copies, in every op."""
import pytest
import torch

from cases import QUANT_RANGES, make_case, make_grad_output
from checks import assert_bitwise_equal
from reference import PER_TENSOR, fake_quantize_reference, in_range_mask, per_channel, per_group
from torchquant.ops import fake_quantize, fake_quantize_backward, fake_quantize_learnable_backward


def transposed(t):
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def channels_last(t):
    return t.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)


def every_other(t):
    """The same values, seen through a view that steps over every other element."""
    buffer = t.new_zeros([2 * n for n in t.shape])
    view = buffer[(slice(None, None, 2),) * t.dim()]
    view.copy_(t)
    return view


def expanded_first_row(t):
    return t[:1].expand_as(t)


VIEWS = {"transposed": transposed, "channels_last": channels_last, "every_other": every_other,
         "expanded": expanded_first_row}

def _case(view_name, shape, granularity):
    return pytest.param(view_name, shape, granularity, id=f"{view_name}-{granularity}-{'x'.join(map(str, shape))}")


CASES = [
    _case("transposed", (20, 12), PER_TENSOR),
    _case("transposed", (20, 12), per_channel(0)),
    _case("transposed", (20, 12), per_channel(-1)),
    _case("transposed", (20, 12), per_group(4)),
    _case("channels_last", (5, 6, 7, 20), per_channel(1)),
    _case("channels_last", (5, 6, 7, 20), per_channel(-1)),
    _case("channels_last", (5, 6, 7, 20), per_group(10)),
    _case("every_other", (5, 16), PER_TENSOR),
    _case("every_other", (5, 16), per_channel(0)),
    _case("every_other", (3, 5, 16), per_group(8)),
    _case("expanded", (6, 24), per_channel(0)),
    _case("expanded", (6, 24), per_group(6)),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("view_name,shape,granularity", CASES)
def test_non_contiguous_input_and_grad_output(device, view_name, shape, granularity, dtype):
    x, scale, zero_point = make_case(shape, granularity, QUANT_RANGES["int4"], dtype, device=device)
    kwargs = dict(quant_min=-8, quant_max=7, **granularity.op_kwargs())
    view = VIEWS[view_name]
    x_view = view(x)
    dy_view = view(make_grad_output(x))
    assert not x_view.is_contiguous() and not dy_view.is_contiguous()
    x_copy, dy_copy = x_view.contiguous(), dy_view.contiguous()

    assert_bitwise_equal(fake_quantize(x_view, scale, zero_point, **kwargs),
                         fake_quantize(x_copy, scale, zero_point, **kwargs))
    assert_bitwise_equal(fake_quantize_backward(dy_view, x_view, scale, zero_point, **kwargs),
                         fake_quantize_backward(dy_copy, x_copy, scale, zero_point, **kwargs))
    for actual, expected in zip(fake_quantize_learnable_backward(dy_view, x_view, scale, zero_point, **kwargs),
                                fake_quantize_learnable_backward(dy_copy, x_copy, scale, zero_point, **kwargs)):
        assert_bitwise_equal(actual, expected)


@pytest.mark.parametrize("granularity", [per_channel(1), per_group(5)], ids=str)
def test_non_contiguous_qparams(device, granularity):
    shape = (4, 6, 10)
    x, scale, zero_point = make_case(shape, granularity, QUANT_RANGES["uint8"], torch.float32, device=device)
    dy = make_grad_output(x)
    scale_view, zero_view = every_other(scale), every_other(zero_point)
    kwargs = dict(quant_min=0, quant_max=255, **granularity.op_kwargs())

    assert_bitwise_equal(fake_quantize(x, scale_view, zero_view, **kwargs),
                         fake_quantize(x, scale, zero_point, **kwargs))
    for actual, expected in zip(fake_quantize_learnable_backward(dy, x, scale_view, zero_view, **kwargs),
                                fake_quantize_learnable_backward(dy, x, scale, zero_point, **kwargs)):
        assert_bitwise_equal(actual, expected)


@pytest.mark.parametrize("granularity", [PER_TENSOR, per_channel(0), per_group(64)], ids=str)
def test_outputs_large_enough_for_huge_pages(device, granularity):
    """Outputs of several MiB (the CPU kernels advise huge pages for those
    before writing) hold the same values as the reference, to the last
    element of the last, partly covered, page."""
    shape = (1031, 2112)  # 8.3 MiB in fp32, an odd number of 4 KiB pages
    x, scale, zero_point = make_case(shape, granularity, QUANT_RANGES["int8"], torch.float32, device=device)
    dy = make_grad_output(x)
    grid = dict(quant_min=-128, quant_max=127)
    kwargs = dict(grid, **granularity.op_kwargs())
    y = fake_quantize(x, scale, zero_point, **kwargs)
    assert_bitwise_equal(y, fake_quantize_reference(x, scale, zero_point, granularity=granularity, **grid))
    dx_ste = fake_quantize_backward(dy, x, scale, zero_point, **kwargs)
    dx, _, _ = fake_quantize_learnable_backward(dy, x, scale, zero_point, **kwargs)
    expected_dx = torch.where(in_range_mask(x, scale, zero_point, granularity=granularity, **grid), dy, 0.0)
    assert_bitwise_equal(dx_ste, expected_dx)
    assert_bitwise_equal(dx, expected_dx)
