"""torchquant.ptq.gptq on whole models: each layer's result against the GPTQ op
called on a Hessian computed here from the layer's inputs, the model's
output error against round-to-nearest, padding kept out of the Hessians,
the block-less and mixture-of-experts cases, exclusions, the report, and bad
input."""
import copy

import pytest
import torch
from torch import nn

from ptq_models import (DEAD_EXPERT, DECODER_BLOCK_LINEARS, SEQ, TinyDecoder, TinyMoE, call, correlated_features,
                        layer_inputs, padded_batches, plain_mlp, real_token_count, real_tokens, reference_hessian,
                        round_to_nearest, seeded, token_batches)
from qat_models import single_threaded  # noqa: F401  (autouse fixture)
from torchquant import QuantSpec, ops
from torchquant.nn import GPTQLinear
from torchquant.ptq import CalibrationWarning, GPTQReport, gptq
from torchquant.ptq.report import EXCLUDED, NO_CALIBRATION_TOKENS, OUTSIDE_BLOCKS, QUANTIZED

PER_ROW_4BIT = QuantSpec(bits=4, granularity="channel")
GROUPED_3BIT = QuantSpec(bits=3, symmetric=False, granularity="group", group_size=16)

# (spec, gptq keyword arguments): the grids and orders the driver must hand to the op unchanged.
SETTINGS = {
    "w4-row-damp": (PER_ROW_4BIT, {"percdamp": 0.05}),
    "w3-g16-asym-act-order": (GROUPED_3BIT, {"act_order": True}),
    "w4-g16-static-groups": (QuantSpec(bits=4, granularity="group", group_size=16),
                             {"act_order": True, "static_groups": True, "block_size": 8}),
    "w4-g16-mse": (QuantSpec(bits=4, symmetric=False, granularity="group", group_size=16, observer="mse"),
                   {"clip_search_steps": 10}),
}


def decoder_names(blocks=2):
    return [f"layers.{i}.{n}" for i in range(blocks) for n in DECODER_BLOCK_LINEARS]


def run(model, batches, spec, **kwargs) -> GPTQReport:
    kwargs.setdefault("progress", False)
    return gptq(model, batches, spec, **kwargs)


def op_on(weight, hessian, spec, **kwargs):
    """The GPTQ op called directly with ``spec``'s grid."""
    qmin, qmax = ops.quant_range(spec.bits, signed=spec.symmetric)
    group = spec.group_size if spec.granularity == "group" else None
    allowed = ("act_order", "static_groups", "block_size", "percdamp", "clip_search_steps")
    return ops.gptq_quantize(weight, hessian.float(), qmin, qmax, spec.symmetric, group_size=group,
                             **{k: v for k, v in kwargs.items() if k in allowed})


def output_error(model, reference, batches) -> float:
    with torch.no_grad():
        return sum(float((call(model, b) - call(reference, b)).square().mean()) for b in batches) / len(batches)


def state_snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_unchanged(model, snapshot):
    for k, v in model.state_dict().items():
        assert torch.equal(v, snapshot[k]), k


# ---- each layer against the op -------------------------------------------------------------

@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("sequential", [True, False])
def test_each_layer_is_the_op_applied_to_the_hessian_of_its_inputs(setting, sequential):
    """Sequential: a layer's inputs during GPTQ are its inputs in the final quantized model (all the
    layers before it are quantized by then, none after it matters). Otherwise the first block's
    layers see the float model's inputs."""
    spec, kwargs = SETTINGS[setting]
    original = seeded(TinyDecoder)
    model = copy.deepcopy(original)
    batches = padded_batches()
    report = run(model, batches, spec, sequential=sequential, **kwargs)
    names = decoder_names() if sequential else decoder_names(1)
    # the driver's Hessians hold the real tokens only
    inputs = {name: real_tokens(x, batches)
              for name, x in layer_inputs(model if sequential else original, names, batches).items()}
    for name in names:
        hessian = reference_hessian(inputs[name])
        # The same float32 sums as the driver's, when it saw the same inputs in the same order: the
        # comparison below is then exact, with no rounding-dependent code flips.
        accumulated, seen = torch.zeros(hessian.shape), 0
        for x in inputs[name]:
            seen = ops.gptq_accumulate_hessian(accumulated, x, seen)
        torch.testing.assert_close(accumulated.double(), hessian, rtol=1e-5, atol=1e-6 * float(hessian.abs().max()))
        expected = op_on(original.get_submodule(name).weight.detach(), accumulated, spec, **kwargs)
        layer, result = report[name], report.results[name]
        assert layer.status == QUANTIZED and layer.samples == seen
        assert layer.loss == float(expected.loss) and layer.details["damp"] == float(expected.damp), name
        assert torch.equal(result.codes, expected.codes), name
        assert torch.equal(result.g_idx, expected.g_idx), name
        assert torch.equal(result.scales, expected.scales), name
        assert torch.equal(result.zero_points, expected.zero_points), name
        # the reported loss is the loss of the weight now in the model, on these inputs
        e = (original.get_submodule(name).weight - model.get_submodule(name).weight).detach().double()
        torch.testing.assert_close(layer.loss, float(0.5 * ((e @ hessian) * e).sum()), rtol=1e-4, atol=0)


def test_samples_count_the_real_tokens_and_token_mask_none_counts_the_padding_too():
    batches = padded_batches()
    masked = run(seeded(TinyDecoder), batches, PER_ROW_4BIT)
    unmasked = run(seeded(TinyDecoder), batches, PER_ROW_4BIT, token_mask=None)
    tokens = real_token_count(batches)
    assert tokens < 3 * 2 * SEQ
    for name in decoder_names():
        assert masked[name].samples == tokens and unmasked[name].samples == 3 * 2 * SEQ, name
    # the padding changed what GPTQ saw, hence its result
    assert any(not torch.equal(masked.results[n].codes, unmasked.results[n].codes) for n in decoder_names())
    with pytest.raises(TypeError, match="token_mask must be 'auto'"):
        run(seeded(TinyDecoder), batches, PER_ROW_4BIT, token_mask="attention_mask")


def test_quantized_weights_are_replaced_in_place_and_nothing_else_changes():
    original = seeded(TinyDecoder)
    model = copy.deepcopy(original)
    params = {name: model.get_submodule(name).weight for name in decoder_names()}
    report = run(model, token_batches(), GROUPED_3BIT)
    for name, param in params.items():
        module = model.get_submodule(name)
        assert module.weight is param, f"{name}: the Parameter object was replaced"
        result = report.results[name]
        torch.testing.assert_close(module.weight, result.dequantize(), rtol=1e-6, atol=1e-7)
        assert not torch.equal(module.weight, original.get_submodule(name).weight)
        codes = result.codes
        assert codes.dtype == torch.int32 and codes.device.type == "cpu"
        assert int(codes.min()) >= 0 and int(codes.max()) <= 7
        assert result.scales.shape == (module.out_features, module.in_features // 16)
        assert torch.equal(result.unsigned_codes.int(), codes - result.quant_min)
    quantized = {f"{n}.weight" for n in decoder_names()}
    for key, value in model.state_dict().items():
        if key not in quantized:
            assert torch.equal(value, original.state_dict()[key]), key


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_half_precision_model_keeps_its_dtype(dtype):
    model = seeded(TinyDecoder).to(dtype)
    report = run(model, token_batches(), PER_ROW_4BIT)
    assert len(report.quantized) == 14
    for name in decoder_names():
        weight = model.get_submodule(name).weight
        assert weight.dtype == dtype
        assert torch.equal(weight, report.results[name].dequantize(dtype)), name


def test_results_build_the_layers_of_a_gptq_checkpoint():
    model = seeded(TinyDecoder)
    report = run(model, token_batches(), GROUPED_3BIT, act_order=True)
    for name in decoder_names():
        r, m = report.results[name], model.get_submodule(name)
        assert r.act_order and not r.static_groups
        layer = GPTQLinear.from_codes(r.codes, r.scales, r.zero_points, r.g_idx, m.bias, r.bits, r.group_size,
                                      r.quant_min, r.spec.symmetric, desc_act=r.act_order)
        # equal but for the checkpoint's float16 scales (relative rounding below 2^-11)
        torch.testing.assert_close(layer.dequantized_weight(), m.weight.detach(), rtol=1e-3, atol=0)


# ---- better than rounding to nearest -------------------------------------------------------

@pytest.mark.parametrize("spec", [PER_ROW_4BIT, GROUPED_3BIT], ids=["w4-row", "w3-g16-asym"])
@pytest.mark.parametrize("sequential", [True, False])
def test_gptq_output_error_is_below_round_to_nearest(spec, sequential):
    original = seeded(TinyDecoder)
    model = copy.deepcopy(original)
    batches = token_batches(4, batch=4)
    run(model, batches, spec, sequential=sequential)
    rtn = round_to_nearest(original, spec, decoder_names())
    heldout = token_batches(4, batch=4, seed=1)
    gptq_error, rtn_error = output_error(model, original, batches), output_error(rtn, original, batches)
    assert gptq_error < 0.7 * rtn_error, (gptq_error, rtn_error)
    assert output_error(model, original, heldout) < output_error(rtn, original, heldout)


def test_a_model_without_blocks_is_quantized_as_one_block():
    original = seeded(plain_mlp)
    model = copy.deepcopy(original)
    batches = correlated_features()
    report = run(model, batches, PER_ROW_4BIT)
    assert report.blocks is None and report.num_blocks == 1
    assert [(r.name, r.status) for r in report] == [("0", QUANTIZED), ("2", QUANTIZED), ("4", QUANTIZED)]
    assert report["0"].samples == 3 * 16
    rtn = round_to_nearest(original, PER_ROW_4BIT, ["0", "2", "4"])
    assert output_error(model, original, batches) < output_error(rtn, original, batches)


@pytest.mark.parametrize("call_empty_experts", [False, True])
def test_an_expert_without_tokens_is_skipped_reported_and_warned_about(call_empty_experts):
    original = seeded(lambda: TinyMoE(call_empty_experts=call_empty_experts))
    model = copy.deepcopy(original)
    with pytest.warns(CalibrationWarning, match=rf"experts\.{DEAD_EXPERT}\.(up|down): no calibration tokens"):
        report = run(model, token_batches(), PER_ROW_4BIT)
    dead = {f"layers.{i}.experts.{DEAD_EXPERT}.{n}" for i in range(2) for n in ("up", "down")}
    for layer in report:
        if layer.name in dead:
            assert layer.status == NO_CALIBRATION_TOKENS and layer.samples == 0 and layer.loss is None
            assert layer.name not in report.results
            assert torch.equal(model.get_submodule(layer.name).weight, original.get_submodule(layer.name).weight)
        elif layer.name == "lm_head":
            assert layer.status == EXCLUDED
        else:
            assert layer.status == QUANTIZED and layer.samples > 0, layer
    assert len(report.quantized) == 2 * (1 + 2 * 3)
    assert "4 skipped: no calibration tokens" in report.summary()


# ---- settings ------------------------------------------------------------------------------

def test_exclude_patterns_leave_layers_and_whole_modules_in_float():
    original = seeded(TinyDecoder)
    model = copy.deepcopy(original)
    report = run(model, token_batches(), PER_ROW_4BIT, exclude=("*.mlp.*", "layers.1.self_attn"))
    for name in decoder_names():
        expected = EXCLUDED if ".mlp." in name or name.startswith("layers.1.") else QUANTIZED
        assert report[name].status == expected, name
        same = torch.equal(model.get_submodule(name).weight, original.get_submodule(name).weight)
        assert same == (expected == EXCLUDED), name
    # no longer excluded by the default patterns, but never inside a block
    assert report["lm_head"].status == OUTSIDE_BLOCKS
    single = run(copy.deepcopy(original), token_batches(), PER_ROW_4BIT, exclude="layers.0")
    assert {r.status for r in single if r.name.startswith("layers.0.")} == {EXCLUDED}


def test_blocks_path_and_device_are_honoured(device):
    original = seeded(TinyDecoder)
    model = copy.deepcopy(original)
    report = run(model, token_batches(), PER_ROW_4BIT, blocks="layers", device=device)
    assert report.blocks == "layers" and report.num_blocks == 2
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    if device == "cpu":
        reference = copy.deepcopy(original)
        run(reference, token_batches(), PER_ROW_4BIT)
        assert_unchanged(model, state_snapshot(reference))
    assert all(r.device.type == "cpu" for res in report.results.values() for r in (res.unsigned_codes, res.scales))


def test_mse_observer_turns_on_the_clip_search():
    spec = QuantSpec(bits=4, granularity="channel", observer="mse")
    assert run(seeded(plain_mlp), correlated_features(), spec).config.clip_search_steps == 100
    assert run(seeded(plain_mlp), correlated_features(), spec, clip_search_steps=5).config.clip_search_steps == 5
    assert run(seeded(plain_mlp), correlated_features(), PER_ROW_4BIT).config.clip_search_steps == 0


# ---- the report ----------------------------------------------------------------------------

def test_report_rows_table_and_progress_bar(capsys):
    model = seeded(TinyDecoder)
    report = run(model, token_batches(), GROUPED_3BIT, progress=True)
    err = capsys.readouterr().err
    assert "GPTQ" in err and "2/2" in err and "layer=layers.1.mlp.down_proj" in err
    rows = report.to_rows()
    assert [r["name"] for r in rows] == decoder_names() + ["lm_head"]
    assert set(rows[0]) == {"name", "shape", "status", "samples", "loss", "seconds", "damp"}
    assert all(r["damp"] > 0 and r["loss"] > 0 and r["samples"] == 3 * 2 * 8 for r in rows[:-1])
    assert rows[0]["shape"] == (32, 32) and rows[-1]["status"] == EXCLUDED
    table = report.as_table()
    lines = table.splitlines()
    assert len(lines) == len(rows) + 2
    assert lines[0].split("|")[1].strip() == "name" and "damp" in lines[0] and "status" in lines[0]
    assert "| layers.0.self_attn.q_proj" in lines[2] and "32x32" in lines[2]
    text = str(report)
    assert text.startswith("GPTQ: 14 of 15 Linear layers quantized over 2 blocks of 'layers'")
    assert "1 excluded" in text.splitlines()[0] and table in text


# ---- bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize("spec, message", [
    (QuantSpec(bits=4), "granularity must be 'channel' \\(axis=0\\) or 'group', got 'tensor'"),
    (QuantSpec(bits=4, granularity="channel", axis=1), "spec.axis must be 0 .* got 1"),
    (QuantSpec(bits=12, granularity="channel"), "at most 8 bits, got spec.bits=12"),
    (QuantSpec(bits=4, granularity="channel", learnable=True), "spec.learnable=True"),
    (QuantSpec(bits=4, granularity="channel", observer="percentile"), "spec.observer must be one of"),
])
def test_specs_gptq_cannot_honour_are_refused_before_anything_changes(spec, message):
    model = seeded(TinyDecoder)
    snapshot = state_snapshot(model)
    with pytest.raises(ValueError, match=message):
        run(model, token_batches(), spec)
    assert_unchanged(model, snapshot)


@pytest.mark.parametrize("kwargs, error, message", [
    ({"exclude": 5}, TypeError, "exclude must be an fnmatch pattern string or a sequence of them"),
    ({"exclude": [nn.Linear]}, TypeError, "exclude must be an fnmatch pattern string"),
    ({"block_size": 0}, ValueError, "block_size must be a positive integer, got 0"),
    ({"percdamp": 0.0}, ValueError, "percdamp must be a number in \\(0, 1\\]"),
    ({"percdamp": "0.01"}, ValueError, "percdamp must be a number in \\(0, 1\\]"),
    ({"clip_search_steps": -1}, ValueError, "clip_search_steps must be a non-negative integer"),
    ({"clip_max_shrink": 1.5}, ValueError, "clip_max_shrink must be in \\(0, 1\\)"),
    ({"act_order": "yes"}, TypeError, "act_order must be a bool"),
    ({"static_groups": True}, ValueError, "static_groups=True .* needs spec.granularity='group'"),
    ({"blocks": "encoder.layer"}, ValueError, "blocks='encoder.layer': the model has no submodule"),
])
def test_bad_settings_are_refused_clearly_before_anything_changes(kwargs, error, message):
    model = seeded(TinyDecoder)
    snapshot = state_snapshot(model)
    with pytest.raises(error, match=message):
        run(model, token_batches(), PER_ROW_4BIT, **kwargs)
    assert_unchanged(model, snapshot)


def test_a_group_size_that_does_not_divide_a_layer_is_refused_before_anything_changes():
    model = seeded(TinyDecoder)
    snapshot = state_snapshot(model)
    spec = QuantSpec(bits=4, granularity="group", group_size=24)
    with pytest.raises(ValueError, match="layer 'layers.0.self_attn.q_proj': spec.group_size=24 does not divide"):
        run(model, token_batches(), spec)
    assert_unchanged(model, snapshot)
    # excluded layers need not fit
    report = run(model, token_batches(), spec.with_(group_size=64), exclude=("lm_head", "*_attn.*", "*.gate_proj",
                                                                              "*.up_proj"))
    assert [r.name for r in report.quantized] == ["layers.0.mlp.down_proj", "layers.1.mlp.down_proj"]


def test_bad_calibration_data_is_refused_clearly_before_anything_changes():
    model = seeded(TinyDecoder)
    snapshot = state_snapshot(model)
    with pytest.raises(ValueError, match="no calibration data"):
        run(model, [], PER_ROW_4BIT)
    with pytest.raises(TypeError, match="spec must be a torchquant.QuantSpec, got dict"):
        run(model, token_batches(), {"bits": 4})
    with pytest.raises(TypeError, match="calibration_batches must be an iterable of batches"):
        run(model, token_batches()[0], PER_ROW_4BIT)
    assert_unchanged(model, snapshot)
