"""convert(): integer weights that reproduce the QAT model in eval mode, for
every preset and 2-bit weights; integer codes in range; real memory savings;
Conv+BN folding; errors.

Converted Linear layers run the quantized-linear kernels, which sum in their
own order in float32: their outputs equal the QAT model's up to float
rounding, not bit for bit. The weights themselves are exact."""
import pytest
import torch
from torch import nn

from checks import assert_equal_values
from qat_models import CONFIGS, ConvNet, TinyTransformer, conv_bn_net, convnet_input, image_input, seeded, \
    single_threaded, train_steps, transformer_input  # noqa: F401  (single_threaded: autouse fixture)
from torchquant import QuantSpec
from torchquant.nn.qat import QATConvBn2d, QATModule
from torchquant.nn.quantized import QuantizedConv2d, QuantizedModule
from torchquant.nn.quantized_linear import QuantizedLinear
from torchquant.qat import W4A8, W4A16, W8, W8A8, LayerQuant, QuantConfig, convert, parameter_bytes, prepare_qat

MODELS = {
    "transformer": (TinyTransformer, transformer_input),
    "convnet": (ConvNet, convnet_input),
}


def trained_qat(model_name, config_name, steps=3):
    """A QAT model after a few training steps (grids calibrated and, when learnable, trained), in eval mode."""
    make, inputs = MODELS[model_name]
    qat = prepare_qat(seeded(make), CONFIGS[config_name]())
    train_steps(qat, [inputs(seed=s) for s in range(steps)])
    return qat.eval()


def qat_and_quantized_pairs(qat, converted):
    pairs = [(name, m, converted.get_submodule(name)) for name, m in qat.named_modules() if isinstance(m, QATModule)]
    assert pairs, "the model has no QAT layers"
    return pairs


@pytest.fixture(scope="module", params=[(m, c) for m in MODELS for c in CONFIGS], ids=lambda p: f"{p[0]}-{p[1]}")
def converted_case(request):
    model_name, config_name = request.param
    qat = trained_qat(model_name, config_name)
    return model_name, config_name, qat, convert(qat)


def assert_same_up_to_rounding(actual, expected):
    # A few float32 ulps of the largest output: the kernels' summation order moves each dot product by
    # about K ulps of its terms, and the models are a few layers deep.
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * float(expected.detach().abs().max()))


def test_converted_model_reproduces_the_qat_model(converted_case):
    model_name, _, qat, converted = converted_case
    _, inputs = MODELS[model_name]
    for seed in (10, 11):
        x = inputs(seed=seed)
        assert_same_up_to_rounding(converted(x), qat(x))


def test_converted_linear_layers_run_from_packed_codes_and_keep_no_float_weight(converted_case):
    _, _, qat, converted = converted_case
    for name, _, quantized in qat_and_quantized_pairs(qat, converted):
        if isinstance(quantized, QuantizedLinear):
            assert not list(quantized.parameters()), name
            assert quantized.packed_weight.dtype == torch.uint8, name


def test_every_qat_layer_becomes_a_quantized_layer(converted_case):
    _, _, qat, converted = converted_case
    for name, qat_layer, quantized in qat_and_quantized_pairs(qat, converted):
        assert isinstance(quantized, QuantizedModule), name
        assert quantized.weight_spec == qat_layer.weight_spec, name
    assert not any(isinstance(m, QATModule) for m in converted.modules())
    assert not converted.training


def test_integer_codes_lie_in_the_code_range_and_dequantize_to_the_fake_quantized_weight(converted_case):
    _, _, qat, converted = converted_case
    for name, qat_layer, quantized in qat_and_quantized_pairs(qat, converted):
        spec = quantized.weight_spec
        codes = quantized.weight_codes()
        assert codes.dtype == torch.int32
        assert spec.quant_min <= int(codes.min()) and int(codes.max()) <= spec.quant_max, name
        with torch.no_grad():
            assert_equal_values(quantized.dequantized_weight(), qat_layer.quantized_weight())


def test_learnable_grids_were_trained_before_conversion(converted_case):
    # Guards the other tests: they compare trained grids, not just the observers' ones.
    _, config_name, qat, _ = converted_case
    quantizers = [m.weight_fake_quant for m in qat.modules() if isinstance(m, QATModule)]
    if not quantizers[0].spec.learnable:
        pytest.skip(f"{config_name} has fixed grids")
    assert any(not torch.equal(fq.scale, fq.observer.calculate_qparams()[0]) for fq in quantizers)


def test_two_bit_weights_use_four_levels():
    qat = trained_qat("transformer", "W2A8")
    for _, _, quantized in qat_and_quantized_pairs(qat, convert(qat)):
        assert set(quantized.weight_codes().unique().tolist()) <= {-2, -1, 0, 1}
        qweight = quantized.state_dict()["qweight"]  # torchquant's checkpoint layout: four codes a byte
        assert qweight.dtype == torch.uint8
        assert qweight.numel() == -(-quantized.weight_codes().numel() // 4)


def test_weight_only_models_convert_right_after_prepare():
    # Weight grids are calibrated when the layer is built: no data is needed.
    for config in (W8(), W4A16(group_size=8)):
        qat = prepare_qat(seeded(TinyTransformer), config).eval()
        x = transformer_input(seed=3)
        assert_same_up_to_rounding(convert(qat)(x), qat(x))


def test_convert_leaves_the_qat_model_alone_unless_inplace():
    qat = trained_qat("convnet", "W8A8")
    converted = convert(qat)
    assert sum(isinstance(m, QATModule) for m in qat.modules()) == 4
    x = convnet_input(seed=4)
    assert_equal_values(convert(qat, inplace=True)(x), converted(x))
    assert not any(isinstance(m, QATModule) for m in qat.modules())


def test_converting_a_converted_model_changes_nothing():
    converted = convert(trained_qat("transformer", "W4A8"))
    again = convert(converted)
    x = transformer_input(seed=5)
    assert_equal_values(again(x), converted(x))


def test_a_bare_qat_layer_converts():
    layer = prepare_qat(seeded(lambda: nn.Linear(16, 8)), W8()).eval()
    x = torch.randn(4, 16)
    converted = convert(layer)
    assert isinstance(converted, QuantizedModule)
    assert_same_up_to_rounding(converted(x), layer(x))


# ---- Conv + BatchNorm folding ----------------------------------------------------------

@pytest.mark.parametrize("config", [W8A8(fold_bn=True), W4A8(group_size=8, fold_bn=True),
                                    W8(learnable=False, fold_bn=True)], ids=["W8A8", "W4A8", "W8-fixed"])
def test_folded_conv_bn_converts_to_one_conv_with_the_same_outputs(config):
    qat = prepare_qat(seeded(conv_bn_net), config)
    assert isinstance(qat[0], QATConvBn2d) and isinstance(qat[1], nn.Identity)
    train_steps(qat, [image_input(seed=s) for s in range(4)])
    qat.eval()
    converted = convert(qat)
    assert isinstance(converted[0], QuantizedConv2d) and converted[0].bias is not None
    with torch.no_grad():
        for seed in (20, 21):
            x = image_input(seed=seed)
            expected = qat(x)
            # Folding reorders float operations (conv(x, w * s) / s + b, then BN,
            # versus conv(x, w * s) + folded bias): equal up to rounding.
            torch.testing.assert_close(converted(x), expected, rtol=1e-5, atol=1e-5 * float(expected.detach().abs().max()))
        assert_equal_values(converted[0].dequantized_weight(), qat[0].quantized_weight())


# ---- memory ---------------------------------------------------------------------------

WIDTH = 512


def wide_mlp():
    """Weights dominate: two 512x512 Linear layers without bias."""
    return nn.Sequential(nn.Linear(WIDTH, WIDTH, bias=False), nn.ReLU(), nn.Linear(WIDTH, WIDTH, bias=False))


@pytest.mark.parametrize("weight, bits_per_code, min_ratio", [
    (QuantSpec(bits=8, granularity="channel"), 8, 3.9),
    (QuantSpec(bits=4, granularity="channel"), 4, 7.7),
    (QuantSpec(bits=4, granularity="group", group_size=128), 4, 7.0),
    (QuantSpec(bits=3, granularity="channel"), 3, 10.0),  # the run-time layout packs 3-bit codes in 3 bits
    (QuantSpec(bits=2, granularity="channel"), 2, 15.0),
])
def test_converted_weights_take_a_fraction_of_the_float_bytes(weight, bits_per_code, min_ratio):
    model = seeded(wide_mlp)
    converted = convert(prepare_qat(model, QuantConfig(default=LayerQuant(weight))))
    grids = WIDTH if weight.granularity == "channel" else WIDTH * WIDTH // weight.group_size
    # Per layer: the packed codes (the run-time layout, 512 columns fill whole chunks), then a float32 scale and
    # zero-point per grid.
    expected = 2 * (WIDTH * WIDTH * bits_per_code // 8 + grids * 2 * 4)
    assert parameter_bytes(converted) == expected
    assert parameter_bytes(model) == 2 * WIDTH * WIDTH * 4
    assert parameter_bytes(model) / parameter_bytes(converted) >= min_ratio


def test_parameter_bytes_counts_shared_tensors_once():
    linear = nn.Linear(8, 8, bias=False)
    assert parameter_bytes(nn.Sequential(linear, linear)) == 8 * 8 * 4


# ---- errors --------------------------------------------------------------------------

def test_convert_before_activation_calibration_names_the_layer():
    # embed_tokens has no activation quantizer; the first layer with one is q_proj.
    for config in (W8A8(), W8A8(learnable=False)):
        qat = prepare_qat(seeded(TinyTransformer), config)
        with pytest.raises(RuntimeError, match=r"'layers\.0\.self_attn\.q_proj'.*calibrat"):
            convert(qat)


@pytest.mark.parametrize("model", [nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 4), nn.ReLU()])
def test_convert_without_qat_layers_is_an_error(model):
    with pytest.raises(ValueError, match="prepare_qat"):
        convert(model)


def test_convert_refuses_linear_weights_the_kernels_cannot_read_naming_the_layer():
    qat = prepare_qat(seeded(wide_mlp), QuantConfig(default=LayerQuant(QuantSpec(bits=12, granularity="channel"))))
    with pytest.raises(ValueError, match=r"convert: layer '0'.*bits must be an integer in \[2, 8\]"):
        convert(qat)
