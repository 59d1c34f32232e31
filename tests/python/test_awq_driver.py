"""torchquant.ptq.awq on whole models: the scales it picks against the plain-PyTorch AWQ reference on
activations captured here, its output error against round-to-nearest, the float invariance of the
scaling alone, AWQ followed by GPTQ, the AWQ GEMM checkpoint of its result, the report, and bad input."""
import copy

import pytest
import torch
from torch import nn

import awq_reference as ref
from ptq_models import (DEAD_EXPERT, DECODER_BLOCK_LINEARS, TinyDecoder, TinyMoE, call, correlated_features,
                        layer_inputs, padded_batches, plain_mlp, real_token_count, real_tokens, reference_hessian,
                        round_to_nearest, seeded, token_batches)
from qat_models import single_threaded  # noqa: F401  (autouse fixture)
from torchquant import QuantSpec, ops
from torchquant.nn import AWQLinear
from torchquant.nn.input_scaled_linear import InputScaledLinear
from torchquant.ptq import CalibrationWarning, gptq, to_gptq_modules
from torchquant.ptq.awq import SCALED, AWQReport, _TokenSample, awq, awq_then_gptq, to_awq_modules
from torchquant.ptq.awq_format import load_awq, save_awq
from torchquant.ptq.report import EXCLUDED, NO_CALIBRATION_TOKENS, QUANTIZED

ASYM4 = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=16)
SPECS = {
    "w4-g16-asym": ASYM4,
    "w4-g16-sym": QuantSpec(bits=4, symmetric=True, granularity="group", group_size=16),
    "w3-g16-asym": QuantSpec(bits=3, symmetric=False, granularity="group", group_size=16),
    "w3-g16-sym": QuantSpec(bits=3, symmetric=True, granularity="group", group_size=16),
}
SALIENT = (3, 17)  # the input channels made large


def decoder_names(blocks=2):
    return [f"layers.{i}.{n}" for i in range(blocks) for n in DECODER_BLOCK_LINEARS]


def salient_decoder(factor: float = 10.0) -> TinyDecoder:
    """A TinyDecoder whose norms and up_proj make a few input channels of every layer ``factor`` times larger
    than the rest: the outlier channels of LLM activations that AWQ's scales protect."""
    model = seeded(TinyDecoder)
    with torch.no_grad():
        for block in model.layers:
            for norm in (block.input_layernorm, block.post_attention_layernorm):
                norm.weight[list(SALIENT)] *= factor
            block.mlp.up_proj.weight[list(SALIENT)] *= factor
    return model


MODELS = {"plain": lambda: seeded(TinyDecoder), "salient": salient_decoder}


def run(model, batches, spec=ASYM4, **kwargs) -> AWQReport:
    kwargs.setdefault("progress", False)
    return awq(model, batches, spec, **kwargs)


def output_error(model, reference, batches) -> float:
    with torch.no_grad():
        return sum(float((call(model, b) - call(reference, b)).square().mean()) for b in batches) / len(batches)


def captured_rows(model, name, batches) -> torch.Tensor:
    """The real-token rows ``name`` reads when ``model`` runs normally on ``batches``."""
    return torch.cat(real_tokens(layer_inputs(model, [name], batches)[name], batches))


def group_of(report, layer):
    (group,) = [g for g in report.groups.values() if layer in g.layers]
    return group


def reference_search(x, weights, spec, **kwargs):
    return ref.search_scales(x, [w.detach() for w in weights], None, spec.quant_min, spec.quant_max, spec.symmetric,
                             spec.group_size, **kwargs)


def assert_reference_choice(group, want, grid=20, rtol=1e-5):
    """The driver's group chose the reference's grid point (or one whose reference loss is within the
    rounding of the sums) and holds that candidate's scales and every grid point's loss."""
    chosen = round(group.alpha * grid)
    assert group.losses.shape == (grid,)
    torch.testing.assert_close(group.losses.double(), want.losses, rtol=rtol, atol=0)
    if chosen != want.best:
        assert want.losses[chosen] <= want.losses[want.best] * (1 + rtol), (chosen, want.best, want.losses)
    torch.testing.assert_close(group.scales, want.candidates[chosen], rtol=rtol, atol=0)


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, before):
    state = model.state_dict()
    assert state.keys() == before.keys()
    for k, v in state.items():
        assert torch.equal(v, before[k]), k


# ---- the scales against the reference ------------------------------------------------------

@pytest.mark.parametrize("duo_scaling", [False, True], ids=["plain", "duo"])
@pytest.mark.parametrize("spec_name", ["w4-g16-asym", "w3-g16-sym"])
def test_first_group_scales_are_the_reference_search_on_independently_captured_inputs(spec_name, duo_scaling):
    """The first group of the first block reads the float model's activations (padding removed)."""
    spec = SPECS[spec_name]
    original = salient_decoder()
    batches = padded_batches()
    report = run(copy.deepcopy(original), batches, spec, duo_scaling=duo_scaling)
    x = captured_rows(original, "layers.0.self_attn.q_proj", batches)
    assert x.shape[0] == real_token_count(batches)
    weights = [original.get_submodule(f"layers.0.self_attn.{p}_proj").weight.detach() for p in "qkv"]
    group = group_of(report, "layers.0.self_attn.q_proj")
    assert group.kind == "norm" and group.prev_name == "layers.0.input_layernorm" and group.rows == x.shape[0]
    assert group.layers == [f"layers.0.self_attn.{p}_proj" for p in "qkv"]
    want = reference_search(x, weights, spec, duo_scaling=duo_scaling)
    assert_reference_choice(group, want)
    assert group.loss <= group.rtn_loss
    if not duo_scaling:  # alpha = 0 is s = 1: plain round-to-nearest
        torch.testing.assert_close(group.rtn_loss, ref.rtn_error(x, weights, spec.quant_min, spec.quant_max,
                                                                 spec.symmetric, spec.group_size), rtol=1e-5, atol=0)


def test_every_group_is_the_reference_search_when_only_scaling():
    """Scaling alone keeps the float model, so every group of every block reads (up to rounding) what the
    float model's layers read."""
    original = salient_decoder()
    batches = padded_batches()
    report = run(copy.deepcopy(original), batches, apply_quantization=False, clip=False)
    assert len(report.groups) == 8
    for group in report.groups.values():
        x = captured_rows(original, group.layers[0], batches)
        weights = [original.get_submodule(name).weight for name in group.layers]
        # inputs equal up to the roundings of the folds before: a looser tolerance on the sums
        assert_reference_choice(group, reference_search(x, weights, ASYM4), rtol=1e-4)


def test_the_search_sees_every_other_real_token_when_they_exceed_max_tokens():
    original = salient_decoder()
    batches = padded_batches()
    tokens = real_token_count(batches)  # 36
    report = run(copy.deepcopy(original), batches, max_tokens=tokens // 2 + 2)
    x = captured_rows(original, "layers.0.self_attn.q_proj", batches)[::2]
    group = group_of(report, "layers.0.self_attn.q_proj")
    assert group.rows == x.shape[0] == tokens // 2
    weights = [original.get_submodule(f"layers.0.self_attn.{p}_proj").weight.detach() for p in "qkv"]
    assert_reference_choice(group, reference_search(x, weights, ASYM4))


@pytest.mark.parametrize("limit", [1, 5, 8, 100])
def test_token_sample_keeps_rows_at_the_smallest_power_of_two_stride_within_the_limit(limit):
    sample = _TokenSample(limit)
    rows = torch.arange(70.0)[:, None].expand(70, 3)
    for size in (7, 1, 20, 13, 29):  # uneven batches: the stride must run across them
        chunk, rows = rows[:size], rows[size:]
        sample.update(chunk.reshape(1, size, 3))
    stride = 1
    while len(range(0, 70, stride)) > limit:
        stride *= 2
    assert torch.equal(sample.rows()[:, 0], torch.arange(0.0, 70.0, stride))


def test_layer_report_holds_its_output_error_and_round_to_nearest_s():
    original = salient_decoder()
    model = copy.deepcopy(original)
    batches = padded_batches()
    report = run(model, batches)
    name = "layers.0.self_attn.q_proj"
    x = captured_rows(original, name, batches).double()
    w = original.get_submodule(name).weight.detach().double()
    s = group_of(report, name).scales.double()
    w_rtn = ref.pseudo_quantize(w.float(), 0, 15, False, 16).double()
    layer = report[name]
    torch.testing.assert_close(layer.details["rtn_loss"], float((x @ (w_rtn - w).T).square().mean()),
                               rtol=1e-4, atol=0)
    w_now = model.get_submodule(name).weight.detach().double()
    torch.testing.assert_close(layer.loss, float(((x / s) @ w_now.T - x @ w.T).square().mean()), rtol=1e-4, atol=0)
    assert layer.details["alpha"] == group_of(report, name).alpha
    assert layer.details["scaling"] == "norm" and layer.details["clip"] == "skipped: query/key"


# ---- better than rounding to nearest -------------------------------------------------------

@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("spec_name", list(SPECS))
def test_awq_output_error_on_the_calibration_data_is_well_below_round_to_nearest(model_name, spec_name):
    spec = SPECS[spec_name]
    original = MODELS[model_name]()
    model = copy.deepcopy(original)
    batches = padded_batches()
    run(model, batches, spec)
    awq_error = output_error(model, original, batches)
    rtn_error = output_error(round_to_nearest(original, spec, decoder_names()), original, batches)
    assert awq_error < 0.8 * rtn_error, (awq_error, rtn_error)


@pytest.mark.parametrize("spec_name", ["w4-g16-asym", "w3-g16-asym"])
def test_the_scales_alone_halve_round_to_nearest_s_error_on_salient_channels(spec_name):
    """Without clipping, what is left of AWQ is the protection of the large input channels."""
    spec = SPECS[spec_name]
    original = salient_decoder()
    model = copy.deepcopy(original)
    batches = padded_batches()
    report = run(model, batches, spec, clip=False)
    assert all(layer.details["clip"] == "off" for layer in report.quantized)
    awq_error = output_error(model, original, batches)
    rtn_error = output_error(round_to_nearest(original, spec, decoder_names()), original, batches)
    assert awq_error < 0.5 * rtn_error, (awq_error, rtn_error)
    # the channels protected are the salient ones: their scales are the largest of their group's
    group = group_of(report, "layers.0.mlp.gate_proj")
    assert group.alpha > 0 and set(group.scales.topk(len(SALIENT)).indices.tolist()) == set(SALIENT)


# ---- scaling alone keeps the float model ---------------------------------------------------

@pytest.mark.parametrize("make,batches,kinds", [
    (lambda: salient_decoder(), padded_batches, {"norm", "linear"}),
    (lambda: seeded(plain_mlp), correlated_features, {"explicit"}),
], ids=["decoder-folds", "mlp-explicit"])
def test_scaling_alone_leaves_the_float_outputs_unchanged(make, batches, kinds):
    original = make()
    model = copy.deepcopy(original)
    data = batches()
    report = run(model, data, apply_quantization=False, clip=False)
    assert {g.kind for g in report.groups.values()} == kinds
    assert not report.results and all(layer.status == SCALED for layer in report if layer.samples)
    assert not report.quantized
    with torch.no_grad():
        for b in data:
            expected = call(original, b)
            torch.testing.assert_close(call(model, b), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    changed = [k for k, v in model.state_dict().items() if k in original.state_dict()
               and not torch.allclose(v, original.state_dict()[k], rtol=1e-3, atol=0)]
    assert changed, "no weight was scaled"
    if kinds == {"explicit"}:
        assert all(isinstance(model.get_submodule(n), InputScaledLinear) for n in ("0", "2", "4"))


def test_query_and_key_are_scaled_but_not_clipped():
    original = salient_decoder()
    model = copy.deepcopy(original)
    report = run(model, padded_batches(), apply_quantization=False)
    for i in range(2):
        s = group_of(report, f"layers.{i}.self_attn.q_proj").scales
        for p in "qk":
            name = f"layers.{i}.self_attn.{p}_proj"
            assert report[name].details["clip"] == "skipped: query/key"
            torch.testing.assert_close(model.get_submodule(name).weight,
                                       original.get_submodule(name).weight * s, rtol=1e-6, atol=0)
        assert report[f"layers.{i}.self_attn.v_proj"].details["clip"] == "applied"
    clipped = [n for n in decoder_names() if report[n].details["clip"] == "applied"]
    assert len(clipped) == 10


# ---- AWQ, then GPTQ ------------------------------------------------------------------------

@pytest.mark.parametrize("spec_name", ["w4-g16-asym", "w3-g16-sym"])
def test_awq_then_gptq_is_not_worse_than_gptq_alone(spec_name):
    spec = SPECS[spec_name]
    original = salient_decoder()
    batches = padded_batches()
    alone = copy.deepcopy(original)
    gptq(alone, batches, spec, progress=False)
    model = copy.deepcopy(original)
    reports = awq_then_gptq(model, iter(batches), spec, {"progress": False}, {"progress": False})
    assert not reports.awq.results and len(reports.awq.groups) == 8
    assert all(reports.awq[n].details["clip"] == "off" for n in decoder_names())  # the default here
    assert len(reports.gptq.results) == 14
    for name in decoder_names():
        assert torch.equal(model.get_submodule(name).weight, reports.gptq.results[name].dequantize()), name
    combined, gptq_error = output_error(model, original, batches), output_error(alone, original, batches)
    assert combined < 1.1 * gptq_error, (combined, gptq_error)


def test_gptq_after_awq_sees_the_inputs_an_input_scaled_layer_multiplies():
    """Explicit scaling divides inside the layer; GPTQ's Hessian must be that of x / input_scale."""
    spec = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=16)
    original = seeded(plain_mlp)
    batches = correlated_features()
    scaled = copy.deepcopy(original)
    run(scaled, batches, spec, apply_quantization=False, clip=False)
    first = scaled.get_submodule("0")
    x = torch.cat(layer_inputs(scaled, ["0"], batches)["0"]) / first.input_scale
    expected = ops.gptq_quantize(first.weight.detach(), reference_hessian([x]).float(), 0, 15, False, group_size=16)

    model = copy.deepcopy(original)
    reports = awq_then_gptq(model, batches, spec, {"progress": False, "clip": False}, {"progress": False})
    torch.testing.assert_close(reports.gptq.results["0"].codes, expected.codes, rtol=0, atol=0)
    layer = model.get_submodule("0")
    assert isinstance(layer, InputScaledLinear) and torch.equal(layer.input_scale, first.input_scale)
    assert not layer._forward_pre_hooks
    # The GPTQ layout has no place for the online division: converting must refuse, not drop it.
    with pytest.raises(ValueError, match=r"'0' divides its input by input_scale"):
        to_gptq_modules(model, reports.gptq)


# ---- checkpoint ----------------------------------------------------------------------------

@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
def test_results_round_trip_through_an_awq_checkpoint(tmp_path, symmetric):
    spec = QuantSpec(bits=4, symmetric=symmetric, granularity="group", group_size=16)
    model = salient_decoder()
    batches = padded_batches()
    report = run(model, batches, spec)
    assert set(report.results) == set(decoder_names())
    # the float model computes with the results' weights exactly, also where a later scale was folded into
    # an already quantized layer's rows (v_proj, up_proj)
    for name in decoder_names():
        assert torch.equal(model.get_submodule(name).weight, report.results[name].dequantize()), name
    converted = to_awq_modules(copy.deepcopy(model), report)
    for name in decoder_names():
        layer, q = converted.get_submodule(name), report.results[name]
        assert isinstance(layer, AWQLinear) and layer.symmetric == symmetric
        got = layer.unpack()
        assert torch.equal(got.codes, q.codes) and torch.equal(got.zero_points, q.zero_points)
        assert torch.equal(got.scales, q.scales.half().float())  # the layout stores float16 scales
        # so each weight moves by at most |code - zero| * |scale - fp16(scale)| <= 2^-11 |code - zero| scale
        step = (q.codes.float() - q.zero_points.repeat_interleave(16, 1)).abs() * q.scales.repeat_interleave(16, 1)
        assert bool(((layer.dequantized_weight() - model.get_submodule(name).weight).abs()
                     <= 2.0 ** -11 * step + 1e-12).all()), name
    save_awq(converted, tmp_path / "awq")
    reloaded = load_awq(seeded(TinyDecoder), tmp_path / "awq")
    with torch.no_grad():
        for b in batches:
            assert torch.equal(call(reloaded, b), call(converted, b))
            torch.testing.assert_close(call(converted, b), call(model, b), rtol=0, atol=2e-2)


def test_to_awq_modules_refuses_what_the_layout_cannot_hold_before_changing_anything():
    model = salient_decoder()
    w3 = run(model, padded_batches(), SPECS["w3-g16-asym"])
    before = snapshot(model)
    with pytest.raises(ValueError, match="3-bit codes; the AWQ GEMM layout holds 4-bit codes only"):
        to_awq_modules(model, w3)
    assert_unchanged(model, before)

    mlp = seeded(plain_mlp)
    explicit = run(mlp, correlated_features(), ASYM4)
    before = snapshot(mlp)
    with pytest.raises(ValueError, match="layer '0' divides its input by input_scale"):
        to_awq_modules(mlp, explicit)
    assert_unchanged(mlp, before)

    scaled_only = run(salient_decoder(), padded_batches(), apply_quantization=False)
    with pytest.raises(ValueError, match="holds no quantized weights"):
        to_awq_modules(salient_decoder(), scaled_only)
    model = salient_decoder()
    report = run(copy.deepcopy(model), padded_batches())
    with pytest.raises(ValueError, match="is not the one the report's codes give"):
        to_awq_modules(model, report)  # the float model, not the quantized one
    with pytest.raises(TypeError, match="report must be the PTQReport"):
        to_awq_modules(model, report.results)


# ---- the report and the walk ---------------------------------------------------------------

def test_report_lists_every_layer_and_each_block_s_four_groups():
    model = salient_decoder()
    report = run(model, padded_batches())
    assert report.method == "AWQ" and report.blocks == "layers" and report.num_blocks == 2
    assert [layer.name for layer in report] == decoder_names() + ["lm_head"]
    assert report["lm_head"].status == EXCLUDED
    assert all(report[n].status == QUANTIZED and report[n].samples == real_token_count(padded_batches())
               for n in decoder_names())
    kinds = [(name.split(".", 2)[2], g.kind, g.prev_name) for name, g in report.groups.items()
             if name.startswith("layers.1")]
    assert kinds == [("self_attn.qkv", "norm", "layers.1.input_layernorm"),
                     ("self_attn.o_proj", "linear", "layers.1.self_attn.v_proj"),
                     ("mlp.gate_up", "norm", "layers.1.post_attention_layernorm"),
                     ("mlp.down_proj", "linear", "layers.1.mlp.up_proj")]
    for g in report.groups.values():
        assert 0.0 <= g.alpha < 1.0 and g.loss <= g.rtn_loss
    text = str(report)
    assert "alpha" in text and "rtn_loss" in text and "skipped: query/key" in text


def test_an_expert_without_tokens_is_skipped_and_the_others_scaled_explicitly():
    model = seeded(TinyMoE)
    with pytest.warns(CalibrationWarning, match=rf"experts\.{DEAD_EXPERT}\.(up|down): no calibration tokens"):
        report = run(model, token_batches())
    for layer in report:
        if f"experts.{DEAD_EXPERT}." in layer.name:
            assert layer.status == NO_CALIBRATION_TOKENS
            assert not isinstance(model.get_submodule(layer.name), InputScaledLinear)
        elif layer.name != "lm_head":
            assert layer.status == QUANTIZED and layer.details["scaling"] == "explicit", layer.name


def test_a_half_precision_model_keeps_its_dtype():
    model = salient_decoder().to(torch.bfloat16)
    report = run(model, padded_batches())
    for name in decoder_names():
        weight = model.get_submodule(name).weight
        assert weight.dtype == torch.bfloat16
        assert torch.equal(weight, report.results[name].dequantize(torch.bfloat16)), name


def test_blocks_path_and_device_are_honoured(device):
    model = salient_decoder()
    report = run(model, padded_batches(), blocks="layers", device=device)
    assert len(report.quantized) == 14
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(q.codes.device.type == "cpu" for q in report.results.values())


# ---- bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize("spec,error,message", [
    (QuantSpec(bits=4, granularity="channel"), ValueError, "spec.granularity must be 'group'"),
    (QuantSpec(bits=8, granularity="group", group_size=16), ValueError, r"spec.bits must be one of \(3, 4\)"),
    (QuantSpec(bits=2, granularity="group", group_size=16), ValueError, r"spec.bits must be one of \(3, 4\)"),
    (QuantSpec(bits=4, granularity="group", group_size=16, observer="mse"), ValueError, "spec.observer must be"),
    (QuantSpec(bits=4, granularity="group", group_size=16, learnable=True), ValueError, "learnable"),
    (QuantSpec(bits=4, granularity="group", group_size=24), ValueError, "group_size=24 does not divide"),
    ("int4", TypeError, "spec must be a torchquant.QuantSpec"),
])
def test_specs_awq_cannot_honour_are_refused_before_anything_changes(spec, error, message):
    model = salient_decoder()
    before = snapshot(model)
    with pytest.raises(error, match=message):
        run(model, padded_batches(), spec)
    assert_unchanged(model, before)


@pytest.mark.parametrize("kwargs,error,message", [
    ({"grid": 0}, ValueError, "grid must be a positive integer"),
    ({"grid": 2.5}, ValueError, "grid must be a positive integer"),
    ({"clip_steps": 0}, ValueError, "clip_steps must be a positive integer"),
    ({"clip_max_shrink": 1.0}, ValueError, r"clip_max_shrink must be in \(0, 1\)"),
    ({"max_clip_tokens": 0}, ValueError, "max_clip_tokens must be a positive integer"),
    ({"max_tokens": -1}, ValueError, "max_tokens must be a positive integer"),
    ({"clip": "yes"}, TypeError, "clip must be a bool"),
    ({"apply_quantization": 1}, TypeError, "apply_quantization must be a bool"),
    ({"exclude": 3}, TypeError, "exclude must be an fnmatch pattern"),
    ({"blocks": "decoder.layers"}, ValueError, "no submodule of that name"),
])
def test_bad_settings_are_refused_clearly_before_anything_changes(kwargs, error, message):
    model = salient_decoder()
    before = snapshot(model)
    with pytest.raises(error, match=message):
        run(model, padded_batches(), **kwargs)
    assert_unchanged(model, before)


@pytest.mark.parametrize("batches,error,message", [
    ([], ValueError, "no calibration data"),
    (None, TypeError, "calibration_batches must be an iterable"),
    (torch.zeros(2, 8, dtype=torch.long), TypeError, "calibration_batches must be an iterable"),
])
def test_missing_calibration_data_is_refused_before_anything_changes(batches, error, message):
    for driver in (lambda m: run(m, batches), lambda m: awq_then_gptq(m, batches, ASYM4)):
        model = salient_decoder()
        before = snapshot(model)
        with pytest.raises(error, match=message):
            driver(model)
        assert_unchanged(model, before)


def test_awq_then_gptq_refuses_to_let_awq_round():
    model = salient_decoder()
    with pytest.raises(ValueError, match="awq_kwargs must not set apply_quantization"):
        awq_then_gptq(model, padded_batches(), ASYM4, {"apply_quantization": True})
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        run(nn.Linear(16, 16).state_dict(), padded_batches())
