"""NF4 / FP4 QuantizedLinear layers (ptq.nf4): the lookup-table kernels, double quantization, memory, checkpoints."""
import pytest
import torch
from torch import nn

import torchquant
from torchquant.nn import QuantizedLinear
from torchquant.ptq import lookup_table_weight
from torchquant.quantized_weight import QuantizedScales

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def mlp(width=128):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, 64))


@pytest.mark.parametrize("dtype_name", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("act_dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 5, 40])
def test_layer_equals_dequantize_then_matmul(dtype_name, double_quant, act_dtype, m):
    torch.manual_seed(m)
    linear = nn.Linear(256, 96)
    w = lookup_table_weight(linear.weight, dtype_name, 64, double_quant)
    layer = QuantizedLinear(w, linear.bias.detach())
    x = torch.randn(m, 256).to(act_dtype)
    w_float = layer.dequantized_weight()
    want = (x.float() @ w_float.T + linear.bias.detach()).to(act_dtype)
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-3}[act_dtype]
    torch.testing.assert_close(layer(x), want, rtol=tol, atol=tol)


def test_weight_error_is_the_nf4_error():
    torch.manual_seed(1)
    weight = torch.randn(64, 256) * 0.02
    w = lookup_table_weight(weight, "nf4", 64)
    rel = (w.dequantize() - weight).norm() / weight.norm()
    assert 0.05 < rel < 0.15  # 4-bit NormalFloat on Gaussian weights: about 10%
    w_dq = lookup_table_weight(weight, "nf4", 64, double_quant=True)
    assert torch.equal(w_dq.unsigned_codes(), w.unsigned_codes())
    assert (w_dq.scales - w.scales).abs().max() <= 0.01 * w.scales.abs().max()


def test_resident_bytes_are_packed_bytes():
    """4 bits per weight and a float32 absmax per block of 64 (0.5 bit; 0.127 with double quantization): the
    layer holds these and nothing else (no float weight, no zero grid)."""
    weight = torch.randn(512, 1024)
    plain = lookup_table_weight(weight, "nf4", 64)
    dq = lookup_table_weight(weight, "nf4", 64, double_quant=True)
    n = weight.numel()
    assert plain.nbytes * 8 / n == pytest.approx(4.5, abs=0.001)
    assert dq.nbytes * 8 / n == pytest.approx(4.127, abs=0.02)  # + the 1 KiB map
    layer = QuantizedLinear(dq)
    buffers = sum(b.numel() * b.element_size() for b in layer.buffers())
    assert buffers == dq.nbytes  # no float scales, no float weight
    assert layer.group_scales is None and layer.group_zeros is None and layer.scale_codes.dtype == torch.uint8


@pytest.mark.parametrize("double_quant", [False, True])
def test_converter_and_state_dict_round_trip(double_quant, tmp_path):
    model = mlp()
    x = torch.randn(7, 128)
    report = torchquant.ptq.nf4(model, double_quant=double_quant)
    assert report.method == "NF4" and len(report.quantized) == 2
    y = model(x)
    restored = mlp()
    torchquant.ptq.nf4(restored, double_quant=double_quant)
    restored.load_state_dict(model.state_dict())
    assert torch.equal(restored(x), y)
    path = tmp_path / "model.safetensors"
    torchquant.save_quantized(model, path)
    loaded = torchquant.load_quantized(mlp(), path)
    assert torch.equal(loaded(x), y)


def test_compile_and_export_read_the_packed_buffers():
    model = mlp()
    torchquant.ptq.nf4(model, double_quant=True)
    x = torch.randn(3, 128)
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    for m in (2, 3, 9):
        t = torch.randn(m, 128)
        torch.testing.assert_close(compiled(t), model(t), rtol=1e-6, atol=1e-6)
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    assert any("scale_codes" in name for name in program.state_dict) or \
        any("scale_codes" in str(spec.target) for spec in program.graph_signature.input_specs)
    torch.testing.assert_close(program.module()(torch.randn(5, 128)).shape, torch.Size([5, 64]))


def test_input_gradient_flows_through_the_packed_weight():
    linear = nn.Linear(128, 32)
    layer = QuantizedLinear(lookup_table_weight(linear.weight, "nf4", 64, True))
    x = torch.randn(4, 128, requires_grad=True)
    dy = torch.randn(4, 32)
    layer(x).backward(dy)
    torch.testing.assert_close(x.grad, dy @ layer.dequantized_weight(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs,error,match", [
    ({"dtype": "int4"}, ValueError, "dtype must be"),
    ({"block_size": 0}, ValueError, "block_size"),
    ({"block_size": 48}, ValueError, "does not divide"),
])
def test_converter_errors(kwargs, error, match):
    model = mlp()
    with pytest.raises(error, match=match):
        torchquant.ptq.nf4(model, **kwargs)
    assert isinstance(model[0], nn.Linear)


def test_nan_weights_are_refused_naming_the_layer():
    model = mlp()
    with torch.no_grad():
        model[2].weight[3, 3] = float("inf")
    with pytest.raises(ValueError, match="'2'.*NaN or Inf"):
        torchquant.ptq.nf4(model)


def test_quantized_scales_checks():
    with pytest.raises(ValueError, match="absmax"):
        QuantizedScales(torch.zeros(4, 2, dtype=torch.uint8), torch.ones(2), torch.zeros(1),
                        torch.zeros(256), block_size=256)
