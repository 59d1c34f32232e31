"""prepare_qat: which layers are swapped (by type, by name, exclusions), on
nested models; idempotence; state dicts shared with the float model; bad
configurations."""
import copy

import pytest
import torch
from torch import nn

from checks import assert_equal_values
from qat_models import ConvNet, TinyTransformer, conv_bn_net, convnet_input, fake_quantizers, image_input, seeded, \
    single_threaded, train_steps, transformer_input  # noqa: F401  (single_threaded: autouse fixture)
from torchquant import QuantSpec
from torchquant.nn.qat import QATConv1d, QATConv2d, QATConvBn2d, QATEmbedding, QATLinear, QATModule, \
    float_state_dict
from torchquant.qat import W4A8, W8, W8A8, LayerQuant, QuantConfig, prepare_qat, qat_report

INT8_WEIGHT = LayerQuant(QuantSpec(bits=8, granularity="channel"))
INT4_WEIGHT = LayerQuant(QuantSpec(bits=4, granularity="channel"))

TRANSFORMER_LINEARS = [f"layers.{i}.{p}" for i in range(2) for p in
                       ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                        "mlp.up_proj", "mlp.down_proj")] + ["lm_head"]


def qat_layers(model):
    """{name: QAT type name} of every QAT layer."""
    return {name: type(m).__name__ for name, m in model.named_modules() if isinstance(m, QATModule)}


def weight_bits(model):
    return {name: m.weight_spec.bits for name, m in model.named_modules() if isinstance(m, QATModule)}


# ---- which layers ------------------------------------------------------------------

def test_default_swaps_every_supported_layer_of_a_transformer_and_nothing_else():
    model = seeded(TinyTransformer)
    qat = prepare_qat(model, W8A8())
    expected = {name: "QATLinear" for name in TRANSFORMER_LINEARS}
    expected["embed_tokens"] = "QATEmbedding"
    assert qat_layers(qat) == expected
    for name, m in qat.named_modules():
        if isinstance(m, nn.LayerNorm):
            assert type(m) is nn.LayerNorm, name
    assert type(qat.layers[0].self_attn) is type(model.layers[0].self_attn)


def test_swaps_layers_nested_in_sequential_in_moduledict_in_a_custom_module():
    qat = prepare_qat(seeded(ConvNet), W8A8())
    assert qat_layers(qat) == {"stages.image.0": "QATConv2d", "stages.image.2": "QATConv2d",
                               "stages.signal.0": "QATConv1d", "head": "QATLinear"}
    assert isinstance(qat.stages["image"][1], nn.ReLU) and isinstance(qat.stages["signal"][1], nn.Tanh)


def test_qat_layers_compute_the_float_function_when_fake_quantization_is_off():
    for make, inputs in [(TinyTransformer, transformer_input()), (ConvNet, convnet_input())]:
        model = seeded(make).eval()
        qat = prepare_qat(model, W8A8()).eval()
        for fq in fake_quantizers(qat):
            fq.disable_fake_quant()
        assert_equal_values(qat(inputs), model(inputs))


def test_by_type_selects_that_type_only():
    config = QuantConfig(by_type={nn.Embedding: INT4_WEIGHT})
    assert qat_layers(prepare_qat(seeded(TinyTransformer), config)) == {"embed_tokens": "QATEmbedding"}
    assert weight_bits(prepare_qat(seeded(TinyTransformer), config)) == {"embed_tokens": 4}


def test_by_type_overrides_the_default():
    config = W8A8(by_type={nn.Embedding: INT4_WEIGHT})
    bits = weight_bits(prepare_qat(seeded(TinyTransformer), config))
    assert bits.pop("embed_tokens") == 4
    assert set(bits.values()) == {8}


def test_by_name_patterns_take_the_first_match_and_none_leaves_a_layer_alone():
    config = QuantConfig(default=INT8_WEIGHT, by_name={
        "*.self_attn.q_proj": INT4_WEIGHT,      # more specific first: wins over the next pattern
        "*.self_attn.*": LayerQuant(QuantSpec(bits=6)),
        "layers.1.mlp.*": None,                 # kept in floating point
    })
    bits = weight_bits(prepare_qat(seeded(TinyTransformer), config))
    for i in range(2):
        assert bits[f"layers.{i}.self_attn.q_proj"] == 4
        for p in ("k_proj", "v_proj", "o_proj"):
            assert bits[f"layers.{i}.self_attn.{p}"] == 6
    assert bits["layers.0.mlp.up_proj"] == bits["layers.0.mlp.down_proj"] == 8
    assert "layers.1.mlp.up_proj" not in bits and "layers.1.mlp.down_proj" not in bits
    assert bits["embed_tokens"] == bits["lm_head"] == 8


def test_exclude_wins_over_by_name_and_covers_whole_subtrees():
    config = W8A8(by_name={"lm_head": INT4_WEIGHT}, exclude=["lm_head", "layers.1", "*.k_proj"])
    layers = qat_layers(prepare_qat(seeded(TinyTransformer), config))
    assert "lm_head" not in layers
    assert not any(name.startswith("layers.1.") for name in layers)
    assert not any(name.endswith("k_proj") for name in layers)
    assert "layers.0.self_attn.q_proj" in layers and "embed_tokens" in layers


class _LinearSubclass(nn.Linear):
    pass


def test_unsupported_layers_and_subclasses_of_supported_ones_are_left_alone():
    model = nn.Sequential(nn.LSTM(4, 4), _LinearSubclass(4, 4), nn.MultiheadAttention(4, 2), nn.Linear(4, 4),
                          nn.Conv3d(1, 1, 1))
    qat = prepare_qat(model, W8())
    assert qat_layers(qat) == {"3": "QATLinear"}
    # MultiheadAttention's out_proj is a Linear subclass whose weight it reads directly.
    assert type(qat[2].out_proj) is type(model[2].out_proj)


def test_a_bare_layer_becomes_its_qat_layer():
    linear = seeded(lambda: nn.Linear(8, 4))
    qat = prepare_qat(linear, W8())
    assert isinstance(qat, QATLinear)
    assert type(linear) is nn.Linear
    assert isinstance(prepare_qat(nn.Embedding(5, 8), W8()), QATEmbedding)
    assert type(prepare_qat(linear, W8(exclude=["*"]))) is nn.Linear


def test_qat_report_lists_every_swapped_layer_with_its_grids():
    config = W4A8(group_size=8, by_type={nn.Embedding: INT8_WEIGHT})
    report = qat_report(prepare_qat(seeded(TinyTransformer), config))
    rows = {name: rest for name, *rest in report}
    assert set(rows) == set(TRANSFORMER_LINEARS) | {"embed_tokens"}
    assert rows["embed_tokens"] == ["QATEmbedding", "int8 sym channel(axis=0)", "-"]
    assert rows["lm_head"] == ["QATLinear", "int4 sym group(8) learnable", "int8 asym tensor learnable"]
    assert qat_report(seeded(TinyTransformer)) == []


# ---- idempotence, copies, shared parameters ------------------------------------------

@pytest.mark.parametrize("fold_bn", [False, True])
def test_a_second_prepare_changes_nothing(fold_bn):
    model = seeded(conv_bn_net) if fold_bn else seeded(TinyTransformer)
    qat = prepare_qat(model, W8A8(fold_bn=fold_bn))
    modules = {name: id(m) for name, m in qat.named_modules()}
    report = qat_report(qat)
    again = prepare_qat(qat, W8A8(fold_bn=fold_bn), inplace=True)
    assert again is qat
    assert {name: id(m) for name, m in again.named_modules()} == modules
    assert qat_report(again) == report
    assert qat_report(prepare_qat(qat, W4A8(group_size=8))) == report


def test_inplace_false_leaves_the_model_untouched():
    model = seeded(TinyTransformer)
    before = copy.deepcopy(model.state_dict())
    modules = {name: type(m) for name, m in model.named_modules()}
    qat = prepare_qat(model, W8A8())
    train_steps(qat, [transformer_input(seed=s) for s in range(2)])
    assert {name: type(m) for name, m in model.named_modules()} == modules
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert qat.lm_head.weight is not model.lm_head.weight


def test_inplace_true_trains_the_float_models_own_parameters():
    model = seeded(TinyTransformer)
    weight = model.layers[0].mlp.up_proj.weight
    qat = prepare_qat(model, W8A8(), inplace=True)
    assert qat is model
    assert qat.layers[0].mlp.up_proj.weight is weight


def test_qat_state_dict_keeps_every_float_key():
    for make, config in [(TinyTransformer, W8A8()), (ConvNet, W4A8(group_size=8))]:
        model = seeded(make)
        qat = prepare_qat(model, config)
        float_keys, qat_keys = set(model.state_dict()), set(qat.state_dict())
        assert float_keys <= qat_keys
        assert any(k.endswith("weight_fake_quant.scale") for k in qat_keys - float_keys)


# ---- loading checkpoints in both directions -------------------------------------------

def test_a_float_checkpoint_loads_strictly_and_recalibrates_the_weight_grids():
    trained = seeded(TinyTransformer, seed=1)
    qat = prepare_qat(seeded(TinyTransformer, seed=0), W8A8())
    train_steps(qat, [transformer_input(seed=s) for s in range(2)])  # activation grids calibrated
    scale_before = qat.lm_head.weight_fake_quant.scale.detach().clone()
    qat.load_state_dict(trained.state_dict(), strict=True)
    assert not torch.equal(qat.lm_head.weight_fake_quant.scale, scale_before)
    reference = prepare_qat(trained, W8A8())
    for name, m in qat.named_modules():
        if isinstance(m, QATModule):
            ref = reference.get_submodule(name)
            assert_equal_values(m.weight, ref.weight)
            assert_equal_values(m.weight_fake_quant.scale, ref.weight_fake_quant.scale)
            assert_equal_values(m.quantized_weight(), ref.quantized_weight())
    # The activation grids keep what they learnt.
    assert qat.lm_head.input_fake_quant.is_calibrated


def test_a_float_checkpoint_with_other_keys_still_fails_strict_loading():
    qat = prepare_qat(seeded(TinyTransformer), W8A8())
    state = seeded(TinyTransformer).state_dict()
    del state["lm_head.weight"]
    with pytest.raises(RuntimeError, match="lm_head.weight"):
        qat.load_state_dict(state, strict=True)


@pytest.mark.parametrize("fold_bn", [False, True])
def test_float_state_dict_loads_strictly_into_a_fresh_float_model(fold_bn):
    make = conv_bn_net
    qat = prepare_qat(seeded(make), W8A8(fold_bn=fold_bn))
    if fold_bn:
        assert isinstance(qat[0], QATConvBn2d)
    train_steps(qat, [image_input(seed=s) for s in range(3)])  # moves weights and BN statistics
    fresh = seeded(make, seed=5)
    fresh.load_state_dict(float_state_dict(qat), strict=True)
    bn = qat[0].bn if fold_bn else qat[1]
    assert_equal_values(fresh[1].running_mean, bn.running_mean)
    assert_equal_values(fresh[0].weight, qat[0].weight)
    # With fake quantization off, the QAT model is the float model it gives back.
    for fq in fake_quantizers(qat):
        fq.disable_fake_quant()
    x = image_input(seed=9)
    torch.testing.assert_close(fresh.eval()(x), qat.eval()(x), rtol=1e-5, atol=1e-6)


def test_float_state_dict_renames_folded_batchnorms_inside_a_wrapped_model():
    qat = prepare_qat(nn.ModuleDict({"net": seeded(conv_bn_net)}), W8A8(fold_bn=True))
    wrapped = nn.Sequential(qat)  # names gain a prefix after prepare_qat
    nn.Sequential(nn.ModuleDict({"net": conv_bn_net()})).load_state_dict(float_state_dict(wrapped), strict=True)


# ---- bad configurations --------------------------------------------------------------

@pytest.mark.parametrize("module_type", [nn.LSTM, nn.LayerNorm, _LinearSubclass])
def test_by_type_rejects_types_without_a_qat_version(module_type):
    with pytest.raises(ValueError, match=module_type.__name__):
        QuantConfig(by_type={module_type: INT8_WEIGHT})


@pytest.mark.parametrize("key", ["Linear", 3, nn.Linear(2, 2)])
def test_by_type_rejects_keys_that_are_not_module_types(key):
    with pytest.raises(TypeError, match="by_type"):
        QuantConfig(by_type={key: INT8_WEIGHT})


def test_config_entries_must_be_layer_quants():
    with pytest.raises(TypeError, match="LayerQuant"):
        QuantConfig(default=QuantSpec())
    with pytest.raises(TypeError, match="lm_head"):
        QuantConfig(by_name={"lm_head": QuantSpec()})


@pytest.mark.parametrize("fields, message", [
    (dict(granularity="group"), "group_size"),
    (dict(granularity="group", group_size=0), "group_size"),
    (dict(granularity="channel", group_size=8), "group_size"),
    (dict(bits=1), "bits"),
    (dict(bits=17), "bits"),
])
def test_contradicting_specs_are_rejected(fields, message):
    with pytest.raises(ValueError, match=message):
        QuantSpec(**fields)


def test_a_group_size_that_does_not_divide_a_layer_names_the_layer():
    # TinyTransformer's hidden size is 32: group_size=12 fits no layer, the first one met is reported.
    with pytest.raises(ValueError, match=r"'embed_tokens'.*group_size=12"):
        prepare_qat(seeded(TinyTransformer), W4A8(group_size=12))
    with pytest.raises(ValueError, match=r"'layers.0.mlp.down_proj'.*group_size=48.*64"):
        prepare_qat(seeded(TinyTransformer), W4A8(group_size=48, exclude=["embed_tokens", "*self_attn*", "*up_proj"]))


@pytest.mark.parametrize("config", [None, W8A8().default, {"default": W8A8().default}])
def test_prepare_qat_requires_a_quant_config(config):
    with pytest.raises(TypeError, match="QuantConfig"):
        prepare_qat(seeded(TinyTransformer), config)


def test_qat_layers_are_still_instances_of_the_float_types():
    # Code that dispatches on isinstance(m, nn.Conv2d) keeps working on a QAT model.
    qat = prepare_qat(seeded(ConvNet), W8())
    conv2d, conv1d, linear = qat.stages["image"][0], qat.stages["signal"][0], qat.head
    assert isinstance(conv2d, QATConv2d) and isinstance(conv2d, nn.Conv2d)
    assert isinstance(conv1d, QATConv1d) and isinstance(conv1d, nn.Conv1d)
    assert isinstance(linear, QATLinear) and isinstance(linear, nn.Linear)
