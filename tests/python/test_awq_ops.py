"""torchquant.awq_search_scales / awq_search_clip / awq_apply_clip against the plain-PyTorch AWQ reference.

The reference (awq_reference.py) follows AutoAWQ step by step and evaluates
the paper's objective literally in float64. On one device the op and the
reference quantize bit-identically, so the op must choose the reference's
grid point (exactly, unless two candidates' errors are closer than the
rounding of the sums) and report its losses to float32 accuracy.
"""
from __future__ import annotations

import pytest
import torch
from torch.library import opcheck

import awq_reference as ref
from torchquant import ops

OPS = torch.ops.torchquant

# name: (quant_min, quant_max, symmetric)
GRIDS = {"asym4": (0, 15, False), "sym4": (-8, 7, True), "asym3": (0, 7, False), "sym3": (-4, 3, True)}

LOSS_RTOL = 1e-5  # float32 sums of the op against float64 sums of the reference
IN = 128


def activations(rows: int, cols: int = IN, seed: int = 0, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """Calibration inputs whose channels differ in magnitude, a few by far (the outliers AWQ protects)."""
    g = torch.Generator().manual_seed(seed)
    magnitude = torch.rand(cols, generator=g) * 2 + 0.1
    magnitude[torch.randperm(cols, generator=g)[:4]] *= 20
    x = torch.randn(rows, cols, generator=g) * magnitude
    return x.to(device=device, dtype=dtype)


def layer_weights(outs=(48, 32, 16), cols: int = IN, seed: int = 1, device="cpu", dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(o, cols, generator=g) * 0.05).to(device=device, dtype=dtype) for o in outs]


def assert_same_choice(losses_ref: torch.Tensor, chosen: int, rtol: float) -> None:
    """The op's choice is the reference's best unless the two are within the rounding of the sums."""
    best = int(losses_ref.argmin())
    if chosen != best:
        assert losses_ref[chosen] <= losses_ref[best] * (1 + rtol), (chosen, best, losses_ref)


# ---- awq_search_scales --------------------------------------------------------------------

# Fewer rows than input features: the error is computed directly; more: through x^T x.
PATHS = {"direct": 48, "gram": 200}


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("duo", [False, True], ids=["plain", "duo"])
@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("grid_name", ["asym4", "sym4"])
def test_search_scales_matches_reference(device, grid_name, group_size, duo, path):
    qmin, qmax, sym = GRIDS[grid_name]
    x = activations(PATHS[path], device=device)
    weights = layer_weights(device=device)
    got = ops.awq_search_scales(x, weights, None, qmin, qmax, sym, group_size, 20, duo)
    want = ref.search_scales(x, weights, None, qmin, qmax, sym, group_size, 20, duo)
    assert got.scales.dtype == got.losses.dtype == torch.float32
    assert got.scales.shape == (IN,) and got.losses.shape == (20,)
    torch.testing.assert_close(got.losses.double(), want.losses.to(device), rtol=LOSS_RTOL, atol=0)
    chosen = int(got.losses.argmin())
    assert_same_choice(want.losses, chosen, LOSS_RTOL)
    # The scales are the chosen candidate's, computed with the same float32 steps.
    torch.testing.assert_close(got.scales, want.candidates[chosen], rtol=1e-6, atol=0)


@pytest.mark.parametrize("grid_name,group_size", [("asym3", -1), ("sym3", 32), ("asym4", None)])
def test_search_scales_other_widths_and_row_groups(device, grid_name, group_size):
    qmin, qmax, sym = GRIDS[grid_name]
    x = activations(64, device=device)
    weights = layer_weights((32,), device=device)
    got = ops.awq_search_scales(x, weights, None, qmin, qmax, sym, group_size, 10)
    want = ref.search_scales(x, weights, None, qmin, qmax, sym, group_size, 10)
    torch.testing.assert_close(got.losses.double(), want.losses.to(device), rtol=LOSS_RTOL, atol=0)
    chosen = int(got.losses.argmin())
    assert_same_choice(want.losses, chosen, LOSS_RTOL)
    torch.testing.assert_close(got.scales, want.candidates[chosen], rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_search_scales_half_precision_inputs(device, dtype):
    """Half-precision x and weights are read as float32, as the reference reads them."""
    x = activations(48, device=device, dtype=dtype)
    weights = layer_weights((32, 16), device=device, dtype=dtype)
    got = ops.awq_search_scales(x, weights, None, 0, 15, False, 32)
    want = ref.search_scales(x, weights, None, 0, 15, False, 32)
    torch.testing.assert_close(got.losses.double(), want.losses.to(device), rtol=LOSS_RTOL, atol=0)
    torch.testing.assert_close(got.scales, want.candidates[int(got.losses.argmin())], rtol=1e-6, atol=0)


@pytest.mark.parametrize("grid_name", ["asym4", "sym4"])
def test_alpha_zero_is_round_to_nearest(device, grid_name):
    """Without duo scaling alpha = 0 gives s = 1 exactly: losses[0] is RTN's error and AWQ is never worse."""
    qmin, qmax, sym = GRIDS[grid_name]
    x = activations(48, device=device)
    weights = layer_weights(device=device)
    rtn = ref.rtn_error(x, weights, qmin, qmax, sym, 32)

    only_rtn = ops.awq_search_scales(x, weights, None, qmin, qmax, sym, 32, grid=1)
    assert torch.equal(only_rtn.scales, torch.ones(IN, device=device))
    torch.testing.assert_close(float(only_rtn.losses[0]), rtn, rtol=LOSS_RTOL, atol=0)

    full = ops.awq_search_scales(x, weights, None, qmin, qmax, sym, 32)
    torch.testing.assert_close(float(full.losses[0]), rtn, rtol=LOSS_RTOL, atol=0)
    assert float(full.losses.min()) <= float(full.losses[0])
    # With outlier channels the search does find something better than RTN.
    assert int(full.losses.argmin()) > 0
    assert float(full.losses.min()) < 0.9 * rtn


def test_duo_alpha_zero_scales_by_weights_only(device):
    """With duo scaling alpha = 0 is s = 1 / (w_mean + 1e-4), not RTN: check the reference agrees."""
    x = activations(48, device=device)
    weights = layer_weights(device=device)
    want = ref.search_scales(x, weights, None, 0, 15, False, 32, 20, True)
    w_mean = ref.weight_mean(weights, 32)
    s0 = (1 / (w_mean + 1e-4)).clamp(min=1e-4)
    torch.testing.assert_close(want.candidates[0], s0 / (s0.max() * s0.min()).sqrt(), rtol=1e-6, atol=0)
    got = ops.awq_search_scales(x, weights, None, 0, 15, False, 32, 20, True)
    torch.testing.assert_close(got.losses.double(), want.losses.to(device), rtol=LOSS_RTOL, atol=0)


def test_search_scales_many_rows_in_chunks(device):
    """More rows than one statistics chunk (8192): the per-channel means are summed chunk by chunk."""
    x = activations(8200, cols=32, device=device)
    weights = layer_weights((16, 8), cols=32, device=device)
    got = ops.awq_search_scales(x, weights, None, 0, 15, False, 16, 8)
    want = ref.search_scales(x, weights, None, 0, 15, False, 16, 8)
    # The chunked sum may round the means differently in the last bit.
    torch.testing.assert_close(got.losses.double(), want.losses.to(device), rtol=1e-4, atol=0)
    chosen = int(got.losses.argmin())
    assert_same_choice(want.losses, chosen, 1e-4)
    torch.testing.assert_close(got.scales, want.candidates[chosen], rtol=1e-5, atol=0)


@pytest.mark.parametrize("duo", [False, True], ids=["plain", "duo"])
def test_zero_channel_gives_finite_scales(device, duo):
    """A channel that is always 0 (and, for duo, a weight column of zeros) is clamped, never inf / NaN."""
    x = activations(48, device=device)
    x[:, 5] = 0
    weights = layer_weights(device=device)
    for w in weights:
        w[:, 9] = 0
    got = ops.awq_search_scales(x, weights, None, 0, 15, False, 32, 20, duo)
    assert bool(torch.isfinite(got.scales).all()) and bool((got.scales > 0).all())
    assert bool(torch.isfinite(got.losses).all())
    want = ref.search_scales(x, weights, None, 0, 15, False, 32, 20, duo)
    torch.testing.assert_close(got.losses.double(), want.losses.to(device), rtol=LOSS_RTOL, atol=0)


def test_biases_cancel(device):
    x = activations(48, device=device)
    weights = layer_weights(device=device)
    biases = [torch.randn(w.shape[0], device=device) for w in weights]
    with_bias = ops.awq_search_scales(x, weights, biases, 0, 15, False, 32)
    without = ops.awq_search_scales(x, weights, None, 0, 15, False, 32)
    assert torch.equal(with_bias.scales, without.scales) and torch.equal(with_bias.losses, without.losses)
    want = ref.search_scales(x, weights, biases, 0, 15, False, 32)
    torch.testing.assert_close(with_bias.losses.double(), want.losses.to(device), rtol=1e-4, atol=0)


def test_parameters_are_read_as_data(device):
    """Weights that are nn.Parameters: the outputs do not require grad."""
    x = activations(48, device=device)
    weights = [torch.nn.Parameter(w) for w in layer_weights(device=device)]
    got = ops.awq_search_scales(x, weights, None, 0, 15, False, 32)
    assert not got.scales.requires_grad and not got.losses.requires_grad
    clip = ops.awq_search_clip(x, weights[0], 0, 15, False, 32)
    assert not clip.min_val.requires_grad and not clip.max_val.requires_grad


# ---- awq_search_clip ----------------------------------------------------------------------

def chosen_factor_index(got: ops.AWQClip, want: ref.ClipSearch) -> torch.Tensor:
    """The candidate each group's (min_val, max_val) is, bit for bit; fails if one is no candidate."""
    f = want.factors.view(-1, 1, 1)
    match = (want.lo * f == got.min_val) & (want.hi * f == got.max_val)
    assert bool(match.any(0).all()), "a returned range is not one of the candidate ranges"
    return match.to(torch.uint8).argmax(0)


def assert_clip_matches(got: ops.AWQClip, want: ref.ClipSearch, rtol: float = 1e-6) -> torch.Tensor:
    k = chosen_factor_index(got, want)
    ours = want.errors.gather(0, k.unsqueeze(0))[0]
    best = want.errors.min(0).values
    assert bool((ours <= best * (1 + rtol) + 1e-30).all())
    # Where the best candidate is clear, the op picks it.
    second = want.errors.sort(0).values[1] if want.errors.shape[0] > 1 else best + 1
    clear = second > best * (1 + rtol) + 1e-30
    want_k = want.errors.argmin(0)
    assert torch.equal(k[clear], want_k[clear])
    return k


# (tokens, max_tokens): the sample is every (tokens // max_tokens)-th row.
SAMPLES = {"few": (40, 512), "strided": (3000, 512)}


@pytest.mark.parametrize("sample", list(SAMPLES))
@pytest.mark.parametrize("group_size", [32, 64, -1])
@pytest.mark.parametrize("grid_name", ["asym4", "sym4", "asym3"])
def test_search_clip_matches_reference(device, grid_name, group_size, sample):
    qmin, qmax, sym = GRIDS[grid_name]
    tokens, max_tokens = SAMPLES[sample]
    x = activations(tokens, device=device)
    (w,) = layer_weights((40,), device=device)
    # 40 outputs in chunks of 16: the last chunk is short.
    got = ops.awq_search_clip(x, w, qmin, qmax, sym, group_size, 20, 0.5, max_tokens, 16)
    want = ref.search_clip(x, w, qmin, qmax, sym, group_size, 20, 0.5, max_tokens)
    n_groups = 1 if group_size == -1 else IN // group_size
    assert got.min_val.shape == got.max_val.shape == (40, n_groups)
    assert got.min_val.dtype == got.max_val.dtype == torch.float32
    assert_clip_matches(got, want)
    if sym:
        assert torch.equal(got.min_val, -got.max_val)


@pytest.mark.parametrize("grid_name", ["asym4", "sym4"])
def test_clipping_never_worse_than_none(device, grid_name):
    qmin, qmax, sym = GRIDS[grid_name]
    x = activations(256, device=device)
    (w,) = layer_weights((64,), device=device)
    w[0, 3] = 1.0  # an outlier weight makes clipping its group worthwhile
    got = ops.awq_search_clip(x, w, qmin, qmax, sym, 32)
    want = ref.search_clip(x, w, qmin, qmax, sym, 32)
    k = assert_clip_matches(got, want)
    ours = want.errors.gather(0, k.unsqueeze(0))[0]
    assert bool((ours <= want.errors[0]).all())  # factor 1: no clipping
    assert bool((k > 0).any()), "the search never clipped: the test data exercises nothing"
    # Every range lies inside the group's own, shrunk by at most max_shrink.
    assert bool((got.max_val <= want.hi).all()) and bool((got.min_val >= want.lo).all())
    assert bool((got.max_val >= 0.5 * want.hi).all()) and bool((got.min_val <= 0.5 * want.lo).all())


def test_search_clip_chunking_does_not_matter(device):
    x = activations(100, device=device)
    (w,) = layer_weights((40,), device=device)
    whole = ops.awq_search_clip(x, w, 0, 15, False, 32, steps=6, out_chunk=1000)
    for chunk in (3, 40):
        part = ops.awq_search_clip(x, w, 0, 15, False, 32, steps=6, out_chunk=chunk)
        assert torch.equal(part.min_val, whole.min_val) and torch.equal(part.max_val, whole.max_val)


def test_search_clip_autoawq_grid(device):
    """AutoAWQ's candidates 1 - i / 20, i < 10, are steps=10, max_shrink=0.5."""
    want = ref.shrink_factors(10, 0.5)
    autoawq = torch.tensor([1 - i / 20 for i in range(10)], dtype=torch.float32)
    torch.testing.assert_close(want, autoawq, rtol=1e-7, atol=1e-7)
    x = activations(64, device=device)
    (w,) = layer_weights((16,), device=device)
    assert_clip_matches(ops.awq_search_clip(x, w, 0, 15, False, 32, 10, 0.5),
                        ref.search_clip(x, w, 0, 15, False, 32, 10, 0.5))


# ---- awq_apply_clip -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_apply_clip(device, dtype):
    x = activations(64, device=device)
    (w,) = layer_weights((16,), device=device)
    clip = ops.awq_search_clip(x, w, 0, 15, False, 32)
    w = w.to(dtype)
    got = ops.awq_apply_clip(w, clip.min_val, clip.max_val)
    assert got.dtype == dtype and got.shape == w.shape
    lo = clip.min_val.repeat_interleave(32, dim=1)
    hi = clip.max_val.repeat_interleave(32, dim=1)
    want = torch.minimum(torch.maximum(w.float(), lo), hi).to(dtype)
    assert torch.equal(got, want)


def test_apply_clip_errors():
    w = torch.randn(4, 8)
    lo, hi = -torch.ones(4, 2), torch.ones(4, 2)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        ops.awq_apply_clip(w[0], lo, hi)
    with pytest.raises(ValueError, match="min_val must be"):
        ops.awq_apply_clip(w, -torch.ones(4, 3), torch.ones(4, 3))
    with pytest.raises(ValueError, match="max_val must have the shape"):
        ops.awq_apply_clip(w, lo, torch.ones(4, 4))
    with pytest.raises(ValueError, match="must not exceed"):
        ops.awq_apply_clip(w, hi, lo)
    with pytest.raises(TypeError, match="min_val must be a Tensor"):
        ops.awq_apply_clip(w, 0.0, hi)


# ---- bad input ----------------------------------------------------------------------------

def _scales_call(**changes):
    args = dict(x=torch.randn(16, 64), weights=[torch.randn(8, 64)], biases=None, quant_min=0, quant_max=15,
                symmetric=False, group_size=32, grid=20, duo_scaling=False)
    args.update(changes)
    return lambda: ops.awq_search_scales(**args)


def _nan(shape, where=(0, 0)):
    t = torch.randn(*shape)
    t[where] = float("nan")
    return t


SCALES_ERRORS = [
    ("x-1d", dict(x=torch.randn(64)), ValueError, "x must be 2-D"),
    ("x-empty", dict(x=torch.randn(0, 64)), ValueError, "x must have at least one row"),
    ("x-nan", dict(x=_nan((16, 64))), ValueError, "x contains NaN"),
    ("x-inf", dict(x=torch.full((16, 64), float("inf"))), ValueError, "x contains NaN or Inf"),
    ("x-int", dict(x=torch.ones(16, 64, dtype=torch.int32)), TypeError, "x must be float32"),
    ("x-not-tensor", dict(x=[[1.0]]), TypeError, "x must be a Tensor"),
    ("no-weights", dict(weights=[]), ValueError, "weights must hold at least one"),
    ("weights-not-list", dict(weights=torch.randn(8, 64)), TypeError, "weights must be a list"),
    ("weight-in-mismatch", dict(weights=[torch.randn(8, 64), torch.randn(8, 32)]), ValueError,
     r"weights\[1\] has 32 input features but x has 64"),
    ("weight-nan", dict(weights=[_nan((8, 64))]), ValueError, r"weights\[0\] contains NaN"),
    ("weight-3d", dict(weights=[torch.randn(2, 8, 64)]), ValueError, r"weights\[0\] must be 2-D"),
    ("weight-int", dict(weights=[torch.ones(8, 64, dtype=torch.int64)]), TypeError, r"weights\[0\] must be float32"),
    ("biases-count", dict(biases=[torch.randn(8), torch.randn(8)]), ValueError, "one bias per weight"),
    ("bias-shape", dict(biases=[torch.randn(7)]), ValueError, r"biases\[0\] must have shape \[8\]"),
    ("bias-nan", dict(biases=[_nan((8,), 0)]), ValueError, r"biases\[0\] contains NaN"),
    ("grid-0", dict(grid=0), ValueError, "grid must be at least 1"),
    ("grid-negative", dict(grid=-3), ValueError, "grid must be at least 1"),
    ("group-not-dividing", dict(group_size=24), ValueError, r"group_size \(24\) must divide in_features \(64\)"),
    ("group-0", dict(group_size=0), ValueError, "group_size must be positive"),
    ("group-float", dict(group_size=32.0), TypeError, "group_size must be an int"),
    ("range-empty", dict(quant_min=15, quant_max=0), ValueError, "quant_min must be less than quant_max"),
    ("range-1bit", dict(quant_min=0, quant_max=1), ValueError, "2 to 16 bits"),
    ("symmetric-unsigned", dict(symmetric=True), ValueError, "symmetric grid .* signed code range"),
]


@pytest.mark.parametrize("changes,error,match", [pytest.param(*c[1:], id=c[0]) for c in SCALES_ERRORS])
def test_search_scales_errors(changes, error, match):
    with pytest.raises(error, match=match):
        _scales_call(**changes)()


def _clip_call(**changes):
    args = dict(x=torch.randn(16, 64), weight=torch.randn(8, 64), quant_min=0, quant_max=15, symmetric=False,
                group_size=32, steps=20, max_shrink=0.5, max_tokens=512, out_chunk=256)
    args.update(changes)
    return lambda: ops.awq_search_clip(**args)


CLIP_ERRORS = [
    ("x-nan", dict(x=_nan((16, 64))), ValueError, "x contains NaN"),
    ("weight-nan", dict(weight=_nan((8, 64), (3, 5))), ValueError, "weight contains NaN"),
    ("weight-mismatch", dict(weight=torch.randn(8, 48)), ValueError, "weight has 48 input features but x has 64"),
    ("weight-1d", dict(weight=torch.randn(64)), ValueError, "weight must be 2-D"),
    ("group-not-dividing", dict(group_size=48), ValueError, r"group_size \(48\) must divide in_features \(64\)"),
    ("steps-0", dict(steps=0), ValueError, "steps must be in"),
    ("max-shrink-0", dict(max_shrink=0.0), ValueError, r"max_shrink must be in \(0, 1\)"),
    ("max-shrink-1", dict(max_shrink=1.0), ValueError, r"max_shrink must be in \(0, 1\)"),
    ("max-shrink-negative", dict(max_shrink=-0.2), ValueError, r"max_shrink must be in \(0, 1\)"),
    ("max-shrink-nan", dict(max_shrink=float("nan")), ValueError, r"max_shrink must be in \(0, 1\)"),
    ("max-tokens-0", dict(max_tokens=0), ValueError, "max_tokens must be at least 1"),
    ("out-chunk-0", dict(out_chunk=0), ValueError, "out_chunk must be at least 1"),
    ("range", dict(quant_min=3, quant_max=3), ValueError, "quant_min must be less than quant_max"),
]


@pytest.mark.parametrize("changes,error,match", [pytest.param(*c[1:], id=c[0]) for c in CLIP_ERRORS])
def test_search_clip_errors(changes, error, match):
    with pytest.raises(error, match=match):
        _clip_call(**changes)()


@pytest.mark.cuda
def test_device_mismatch_is_an_error():
    x = torch.randn(16, 64, device="cuda")
    with pytest.raises(ValueError, match=r"weights\[0\] is on cpu but x is on cuda"):
        ops.awq_search_scales(x, [torch.randn(8, 64)], None, 0, 15, False, 32)
    with pytest.raises(ValueError, match="weight is on cpu but x is on cuda"):
        ops.awq_search_clip(x, torch.randn(8, 64), 0, 15, False, 32)


# ---- opcheck ------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["direct", "gram-duo", "half-bias", "row-groups"])
def test_opcheck_search_scales(device, case):
    rows = 200 if case.startswith("gram") else 24
    dtype = torch.float16 if case == "half-bias" else torch.float32
    x = activations(rows, cols=64, device=device, dtype=dtype)
    weights = layer_weights((16, 8), cols=64, device=device, dtype=dtype)
    biases = [torch.randn(w.shape[0], device=device) for w in weights] if case == "half-bias" else None
    group_size = -1 if case == "row-groups" else 32
    opcheck(OPS.awq_search_scales.default, (x, weights, biases, 0, 15, False, group_size, 5, case == "gram-duo"))


@pytest.mark.parametrize("case", ["gram", "direct-sym", "parameter"])
def test_opcheck_search_clip(device, case):
    x = activations(48, cols=64, device=device)
    (w,) = layer_weights((16,), cols=64, device=device)
    qmin, qmax, sym = GRIDS["sym4" if case == "direct-sym" else "asym4"]
    group_size = 64 if case == "direct-sym" else 16
    if case == "parameter":
        w.requires_grad_(True)
    opcheck(OPS.awq_search_clip.default, (x, w, qmin, qmax, sym, group_size, 6, 0.5, 32, 5))
