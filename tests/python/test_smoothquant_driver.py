"""The SmoothQuant driver and the W8A8 conversion against plain-PyTorch references: smoothing factors
against the paper's formula on activations captured independently (padding excluded), the float
model unchanged, W8A8 error lower with smoothing on outlier activations, the alpha search scored as
an exact W8A8 reference scores it, static activation scales, exclusions, and argument errors."""
import copy
from typing import Dict, List

import pytest
import torch
from torch import nn

from ptq_models import correlated_features, layer_inputs, padded_batches, plain_mlp, real_tokens, seeded
from smoothquant_models import (HEADS, hf_bert, llama_like, loud_padding, opt_like, output, pad_batches,
                                unknown_arch, with_outliers)
from smoothquant_reference import quantize_rows, quantize_with_scale, smoothing_scales, w8a8_product
from torchquant import ops
from torchquant.nn import W8A8Linear
from torchquant.ptq.report import EXCLUDED, OUTSIDE_BLOCKS, QUANTIZED
from torchquant.ptq.scaling import ScalingInvarianceError
from torchquant.ptq.smoothquant import (NO_FOLD, ONLINE_SCALE_DISABLED, SMOOTHED, SMOOTHED_ONLINE, quantize_w8a8,
                                        smoothquant)

try:
    import transformers  # noqa: F401
    HAVE_TRANSFORMERS = True
except ImportError:
    HAVE_TRANSFORMERS = False

GRID = (0.2, 0.5, 0.8)


def _outlier_llama():
    return seeded(lambda: loud_padding(with_outliers(llama_like(norm="layer"))))


def _batches(n=3, seed=0):
    return pad_batches(padded_batches(n, seed=seed))


def _captured(model, names: List[str], batches) -> Dict[str, torch.Tensor]:
    """Each layer's inputs on the real tokens, rows ``[tokens, in]``, from a plain forward of ``model``."""
    seen = layer_inputs(model, names, batches)
    return {name: torch.cat([x.reshape(-1, x.shape[-1]) for x in real_tokens(seen[name], batches)]) for name in names}


def _with_padding(model, name: str, batches) -> torch.Tensor:
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in layer_inputs(model, [name], batches)[name]])


def _relative_error(model, reference, batches) -> float:
    num = den = 0.0
    with torch.no_grad():
        for batch, ref in zip(batches, reference):
            mask = batch["attention_mask"].bool()
            num += float((output(model, batch)[mask] - ref[mask]).square().sum())
            den += float(ref[mask].square().sum())
    return num / den


def _outputs(model, batches):
    with torch.no_grad():
        return [output(model, b) for b in batches]


# ---------------------------------------------------------------------------- smoothing factors

@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_factors_follow_paper_formula_on_real_tokens(alpha):
    model = _outlier_llama()
    original = copy.deepcopy(model)
    batches = _batches()
    report = smoothquant(model, batches, alpha=alpha, progress=False)
    assert len(report.groups) == 8
    for group in report.groups.values():
        x = _captured(original, [group.layers[0]], batches)[group.layers[0]]
        weights = [original.get_submodule(n).weight.detach() for n in group.layers]
        expected = smoothing_scales(x.abs().amax(dim=0), weights, alpha)
        torch.testing.assert_close(group.scales.double(), expected, rtol=1e-4, atol=0)
        assert group.alpha == alpha and group.samples == x.shape[0]
        # Padding would have moved the factors: the statistics saw real tokens only.
        padded = smoothing_scales(_with_padding(original, group.layers[0], batches).abs().amax(dim=0), weights, alpha)
        if group.name == "layers.0.self_attn.qkv":
            assert float((padded / expected).max()) > 1.2
        # Columns scaled by s (the layers that are no producer of another group's input).
        for name in group.layers:
            if not name.endswith(("v_proj", "up_proj")):
                torch.testing.assert_close(model.get_submodule(name).weight.double(),
                                           original.get_submodule(name).weight.double() * expected, rtol=1e-4, atol=0)
        if group.kind == "norm":
            torch.testing.assert_close(model.get_submodule(group.prev_name).weight.double(),
                                       original.get_submodule(group.prev_name).weight.double() / expected,
                                       rtol=1e-4, atol=0)


def test_report_rows():
    model = _outlier_llama()
    original = copy.deepcopy(model)
    batches = _batches()
    report = smoothquant(model, batches, alpha=0.5, progress=False)
    assert [r.name for r in report] == [n for n, m in original.named_modules() if isinstance(m, nn.Linear)]
    assert report["lm_head"].status == EXCLUDED and len(report.smoothed) == 14
    assert "14 of 15 Linear layers smoothed (0 by an online input scale) over 2 blocks of 'layers'" in report.summary()
    x = _captured(original, ["layers.1.mlp.gate_proj"], batches)["layers.1.mlp.gate_proj"]
    row = report["layers.1.mlp.up_proj"]
    s = report.groups["layers.1.mlp.gate_up"].scales
    assert row.status == SMOOTHED and row.details["kind"] == "norm" and row.details["alpha"] == 0.5
    assert row.samples == x.shape[0]
    torch.testing.assert_close(row.details["act_max"], float(x.abs().max()), rtol=1e-5, atol=0)
    torch.testing.assert_close(row.details["act_max_smoothed"], float((x.abs().amax(0) / s).max()), rtol=1e-5, atol=0)
    assert row.details["act_max_smoothed"] < row.details["act_max"] / 5  # the outliers were moved
    assert row.details["w_max"] == float(original.layers[1].mlp.up_proj.weight.detach().abs().max())
    assert row.details["w_max_smoothed"] == float(model.layers[1].mlp.up_proj.weight.detach().abs().max())
    assert row.loss < row.details["loss_unsmoothed"]
    assert "act_max_smoothed" in report.as_table()


def test_errors_scored_on_a_spread_of_tokens():
    batches = _batches()
    full = smoothquant(_outlier_llama(), batches, progress=False)
    few = smoothquant(_outlier_llama(), batches, max_tokens=10, progress=False)
    for name, group in full.groups.items():
        assert group.scored_tokens == group.samples == 36
        assert few.groups[name].scored_tokens == 9  # every 4th token
        torch.testing.assert_close(few.groups[name].scales, group.scales)  # the statistics see every token
        assert not torch.equal(few.groups[name].errors, group.errors)


# ---------------------------------------------------------------------------- the float model is unchanged

MODELS = {
    "llama": _outlier_llama,
    "llama-gqa": lambda: seeded(lambda: llama_like(kv_heads=HEADS // 2)),
    "opt": lambda: seeded(lambda: with_outliers(opt_like())),
    "unknown": lambda: seeded(unknown_arch),
    "bert": lambda: seeded(hf_bert),
}


@pytest.mark.parametrize("alpha", [0.5, "search"])
@pytest.mark.parametrize("name", list(MODELS))
def test_outputs_unchanged(name, alpha):
    if name == "bert" and not HAVE_TRANSFORMERS:
        pytest.skip("transformers is not installed")
    model = MODELS[name]()
    batches = _batches()
    expected = _outputs(model, batches)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    kwargs = {"alpha_grid": GRID} if alpha == "search" else {}
    report = smoothquant(model, batches, alpha=alpha, progress=False, **kwargs)
    assert report.smoothed
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    for got, want, batch in zip(_outputs(model, batches), expected, batches):
        mask = batch["attention_mask"].bool()
        torch.testing.assert_close(got[mask], want[mask], rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models(dtype):
    """Smoothing a half-precision model moves it from the float32 model by about as much as half precision does."""
    model = _outlier_llama()
    batches = _batches()
    reference = _outputs(model, batches)
    model = model.to(dtype)
    unsmoothed = _outputs(model, batches)
    smoothquant(model, batches, progress=False)
    assert all(p.dtype == dtype for p in model.parameters())
    smoothed = _outputs(model, batches)
    assert all(out.dtype == dtype for out in smoothed)

    def deviation(outputs):
        return max(float((o.float() - r).abs().max() / r.abs().max()) for o, r in zip(outputs, reference))

    assert deviation(smoothed) <= 2 * deviation(unsmoothed)
    quantize_w8a8(model, calibration_batches=batches, progress=False)
    assert _outputs(model, batches)[0].dtype == dtype


def test_whole_model_without_blocks():
    model = seeded(plain_mlp)
    batches = correlated_features(3)
    expected = [model(x) for x in batches]
    report = smoothquant(model, batches, progress=False)
    assert report.blocks is None and [r.status for r in report] == [SMOOTHED_ONLINE] * 3
    for x, want in zip(batches, expected):
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-6)


def test_dead_relu_channels_keep_unit_factor():
    model = seeded(lambda: with_outliers(opt_like()))
    with torch.no_grad():
        for block in model.layers:
            block.fc1.bias[:8] = -100.0  # these units never fire
    batches = _batches()
    expected = _outputs(model, batches)
    report = smoothquant(model, batches, progress=False)
    s = report.groups["layers.0.fc2"].scales
    assert torch.equal(s[:8], torch.ones(8)) and not torch.equal(s[8:], torch.ones(s.numel() - 8))
    for got, want in zip(_outputs(model, batches), expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


# ---------------------------------------------------------------------------- W8A8 error

def test_smoothing_lowers_w8a8_error_on_outlier_activations():
    model = _outlier_llama()
    batches, heldout = _batches(), _batches(2, seed=1)
    reference = _outputs(model, heldout)

    plain = copy.deepcopy(model)
    quantize_w8a8(plain, calibration_batches=batches, progress=False)
    half = copy.deepcopy(model)
    fixed = smoothquant(half, batches, alpha=0.5, progress=False)
    quantize_w8a8(half, calibration_batches=batches, progress=False)
    searched_model = copy.deepcopy(model)
    searched = smoothquant(searched_model, batches, alpha="search", alpha_grid=GRID, progress=False)
    quantize_w8a8(searched_model, calibration_batches=batches, progress=False)

    e_plain = _relative_error(plain, reference, heldout)
    assert _relative_error(half, reference, heldout) < 0.5 * e_plain
    assert _relative_error(searched_model, reference, heldout) < 0.5 * e_plain
    for name, group in searched.groups.items():
        # The same group inputs up to rounding (the float model is unchanged), so about the same scores for
        # alpha = 0.5 and none (an ulp of s can move a weight row's negative maximum from code -128 to -127:
        # the grid's max / 127.5 puts it on a rounding tie), and the search keeps the best of a grid holding 0.5.
        torch.testing.assert_close(group.errors[[0, 2]], fixed.groups[name].errors, rtol=5e-2, atol=0)
        assert group.errors[1:].min() == group.errors[1 + GRID.index(group.alpha)] <= group.errors[2]


def _reference_w8a8_error(x: torch.Tensor, weights: List[torch.Tensor], s: torch.Tensor,
                          granularity: str = "tensor") -> float:
    """``sum ||X W^T - Q(X / s) Q(W s)^T||^2 / sum ||X W^T||^2``: per-channel int8 weights, int8 activations
    with one static scale (``max |X / s| / 127.5``) or one per token, the integer product exact in float64."""
    xs = x / s
    if granularity == "tensor":
        act_scale = (xs.abs().max().reshape(1) / 127.5).expand(x.shape[0])
        codes_x = quantize_with_scale(xs, act_scale[0])
    else:
        codes_x, act_scale = quantize_rows(xs, -128, 127)
    err = energy = 0.0
    for w in weights:
        ws = (w.double() * s.double()).float()
        w_scale = ws.abs().amax(dim=1) / 127.5
        y = w8a8_product(codes_x, act_scale, quantize_with_scale(ws, w_scale[:, None]), w_scale, None)
        exact = x.double() @ w.double().T
        err += float((y - exact).square().sum())
        energy += float(exact.square().sum())
    return err / energy


@pytest.mark.parametrize("name, granularity, rtol", [
    ("layers.0.self_attn.qkv", "tensor", 1e-4), ("layers.0.self_attn.qkv", "token", 1e-4),
    ("layers.0.mlp.down_proj", "tensor", 5e-2), ("layers.1.mlp.gate_up", "tensor", 5e-2)])
def test_search_scores_match_exact_w8a8_reference(name, granularity, rtol):
    """Scores of the op's factors (checked against the formula above) on the float model's activations.

    The first group reads exactly the float model's activations. Later groups read those of the model
    smoothed so far, equal up to rounding, and a factor one ulp off can move a weight row's negative
    maximum between codes -128 and -127 (the grid's max / 127.5 puts it on a rounding tie): a few percent
    of the error on data this small.
    """
    model = _outlier_llama()
    original = copy.deepcopy(model)
    batches = _batches()
    report = smoothquant(model, batches, alpha="search", alpha_grid=GRID, act_granularity=granularity,
                         progress=False)
    group = report.groups[name]
    x = _captured(original, [group.layers[0]], batches)[group.layers[0]]
    weights = [original.get_submodule(n).weight.detach() for n in group.layers]
    absmax = x.abs().amax(dim=0)
    candidates = [torch.ones_like(absmax)] + [ops.smoothquant_scales(absmax, weights, a) for a in GRID]
    expected = torch.tensor([_reference_w8a8_error(x, weights, s, granularity) for s in candidates],
                            dtype=torch.float64)
    torch.testing.assert_close(group.errors, expected, rtol=rtol, atol=0)
    assert group.alpha == GRID[int(expected[1:].argmin())]


# ---------------------------------------------------------------------------- options

def test_exclusion_turns_a_shared_fold_into_online_scales():
    model = _outlier_llama()
    original = copy.deepcopy(model)
    batches = _batches()
    expected = _outputs(model, batches)
    report = smoothquant(model, batches, exclude=["lm_head", "*.self_attn.q_proj", "layers.1.self_attn.v_proj"],
                         progress=False)
    for i in (0, 1):
        p = f"layers.{i}."
        assert report[p + "self_attn.q_proj"].status == EXCLUDED
        assert type(model.get_submodule(p + "self_attn.q_proj")) is nn.Linear
        assert torch.equal(model.get_submodule(p + "self_attn.q_proj").weight,
                           original.get_submodule(p + "self_attn.q_proj").weight)
        assert torch.equal(model.get_submodule(p + "input_layernorm").weight,
                           original.get_submodule(p + "input_layernorm").weight)
        assert report[p + "self_attn.k_proj"].status == SMOOTHED_ONLINE
    # An excluded producer keeps its rows: the layer after it divides online.
    assert torch.equal(model.layers[1].self_attn.v_proj.weight, original.layers[1].self_attn.v_proj.weight)
    assert report["layers.1.self_attn.o_proj"].status == SMOOTHED_ONLINE
    assert report["layers.0.self_attn.o_proj"].status == SMOOTHED
    for got, want in zip(_outputs(model, batches), expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


@pytest.mark.skipif(not HAVE_TRANSFORMERS, reason="transformers is not installed")
def test_explicit_false_smooths_only_what_folds():
    model = seeded(hf_bert)
    report = smoothquant(model, _batches(), explicit=False, progress=False)
    statuses = {r.name: r.status for r in report}
    for i in (0, 1):
        p = f"encoder.layer.{i}."
        assert statuses[p + "attention.output.dense"] == SMOOTHED
        for name in ("attention.self.query", "attention.self.key", "attention.self.value", "intermediate.dense",
                     "output.dense"):
            assert statuses[p + name] == ONLINE_SCALE_DISABLED
            assert type(model.get_submodule(p + name)) is nn.Linear
    assert statuses["pooler.dense"] == OUTSIDE_BLOCKS


def test_grouped_query_o_proj_is_reported():
    model = seeded(lambda: llama_like(kv_heads=HEADS // 2))
    report = smoothquant(model, _batches(), progress=False)
    assert report["layers.0.self_attn.o_proj"].status == NO_FOLD
    assert type(model.layers[0].self_attn.o_proj) is nn.Linear


# ---------------------------------------------------------------------------- W8A8 conversion

def test_static_activation_scales_from_real_tokens():
    model = seeded(lambda: loud_padding(llama_like(norm="layer")))  # no outliers to hide the padding's spike
    original = copy.deepcopy(model)
    batches = _batches()
    report = quantize_w8a8(model, calibration_batches=batches, progress=False)
    names = [n for n, m in original.layers.named_modules() if isinstance(m, nn.Linear)]
    names = [f"layers.{n}" for n in names]
    captured = _captured(original, names, batches)
    moved = 0
    for name in names:
        layer = model.get_submodule(name)
        assert type(layer) is W8A8Linear and layer.act_granularity == "tensor"
        expected = captured[name].abs().max() / 127.5
        torch.testing.assert_close(layer.act_scale, expected.reshape(1), rtol=1e-6, atol=0)
        assert report[name].status == QUANTIZED and report[name].samples == captured[name].shape[0]
        moved += bool(_with_padding(original, name, batches).abs().max() / 127.5 > 1.01 * expected)
    assert moved  # padding would have changed some scale
    assert type(model.lm_head) is nn.Linear and report["lm_head"].status == EXCLUDED


def test_online_scales_become_part_of_the_activation_quantization():
    model = seeded(unknown_arch)
    batches = _batches()
    smoothquant(model, batches, progress=False)
    smoothed = copy.deepcopy(model)
    expected = _outputs(model, batches)
    quantize_w8a8(model, calibration_batches=batches, progress=False)
    name = "layers.1.attn.wk"
    layer = model.get_submodule(name)
    # The online scale is an attribute of the W8A8 layer, not another class.
    assert type(layer) is W8A8Linear and layer.input_scale is not None
    source = smoothed.get_submodule(name)
    assert torch.equal(layer.input_scale, source.input_scale)
    x = _captured(smoothed, [name], batches)[name]
    torch.testing.assert_close(layer.act_scale, ((x / source.input_scale).abs().max() / 127.5).reshape(1),
                               rtol=1e-6, atol=0)
    assert _relative_error(model, expected, batches) < 1e-2


@pytest.mark.parametrize("granularity, static", [("token", None), ("tensor", False)])
def test_dynamic_activation_scales(granularity, static):
    model = _outlier_llama()
    report = quantize_w8a8(model, act_granularity=granularity, static=static, progress=False)
    layer = model.layers[0].mlp.down_proj
    assert type(layer) is W8A8Linear and layer.act_granularity == granularity and layer.act_scale is None
    assert len(report.quantized) == 14 and report.blocks == "layers"


# ---------------------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs, error, match", [
    ({"alpha": 1.5}, ValueError, r"alpha .* must be in \[0, 1\], got 1.5"),
    ({"alpha": -0.1}, ValueError, r"must be in \[0, 1\]"),
    ({"alpha": float("nan")}, ValueError, r"must be in \[0, 1\]"),
    ({"alpha": True}, TypeError, "alpha must be a number"),
    ({"alpha": "auto"}, ValueError, "or 'search', got 'auto'"),
    ({"alpha": 0.5, "alpha_grid": (0.5,)}, ValueError, "alpha_grid is the candidates of alpha='search'"),
    ({"alpha": "search", "alpha_grid": ()}, ValueError, "at least one alpha"),
    ({"alpha": "search", "alpha_grid": (0.5, 1.2)}, ValueError, r"alpha_grid must hold numbers in \[0, 1\]"),
    ({"act_granularity": "channel"}, ValueError, "act_granularity must be 'tensor'"),
    ({"explicit": 1}, TypeError, "explicit must be a bool"),
    ({"max_tokens": 0}, ValueError, "max_tokens must be a positive integer"),
    ({"exclude": 3}, TypeError, "exclude must be"),
])
def test_bad_arguments(kwargs, error, match):
    model = seeded(plain_mlp)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        smoothquant(model, correlated_features(1), progress=False, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_missing_calibration_and_no_linear_layers():
    with pytest.raises(ValueError, match="needs calibration_batches"):
        smoothquant(seeded(plain_mlp), None, progress=False)
    with pytest.raises(ValueError, match="no nn.Linear layers: nothing to smooth"):
        smoothquant(nn.Sequential(nn.ReLU()), [torch.ones(2, 3)], progress=False)
    with pytest.raises(ValueError, match="every nn.Linear in the blocks is excluded"):
        smoothquant(seeded(plain_mlp), correlated_features(1), exclude="*", progress=False)
    with pytest.raises(ValueError, match="no nn.Linear layers: nothing to quantize"):
        quantize_w8a8(nn.Sequential(nn.ReLU()), act_granularity="token")
    with pytest.raises(ValueError, match="is itself an nn.Linear"):
        quantize_w8a8(nn.Linear(4, 2), act_granularity="token")


def test_zero_and_non_finite_statistics():
    zeros = [torch.zeros(4, 16)]
    with pytest.raises(ValueError, match=r"group '0': every input channel of 0 was 0 on all 4 calibration tokens"):
        smoothquant(seeded(plain_mlp), zeros, progress=False)
    nan = correlated_features(1)
    nan[0][1, 3] = float("nan")
    with pytest.raises(ValueError, match="group '0': 1 input channels of 0 were NaN or Inf"):
        smoothquant(seeded(plain_mlp), nan, progress=False)
    with pytest.raises(ValueError, match="layer '0': the largest |input| on the calibration data is 0.0"):
        quantize_w8a8(seeded(plain_mlp), calibration_batches=zeros, progress=False)


def test_smoothing_twice_is_refused():
    model = seeded(unknown_arch)
    smoothquant(model, _batches(1), progress=False)
    with pytest.raises(ValueError, match="smoothed already: 'layers.0.attn.wq' is an InputScaledLinear"):
        smoothquant(model, _batches(1), progress=False)


def test_wrong_rule_is_caught_and_its_group_put_back():
    model = seeded(lambda: llama_like(residual_from_norm=True))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ScalingInvarianceError, match="'layers.0.self_attn.qkv' .*residual connection"):
        smoothquant(model, _batches(), progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the first group: nothing stays


@pytest.mark.parametrize("kwargs, match", [
    ({}, "static per-tensor activation scales are measured on calibration data"),
    ({"act_granularity": "token", "calibration_batches": [torch.ones(2, 16)]}, "only used for static"),
    ({"act_granularity": "token", "static": True}, "per-token activation scales are dynamic"),
    ({"act_granularity": "row"}, "act_granularity must be 'tensor'"),
])
def test_quantize_w8a8_bad_arguments(kwargs, match):
    model = seeded(plain_mlp)
    with pytest.raises(ValueError, match=match):
        quantize_w8a8(model, **kwargs)
    assert all(type(m) is not W8A8Linear for m in model.modules())
    with pytest.raises(TypeError, match="static must be a bool"):
        quantize_w8a8(model, static="yes")
