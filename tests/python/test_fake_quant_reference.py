"""Forward of torchquant.ops.fake_quantize against PyTorch's fake-quant ops and
the plain reference: bit-identical, for every granularity, code range and
input dtype."""
import pytest
import torch

from cases import FLOAT_DTYPES, QUANT_RANGES, make_case
from checks import assert_bitwise_equal
from reference import (PER_TENSOR, fake_quantize_reference, per_channel, per_group, torch_fake_quantize,
                       torch_learnable_fake_quantize)
from torchquant.ops import fake_quantize

CONV_SHAPE = (5, 6, 7, 20)  # [out_channels, in_channels, kh, kw]-like
# (shape, granularity). The shapes leave a scalar tail after the vector loops.
LAYOUTS = [
    (CONV_SHAPE, PER_TENSOR),
    (CONV_SHAPE, per_channel(0)),
    (CONV_SHAPE, per_channel(1)),
    (CONV_SHAPE, per_channel(2)),
    (CONV_SHAPE, per_channel(-1)),
    ((37,), per_channel(0)),
    ((6, 40), per_group(8)),
    ((6, 40), per_group(40)),
    ((3, 4, 30), per_group(5)),
    ((3, 4, 30), per_group(3)),
    ((2, 5, 64), per_group(32)),
    ((2, 5, 6), per_group(1)),
]
# Large enough to be split across threads, and into several row blocks.
LARGE_LAYOUTS = [((70001,), PER_TENSOR), ((300, 67), per_channel(-1)), ((48, 1030), per_group(515))]
REFERENCES = pytest.mark.parametrize("reference", [torch_fake_quantize, fake_quantize_reference],
                                     ids=["torch", "plain"])


def _layout_id(layout):
    shape, granularity = layout
    return f"{granularity}-{'x'.join(map(str, shape))}"


def _check_forward(device, reference, layout, quant_range, dtype):
    shape, granularity = layout
    qmin, qmax = quant_range
    x, scale, zero_point = make_case(shape, granularity, quant_range, dtype, seed=len(shape) + qmax, device=device)
    actual = fake_quantize(x, scale, zero_point, qmin, qmax, **granularity.op_kwargs())
    assert_bitwise_equal(actual, reference(x, scale, zero_point, qmin, qmax, granularity))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("quant_range", QUANT_RANGES.values(), ids=QUANT_RANGES.keys())
@pytest.mark.parametrize("layout", LAYOUTS, ids=_layout_id)
@REFERENCES
def test_forward_is_bit_identical(device, reference, layout, quant_range, dtype):
    _check_forward(device, reference, layout, quant_range, dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("range_name", ["int8", "uint16"])
@pytest.mark.parametrize("layout", LARGE_LAYOUTS, ids=_layout_id)
@REFERENCES
def test_forward_is_bit_identical_when_parallel(device, reference, layout, range_name, dtype):
    _check_forward(device, reference, layout, QUANT_RANGES[range_name], dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("layout", [(CONV_SHAPE, PER_TENSOR), (CONV_SHAPE, per_channel(1))], ids=_layout_id)
def test_forward_matches_torch_learnable_forward(device, layout, dtype):
    shape, granularity = layout
    x, scale, zero_point = make_case(shape, granularity, QUANT_RANGES["int4"], dtype, device=device)
    actual = fake_quantize(x, scale, zero_point, -8, 7, **granularity.op_kwargs())
    assert_bitwise_equal(actual, torch_learnable_fake_quantize(x, scale, zero_point, -8, 7, granularity))


# Code ranges whose inputs (k + 1/2) / 4 are exact in each dtype (bfloat16
# keeps 8 significant bits).
_TIE_RANGES = [(dtype, name) for dtype in FLOAT_DTYPES for name in ("int4", "uint4", "int2")] + [
    (dtype, name) for dtype in (torch.float32, torch.float16) for name in ("int8", "uint8")]


@pytest.mark.parametrize("dtype,range_name", _TIE_RANGES, ids=str)
def test_exact_ties_round_half_to_even(device, dtype, range_name):
    qmin, qmax = QUANT_RANGES[range_name]
    zero_point = (qmin + qmax + 1) // 2
    scale = 0.25
    ks = list(range(qmin - zero_point - 3, qmax - zero_point + 3))
    x = torch.tensor([(k + 0.5) * scale for k in ks], dtype=dtype, device=device)
    assert x.float().div(scale).sub(0.5).tolist() == ks, "inputs must sit exactly on ties"

    actual = fake_quantize(x, torch.tensor([scale], device=device), torch.tensor([zero_point], device=device),
                           qmin, qmax)

    nearest_even = [k if k % 2 == 0 else k + 1 for k in ks]
    clamped = [min(max(n + zero_point, qmin), qmax) - zero_point for n in nearest_even]
    expected = torch.tensor([n * scale for n in clamped], dtype=dtype, device=device)
    assert_bitwise_equal(actual, expected)
    assert_bitwise_equal(actual, torch_fake_quantize(x, torch.tensor([scale]).to(device),
                                                     torch.tensor([zero_point]).to(device), qmin, qmax, PER_TENSOR))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_clips_to_both_ends_of_the_range(device, dtype):
    scale = torch.tensor([0.5, 0.125], device=device)
    zero_point = torch.tensor([3.0, -2.0], device=device)
    # Codes, far below / just below / at each end / just above / far above:
    #   row 0: -1997, -13, -8, 7, 35, 2003;  row 1: -8002, -9, -8, 7, 8, 7998.
    x = torch.tensor([[-1e3, -8.25, -5.5, 2.0, 16.0, 1e3],
                      [-1e3, -0.875, -0.75, 1.125, 1.25, 1e3]], dtype=dtype, device=device)
    actual = fake_quantize(x, scale, zero_point, -8, 7, axis=0)
    low = ((-8 - 3) * 0.5, (-8 + 2) * 0.125)
    high = ((7 - 3) * 0.5, (7 + 2) * 0.125)
    expected = torch.tensor([[low[c]] * 3 + [high[c]] * 3 for c in range(2)], dtype=dtype, device=device)
    assert_bitwise_equal(actual, expected)


@pytest.mark.parametrize("zero_point_dtype", [torch.int32, torch.int64], ids=str)
def test_integer_zero_points_match_float_ones(device, zero_point_dtype):
    x, scale, zero_point = make_case(CONV_SHAPE, per_channel(1), QUANT_RANGES["uint8"], torch.float32, device=device)
    as_float = fake_quantize(x, scale, zero_point, 0, 255, axis=1)
    as_int = fake_quantize(x, scale, zero_point.to(zero_point_dtype), 0, 255, axis=1)
    assert_bitwise_equal(as_int, as_float)


def test_float_zero_point_is_rounded_half_to_even(device):
    x, scale, _ = make_case((4, 64), per_channel(0), QUANT_RANGES["int8"], torch.float32, device=device)
    fractional = torch.tensor([2.5, 3.5, -1.5, 0.4], device=device)
    rounded = torch.tensor([2, 4, -2, 0], dtype=torch.int32, device=device)
    assert_bitwise_equal(fake_quantize(x, scale, fractional, -128, 127, axis=0),
                         fake_quantize(x, scale, rounded, -128, 127, axis=0))


def test_scalar_qparams_are_accepted_for_per_tensor(device):
    x, scale, zero_point = make_case((3, 17), PER_TENSOR, QUANT_RANGES["int8"], torch.float32, device=device)
    assert_bitwise_equal(fake_quantize(x, scale.reshape(()), zero_point.reshape(()), -128, 127),
                         fake_quantize(x, scale, zero_point, -128, 127))


def test_empty_input_gives_empty_output(device):
    x = torch.empty(0, 8, device=device)
    y = fake_quantize(x, torch.full((0, 2), 0.1, device=device), torch.zeros(0, 2, device=device), -8, 7,
                      group_size=4)
    assert y.shape == (0, 8) and y.dtype == torch.float32
