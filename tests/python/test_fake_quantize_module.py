"""torchquant.nn.FakeQuantize: calibration, grids, switches, LSQ training, state dicts, compile."""
import copy
import math

import pytest
import torch
from torch import nn

from torchquant import QuantSpec, ops
from torchquant.nn import FakeQuantize

# name -> (spec fields for the layout, input shape)
LAYOUTS = {
    "tensor": (dict(granularity="tensor"), (4, 6, 8)),
    "channel0": (dict(granularity="channel", axis=0), (6, 16)),
    "channel1": (dict(granularity="channel", axis=1), (2, 5, 8)),
    "group": (dict(granularity="group", group_size=8), (3, 4, 16)),
}
BITS = range(2, 9)


def make_spec(layout, **fields):
    layout_fields, _ = LAYOUTS[layout]
    return QuantSpec(**layout_fields, **fields)


def make_input(layout, seed=0, scale=1.0, shift=0.0, dtype=torch.float32):
    _, shape = LAYOUTS[layout]
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale + shift).to(dtype)


def op_layout(spec):
    """The axis / group_size arguments of the op for ``spec``."""
    return dict(
        axis=spec.axis if spec.granularity == "channel" else None,
        group_size=spec.group_size if spec.granularity == "group" else None,
    )


def reference_range(x, spec):
    """Per-grid min/max straight from ``aminmax``, one grid at a time."""
    x = x.float()
    if spec.granularity == "tensor":
        lo, hi = x.aminmax()
        return lo.reshape(1), hi.reshape(1)
    if spec.granularity == "channel":
        pairs = [x.select(spec.axis, c).aminmax() for c in range(x.shape[spec.axis])]
        return torch.stack([p.min for p in pairs]), torch.stack([p.max for p in pairs])
    return x.unflatten(-1, (-1, spec.group_size)).aminmax(dim=-1)


def reference_qparams(lo, hi, spec):
    qmin, qmax = spec.quant_range
    lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
    if spec.symmetric:
        return torch.maximum(lo.abs(), hi) / ((qmax - qmin) / 2), torch.zeros_like(lo)
    scale = (hi - lo) / (qmax - qmin)
    return scale, (qmin - torch.round(lo / scale)).clamp(qmin, qmax)


def pytorch_fake_quantize(x, scale, zero_point, spec):
    """PyTorch's own fake-quantize ops; per-group as per-channel over [groups, group_size]."""
    qmin, qmax = spec.quant_range
    zp = zero_point.round().to(torch.int32)
    xf = x.float()
    if spec.granularity == "tensor":
        y = torch.fake_quantize_per_tensor_affine(xf, scale, zp, qmin, qmax)
    elif spec.granularity == "channel":
        y = torch.fake_quantize_per_channel_affine(xf, scale, zp, spec.axis % x.dim(), qmin, qmax)
    else:
        flat = xf.reshape(-1, spec.group_size)
        y = torch.fake_quantize_per_channel_affine(flat, scale.flatten(), zp.flatten(), 0, qmin, qmax)
        y = y.reshape(x.shape)
    return y.to(x.dtype)


def per_element(param, x, spec):
    """``param`` (shaped like the scale) broadcast to every element of ``x``."""
    if spec.granularity == "tensor":
        return param.reshape([1] * x.dim()).expand(x.shape)
    if spec.granularity == "channel":
        shape = [1] * x.dim()
        shape[spec.axis] = -1
        return param.reshape(shape).expand(x.shape)
    return param.repeat_interleave(spec.group_size, dim=-1)


def assert_identical(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def calibrated(spec, x, **kwargs):
    fq = FakeQuantize(spec, **kwargs)
    fq(x)
    return fq


# ---- calibration --------------------------------------------------------------

@pytest.mark.parametrize("learnable", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_first_batch_initialises_grid_from_observed_range(layout, bits, symmetric, learnable):
    spec = make_spec(layout, bits=bits, symmetric=symmetric, learnable=learnable)
    x = make_input(layout, shift=0.3)
    fq = calibrated(spec, x)

    lo, hi = reference_range(x, spec)
    scale, zero_point = reference_qparams(lo, hi, spec)
    assert_identical(fq.min_val, lo)
    assert_identical(fq.max_val, hi)
    assert_identical(fq.scale.detach(), scale)
    assert_identical(fq.zero_point.detach(), zero_point)
    assert_identical(fq.calculate_qparams()[0], scale)
    assert_identical(fq.calculate_qparams()[1], zero_point)
    assert (fq.quant_min, fq.quant_max) == spec.quant_range


@pytest.mark.parametrize("symmetric", [True, False])
def test_grid_always_contains_zero(symmetric):
    spec = QuantSpec(bits=4, symmetric=symmetric)
    positive = torch.rand(64) + 2.0  # observed range [2, 3]: the grid still starts at 0
    fq = calibrated(spec, positive)
    _, zero_point = fq.calculate_qparams()
    if not symmetric:
        assert zero_point.item() == spec.quant_min
    assert_identical(fq(torch.zeros(5)), torch.zeros(5))
    assert fq(positive).max() >= 2.0


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_minmax_observer_keeps_running_range_across_batches(layout, symmetric):
    spec = make_spec(layout, bits=4, symmetric=symmetric)
    batches = [make_input(layout, seed=s, scale=1.0 + s, shift=0.2 * s) for s in range(3)]
    fq = FakeQuantize(spec)
    for x in batches:
        fq(x)

    ranges = [reference_range(x, spec) for x in batches]
    lo = torch.stack([r[0] for r in ranges]).amin(dim=0)
    hi = torch.stack([r[1] for r in ranges]).amax(dim=0)
    assert_identical(fq.min_val, lo)
    assert_identical(fq.max_val, hi)
    scale, zero_point = reference_qparams(lo, hi, spec)
    assert_identical(fq.scale, scale)
    assert_identical(fq.zero_point, zero_point)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_moving_average_observer(layout):
    c = 0.25
    spec = make_spec(layout, symmetric=False, observer="moving_average_minmax", averaging_constant=c)
    batches = [make_input(layout, seed=s, scale=1.0 + s) for s in range(3)]
    fq = FakeQuantize(spec)
    for x in batches:
        fq(x)

    lo, hi = reference_range(batches[0], spec)
    for x in batches[1:]:
        new_lo, new_hi = reference_range(x, spec)
        lo, hi = lo + c * (new_lo - lo), hi + c * (new_hi - hi)
    torch.testing.assert_close(fq.min_val, lo)
    torch.testing.assert_close(fq.max_val, hi)
    scale, zero_point = reference_qparams(fq.min_val, fq.max_val, spec)
    assert_identical(fq.scale, scale)
    assert_identical(fq.zero_point, zero_point)


# ---- the output -------------------------------------------------------------------

@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_fixed_grid_output_matches_op_and_pytorch_and_lies_on_grid(layout, bits, symmetric):
    spec = make_spec(layout, bits=bits, symmetric=symmetric)
    fq = calibrated(spec, make_input(layout)).eval()
    x = make_input(layout, seed=1, scale=1.5)  # wider than the calibration data: some values clip
    y = fq(x)

    scale, zero_point = fq.calculate_qparams()
    assert_identical(y, ops.fake_quantize(x, scale, zero_point, *spec.quant_range, **op_layout(spec)))
    assert_identical(y, pytorch_fake_quantize(x, scale, zero_point, spec))

    codes = y / per_element(scale, x, spec) + per_element(zero_point, x, spec)
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-3)
    assert codes.min() >= spec.quant_min - 1e-3 and codes.max() <= spec.quant_max + 1e-3
    assert codes.round().unique().numel() > 1


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_learnable_output_matches_op_with_calculated_qparams(layout, symmetric):
    spec = make_spec(layout, bits=4, symmetric=symmetric, learnable=True)
    fq = calibrated(spec, make_input(layout))
    with torch.no_grad():  # a trained grid: not the observed one, zero-point not an integer
        fq.scale.mul_(1.1)
        if not symmetric:
            fq.zero_point.add_(0.7)
    x = make_input(layout, seed=1)
    scale, zero_point = fq.calculate_qparams()
    assert_identical(fq(x), ops.fake_quantize(x, scale, zero_point, *spec.quant_range, **op_layout(spec)))


@pytest.mark.parametrize("learnable", [False, True])
@pytest.mark.parametrize("layout", ["tensor", "channel0", "group"])
def test_bf16_input(layout, learnable):
    spec = make_spec(layout, bits=4, symmetric=False, learnable=learnable)
    x = make_input(layout, dtype=torch.bfloat16)
    fq = calibrated(spec, x)
    scale, zero_point = reference_qparams(*reference_range(x.float(), spec), spec)
    assert_identical(fq.scale.detach(), scale)

    x_in = x.clone().requires_grad_(learnable)
    y = fq(x_in)
    assert y.dtype == torch.bfloat16
    assert_identical(y.detach(), pytorch_fake_quantize(x, scale, zero_point, spec))
    if learnable:
        y.float().square().sum().backward()
        assert x_in.grad.dtype == torch.bfloat16
        assert fq.scale.grad.dtype == torch.float32 and torch.isfinite(fq.scale.grad).all()
        assert fq.zero_point.grad is not None


# ---- switches ------------------------------------------------------------------------

def test_disabled_fake_quant_is_identity_and_still_observes():
    fq = FakeQuantize(QuantSpec(bits=2)).disable_fake_quant()
    x = torch.randn(32)
    assert_identical(fq(x), x)
    assert fq.is_calibrated
    assert_identical(fq.max_val, x.max().reshape(1))
    fq.enable_fake_quant()
    assert not torch.equal(fq(x), x)


@pytest.mark.parametrize("freeze", ["disable_observer", "eval"])
@pytest.mark.parametrize("learnable", [False, True])
def test_frozen_observer_keeps_grid(freeze, learnable):
    spec = QuantSpec(bits=4, granularity="channel", axis=0, learnable=learnable)
    x = torch.randn(4, 16)
    fq = calibrated(spec, x)
    grid = [t.detach().clone() for t in (fq.min_val, fq.max_val, fq.scale, fq.zero_point)]
    if freeze == "eval":
        fq.eval()
    else:
        fq.disable_observer()

    wide = 10 * x
    y = fq(wide)
    for before, now in zip(grid, (fq.min_val, fq.max_val, fq.scale, fq.zero_point)):
        assert_identical(now.detach(), before)
    assert_identical(y, ops.fake_quantize(wide, grid[2].abs(), grid[3], *spec.quant_range, axis=0))
    assert y.abs().amax() < wide.abs().amax() / 2  # clipped to the old grid

    if not learnable:  # fixed grids follow the data again once observing resumes
        fq.train().enable_observer()
        fq(wide)
        assert (fq.scale > grid[2]).all()


def test_learnable_grid_is_initialised_once_then_left_to_training():
    fq = calibrated(QuantSpec(bits=4, learnable=True), torch.randn(64))
    assert fq.is_calibrated
    min_val = fq.min_val.clone()
    scale = fq.scale.detach().clone()
    fq(10 * torch.randn(64))
    assert_identical(fq.scale.detach(), scale)
    assert_identical(fq.min_val, min_val)  # the observer saw nothing more


def test_forward_before_calibration_in_eval_raises():
    fq = FakeQuantize(QuantSpec()).eval()
    with pytest.raises(RuntimeError, match="no grid yet"):
        fq(torch.randn(8))
    with pytest.raises(RuntimeError, match="has not observed any data"):
        fq.calculate_qparams()
    with pytest.raises(RuntimeError, match="no grid yet"):
        fq.train().disable_observer()(torch.randn(8))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("layout", ["tensor", "channel0", "group"])
def test_non_finite_input_during_calibration_raises(layout, bad):
    spec = make_spec(layout)
    x = make_input(layout)
    poisoned = x.clone()
    poisoned.view(-1)[3] = bad
    fq = FakeQuantize(spec)
    with pytest.raises(ValueError, match="NaN or Inf"):
        fq(poisoned)
    assert not fq.is_calibrated

    fq(x)
    scale = fq.scale.clone()
    with pytest.raises(ValueError, match="NaN or Inf"):
        fq(poisoned)
    assert_identical(fq.scale, scale)


@pytest.mark.parametrize(
    "spec, shape, match",
    [
        (QuantSpec(granularity="channel", axis=2), (4, 8), "QuantSpec.axis"),
        (QuantSpec(granularity="group", group_size=3), (4, 8), "QuantSpec.group_size"),
    ],
)
def test_spec_not_fitting_the_input_raises(spec, shape, match):
    with pytest.raises(ValueError, match=match):
        FakeQuantize(spec)(torch.randn(shape))


@pytest.mark.parametrize("grad_factor", ["LSQ", 0, -1.0, None])
def test_bad_grad_factor_raises(grad_factor):
    with pytest.raises(ValueError, match="grad_factor"):
        FakeQuantize(QuantSpec(learnable=True), grad_factor=grad_factor)


# ---- learnable grids ----------------------------------------------------------------

@pytest.mark.parametrize("grad_factor", ["lsq", 0.5])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_learnable_gradients_are_lsq_with_grad_factor(layout, symmetric, grad_factor):
    spec = make_spec(layout, bits=4, symmetric=symmetric, learnable=True)
    fq = calibrated(spec, make_input(layout), grad_factor=grad_factor)
    x = make_input(layout, seed=1, scale=1.3).requires_grad_()
    grad_output = make_input(layout, seed=2)
    fq(x).backward(grad_output)

    scale, zero_point = fq.calculate_qparams()
    if grad_factor == "lsq":
        elements_per_grid = x.numel() // scale.numel()
        grad_factor = 1.0 / math.sqrt(elements_per_grid * spec.quant_max)
    dx, dscale, dzero = ops.fake_quantize_learnable_backward(
        grad_output, x.detach(), scale, zero_point, *spec.quant_range, **op_layout(spec), grad_factor=grad_factor
    )
    assert dscale.abs().sum() > 0
    assert_identical(x.grad, dx)
    assert_identical(fq.scale.grad, dscale.reshape(fq.scale.shape))
    if symmetric:
        assert not isinstance(fq.zero_point, nn.Parameter)
        assert [name for name, _ in fq.named_parameters()] == ["scale"]
    else:
        assert dzero.abs().sum() > 0
        assert_identical(fq.zero_point.grad, dzero.reshape(fq.zero_point.shape))


@pytest.mark.parametrize("bad_scale", ["negative", "zero"])
def test_learnable_scale_crossing_zero_still_gives_valid_grid(bad_scale):
    spec = QuantSpec(bits=4, granularity="channel", axis=0, learnable=True)
    x = torch.randn(4, 16)
    fq = calibrated(spec, x)
    positive = fq.scale.detach().clone()
    expected_scale = positive if bad_scale == "negative" else torch.full_like(positive, fq.eps)
    with torch.no_grad():
        fq.scale.copy_(-positive if bad_scale == "negative" else torch.zeros_like(positive))

    y = fq(x)
    scale, zero_point = fq.calculate_qparams()
    assert_identical(scale, expected_scale)
    assert_identical(y, ops.fake_quantize(x, expected_scale, zero_point, *spec.quant_range, axis=0))
    y.square().sum().backward()
    assert torch.isfinite(fq.scale.grad).all()
    optimizer = torch.optim.SGD(fq.parameters(), lr=0.1)
    optimizer.step()
    assert torch.isfinite(fq(x)).all()


@pytest.mark.parametrize("drift, clamped_to", [(40.3, "quant_max"), (-7.6, "quant_min")])
def test_zero_point_drifting_out_of_range_is_clamped(drift, clamped_to):
    spec = QuantSpec(bits=4, symmetric=False, learnable=True)
    x = torch.randn(64)
    fq = calibrated(spec, x)
    with torch.no_grad():
        fq.zero_point.fill_(getattr(spec, clamped_to) + drift)
    y = fq(x)
    scale, zero_point = fq.calculate_qparams()
    assert zero_point.item() == getattr(spec, clamped_to)
    assert_identical(y, ops.fake_quantize(x, scale, zero_point, *spec.quant_range))


def test_lsq_training_lowers_regression_loss():
    torch.manual_seed(0)
    x = torch.randn(256, 16)
    target = x @ torch.randn(16, 4)
    linear = nn.Linear(16, 4)
    weight_fq = FakeQuantize(QuantSpec(bits=4, granularity="channel", axis=0, learnable=True))
    input_fq = FakeQuantize(QuantSpec(bits=8, symmetric=False, learnable=True))

    def loss_fn():
        return nn.functional.mse_loss(nn.functional.linear(input_fq(x), weight_fq(linear.weight), linear.bias), target)

    first_loss = loss_fn().item()  # also calibrates: the parameters have their shapes now
    scale_at_start = weight_fq.scale.detach().clone()
    params = [*linear.parameters(), *weight_fq.parameters(), *input_fq.parameters()]
    optimizer = torch.optim.Adam(params, lr=0.02)
    for _ in range(60):
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        optimizer.step()
    assert loss_fn().item() < 0.25 * first_loss
    assert not torch.equal(weight_fq.scale.detach(), scale_at_start)


# ---- state dict and compile ---------------------------------------------------------

@pytest.mark.parametrize("learnable", [False, True])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_state_dict_round_trip_reproduces_outputs(layout, symmetric, learnable):
    spec = make_spec(layout, bits=4, symmetric=symmetric, learnable=learnable)
    trained = calibrated(spec, make_input(layout))
    if learnable:
        with torch.no_grad():
            trained.scale.mul_(0.9)
            trained.zero_point.add_(0.0 if symmetric else 1.3)

    fresh = FakeQuantize(spec)
    fresh.load_state_dict(trained.state_dict())
    for name in ("min_val", "max_val", "scale", "zero_point"):
        assert_identical(getattr(fresh, name).detach(), getattr(trained, name).detach())
    assert isinstance(fresh.scale, nn.Parameter) == learnable
    x = make_input(layout, seed=1, scale=1.5)
    assert_identical(fresh.eval()(x), trained.eval()(x))
    if learnable:  # training mode must not re-initialise a loaded learnable grid
        assert_identical(fresh.train()(x), trained(x))


class _QuantLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(16, 8)
        self.weight_fq = FakeQuantize(QuantSpec(bits=4, granularity="channel", axis=0, learnable=True))
        self.input_fq = FakeQuantize(QuantSpec(bits=8, symmetric=False, learnable=True))

    def forward(self, x):
        return nn.functional.linear(self.input_fq(x), self.weight_fq(self.linear.weight), self.linear.bias)


def test_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = _QuantLinear()
    x = torch.randn(32, 16)
    eager(x)  # calibrate
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True)

    grad_output = torch.randn(32, 8)
    y_eager, y_compiled = eager(x), compiled(x)
    y_eager.backward(grad_output)
    y_compiled.backward(grad_output)
    torch.testing.assert_close(y_compiled, y_eager, rtol=0, atol=0)
    for (name, p_eager), (_, p_compiled) in zip(eager.named_parameters(), compiled_module.named_parameters()):
        torch.testing.assert_close(p_compiled.grad, p_eager.grad, rtol=1e-6, atol=1e-7, msg=name)
    torch._dynamo.reset()
