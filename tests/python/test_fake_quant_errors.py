"""Bad arguments raise TypeError / ValueError naming the argument, in every
fake-quantize op."""
import math

import pytest
import torch

from torchquant.ops import fake_quantize, fake_quantize_backward, fake_quantize_learnable_backward, quant_range


def _forward(x, scale, zero_point, quant_min, quant_max, **kwargs):
    return fake_quantize(x, scale, zero_point, quant_min, quant_max, **kwargs)


def _ste_backward(x, scale, zero_point, quant_min, quant_max, **kwargs):
    return fake_quantize_backward(torch.ones_like(x), x, scale, zero_point, quant_min, quant_max, **kwargs)


def _learnable_backward(x, scale, zero_point, quant_min, quant_max, **kwargs):
    return fake_quantize_learnable_backward(torch.ones_like(x), x, scale, zero_point, quant_min, quant_max, **kwargs)


@pytest.fixture(params=[_forward, _ste_backward, _learnable_backward], ids=["forward", "backward", "learnable"])
def op(request):
    """One of the ops, called as fake_quantize is (a valid grad_output is made up for the backward ones)."""
    return request.param


def _per_tensor(device):
    """A valid per-tensor (x, scale, zero_point)."""
    return torch.randn(4, 8, device=device), torch.tensor([0.1], device=device), torch.tensor([0.0], device=device)


# ----------------------------------------------------------------------------
# Values of scale and zero_point: checked on CPU. (On CUDA they are not, which
# would cost a host synchronisation; see test_cuda_invalid_scale_gives_nan.)


@pytest.mark.parametrize("bad_scale", [0.0, -0.5, math.inf], ids=["zero", "negative", "inf"])
def test_scale_not_positive_and_finite(op, bad_scale):
    x = torch.randn(4, 8)
    scale = torch.tensor([0.1, bad_scale, 0.1, 0.1])
    with pytest.raises(ValueError, match=r"scale must be positive and finite.*scale\[1\]"):
        op(x, scale, torch.zeros(4), -8, 7, axis=0)


def test_scale_nan(op):
    x, _, zero_point = _per_tensor("cpu")
    with pytest.raises(ValueError, match=r"scale must be positive and finite.*nan"):
        op(x, torch.tensor([math.nan]), zero_point, -8, 7)


@pytest.mark.parametrize("bad_zero", [8.0, -9.0, 7.5], ids=["above", "below", "rounds_above"])
def test_zero_point_outside_range(op, bad_zero):
    x, scale, _ = _per_tensor("cpu")
    with pytest.raises(ValueError, match=r"zero_point must round to a value in \[quant_min, quant_max\]"):
        op(x, scale, torch.tensor([bad_zero]), -8, 7)


@pytest.mark.cuda
def test_cuda_invalid_scale_gives_nan():
    x, _, zero_point = _per_tensor("cuda")
    y = fake_quantize(x, torch.tensor([-1.0], device="cuda"), zero_point, -8, 7)
    assert bool(y.isnan().all())


# ----------------------------------------------------------------------------
# Code range.


@pytest.mark.parametrize("quant_min,quant_max", [(7, 7), (7, -8)])
def test_quant_min_not_below_quant_max(op, device, quant_min, quant_max):
    x, scale, zero_point = _per_tensor(device)
    with pytest.raises(ValueError, match=r"quant_min must be less than quant_max"):
        op(x, scale, zero_point, quant_min, quant_max)


@pytest.mark.parametrize("quant_min,quant_max", [(0, 1), (-1, 1), (0, (1 << 17) - 1), (-(1 << 16), (1 << 16) - 1)],
                         ids=["1bit", "3levels", "17bit_unsigned", "17bit_signed"])
def test_range_outside_2_to_16_bits(op, device, quant_min, quant_max):
    x, scale, zero_point = _per_tensor(device)
    with pytest.raises(ValueError, match=r"\[quant_min, quant_max\] must"):
        op(x, scale, zero_point, quant_min, quant_max)


@pytest.mark.parametrize("bits", [1, 17, 0, 8.0, True])
def test_quant_range_bad_bits(bits):
    with pytest.raises(ValueError, match=r"bits must be an integer in \[2, 16\]"):
        quant_range(bits)


# ----------------------------------------------------------------------------
# Shapes and granularity.


def test_per_tensor_scale_shape(op, device):
    x, _, zero_point = _per_tensor(device)
    with pytest.raises(ValueError, match=r"per-tensor .* scale must have shape \[1\], got \[2\]"):
        op(x, torch.full((2,), 0.1, device=device), zero_point, -8, 7)


def test_per_channel_scale_shape(op, device):
    x = torch.randn(4, 6, device=device)
    with pytest.raises(ValueError, match=r"per-channel .* scale must have shape \[6\], got \[4\]"):
        op(x, torch.full((4,), 0.1, device=device), torch.zeros(6, device=device), -8, 7, axis=1)


def test_per_group_scale_shape(op, device):
    x = torch.randn(4, 8, device=device)
    with pytest.raises(ValueError, match=r"per-group .* scale must have shape \[4, 2\], got \[8\]"):
        op(x, torch.full((8,), 0.1, device=device), torch.zeros(4, 2, device=device), -8, 7, group_size=4)


def test_zero_point_shape(op, device):
    x = torch.randn(4, 6, device=device)
    with pytest.raises(ValueError, match=r"zero_point must have shape \[6\], got \[1\]"):
        op(x, torch.full((6,), 0.1, device=device), torch.zeros(1, device=device), -8, 7, axis=1)


def test_group_size_not_dividing_last_dim(op, device):
    x = torch.randn(4, 10, device=device)
    with pytest.raises(ValueError, match=r"group_size \(4\) must divide the last dimension of input \(10\)"):
        op(x, torch.full((4, 2), 0.1, device=device), torch.zeros(4, 2, device=device), -8, 7, group_size=4)


@pytest.mark.parametrize("group_size", [0, -2])
def test_group_size_not_positive(op, device, group_size):
    x, scale, zero_point = _per_tensor(device)
    with pytest.raises(ValueError, match=r"group_size must be positive"):
        op(x, scale, zero_point, -8, 7, group_size=group_size)


@pytest.mark.parametrize("axis", [2, -3])
def test_axis_out_of_range(op, device, axis):
    x = torch.randn(4, 6, device=device)
    with pytest.raises(ValueError, match=r"axis must be in \[-2, 1\]"):
        op(x, torch.full((4,), 0.1, device=device), torch.zeros(4, device=device), -8, 7, axis=axis)


@pytest.mark.parametrize("backward", [fake_quantize_backward, fake_quantize_learnable_backward],
                         ids=["backward", "learnable"])
def test_grad_output_shape(device, backward):
    x, scale, zero_point = _per_tensor(device)
    with pytest.raises(ValueError, match=r"grad_output must have the shape of input \[4, 8\], got \[8, 4\]"):
        backward(torch.ones(8, 4, device=device), x, scale, zero_point, -8, 7)


# ----------------------------------------------------------------------------
# Dtypes and devices.


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.float64], ids=str)
def test_input_dtype(op, device, dtype):
    _, scale, zero_point = _per_tensor(device)
    x = torch.ones(4, 8, dtype=dtype, device=device)
    with pytest.raises(TypeError, match=r"input must be float32, float16 or bfloat16"):
        op(x, scale, zero_point, -8, 7)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=str)
def test_scale_dtype(op, device, dtype):
    x, scale, zero_point = _per_tensor(device)
    with pytest.raises(TypeError, match=r"scale must be float32"):
        op(x, scale.to(dtype), zero_point, -8, 7)


def test_zero_point_dtype(op, device):
    x, scale, zero_point = _per_tensor(device)
    with pytest.raises(TypeError, match=r"zero_point must be float32, int32 or int64"):
        op(x, scale, zero_point.to(torch.float16), -8, 7)


@pytest.mark.cuda
@pytest.mark.parametrize("moved", ["scale", "zero_point"])
def test_qparams_on_another_device(op, moved):
    x, scale, zero_point = _per_tensor("cuda")
    qparams = {"scale": scale, "zero_point": zero_point}
    qparams[moved] = qparams[moved].cpu()
    with pytest.raises(ValueError, match=moved + r" must be on the same device as input"):
        op(x, qparams["scale"], qparams["zero_point"], -8, 7)


@pytest.mark.cuda
@pytest.mark.parametrize("backward", [fake_quantize_backward, fake_quantize_learnable_backward],
                         ids=["backward", "learnable"])
def test_grad_output_on_another_device(backward):
    x, scale, zero_point = _per_tensor("cuda")
    with pytest.raises(ValueError, match=r"grad_output must be on the same device as input"):
        backward(torch.ones(4, 8), x, scale, zero_point, -8, 7)
