"""torch.library.opcheck of every fake-quantize op: schema, autograd
registration, fake (meta) kernel and AOT dispatch, over granularities,
dtypes and shapes (empty ones included)."""
import pytest
import torch
from torch.library import opcheck

from cases import FLOAT_DTYPES, QUANT_RANGES, make_case, make_grad_output
from reference import PER_TENSOR, per_channel, per_group

OPS = torch.ops.torchquant

# (shape, granularity): 1-D, 2-D, 4-D and empty inputs for each granularity.
LAYOUTS = [
    ((37,), PER_TENSOR),
    ((3, 5, 4, 6), PER_TENSOR),
    ((0, 4), PER_TENSOR),
    ((12,), per_channel(0)),
    ((6, 9), per_channel(0)),
    ((3, 5, 4, 6), per_channel(0)),
    ((0, 4), per_channel(0)),
    ((6, 9), per_channel(-1)),
    ((3, 5, 4, 6), per_channel(-1)),
    ((3, 0), per_channel(-1)),
    ((12,), per_group(4)),
    ((6, 8), per_group(4)),
    ((2, 3, 4, 6), per_group(3)),
    ((0, 8), per_group(4)),
]


def _cases():
    """Every layout once, cycling through the input dtypes."""
    for i, (shape, granularity) in enumerate(LAYOUTS):
        dtype = FLOAT_DTYPES[i % len(FLOAT_DTYPES)]
        yield pytest.param(shape, granularity, dtype, id=f"{granularity}-{'x'.join(map(str, shape))}-{dtype}")


CASES = list(_cases())


def _args(shape, granularity, dtype, device):
    x, scale, zero_point = make_case(shape, granularity, QUANT_RANGES["int8"], dtype, device=device)
    return x, scale, zero_point, -128, 127, granularity.axis, granularity.group_size


# With learnable qparams, the AOT check traces fake_quantize_learnable_backward
# through autograd; with fixed ones, fake_quantize_backward.
@pytest.mark.parametrize("qparams_need_grad", [False, True], ids=["fixed", "learnable"])
@pytest.mark.parametrize("shape,granularity,dtype", CASES)
def test_fake_quantize(device, shape, granularity, dtype, qparams_need_grad):
    x, scale, zero_point, *rest = _args(shape, granularity, dtype, device)
    x.requires_grad_(True)
    scale.requires_grad_(qparams_need_grad)
    zero_point.requires_grad_(qparams_need_grad)
    opcheck(OPS.fake_quantize.default, (x, scale, zero_point, *rest, 0.5))


# The backward ops have no autograd formula of their own (no double backward),
# so their inputs do not require grad.
@pytest.mark.parametrize("shape,granularity,dtype", CASES)
def test_fake_quantize_backward(device, shape, granularity, dtype):
    x, *rest = _args(shape, granularity, dtype, device)
    opcheck(OPS.fake_quantize_backward.default, (make_grad_output(x), x, *rest))


@pytest.mark.parametrize("shape,granularity,dtype", CASES)
def test_fake_quantize_learnable_backward(device, shape, granularity, dtype):
    x, *rest = _args(shape, granularity, dtype, device)
    opcheck(OPS.fake_quantize_learnable_backward.default, (make_grad_output(x), x, *rest, 0.5))


def test_fake_quantize_with_integer_zero_point(device):
    x, scale, zero_point = make_case((4, 6), per_channel(1), QUANT_RANGES["uint8"], torch.float32, device=device)
    opcheck(OPS.fake_quantize.default,
            (x.requires_grad_(True), scale.requires_grad_(True), zero_point.to(torch.int32), 0, 255, 1, None, 1.0))
