"""Round to nearest (torchquant.ptq.rtn) and to_quantized_modules: post-training results as QuantizedLinear
layers in torchquant's own layout, with act-order groups and online input scales, saved and reloaded.

Outputs are compared with the float model computing with the same dequantized weights: equal up to the
kernels' float32 rounding, never bit for bit (the kernels sum in another order); checkpoints reload bit for bit.
"""
import copy

import pytest
import torch
from torch import nn

from ptq_models import TinyDecoder, call, correlated_features, padded_batches, plain_mlp, round_to_nearest, seeded
from qat_models import single_threaded  # noqa: F401  (autouse fixture)
from torchquant import QuantSpec, load_quantized, save_quantized
from torchquant.nn import InputScaledLinear, QuantizedLinear
from torchquant.ptq import awq, gptq, rtn, to_quantized_modules
from torchquant.ptq.report import EXCLUDED, QUANTIZED

ASYM4 = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=16)


def assert_outputs_close(actual, expected):
    # float32 kernels summing in their own order, through a few layers: a few ulps of the largest output.
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * float(expected.detach().abs().max()))


def quantized_names(model):
    return [name for name, m in model.named_modules() if isinstance(m, QuantizedLinear)]


@pytest.mark.parametrize("spec", [ASYM4, QuantSpec(bits=3, granularity="channel"), QuantSpec(bits=8)],
                         ids=["w4-g16-asym", "w3-channel", "w8-tensor"])
def test_rtn_layers_compute_with_the_round_to_nearest_weights(spec):
    model = seeded(TinyDecoder)
    names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name != "lm_head"]
    reference = round_to_nearest(model, spec, names) if spec.granularity != "tensor" else None
    float_model = copy.deepcopy(model)
    report = rtn(model, spec)
    assert report.method == "RTN" and sorted(report.results) == sorted(names)
    assert quantized_names(model) == names
    assert report["lm_head"].status == EXCLUDED and type(model.lm_head) is nn.Linear
    assert all(report[name].status == QUANTIZED for name in names)
    for name in names:
        layer, q = model.get_submodule(name), report.results[name]
        assert torch.equal(layer.weight_codes(), q.codes) and layer.weight_spec == spec
        if reference is not None:
            torch.testing.assert_close(layer.dequantized_weight(), reference.get_submodule(name).weight,
                                       rtol=0, atol=0)
        float_model.get_submodule(name).weight.data.copy_(layer.dequantized_weight())
    with torch.no_grad():
        for batch in padded_batches(2, seed=3):
            assert_outputs_close(call(model, batch), call(float_model, batch))


def test_rtn_model_saves_and_reloads_bit_exactly(tmp_path):
    model = seeded(TinyDecoder)
    rtn(model, ASYM4)
    save_quantized(model, tmp_path / "rtn.safetensors")
    fresh = load_quantized(seeded(TinyDecoder, seed=1), tmp_path / "rtn.safetensors")
    assert quantized_names(fresh) == quantized_names(model)
    with torch.no_grad():
        for batch in padded_batches(2, seed=4):
            assert torch.equal(call(fresh, batch), call(model, batch))


def test_rtn_refuses_bad_settings_before_changing_anything():
    model = seeded(TinyDecoder)
    with pytest.raises(ValueError, match=r"bits must be an integer in \[2, 8\]"):
        rtn(model, QuantSpec(bits=12))
    with pytest.raises(ValueError, match="group_size=48 does not divide"):
        rtn(model, QuantSpec(bits=4, granularity="group", group_size=48))
    with pytest.raises(ValueError, match="nothing to quantize"):
        rtn(model, ASYM4, exclude="*")
    with pytest.raises(TypeError, match="spec must be a QuantSpec"):
        rtn(model, 4)
    assert not quantized_names(model)


def test_act_order_gptq_results_keep_their_groups():
    model = seeded(TinyDecoder)
    report = gptq(model, padded_batches(), ASYM4, act_order=True, progress=False)
    float_model = copy.deepcopy(model)
    assert to_quantized_modules(model, report) is model
    layers = {name: model.get_submodule(name) for name in report.results}
    assert all(isinstance(m, QuantizedLinear) and m.column_perm is not None for m in layers.values())
    for name, layer in layers.items():
        q = report.results[name]
        assert torch.equal(layer.quantized_weight.g_idx(), q.g_idx) and torch.equal(layer.weight_codes(), q.codes)
        assert list(layer.state_dict())[:4] == ["qweight", "scale", "zero_point", "g_idx"]
    with torch.no_grad():
        for batch in padded_batches(2, seed=5):
            assert_outputs_close(call(model, batch), call(float_model, batch))
    to_quantized_modules(model, report)  # twice: the layers already hold the codes
    assert all(model.get_submodule(name) is layer for name, layer in layers.items())


def test_online_input_scales_of_awq_are_kept(tmp_path):
    mlp = seeded(plain_mlp)
    report = awq(mlp, correlated_features(), ASYM4, progress=False)
    assert any(isinstance(m, InputScaledLinear) for m in mlp.modules())
    float_mlp = copy.deepcopy(mlp)
    to_quantized_modules(mlp, report)
    for name in report.results:
        layer, source = mlp.get_submodule(name), float_mlp.get_submodule(name)
        if isinstance(source, InputScaledLinear):
            assert torch.equal(layer.input_scale, source.input_scale)
    x = correlated_features(1, seed=7)[0]
    with torch.no_grad():
        assert_outputs_close(mlp(x), float_mlp(x))
    save_quantized(mlp, tmp_path / "awq.safetensors")
    fresh = load_quantized(plain_mlp(), tmp_path / "awq.safetensors")
    with torch.no_grad():
        assert torch.equal(fresh(x), mlp(x))


def test_to_quantized_modules_refuses_a_model_the_report_does_not_describe():
    original = seeded(TinyDecoder)
    model = copy.deepcopy(original)
    report = gptq(model, padded_batches(), QuantSpec(bits=4, granularity="channel"), progress=False)
    with pytest.raises(ValueError, match="'layers.0.self_attn.q_proj': its weight is not the one the report's"):
        to_quantized_modules(original, report)
    assert not quantized_names(original)
    other = copy.deepcopy(model)
    rtn(other, QuantSpec(bits=4, granularity="channel"))
    with pytest.raises(ValueError, match="is already a QuantizedLinear, holding other codes"):
        to_quantized_modules(other, report)
