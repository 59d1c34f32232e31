"""Checkpoint layouts as save / load adapters of QuantizedLinear: each state dict keeps its ecosystem's
layout, and state_dict -> load_state_dict -> state_dict is the identity, bit for bit, with identical outputs.
Mismatched checkpoint tensors are refused naming the tensor."""
import pytest
import torch
from torch import nn

from quantized_cases import random_codes
from torchquant import QuantSpec, load_quantized, save_quantized
from torchquant.layouts import (AWQLayout, GPTQLayout, RuntimeLayout, TorchquantLayout, W8A8Layout,
                                layout_from_config)
from torchquant.nn import AWQLinear, GPTQLinear, InputScaledW8A8Linear, QuantizedLinear, W8A8Linear
from torchquant.quantized_weight import QuantizedWeight


def gptq_layer(act_order=True, bits=3):
    c = random_codes(64, 128, bits, 4, act_order=act_order, seed=1)
    return GPTQLinear.from_codes(c.codes, c.scales, c.zero_points, c.g_idx, torch.randn(64), bits, 32, c.quant_min,
                                 False, desc_act=act_order)


def awq_layer():
    c = random_codes(32, 64, 4, 2, signed=True, seed=2)
    zero = torch.zeros_like(c.zero_points)
    return AWQLinear.from_codes(c.codes, c.scales, zero, None, 32, c.quant_min, True)


def w8a8_layer(granularity="tensor", act_scale=0.05, input_scale=True):
    torch.manual_seed(3)
    linear = nn.Linear(64, 32).to(torch.float16)
    layer = W8A8Linear.from_float(linear, granularity, act_scale)
    if input_scale:
        layer = QuantizedLinear._from_weight(layer.quantized_weight, layer.bias, layer.layout,
                                             activations=layer.activations, act_scale=layer.act_scale,
                                             input_scale=torch.rand(64) + 0.5)
    return layer


def torchquant_layer(spec, act_order=False):
    torch.manual_seed(4)
    w = torch.randn(32, 64)
    layout = TorchquantLayout(spec, act_order)
    if act_order:
        c = random_codes(32, 64, spec.bits, 64 // spec.group_size, signed=spec.symmetric, act_order=True, seed=5)
        weight = layout.from_codes(c.codes, c.scales, c.zero_points, c.g_idx)
    else:
        shape = layout.grid_shape(64, 32)
        zero = torch.zeros(shape) if spec.symmetric else torch.randint(0, 4, shape).float()
        weight = layout.quantize(w, torch.rand(shape) * 0.1 + 0.01, zero)
    return QuantizedLinear(weight, torch.randn(32), layout=layout)


def runtime_layer():
    c = random_codes(16, 64, 4, 2, lut=True, act_order=True, seed=6)
    weight = QuantizedWeight.from_codes(c.codes, c.scales, c.zero_points, 4, g_idx=c.g_idx, lut=c.lut)
    return QuantizedLinear(weight)


LAYERS = {
    "gptq-3bit-act-order": (gptq_layer, ["qweight", "qzeros", "scales", "g_idx", "bias"]),
    "gptq-8bit": (lambda: gptq_layer(False, 8), ["qweight", "qzeros", "scales", "g_idx", "bias"]),
    "awq-sym": (awq_layer, ["qweight", "qzeros", "scales"]),
    "w8a8-static-input-scale": (w8a8_layer, ["weight_codes", "weight_scales", "bias", "act_scale", "input_scale"]),
    "w8a8-token": (lambda: w8a8_layer("token", None, False), ["weight_codes", "weight_scales", "bias"]),
    "torchquant-tensor": (lambda: torchquant_layer(QuantSpec(bits=4)), ["qweight", "scale", "zero_point", "bias"]),
    "torchquant-channel-axis1": (lambda: torchquant_layer(QuantSpec(bits=2, granularity="channel", axis=1,
                                                                    symmetric=False)),
                                 ["qweight", "scale", "zero_point", "bias"]),
    "torchquant-group-6bit": (lambda: torchquant_layer(QuantSpec(bits=6, granularity="group", group_size=16,
                                                                 symmetric=False)),
                              ["qweight", "scale", "zero_point", "bias"]),
    "torchquant-act-order": (lambda: torchquant_layer(QuantSpec(bits=4, granularity="group", group_size=16), True),
                             ["qweight", "scale", "zero_point", "g_idx", "bias"]),
    "runtime-lut-act-order": (runtime_layer, ["packed", "scales", "zeros", "lut", "perm"]),
}


def empty_like(layer):
    """A layer of the same kind and settings holding zero codes, for load_state_dict."""
    weight = layer.layout.empty_weight(layer.in_features, layer.out_features)
    bias = None if layer.bias is None else torch.zeros_like(layer.bias)
    act_scale = None if layer.act_scale is None else torch.ones(1)
    input_scale = None if layer.input_scale is None else torch.ones_like(layer.input_scale)
    return type(layer)._from_weight(weight, bias, layout_from_config(layer.layout.config()),
                                    activations=layer.activations, act_scale=act_scale, input_scale=input_scale)


@pytest.mark.parametrize("name", LAYERS)
def test_state_dict_keeps_the_layout_and_round_trips_bit_exactly(name):
    make, keys = LAYERS[name]
    layer = make()
    state = layer.state_dict()
    assert list(state) == keys
    fresh = empty_like(layer)
    fresh.load_state_dict(state)
    again = fresh.state_dict()
    assert list(again) == keys
    for key, t in state.items():
        assert t.dtype == again[key].dtype and torch.equal(t, again[key]), key
    x = torch.randn(3, layer.in_features)
    if layer.bias is not None and layer.bias.dtype == torch.float16:
        x = x.half()
    with torch.no_grad():
        assert torch.equal(fresh(x), layer(x))
    for key in ("group_scales", "group_zeros", "packed_weight"):
        assert torch.equal(getattr(fresh, key), getattr(layer, key)), key


def test_ecosystem_layouts_store_their_dtypes():
    state = gptq_layer().state_dict()
    assert state["qweight"].dtype == torch.int32 and state["qweight"].shape == (128 * 3 // 32, 64)
    assert state["scales"].dtype == torch.float16 and state["scales"].shape == (4, 64)
    assert state["g_idx"].dtype == torch.int32
    w8a8 = w8a8_layer().state_dict()
    assert w8a8["weight_codes"].dtype == torch.int8 and w8a8["weight_scales"].shape == (32,)
    assert w8a8["bias"].dtype == torch.float16


def test_layout_names_and_configs_rebuild_the_layout():
    for layout in (GPTQLayout(4, 128, symmetric=False, desc_act=True), AWQLayout(-1, symmetric=True), W8A8Layout(),
                   TorchquantLayout(QuantSpec(bits=3, granularity="group", group_size=32)), RuntimeLayout(4, 2)):
        assert layout_from_config(layout.config()) == layout
    with pytest.raises(ValueError, match="unknown checkpoint layout 'marlin'"):
        layout_from_config({"name": "marlin"})


def test_save_quantized_round_trips_every_layout(tmp_path):
    makers = {"gptq": (gptq_layer, 128), "awq": (awq_layer, 64), "w8a8": (w8a8_layer, 64),
              "native": (lambda: torchquant_layer(QuantSpec(bits=4, granularity="group", group_size=16), True), 64),
              "runtime": (runtime_layer, 64)}
    model = nn.ModuleDict({name: make() for name, (make, _) in makers.items()})
    model["plain"] = nn.Linear(8, 8)
    save_quantized(model, tmp_path / "m.safetensors")
    fresh = nn.ModuleDict({name: nn.Linear(width, 4) for name, (_, width) in makers.items()})
    fresh["plain"] = nn.Linear(8, 8)
    loaded = load_quantized(fresh, tmp_path / "m.safetensors")
    for name, (_, width) in makers.items():
        assert type(loaded[name]) is type(model[name]), name
        x = torch.randn(2, width)
        x = x.half() if name == "w8a8" else x
        with torch.no_grad():
            assert torch.equal(loaded[name](x), model[name](x)), name
    for key, t in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], t), key


# ---- mismatched checkpoint tensors ------------------------------------------------------------------

@pytest.mark.parametrize("make, key, bad, message", [
    (gptq_layer, "qweight", torch.zeros(8, 64, dtype=torch.int32), r"qweight must have shape \[12, 64\]"),
    (gptq_layer, "scales", torch.ones(4, 64), "scales must be a 2-D torch.float16"),
    (gptq_layer, "g_idx", torch.full((128,), 7, dtype=torch.int32), r"g_idx must hold group indices in \[0, 3\]"),
    (gptq_layer, "g_idx", torch.arange(128, dtype=torch.int32) % 3, "exactly in_features / groups = 32 columns"),
    (awq_layer, "qzeros", torch.zeros(2, 4, dtype=torch.int32), "qzeros: a symmetric"),
    (w8a8_layer, "weight_codes", torch.zeros(32, 64), "weight_codes must be torch.int8"),
    (w8a8_layer, "weight_scales", torch.ones(31), r"weight_scales must have shape \[32\]"),
    (lambda: torchquant_layer(QuantSpec(bits=4)), "qweight", torch.zeros(10, dtype=torch.uint8),
     r"qweight must have shape \[1024\]"),
    (lambda: torchquant_layer(QuantSpec(bits=4)), "zero_point", torch.full((1,), 0.5), "zero_points must hold integers"),
    (runtime_layer, "perm", torch.zeros(64, dtype=torch.int64), "perm must be a permutation"),
])
def test_load_refuses_mismatched_tensors_naming_them(make, key, bad, message):
    layer = make()
    state = layer.state_dict()
    state[key] = bad
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(RuntimeError, match=message):
        layer.load_state_dict(state)
    for k, v in layer.state_dict().items():  # a refused load leaves the weight as it was
        assert torch.equal(v, before[k]), k


def test_missing_and_unexpected_keys_are_reported():
    layer = gptq_layer()
    state = layer.state_dict()
    del state["qzeros"]
    with pytest.raises(RuntimeError, match=r'Missing key\(s\) in state_dict: "qzeros"'):
        layer.load_state_dict(state)
    result = layer.load_state_dict({**layer.state_dict(), "extra": torch.zeros(1)}, strict=False)
    assert result.unexpected_keys == ["extra"] and result.missing_keys == []


def test_input_scaled_w8a8_name_keeps_its_constructor():
    layer = InputScaledW8A8Linear(64, 32, act_granularity="tensor", act_scale=0.1)
    assert list(layer.state_dict()) == ["weight_codes", "weight_scales", "bias", "act_scale", "input_scale"]
    assert isinstance(layer, W8A8Linear) and layer.input_scale.dtype == torch.float32
