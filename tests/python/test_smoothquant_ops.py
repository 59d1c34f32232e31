"""The SmoothQuant ops: smoothing factors against the paper's formula, folding
that leaves a float model's function unchanged, per-token quantization bit
for bit against a reference, argument errors, opcheck and torch.compile."""
import math

import pytest
import torch
from torch import nn
from torch.library import opcheck

from smoothquant_reference import EPS32, fold, quantize_rows, smoothing_scales
from torchquant import ops

OPS = torch.ops.torchquant


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _act_absmax(n: int, seed: int = 0, outliers: int = 2) -> torch.Tensor:
    """Positive per-channel maxima spanning decades, with a few large outlier channels."""
    g = _gen(seed)
    act = torch.exp(torch.empty(n).uniform_(-3.0, 1.0, generator=g))
    act[torch.randperm(n, generator=g)[:outliers]] *= 60.0
    return act


def _weights(shapes, seed: int = 1, dtype=torch.float32):
    g = _gen(seed)
    return [(torch.randn(*s, generator=g) * 0.05).to(dtype) for s in shapes]


# ---------------------------------------------------------------------------- smoothing factors

@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 0.85, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_scales_match_paper_formula(device, alpha, dtype):
    act = _act_absmax(40).to(device)
    weights = [w.to(device) for w in _weights([(24, 40), (8, 40), (16, 40)], dtype=dtype)]
    s = ops.smoothquant_scales(act, weights, alpha)
    assert s.dtype == torch.float32 and s.shape == (40,) and s.device == act.device
    expected = smoothing_scales(act.cpu(), [w.cpu() for w in weights], alpha)
    torch.testing.assert_close(s.cpu().double(), expected, rtol=2e-6, atol=0)


def test_scales_float64_statistic_gives_float64(device):
    act = _act_absmax(16).double().to(device)
    weights = [w.double().to(device) for w in _weights([(4, 16), (5, 16)])]
    s = ops.smoothquant_scales(act, weights, 0.6)
    assert s.dtype == torch.float64
    torch.testing.assert_close(s.cpu(), smoothing_scales(act.cpu(), [w.cpu() for w in weights], 0.6),
                               rtol=1e-13, atol=0)


def test_scales_at_the_ends_of_alpha():
    act = _act_absmax(12)
    (w,) = _weights([(6, 12)])
    assert torch.equal(ops.smoothquant_scales(act, [w], 1.0), act)  # all difficulty moved to the weights
    torch.testing.assert_close(ops.smoothquant_scales(act, [w], 0.0), 1.0 / w.abs().amax(0), rtol=1e-6, atol=0)


def test_half_alpha_balances_activation_and_weight_maxima():
    """At alpha = 0.5 the smoothed activation and the smoothed weights share each channel's maximum."""
    act = _act_absmax(32, outliers=4)
    weights = _weights([(10, 32), (20, 32)])
    s = ops.smoothquant_scales(act, weights, 0.5)
    w_max = torch.cat(weights).abs().amax(0)
    torch.testing.assert_close(act / s, w_max * s, rtol=1e-5, atol=0)
    # ... and the activation's channels are flatter than before.
    assert (act / s).max() / (act / s).min() < act.max() / act.min()


def test_scales_take_the_maximum_over_every_weight():
    act = torch.ones(6)
    a, b = torch.full((3, 6), 0.1), torch.full((2, 6), 0.1)
    b[1, 4] = -2.5  # |.| counts, in any row of any weight
    s = ops.smoothquant_scales(act, [a, b], 0.5)
    torch.testing.assert_close(s, torch.tensor([0.1, 0.1, 0.1, 0.1, 2.5, 0.1]) ** -0.5)


def test_dead_weight_column_is_clamped_at_eps():
    act = torch.full((4,), 2.0)
    w = torch.randn(3, 4)
    w[:, 2] = 0.0
    s = ops.smoothquant_scales(act, [w], 0.5, eps=1e-4)
    assert math.isclose(s[2].item(), 2.0 ** 0.5 / 1e-4 ** 0.5, rel_tol=1e-6)
    assert torch.isfinite(s).all()


def test_weight_without_rows_contributes_nothing():
    act = _act_absmax(8)
    (w,) = _weights([(5, 8)])
    torch.testing.assert_close(ops.smoothquant_scales(act, [w, torch.empty(0, 8)], 0.5),
                               ops.smoothquant_scales(act, [w], 0.5), rtol=0, atol=0)


def test_scales_accept_parameters_and_do_not_track_gradients():
    lin = nn.Linear(8, 4)
    s = ops.smoothquant_scales(_act_absmax(8), [lin.weight], 0.5)
    assert not s.requires_grad


# ---------------------------------------------------------------------------- folding

class LayerNormQKV(nn.Module):
    """LayerNorm -> q, k, v: three Linear layers share the normalised input."""

    def __init__(self, dim: int, dtype) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, dtype=dtype)
        self.q, self.k, self.v = (nn.Linear(dim, d, dtype=dtype) for d in (dim, dim // 2, dim // 2))

    def forward(self, x):
        h = self.norm(x)
        return torch.cat([self.q(h), self.k(h), self.v(h)], dim=-1)


class LinearLinear(nn.Module):
    def __init__(self, dims, dtype) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dims[0], dims[1], dtype=dtype)
        self.fc2 = nn.Linear(dims[1], dims[2], dtype=dtype)

    def forward(self, x):
        return self.fc2(self.fc1(x))


def _randomize(model: nn.Module, seed: int) -> None:
    g = _gen(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5 + (1.0 if p.dim() == 1 else 0.0))


def _activations_with_outliers(shape, dtype, seed: int = 3):
    x = torch.randn(*shape, generator=_gen(seed), dtype=torch.float64)
    x[..., :3] *= 40.0  # outlier channels, as in LLM activations
    return x.to(dtype)


def _channel_absmax(module: nn.Module, layer: nn.Module, x) -> torch.Tensor:
    seen = []
    handle = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().abs().flatten(0, -2)))
    with torch.no_grad():
        module(x)
    handle.remove()
    return torch.cat(seen).amax(0)


# Tolerance relative to the output's magnitude: float32 keeps ~7 digits, float64 ~16.
FOLD_TOL = {torch.float32: 2e-6, torch.float64: 1e-13}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_folding_into_layernorm_keeps_qkv_outputs(device, dtype):
    model = LayerNormQKV(32, dtype).to(device)
    _randomize(model, 0)
    x = _activations_with_outliers((3, 5, 32), dtype).to(device)
    with torch.no_grad():
        before = model(x)
    act = _channel_absmax(model, model.q, x)
    weights = [model.q.weight, model.k.weight, model.v.weight]
    s = ops.smoothquant_scales(act, weights, 0.5)
    ops.smoothquant_fold_(model.norm.weight, model.norm.bias, weights, s)
    with torch.no_grad():
        after = model(x)
    tol = FOLD_TOL[dtype] * before.abs().max().item()
    torch.testing.assert_close(after, before, rtol=0, atol=tol)
    # The smoothed activation is what the next layers now see: max|X_j| / s_j.
    torch.testing.assert_close(_channel_absmax(model, model.q, x), (act / s).to(dtype), rtol=1e-5, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_folding_into_preceding_linear_keeps_outputs(device, dtype):
    model = LinearLinear((16, 24, 8), dtype).to(device)
    _randomize(model, 1)
    x = torch.randn(7, 16, generator=_gen(4), dtype=torch.float64).to(dtype).to(device)
    with torch.no_grad():
        before = model(x)
    act = _channel_absmax(model, model.fc2, x)
    s = ops.smoothquant_scales(act, [model.fc2.weight], 0.8)
    ops.smoothquant_fold_(model.fc1.weight, model.fc1.bias, [model.fc2.weight], s)
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, rtol=0, atol=FOLD_TOL[dtype] * before.abs().max().item())


def test_folding_into_rmsnorm_without_bias():
    norm, fc = nn.RMSNorm(12), nn.Linear(12, 5)
    _randomize(nn.ModuleList([norm, fc]), 2)
    x = _activations_with_outliers((6, 12), torch.float32)
    with torch.no_grad():
        before = fc(norm(x))
    s = ops.smoothquant_scales(_channel_absmax(fc, fc, norm(x).detach()), [fc.weight], 0.5)
    ops.smoothquant_fold_(norm.weight, None, [fc.weight], s)
    with torch.no_grad():
        torch.testing.assert_close(fc(norm(x)), before, rtol=0, atol=2e-6 * before.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("prev_dim", [1, 2])
def test_fold_is_one_rounded_division_and_multiplication(device, dtype, prev_dim):
    """Each folded tensor equals w / s (or w * s) computed wide and rounded once to its dtype."""
    g = _gen(5)
    prev_w = (torch.randn(10, generator=g) if prev_dim == 1 else torch.randn(10, 6, generator=g)).to(dtype)
    prev_b = torch.randn(10, generator=g).to(dtype)
    nexts = [torch.randn(4, 10, generator=g).to(dtype), torch.randn(3, 10, generator=g).to(dtype)]
    s = torch.exp(torch.randn(10, generator=g))
    expected = fold(prev_w, prev_b, nexts, s)
    tensors = [t.to(device) for t in (prev_w, prev_b, *nexts)]
    ops.smoothquant_fold_(tensors[0], tensors[1], tensors[2:], s.to(device))
    for actual, want in zip(tensors, [expected[0], expected[1], *expected[2]]):
        assert actual.dtype == dtype
        assert torch.equal(actual.cpu(), want)


def test_fold_edits_parameters_as_data():
    norm, fc = nn.LayerNorm(8), nn.Linear(8, 4)
    versions = [p._version for p in (norm.weight, norm.bias, fc.weight)]
    s = torch.full((8,), 2.0)
    ops.smoothquant_fold_(norm.weight, norm.bias, [fc.weight], s)  # no torch.no_grad() needed
    for p, v in zip((norm.weight, norm.bias, fc.weight), versions):
        assert p.is_leaf and p.requires_grad and p.grad_fn is None and p._version > v
    assert torch.equal(norm.weight.detach(), torch.full((8,), 0.5))


def test_fold_accepts_disjoint_slices_of_one_buffer():
    fused = torch.randn(9, 4)  # q, k, v rows of one fused weight
    q, k, v = fused[:3], fused[3:6], fused[6:]
    ln = torch.ones(4)
    s = torch.tensor([1.0, 2.0, 4.0, 8.0])
    expected = fused * s
    ops.smoothquant_fold_(ln, None, [q, k, v], s)
    assert torch.equal(fused, expected)


# ---------------------------------------------------------------------------- per-token quantization

RANGES = [(-128, 127), (-127, 127), (-8, 7), (-32768, 32767)]


@pytest.mark.parametrize("quant_range", RANGES, ids=lambda r: f"{r[0]}_{r[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 16), (2, 3, 16), (33,), (0, 16)], ids=str)
def test_quantize_per_token_matches_reference(device, quant_range, dtype, shape):
    qmin, qmax = quant_range
    x = (torch.randn(*shape, generator=_gen(6)) * torch.exp(torch.randn(*shape[:-1], 1, generator=_gen(7)))).to(dtype)
    codes, scales = ops.quantize_per_token(x.to(device), qmin, qmax)
    want_codes, want_scales = quantize_rows(x, qmin, qmax)
    assert codes.dtype == (torch.int8 if qmax <= 127 else torch.int32)
    assert codes.shape == x.shape and scales.shape == (*x.shape[:-1], 1) and scales.dtype == torch.float32
    assert torch.equal(codes.cpu().long(), want_codes)
    assert torch.equal(scales.cpu(), want_scales)
    if x.numel():  # the range is used: some code reaches the end of the grid
        assert codes.long().abs().amax(-1).min() >= min(-qmin, qmax)


def test_quantize_per_token_rounds_ties_to_even():
    # scale = 127.5 * 2^-3 / 127.5 = 2^-3 exactly, so (k + 0.5) / 8 are exact ties.
    row = torch.tensor([127.5, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5]) / 8
    codes, scales = ops.quantize_per_token(row[None], -128, 127)
    assert scales.item() == 2.0 ** -3
    assert codes[0].tolist() == [127, 0, 2, 2, 0, -2, -2, 126]  # 127.5 -> 128, clamped to 127


def test_quantize_per_token_zero_rows_have_no_nan(device):
    x = torch.randn(4, 8)
    x[1] = 0.0
    codes, scales = ops.quantize_per_token(x.to(device))
    assert torch.isfinite(scales).all() and scales[1].item() == EPS32
    assert torch.equal(codes[1].cpu(), torch.zeros(8, dtype=torch.int8))
    assert torch.isfinite(codes.float() * scales).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantized_tokens_equal_fake_quantize_per_channel(device, dtype):
    """The per-token fake quant is torchquant.fake_quantize with the token dims flattened as axis 0."""
    x = (torch.randn(2, 5, 24, generator=_gen(8)) * 3).to(dtype).to(device)
    codes, scales = ops.quantize_per_token(x)
    rows = x.reshape(-1, 24)
    fq = ops.fake_quantize(rows, scales.reshape(-1), torch.zeros(rows.shape[0], device=device), -128, 127, axis=0)
    assert torch.equal((codes.float() * scales).to(dtype).reshape(-1, 24), fq)


def test_quantize_per_token_ignores_requires_grad():
    x = torch.randn(3, 8, requires_grad=True)
    codes, scales = ops.quantize_per_token(x)
    assert not codes.requires_grad and not scales.requires_grad


# ---------------------------------------------------------------------------- errors

def _valid():
    return _act_absmax(8), _weights([(4, 8), (3, 8)])


def _with_channel(values):
    act = _act_absmax(8)
    for j, v in values.items():
        act[j] = v
    return act


SCALES_ERRORS = [
    ("alpha below 0", lambda a, w: ops.smoothquant_scales(a, w, -0.1), ValueError, r"alpha .* \[0, 1\]"),
    ("alpha above 1", lambda a, w: ops.smoothquant_scales(a, w, 1.5), ValueError, r"alpha .* \[0, 1\]"),
    ("alpha NaN", lambda a, w: ops.smoothquant_scales(a, w, float("nan")), ValueError, "alpha"),
    ("alpha not a number", lambda a, w: ops.smoothquant_scales(a, w, "0.5"), TypeError, "alpha"),
    ("eps zero", lambda a, w: ops.smoothquant_scales(a, w, 0.5, eps=0.0), ValueError, "eps"),
    ("zero statistic", lambda a, w: ops.smoothquant_scales(_with_channel({2: 0.0, 5: 0.0}), w, 0.5), ValueError,
     r"act_absmax must be positive.*2 of its 8 channels.*first: channel 2.*calibrate on more"),
    ("negative statistic", lambda a, w: ops.smoothquant_scales(_with_channel({4: -1.0}), w, 0.5), ValueError,
     r"1 of its 8 channels are <= 0 \(first: channel 4"),
    ("NaN statistic", lambda a, w: ops.smoothquant_scales(_with_channel({1: float("nan")}), w, 0.5), ValueError,
     r"act_absmax must be finite.*1 of its 8 channels are NaN or Inf"),
    ("Inf statistic", lambda a, w: ops.smoothquant_scales(_with_channel({7: float("inf")}), w, 0.5), ValueError,
     "NaN or Inf"),
    ("2-D statistic", lambda a, w: ops.smoothquant_scales(a[None], w, 0.5), ValueError,
     r"act_absmax must be 1-D \[in_features\]"),
    ("integer statistic", lambda a, w: ops.smoothquant_scales(a.long(), w, 0.5), TypeError, "act_absmax"),
    ("no weights", lambda a, w: ops.smoothquant_scales(a, [], 0.5), ValueError, "weights must hold at least one"),
    ("weights not a list", lambda a, w: ops.smoothquant_scales(a, w[0], 0.5), TypeError, "weights must be a list"),
    ("weight with other in_features", lambda a, w: ops.smoothquant_scales(a, [w[0], torch.randn(3, 9)], 0.5),
     ValueError, r"weights\[1\] must have in_features = act_absmax.numel\(\) = 8"),
    ("1-D weight", lambda a, w: ops.smoothquant_scales(a, [torch.randn(8)], 0.5), ValueError,
     r"weights\[0\] must be a 2-D Linear weight"),
    ("integer weight", lambda a, w: ops.smoothquant_scales(a, [torch.ones(2, 8, dtype=torch.int8)], 0.5), TypeError,
     r"weights\[0\]"),
    ("NaN weight", lambda a, w: ops.smoothquant_scales(a, [w[0], w[1].index_fill(1, torch.tensor([3]), float("nan"))],
                                                       0.5), ValueError, r"weights\[1\] contains NaN or Inf"),
]


@pytest.mark.parametrize("name,call,error,match", SCALES_ERRORS, ids=[e[0] for e in SCALES_ERRORS])
def test_scales_errors(name, call, error, match):
    act, weights = _valid()
    with pytest.raises(error, match=match):
        call(act, weights)


def _fold_args():
    return torch.ones(8), torch.zeros(8), [torch.randn(4, 8), torch.randn(3, 8)], torch.full((8,), 2.0)


def _spoil(index, value):
    def make():
        args = list(_fold_args())
        args[index] = value(args) if callable(value) else value
        return args
    return make


FOLD_ERRORS = [
    ("scales 2-D", _spoil(3, torch.ones(1, 8)), ValueError, r"scales must be 1-D"),
    ("scales zero", _spoil(3, torch.tensor([1.0, 0.0, 1, 1, 1, 1, 1, 1])), ValueError,
     "scales must be positive and finite, but 1 of its 8"),
    ("scales NaN", _spoil(3, torch.tensor([1.0, float("nan"), -1, 1, 1, 1, 1, 1])), ValueError,
     "but 2 of its 8 entries"),
    ("scales integer", _spoil(3, torch.ones(8, dtype=torch.int32)), TypeError, "scales"),
    ("prev_weight size", _spoil(0, torch.ones(7)), ValueError, r"prev_weight must be the 1-D weight \[8\]"),
    ("prev_weight 3-D", _spoil(0, torch.ones(8, 2, 2)), ValueError, "prev_weight"),
    ("prev_weight integer", _spoil(0, torch.ones(8, dtype=torch.int64)), TypeError, "prev_weight"),
    ("prev_bias shape", _spoil(1, torch.zeros(8, 1)), ValueError, r"prev_bias must have shape \[8\]"),
    ("no next weights", _spoil(2, []), ValueError, "next_weights must hold"),
    ("next weight in_features", _spoil(2, lambda a: [a[2][0], torch.randn(2, 5)]), ValueError,
     r"next_weights\[1\] must have in_features = scales.numel\(\) = 8"),
    ("next weight 1-D", _spoil(2, [torch.randn(8)]), ValueError, r"next_weights\[0\] must be a 2-D"),
    ("same weight twice", _spoil(2, lambda a: [a[2][0], a[2][0]]), ValueError,
     r"next_weights\[0\] and next_weights\[1\] share memory"),
    ("overlapping views", _spoil(2, lambda a: [a[2][0][:3], a[2][0][1:]]), ValueError, "share memory"),
    ("prev is a next weight", _spoil(0, lambda a: a[2][1].t()), ValueError, "share memory"),
    ("scales alias a weight", _spoil(3, lambda a: a[0]), ValueError, "scales shares memory with prev_weight"),
]


@pytest.mark.parametrize("name,make,error,match", FOLD_ERRORS, ids=[e[0] for e in FOLD_ERRORS])
def test_fold_errors_leave_tensors_unchanged(name, make, error, match):
    args = make()
    tensors = [args[0], args[1], *args[2], args[3]]
    snapshot = [t.clone() for t in tensors]
    with pytest.raises(error, match=match):
        ops.smoothquant_fold_(*args)
    for t, before in zip(tensors, snapshot):
        torch.testing.assert_close(t, before, rtol=0, atol=0, equal_nan=True)


PER_TOKEN_ERRORS = [
    ("unsigned range", lambda: ops.quantize_per_token(torch.randn(2, 4), 0, 255), ValueError,
     r"quant_min must be negative and quant_max positive, got \[0, 255\]"),
    ("empty range", lambda: ops.quantize_per_token(torch.randn(2, 4), 3, -3), ValueError, "quant_min"),
    ("over 16 bits", lambda: ops.quantize_per_token(torch.randn(2, 4), -(1 << 17), 1 << 17), ValueError, "quant_min"),
    ("0-d input", lambda: ops.quantize_per_token(torch.tensor(1.0)), ValueError, "x must have at least one dimension"),
    ("integer input", lambda: ops.quantize_per_token(torch.ones(2, 4, dtype=torch.int32)), TypeError,
     "x must be float32, float16 or bfloat16"),
    ("float64 input", lambda: ops.quantize_per_token(torch.ones(2, 4, dtype=torch.float64)), TypeError, "x must be"),
    ("NaN input", lambda: ops.quantize_per_token(torch.tensor([[1.0, float("nan")], [1.0, 2.0], [float("inf"), 0]])),
     ValueError, "x must be finite, but 2 of its 3 rows contain NaN or Inf"),
    ("non-int range", lambda: ops.quantize_per_token(torch.randn(2, 4), -128.0, 127), TypeError, "quant_min"),
]


@pytest.mark.parametrize("name,call,error,match", PER_TOKEN_ERRORS, ids=[e[0] for e in PER_TOKEN_ERRORS])
def test_quantize_per_token_errors(name, call, error, match):
    with pytest.raises(error, match=match):
        call()


@pytest.mark.cuda
def test_device_mismatch_is_named():
    act, weights = _valid()
    with pytest.raises(ValueError, match=r"weights\[1\] must be on the same device as act_absmax"):
        ops.smoothquant_scales(act.cuda(), [weights[0].cuda(), weights[1]], 0.5)
    prev, bias, nexts, s = _fold_args()
    with pytest.raises(ValueError, match="prev_bias must be on the same device as scales"):
        ops.smoothquant_fold_(prev.cuda(), bias, [n.cuda() for n in nexts], s.cuda())


# ---------------------------------------------------------------------------- opcheck and compile

OPCHECK_SCALES = [
    ("one weight", lambda d: (_act_absmax(8).to(d), [torch.randn(4, 8, device=d)], 0.5)),
    ("three weights fp16", lambda d: (_act_absmax(8).to(d), [torch.randn(k, 8, device=d).half() for k in (2, 3, 4)],
                                      0.3)),
    ("float64", lambda d: (_act_absmax(6).double().to(d), [torch.randn(4, 6, device=d, dtype=torch.float64)], 1.0)),
    ("empty weight", lambda d: (_act_absmax(5).to(d), [torch.empty(0, 5, device=d)], 0.5)),
    ("grad", lambda d: (_act_absmax(8).to(d).requires_grad_(), [torch.randn(4, 8, device=d, requires_grad=True)],
                        0.5)),
]


@pytest.mark.parametrize("name,make", OPCHECK_SCALES, ids=[c[0] for c in OPCHECK_SCALES])
def test_opcheck_smoothquant_scales(device, name, make):
    opcheck(OPS.smoothquant_scales.default, make(device))


OPCHECK_FOLD = [
    ("layernorm", lambda d: (torch.randn(8, device=d), torch.randn(8, device=d),
                             [torch.randn(4, 8, device=d), torch.randn(2, 8, device=d)])),
    ("rmsnorm", lambda d: (torch.randn(8, device=d), None, [torch.randn(4, 8, device=d)])),
    ("linear bf16", lambda d: (torch.randn(8, 5, device=d).bfloat16(), torch.randn(8, device=d).bfloat16(),
                               [torch.randn(3, 8, device=d).bfloat16()])),
    ("parameters", lambda d: (torch.randn(8, device=d, requires_grad=True), None,
                              [torch.randn(4, 8, device=d, requires_grad=True)])),
]


@pytest.mark.parametrize("name,make", OPCHECK_FOLD, ids=[c[0] for c in OPCHECK_FOLD])
def test_opcheck_smoothquant_fold(device, name, make):
    prev, bias, nexts = make(device)
    opcheck(OPS.smoothquant_fold_.default, (prev, bias, nexts, torch.rand(8, device=device) + 0.5))


@pytest.mark.parametrize("shape,quant_range,dtype", [
    ((4, 16), (-128, 127), torch.float32),
    ((2, 3, 8), (-8, 7), torch.bfloat16),
    ((5, 8), (-32768, 32767), torch.float16),
    ((0, 8), (-128, 127), torch.float32),
    ((3, 0), (-128, 127), torch.float32),
], ids=str)
def test_opcheck_quantize_per_token(device, shape, quant_range, dtype):
    x = torch.randn(*shape, device=device, dtype=dtype, requires_grad=True)
    opcheck(OPS.quantize_per_token.default, (x, *quant_range))


def test_ops_under_torch_compile_fullgraph():
    def smooth_then_quantize(act, ln_w, ln_b, wq, wk, x):
        s = ops.smoothquant_scales(act, [wq, wk], 0.5)
        ops.smoothquant_fold_(ln_w, ln_b, [wq, wk], s)
        return ops.quantize_per_token(x / s)

    args = [_act_absmax(8), torch.randn(8), torch.randn(8), torch.randn(4, 8), torch.randn(3, 8), torch.randn(5, 8)]
    eager_args = [a.clone() for a in args]
    expected = smooth_then_quantize(*eager_args)
    actual = torch.compile(smooth_then_quantize, fullgraph=True, backend="aot_eager")(*args)
    for a, b in zip(actual, expected):
        assert torch.equal(a, b)
    for a, b in zip(args, eager_args):  # the in-place folding happened in the compiled graph too
        assert torch.equal(a, b)
