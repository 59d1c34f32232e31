"""Bad arguments to the GPTQ ops raise TypeError / ValueError naming the argument
and the expected value; nothing is modified by a rejected call."""
from __future__ import annotations

import math

import pytest
import torch

from torchquant import ops

OPS = torch.ops.torchquant

IN = 32


def _valid(device="cpu"):
    """A valid (weight, hessian) pair: 6 x 32 weight, positive definite Hessian."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, IN, generator=g)
    return torch.randn(6, IN, generator=g).to(device), (2 * x.t() @ x / 128).to(device)


def _call(weight=None, hessian=None, **overrides):
    w, h = _valid()
    kwargs = dict(quant_min=-8, quant_max=7, symmetric=True)
    kwargs.update(overrides)
    return ops.gptq_quantize(w if weight is None else weight, h if hessian is None else hessian, **kwargs)


def test_valid_call_passes():
    result = _call(group_size=16, act_order=True, static_groups=True, block_size=5, percdamp=1.0,
                   clip_search_steps=3, clip_max_shrink=0.0, layer_name="fc")
    assert result.weight_q.shape == (6, IN)


# ---------------------------------------------------------------------------
# weight


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32])
def test_weight_dtype(dtype):
    w, _ = _valid()
    with pytest.raises(TypeError, match=r"weight must be float32, float16 or bfloat16, got .*(Double|Int)"):
        _call(weight=w.to(dtype))


@pytest.mark.parametrize("shape", [(IN,), (2, 3, IN)], ids=["1d", "3d"])
def test_weight_not_2d(shape):
    with pytest.raises(ValueError, match=r"weight must be 2-D \[out_features, in_features\]"):
        _call(weight=torch.randn(shape))


def test_weight_without_columns():
    with pytest.raises(ValueError, match="weight must have at least one input column"):
        ops.gptq_quantize(torch.randn(4, 0), torch.zeros(0, 0), -8, 7, True)


def test_weight_not_a_tensor():
    with pytest.raises(TypeError, match="weight must be a Tensor, got list"):
        _call(weight=[[1.0]])


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_weight_not_finite(bad):
    w, _ = _valid()
    w[2, 5] = bad
    with pytest.raises(ValueError, match=r"\(layer 'mlp.fc1'\): weight contains NaN or Inf"):
        _call(weight=w, layer_name="mlp.fc1")


# ---------------------------------------------------------------------------
# hessian


def test_hessian_dtype():
    _, h = _valid()
    with pytest.raises(TypeError, match="hessian must be float32, got Double"):
        _call(hessian=h.double())


@pytest.mark.parametrize("shape", [(IN, IN + 1), (IN + 1, IN + 1), (IN,)], ids=["rect", "other_in", "1d"])
def test_hessian_shape(shape):
    with pytest.raises(ValueError, match=rf"hessian must be \[in_features, in_features\] = \[{IN}, {IN}\]"):
        _call(hessian=torch.eye(*shape) if len(shape) == 2 else torch.ones(shape))


@pytest.mark.parametrize("bad", [math.nan, -math.inf], ids=["nan", "inf"])
def test_hessian_not_finite(bad):
    _, h = _valid()
    h[3, 3] = bad
    with pytest.raises(ValueError, match="hessian contains NaN or Inf"):
        _call(hessian=h)


def test_hessian_negative_diagonal():
    _, h = _valid()
    h[4, 4] = -1.0
    with pytest.raises(ValueError, match=r"hessian must be positive semi-definite.*negative entry \(-1\)"):
        _call(hessian=h)


def test_hessian_not_symmetric():
    _, h = _valid()
    h[0, 1] += 1.0
    with pytest.raises(ValueError, match=r"hessian must be symmetric, but max \|H - H\^T\|"):
        _call(hessian=h)


def test_hessian_on_another_device_fake():
    """Devices must match; checked by the fake kernel too (meta is the device at hand)."""
    w, h = _valid()
    with pytest.raises(Exception, match="hessian must be on the device of weight"):
        OPS.gptq_quantize(w.to("meta"), h, -8, 7, True)


@pytest.mark.cuda
def test_hessian_on_another_device():
    w, h = _valid()
    with pytest.raises(ValueError, match=r"hessian must be on the device of weight \(cuda"):
        ops.gptq_quantize(w.cuda(), h, -8, 7, True)


# ---------------------------------------------------------------------------
# The grid.


@pytest.mark.parametrize("qmin,qmax", [(7, -8), (3, 3)])
def test_quant_range_order(qmin, qmax):
    with pytest.raises(ValueError, match="quant_min must be less than quant_max"):
        _call(quant_min=qmin, quant_max=qmax, symmetric=False)


def test_quant_range_too_wide():
    with pytest.raises(ValueError, match=r"\[quant_min, quant_max\] must"):
        _call(quant_min=0, quant_max=1 << 17, symmetric=False)


def test_symmetric_needs_signed_range():
    with pytest.raises(ValueError, match=r"symmetric grid needs a signed code range .* got \[0, 15\]"):
        _call(quant_min=0, quant_max=15, symmetric=True)


@pytest.mark.parametrize("name", ["quant_min", "quant_max", "block_size", "clip_search_steps"])
def test_integer_arguments(name):
    with pytest.raises(TypeError, match=rf"{name} must be an int, got 2.0"):
        _call(**{name: 2.0})


@pytest.mark.parametrize("group_size", [0, -16])
def test_group_size_not_positive(group_size):
    with pytest.raises(ValueError, match=rf"group_size must be positive or None, got {group_size}"):
        _call(group_size=group_size)


def test_group_size_not_dividing():
    with pytest.raises(ValueError, match=rf"group_size \(12\) must divide in_features \(weight.shape\[1\] = {IN}\)"):
        _call(group_size=12)


def test_group_size_type():
    with pytest.raises(TypeError, match="group_size must be an int or None, got 16.0"):
        _call(group_size=16.0)


def test_static_groups_need_group_size():
    with pytest.raises(ValueError, match="static_groups=True needs a group_size"):
        _call(static_groups=True)


# ---------------------------------------------------------------------------
# The algorithm's options.


@pytest.mark.parametrize("block_size", [0, -128])
def test_block_size(block_size):
    with pytest.raises(ValueError, match=rf"block_size must be positive, got {block_size}"):
        _call(block_size=block_size)


@pytest.mark.parametrize("percdamp", [0.0, -0.01, 1.5, math.nan])
def test_percdamp(percdamp):
    with pytest.raises(ValueError, match=r"percdamp must be in \(0, 1\]"):
        _call(percdamp=percdamp)


@pytest.mark.parametrize("steps", [-1, 10001])
def test_clip_search_steps(steps):
    with pytest.raises(ValueError, match=rf"clip_search_steps must be in \[0, 10000\].*got {steps}"):
        _call(clip_search_steps=steps)


@pytest.mark.parametrize("shrink", [-0.1, 1.0, math.nan])
def test_clip_max_shrink(shrink):
    with pytest.raises(ValueError, match=r"clip_max_shrink must be in \[0, 1\)"):
        _call(clip_search_steps=4, clip_max_shrink=shrink)


def test_layer_name_type():
    with pytest.raises(TypeError, match="layer_name must be a str, got int"):
        _call(layer_name=3)


def test_errors_name_the_layer():
    with pytest.raises(ValueError, match=r"torchquant.gptq_quantize \(layer 'blocks.7.mlp.down_proj'\): block_size"):
        _call(block_size=0, layer_name="blocks.7.mlp.down_proj")


def test_raw_op_checks_too():
    """The C++ op itself (what torch.ops and LibTorch users call) raises the same errors."""
    w, h = _valid()
    with pytest.raises(ValueError, match="group_size .* must divide in_features"):
        OPS.gptq_quantize(w, h, -8, 7, True, 12)
    with pytest.raises(ValueError, match=r"percdamp must be in \(0, 1\]"):
        OPS.gptq_quantize(w, h, -8, 7, True, percdamp=0.0)


# ---------------------------------------------------------------------------
# gptq_accumulate_hessian


def _accumulate(hessian=None, inputs=None, num_seen=0):
    h = torch.zeros(IN, IN) if hessian is None else hessian
    x = torch.randn(5, IN) if inputs is None else inputs
    return ops.gptq_accumulate_hessian(h, x, num_seen)


def test_accumulate_hessian_dtype():
    with pytest.raises(TypeError, match="hessian must be float32, got Double"):
        _accumulate(hessian=torch.zeros(IN, IN, dtype=torch.float64))


@pytest.mark.parametrize("shape", [(IN, IN + 1), (IN,)], ids=["rect", "1d"])
def test_accumulate_hessian_not_square(shape):
    with pytest.raises(ValueError, match=r"hessian must be a square matrix \[in_features, in_features\]"):
        _accumulate(hessian=torch.zeros(shape))


def test_accumulate_inputs_dtype():
    with pytest.raises(TypeError, match="inputs must be a floating-point tensor, got Int"):
        _accumulate(inputs=torch.ones(5, IN, dtype=torch.int32))


@pytest.mark.parametrize("shape", [(5, IN + 1), ()], ids=["wrong_features", "0d"])
def test_accumulate_inputs_shape(shape):
    with pytest.raises(ValueError, match=rf"inputs must have shape \[\.\.\., in_features\] with in_features = {IN}"):
        _accumulate(inputs=torch.randn(shape))


def test_accumulate_num_seen():
    with pytest.raises(ValueError, match="num_seen must be non-negative, got -1"):
        _accumulate(num_seen=-1)
    with pytest.raises(TypeError, match="num_seen must be an int, got 1.5"):
        _accumulate(num_seen=1.5)


@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_accumulate_inputs_not_finite(bad):
    hessian = torch.eye(IN)
    x = torch.randn(3, 2, IN)
    x[1, 1, 7] = bad
    with pytest.raises(ValueError, match="inputs contain NaN or Inf"):
        _accumulate(hessian=hessian, inputs=x, num_seen=10)
    assert torch.equal(hessian, torch.eye(IN))
