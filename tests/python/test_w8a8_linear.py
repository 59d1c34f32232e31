"""W8A8Linear: its integer weights and activation grids against a plain
reference, the int8 kernel's product against the exact integer product,
SmoothQuant's gain on activations with outlier channels, checkpoints and
argument errors."""
import pytest
import torch
from torch import nn

from smoothquant_reference import quantize_rows, quantize_with_scale, w8a8_product
from torchquant import ops
from torchquant.nn.w8a8_linear import W8A8Linear

U32 = 2.0 ** -24  # float32 unit roundoff


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _linear(in_features: int, out_features: int, bias: bool = True, seed: int = 0, dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias, dtype=dtype)


def _input(*shape, seed: int = 1, dtype=torch.float32):
    x = torch.randn(*shape, generator=_gen(seed))
    x[..., :2] *= 20.0  # outlier channels
    return x.to(dtype)


def _expected_codes(module: W8A8Linear, x: torch.Tensor):
    """The reference's activation codes and scales for the module's granularity."""
    rows = x.reshape(-1, module.in_features)
    if module.act_granularity == "token":
        return quantize_rows(rows, -128, 127)
    if module.act_scale is None:
        codes, scale = quantize_rows(rows.reshape(1, -1), -128, 127)
        return codes.reshape(rows.shape), scale.reshape(1)
    return quantize_with_scale(rows, module.act_scale.cpu()), module.act_scale.cpu()


def _exact_output(module: W8A8Linear, x: torch.Tensor) -> torch.Tensor:
    codes_x, scale_x = _expected_codes(module, x.cpu())
    if scale_x.numel() == 1:
        scale_x = scale_x.expand(codes_x.shape[0])
    bias = None if module.bias is None else module.bias.cpu()
    return w8a8_product(codes_x, scale_x, module.weight_codes.cpu(), module.weight_scales.cpu(), bias)


def _assert_int8_rounding_only(y: torch.Tensor, exact: torch.Tensor, module: W8A8Linear) -> None:
    """float32(acc) * s_x * s_w + b rounds four times per element: within 5 ulp of the terms."""
    bias = 0.0 if module.bias is None else module.bias.cpu().double().abs()
    scaled = (exact - (0.0 if module.bias is None else module.bias.cpu().double())).abs()
    bound = 5 * U32 * (scaled + bias) + 1e-30
    err = (y.cpu().double().reshape(exact.shape) - exact).abs()
    assert bool((err <= bound).all()), f"max error / bound = {(err / bound).max().item():.3g}"


# ---------------------------------------------------------------------------- conversion

def test_from_float_weight_codes_are_symmetric_per_channel():
    lin = _linear(32, 12)
    layer = W8A8Linear.from_float(lin)
    codes, scales = quantize_rows(lin.weight.detach(), -128, 127)
    assert layer.weight_codes.dtype == torch.int8 and torch.equal(layer.weight_codes.long(), codes)
    assert torch.equal(layer.weight_scales, scales.reshape(-1))
    assert torch.equal(layer.bias, lin.bias.detach())
    # Every row reaches the end of the grid, and the dequantized weight is within half a step.
    assert bool((layer.weight_codes.long().abs().amax(1) >= 127).all())
    w_hat = layer.weight_codes.float() * layer.weight_scales[:, None]
    w = lin.weight.detach()
    assert bool(((w_hat - w).abs() <= layer.weight_scales[:, None] / 2 + 4 * U32 * w.abs()).all())


@pytest.mark.parametrize("granularity,act_scale", [("token", None), ("tensor", None), ("tensor", 0.05)],
                         ids=["token", "tensor-dynamic", "tensor-static"])
@pytest.mark.parametrize("bias", [True, False])
def test_int8_product_is_exact_up_to_the_final_rescale(granularity, act_scale, bias):
    lin = _linear(64, 40, bias=bias)
    layer = W8A8Linear.from_float(lin, granularity, act_scale)
    x = _input(2, 20, 64)
    y = layer(x)
    assert y.shape == (2, 20, 40) and y.dtype == torch.float32
    _assert_int8_rounding_only(y, _exact_output(layer, x), layer)


def test_activations_are_quantized_on_the_grid_of_the_whole_input_per_tensor():
    # Dynamic per tensor: one grid for all rows, so scaling one row changes every row's output.
    layer = W8A8Linear.from_float(_linear(32, 8), "tensor")
    x = _input(4, 32)
    wider = x.clone()
    wider[0] *= 10
    assert not torch.equal(layer(wider)[1:], layer(x)[1:])
    per_token = W8A8Linear.from_float(_linear(32, 8), "token")
    assert torch.equal(per_token(wider)[1:], per_token(x)[1:])


@pytest.mark.cuda
def test_cuda_matches_the_exact_integer_product():
    lin = _linear(64, 48).cuda()
    layer = W8A8Linear.from_float(lin)
    x = _input(32, 64).cuda()
    _assert_int8_rounding_only(layer(x), _exact_output(layer, x), layer)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input_gives_its_dtype(dtype):
    layer = W8A8Linear.from_float(_linear(32, 16))
    x = _input(5, 32, dtype=dtype)
    y = layer(x)
    assert y.dtype == dtype
    expected = _exact_output(layer, x).to(dtype)  # the codes come from x's own values
    torch.testing.assert_close(y, expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())


def test_input_gets_the_straight_through_gradient():
    # The op's backward passes dy W to the input everywhere (no clipping mask: the grids are dynamic).
    layer = W8A8Linear.from_float(_linear(16, 6))
    x = _input(4, 16).requires_grad_()
    layer(x).sum().backward()
    w_hat = layer.weight_codes.float() * layer.weight_scales[:, None]
    torch.testing.assert_close(x.grad, w_hat.sum(0).expand(4, 16), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("granularity,act_scale", [("token", None), ("tensor", 0.05)], ids=["token", "static"])
def test_traces_under_torch_compile_fullgraph(granularity, act_scale):
    layer = W8A8Linear.from_float(_linear(32, 16), granularity, act_scale)
    x = _input(20, 32)
    with torch.no_grad():
        assert torch.equal(torch.compile(layer, fullgraph=True, backend="aot_eager")(x), layer(x))


@pytest.mark.parametrize("granularity,act_scale", [("token", None), ("tensor", None), ("tensor", 0.05)])
def test_empty_batch(granularity, act_scale):
    layer = W8A8Linear.from_float(_linear(16, 8), granularity, act_scale)
    assert layer(torch.empty(0, 16)).shape == (0, 8)


# ---------------------------------------------------------------------------- SmoothQuant end to end

def test_smoothing_reduces_w8a8_error_on_outlier_activations():
    """The paper's claim on a LayerNorm -> Linear block: with per-tensor int8 activations,
    a few outlier channels ruin the grid; smoothing (alpha = 0.5) restores it."""
    torch.manual_seed(0)
    dim, out = 64, 32
    norm, fc = nn.LayerNorm(dim), nn.Linear(dim, out)
    with torch.no_grad():
        norm.weight.copy_(1.0 + 0.1 * torch.randn(dim))
        norm.weight[:4] *= 50.0  # the systematic outlier channels of LLM activations
        norm.bias.copy_(0.1 * torch.randn(dim))
    calib, test = torch.randn(64, dim), torch.randn(64, dim)
    with torch.no_grad():
        reference = fc(norm(test))

    def w8a8_error() -> float:
        layer = W8A8Linear.from_float(fc, act_granularity="tensor")
        with torch.no_grad():
            return ((layer(norm(test)) - reference).norm() / reference.norm()).item()

    plain = w8a8_error()
    with torch.no_grad():
        act_absmax = norm(calib).abs().amax(0)
    s = ops.smoothquant_scales(act_absmax, [fc.weight], 0.5)
    ops.smoothquant_fold_(norm.weight, norm.bias, [fc.weight], s)
    with torch.no_grad():
        torch.testing.assert_close(fc(norm(test)), reference, rtol=0, atol=1e-5 * reference.abs().max().item())
    smoothed = w8a8_error()
    assert smoothed < plain / 2.5, (plain, smoothed)  # measured: 0.033 -> 0.0097


# ---------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("granularity,act_scale", [("token", None), ("tensor", 0.05)], ids=["token", "static"])
def test_state_dict_round_trip(granularity, act_scale):
    layer = W8A8Linear.from_float(_linear(16, 8, dtype=torch.float16), granularity, act_scale)
    fresh = W8A8Linear(16, 8, act_granularity=granularity, act_scale=None if act_scale is None else 1.0,
                       dtype=torch.float16)
    state = layer.state_dict()
    fresh.load_state_dict(state)
    x = _input(3, 16)
    assert torch.equal(fresh(x), layer(x))
    assert list(state) == ["weight_codes", "weight_scales", "bias"] + (["act_scale"] if act_scale is not None else [])
    assert all(torch.equal(t, fresh.state_dict()[k]) and t.dtype == fresh.state_dict()[k].dtype
               for k, t in state.items())


# ---------------------------------------------------------------------------- errors

ERRORS = [
    ("not a Linear", lambda: W8A8Linear.from_float(nn.Conv1d(4, 4, 1)), TypeError, "expects an nn.Linear"),
    ("granularity", lambda: W8A8Linear.from_float(_linear(8, 4), act_granularity="channel"), ValueError,
     "act_granularity must be one of"),
    ("static scale per token", lambda: W8A8Linear.from_float(_linear(8, 4), act_scale=0.1), ValueError,
     "act_scale .* needs act_granularity='tensor'"),
    ("zero static scale", lambda: W8A8Linear.from_float(_linear(8, 4), "tensor", 0.0), ValueError,
     "act_scale must be positive and finite"),
    ("NaN static scale", lambda: W8A8Linear.from_float(_linear(8, 4), "tensor", float("nan")), ValueError,
     "act_scale must be positive and finite"),
    ("several static scales", lambda: W8A8Linear.from_float(_linear(8, 4), "tensor", torch.ones(2)), ValueError,
     "act_scale must be a single number"),
    ("NaN weight", lambda: W8A8Linear.from_float(_nan_linear()), ValueError, "weight contains NaN"),
    ("input features", lambda: W8A8Linear.from_float(_linear(8, 4))(torch.randn(2, 9)), ValueError,
     r"expects inputs \[\.\.\., 8\]"),
    ("integer input", lambda: W8A8Linear.from_float(_linear(8, 4))(torch.ones(2, 8, dtype=torch.int64)), TypeError,
     "floating-point input"),
    ("NaN input", lambda: W8A8Linear.from_float(_linear(8, 4))(torch.full((17, 8), float("nan"))),
     ValueError, "input must be finite"),
]


def _nan_linear():
    lin = _linear(8, 4)
    with torch.no_grad():
        lin.weight[1, 2] = float("nan")
    return lin


@pytest.mark.parametrize("name,call,error,match", ERRORS, ids=[e[0] for e in ERRORS])
def test_errors(name, call, error, match):
    with pytest.raises(error, match=match):
        call()
