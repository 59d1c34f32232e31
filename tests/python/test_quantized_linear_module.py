"""QuantizedLinear, the one module family every quantized Linear layer is: outputs of every format and
activation mode against dequantize-then-matmul, gradients, memory, torch.export, torch.compile, errors.

References are plain PyTorch in float64 from the formula (quantized_cases.py). The kernels compute in
float32 in their own summation order, so outputs agree within that rounding (the bound is explained in
``assert_close_to_reference``), not bit for bit.
"""
import pytest
import torch
from torch import nn

from quantized_cases import (UNIT_ROUNDOFF, assert_close_to_reference, linear_reference, random_codes,
                             reference_weight, weight_magnitude)
from torchquant import QuantSpec
from torchquant.nn import QuantizedLinear, W8A8Linear
from torchquant.quantized_weight import QuantizedWeight

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
EPS32 = torch.finfo(torch.float32).eps

# name -> (bits, groups, signed, act_order, lut, activations, static act_scale, input_scale)
FORMATS = {
    "int2-g32": (2, 4, False, False, False, "float", None, False),
    "int3-channel": (3, 1, True, False, False, "float", None, False),
    "int4-g32": (4, 4, False, False, False, "float", None, False),
    "int6-g64-in-8bit-layout": (6, 2, True, False, False, "float", None, False),
    "int8-channel": (8, 1, True, False, False, "float", None, False),
    "lut-nf4-g64": (4, 2, False, False, True, "float", None, False),
    "int4-act-order": (4, 4, False, True, False, "float", None, False),
    "int4-input-scale": (4, 4, True, False, False, "float", None, True),
    "w8a8-token": (8, 1, True, False, False, "int8_per_token", None, False),
    "w8a8-tensor-dynamic": (8, 1, True, False, False, "int8_per_tensor", None, False),
    "w8a8-tensor-static": (8, 1, True, False, False, "int8_per_tensor", 0.02, False),
    "w8a8-token-input-scale": (8, 1, True, False, False, "int8_per_token", None, True),
}
IN, OUT = 128, 48


def make_layer(name, out_features=OUT, in_features=IN, seed=0):
    bits, groups, signed, act_order, lut, activations, act_scale, input_scale = FORMATS[name]
    w8a8 = activations != "float"
    c = random_codes(out_features, in_features, bits, groups, signed=signed, act_order=act_order, lut=lut, seed=seed)
    if w8a8:  # symmetric int8 grid: zero-point 0 in the code domain
        c = c._replace(zero_points=torch.zeros_like(c.zero_points))
    weight = QuantizedWeight.from_codes(c.codes, c.scales, c.zero_points, bits, quant_min=c.quant_min, g_idx=c.g_idx,
                                        lut=c.lut)
    gen = torch.Generator().manual_seed(seed + 1)
    bias = torch.randn(out_features, generator=gen)
    s = torch.empty(in_features).uniform_(0.5, 2.0, generator=gen) if input_scale else None
    layer = QuantizedLinear(weight, bias, activations=activations, act_scale=act_scale, input_scale=s)
    return layer, c


def quantize_activations(layer, x32):
    """The W8A8 kernel's activation codes and scales, written from the op's contract (float32)."""
    rows = x32.reshape(-1, x32.shape[-1])
    if layer.activations == "int8_per_token":
        s = torch.clamp(rows.abs().amax(dim=1, keepdim=True) / 127.5, min=EPS32)
    elif layer.act_scale is not None:
        s = layer.act_scale.reshape(1, 1)
    else:
        s = torch.clamp(rows.abs().amax() / 127.5, min=EPS32).reshape(1, 1)
    codes = torch.clamp(torch.round(rows * torch.reciprocal(s)), -128, 127)
    return codes, s.expand(rows.shape[0], 1)


def reference_output(layer, c, x):
    """(float64 reference, sum of |terms| per output, terms per output) of ``layer(x)``."""
    if layer.input_scale is not None:
        x = (x / layer.input_scale).to(x.dtype)
    if layer.activations == "float":
        return linear_reference(x, c, layer.bias)
    bias = layer.bias.double()
    codes, s_x = quantize_activations(layer, x.float())
    acc = codes.double() @ c.codes.double().t()  # exact: what int32 accumulation gives
    s_w = c.scales.double().reshape(1, -1)
    reference = acc * s_x.double() * s_w + bias
    terms = acc.abs() * s_x.double() * s_w + bias.abs()
    shape = (*x.shape[:-1], layer.out_features)
    return reference.reshape(shape), terms.reshape(shape), 2  # only the final rescale rounds


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", FORMATS)
def test_output_equals_dequantize_then_matmul(name, dtype):
    layer, c = make_layer(name)
    x = torch.randn(2, 3, IN, generator=torch.Generator().manual_seed(5)).to(dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (2, 3, OUT)
    reference, terms, k = reference_output(layer, c, x)
    assert_close_to_reference(y, reference, terms, dtype, k)


@pytest.mark.parametrize("name", ["int4-act-order", "lut-nf4-g64", "int4-input-scale", "w8a8-token"])
def test_input_gradient_is_dy_times_the_weight(name):
    # Weight-only: dx = dy W exactly as autograd of the reference; W8A8: straight through, the same dy W.
    layer, c = make_layer(name)
    x = torch.randn(4, IN, generator=torch.Generator().manual_seed(6), requires_grad=True)
    dy = torch.randn(4, OUT, generator=torch.Generator().manual_seed(7))
    layer(x).backward(dy)
    w = reference_weight(c).double()
    expected = dy.double() @ w
    terms = dy.double().abs() @ weight_magnitude(c)
    if layer.input_scale is not None:
        expected, terms = expected / layer.input_scale.double(), terms / layer.input_scale.double()
    assert_close_to_reference(x.grad, expected, terms, torch.float32, OUT + 1)
    assert not any(t.requires_grad for t in layer.buffers())


# ---- memory --------------------------------------------------------------------------------------

def _tensors_held(module):
    """Every tensor a module and its submodules hold: buffers, parameters and plain attributes."""
    for m in module.modules():
        for value in list(m.__dict__.values()) + list(m._buffers.values()) + list(m._parameters.values()):
            if isinstance(value, torch.Tensor):
                yield value
            elif isinstance(value, (tuple, list)):
                yield from (v for v in value if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("name", FORMATS)
def test_resident_bytes_are_the_packed_bytes_and_no_float_weight_is_kept(name):
    out_f, in_f = 256, 512
    layer, _ = make_layer(name, out_f, in_f)
    for dtype in DTYPES:
        with torch.no_grad():
            layer(torch.randn(3, in_f).to(dtype))
        layer(torch.randn(2, in_f, requires_grad=True)).sum().backward()
    held = {id(t): t for t in _tensors_held(layer)}.values()
    resident = sum(t.numel() * t.element_size() for t in held)
    packed = layer.quantized_weight.nbytes
    assert resident <= 1.05 * packed, (resident, packed)
    assert not list(layer.parameters())
    big_floats = [tuple(t.shape) for t in held if t.is_floating_point() and t.numel() >= out_f * in_f // 8]
    assert not big_floats, f"float tensors of a weight's size held after forward: {big_floats}"


def test_half_precision_cast_keeps_the_grids_in_float32():
    layer, c = make_layer("w8a8-tensor-static")
    layer.half()
    for name in ("group_scales", "group_zeros", "act_scale"):
        assert getattr(layer, name).dtype == torch.float32, name
    assert layer.bias.dtype == torch.float16
    x = torch.randn(5, IN).half()
    reference, terms, k = reference_output(layer, c, x)
    assert_close_to_reference(layer(x), reference, terms, torch.float16, k)


# ---- torch.export and torch.compile ------------------------------------------------------------

@pytest.mark.parametrize("name", ["int4-act-order", "lut-nf4-g64", "w8a8-tensor-static", "int4-input-scale"])
def test_export_of_a_layer_that_ran_reads_the_packed_buffers(name):
    layer, _ = make_layer(name)
    x = torch.randn(6, IN)
    with torch.no_grad():
        expected = layer(x)
    batch = torch.export.Dim("batch", min=2)
    exported = torch.export.export(layer, (x,), dynamic_shapes=({0: batch},))
    held = list(exported.state_dict.values()) + list(exported.constants.values())
    assert any(t.dtype == torch.uint8 and t.shape == layer.packed_weight.shape for t in held)
    big = [tuple(t.shape) for t in held if t.is_floating_point() and t.numel() >= OUT * IN // 8]
    assert not big, f"float weight-sized constants in the exported program: {big}"
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert any("torchquant." in t for t in targets), targets
    with torch.no_grad():
        assert torch.equal(exported.module()(x), expected)
        assert torch.equal(exported.module()(x[:3]), layer(x[:3]))  # another batch size, the same kernel


@pytest.mark.parametrize("name, backend", [("int4-act-order", "inductor"), ("lut-nf4-g64", "aot_eager"),
                                           ("w8a8-tensor-dynamic", "aot_eager"), ("w8a8-token", "inductor"),
                                           ("int4-input-scale", "aot_eager")])
def test_compile_fullgraph_dynamic_without_recompiles(name, backend):
    layer, _ = make_layer(name)
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend=backend)
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):
        for rows in (2, 3, 5, 8, 17):
            x = torch.randn(rows, IN, generator=torch.Generator().manual_seed(rows))
            # The same kernel runs; only the division by input_scale may be fused by the compiler.
            torch.testing.assert_close(compiled(x), layer(x), rtol=4 * UNIT_ROUNDOFF[torch.float32], atol=1e-6)


# ---- bad input -----------------------------------------------------------------------------------

def test_forward_refuses_bad_inputs_naming_them():
    layer, _ = make_layer("int4-g32")
    with pytest.raises(ValueError, match=r"QuantizedLinear expects inputs \[\.\.\., 128\], got shape \[2, 64\]"):
        layer(torch.randn(2, 64))
    with pytest.raises(ValueError, match=r"expects inputs \[\.\.\., 128\]"):
        layer(torch.tensor(1.0))
    with pytest.raises(TypeError, match="floating-point input, got torch.int32"):
        layer(torch.ones(2, IN, dtype=torch.int32))
    with pytest.raises(ValueError, match="input is on meta but the layer's weight is on cpu"):
        layer(torch.randn(2, IN, device="meta"))
    on_meta = make_layer("w8a8-token")[0].to("meta")
    with pytest.raises(ValueError, match="input is on cpu but the layer's weight is on meta"):
        on_meta(torch.randn(2, IN))


def test_constructor_refuses_bad_settings_naming_them():
    weight = make_layer("int4-g32")[0].quantized_weight
    with pytest.raises(TypeError, match="weight must be a QuantizedWeight"):
        QuantizedLinear(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="activations must be one of"):
        QuantizedLinear(weight, activations="int4")
    with pytest.raises(ValueError, match=r"\(W8A8\) needs symmetric int8 codes with one grid per output channel"):
        QuantizedLinear(weight, activations="int8_per_token")
    with pytest.raises(ValueError, match="act_scale .* needs activations='int8_per_tensor'"):
        QuantizedLinear(weight, act_scale=0.1)
    w8 = make_layer("w8a8-token")[0].quantized_weight
    with pytest.raises(ValueError, match="act_scale must be positive and finite"):
        QuantizedLinear(w8, activations="int8_per_tensor", act_scale=0.0)
    with pytest.raises(ValueError, match="act_scale must be a single number"):
        QuantizedLinear(w8, activations="int8_per_tensor", act_scale=torch.ones(2))
    with pytest.raises(ValueError, match=r"input_scale must have shape \[128\]"):
        QuantizedLinear(weight, input_scale=torch.ones(64))
    with pytest.raises(ValueError, match="input_scale must be positive and finite"):
        QuantizedLinear(weight, input_scale=torch.zeros(IN))
    with pytest.raises(ValueError, match=r"bias must have shape \[48\]"):
        QuantizedLinear(weight, torch.zeros(3))


def test_unsupported_widths_and_layouts_are_refused():
    with pytest.raises(ValueError, match=r"bits must be an integer in \[2, 8\]"):
        QuantizedLinear.from_grid(torch.randn(8, 16), None, torch.ones(1), torch.zeros(1), QuantSpec(bits=12))
    with pytest.raises(ValueError, match="the W8A8 layout needs symmetric int8 codes"):
        W8A8Linear._from_weight(make_layer("int4-g32")[0].quantized_weight, None,
                                W8A8Linear(IN, OUT).layout)
    with pytest.raises(TypeError, match="expects an nn.Linear"):
        W8A8Linear.from_float(nn.Conv1d(4, 4, 1))
