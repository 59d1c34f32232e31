"""LLM.int8(): w8a8_linear's outlier decomposition, the QuantizedLinear mode and the ptq.llm_int8 converter.

Against the plain-PyTorch reference written from the paper
(tests/python/lut_reference.py): the int8 part bit for bit, the float part of
the outlier columns to float rounding; against bitsandbytes' Linear8bitLt
within LLM.int8()'s tolerance where bitsandbytes installs.
"""
import os

import pytest
import torch
from torch import nn

import torchquant
from torchquant import ops
from torchquant.nn import QuantizedLinear

import lut_reference as ref

ISAS = ["default", "avx2", "native"] if os.uname().machine in ("x86_64", "AMD64") else ["default"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    if request.param == "native":
        monkeypatch.delenv("TORCHQUANT_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("TORCHQUANT_CPU_ISA", request.param)
    return request.param


def make_weight(n, k, gen):
    q = torch.randint(-127, 128, (n, k), generator=gen)
    packed = torch.zeros(n, -(-k // 16) * 16, dtype=torch.uint8)
    packed[:, :k] = (q + 128).to(torch.uint8)
    scales = torch.rand(n, 1, generator=gen) * 0.01 + 1e-3
    return q, packed, scales


def with_outliers(m, k, gen, columns=(3, 17), dtype=torch.float32):
    x = torch.randn(m, k, generator=gen)
    for c in columns:
        if c < k:
            x[m // 2, c] = 20.0 + c  # one token is enough to make the whole column an outlier
    return x.to(dtype)


@pytest.mark.parametrize("m", [1, 3, 17, 64])
@pytest.mark.parametrize("k", [200, 96])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(isa, m, k, dtype):
    gen = torch.Generator().manual_seed(m * 100 + k)
    q, packed, scales = make_weight(37, k, gen)
    x = with_outliers(m, k, gen, dtype=dtype)
    bias = torch.randn(37, generator=gen) if m % 2 else None
    y = ops.w8a8_linear(x, packed, scales, bias=bias, outlier_threshold=6.0)
    want = ref.llm_int8_linear(x, q, scales, 6.0, bias)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(y, want, rtol=tol, atol=tol * 10)


def test_without_outliers_it_is_w8a8_per_token(isa):
    gen = torch.Generator().manual_seed(0)
    _, packed, scales = make_weight(40, 128, gen)
    x = torch.randn(9, 128, generator=gen)  # every |x| < 6
    assert torch.equal(ops.w8a8_linear(x, packed, scales, outlier_threshold=6.0), ops.w8a8_linear(x, packed, scales))


def test_outlier_columns_are_exact_in_float():
    """A layer whose input has only outlier columns computes in float: no int8 error at all."""
    gen = torch.Generator().manual_seed(1)
    q, packed, scales = make_weight(16, 64, gen)
    x = torch.randn(4, 64, generator=gen) * 100  # every column holds a value >= 6
    y = ops.w8a8_linear(x, packed, scales, outlier_threshold=6.0)
    w = q.float() * scales
    torch.testing.assert_close(y, x @ w.T, rtol=1e-5, atol=1e-3)


def test_inf_is_an_outlier_and_nan_raises():
    gen = torch.Generator().manual_seed(2)
    _, packed, scales = make_weight(8, 32, gen)
    x = torch.randn(2, 32, generator=gen)
    x[0, 5] = float("inf")
    y = ops.w8a8_linear(x, packed, scales, outlier_threshold=6.0)
    assert not bool(torch.isnan(y[1]).any())
    x[1, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ops.w8a8_linear(x, packed, scales, outlier_threshold=6.0)


@pytest.mark.parametrize("threshold,input_scale,match", [
    (-1.0, None, "outlier_threshold must be"),
    (float("inf"), None, "outlier_threshold must be"),
    (6.0, torch.tensor([0.1]), "per-token"),
])
def test_bad_threshold(threshold, input_scale, match):
    _, packed, scales = make_weight(4, 16, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=match):
        ops.w8a8_linear(torch.randn(2, 16), packed, scales, input_scale, outlier_threshold=threshold)


def test_gradient_is_straight_through():
    gen = torch.Generator().manual_seed(3)
    q, packed, scales = make_weight(12, 48, gen)
    x = with_outliers(5, 48, gen).requires_grad_()
    dy = torch.randn(5, 12, generator=gen)
    ops.w8a8_linear(x, packed, scales, outlier_threshold=6.0).backward(dy)
    torch.testing.assert_close(x.grad, dy @ (q.float() * scales), rtol=1e-5, atol=1e-5)


def test_opcheck_and_compile():
    gen = torch.Generator().manual_seed(4)
    _, packed, scales = make_weight(24, 64, gen)
    x = with_outliers(6, 64, gen)
    torch.library.opcheck(torch.ops.torchquant.w8a8_linear, (x, packed, scales, None, None, 6.0))
    layer = torch.compile(lambda t: ops.w8a8_linear(t, packed, scales, outlier_threshold=6.0), fullgraph=True,
                          dynamic=True)
    for m in (2, 3, 7):
        t = with_outliers(m, 64, gen)
        assert torch.equal(layer(t), ops.w8a8_linear(t, packed, scales, outlier_threshold=6.0))


# ---- the converter and the module ------------------------------------------------------------

def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32))


def test_converter_output_and_state_dict():
    model = mlp()
    x = with_outliers(10, 64, torch.Generator().manual_seed(5))
    with torch.no_grad():
        fp = model(x)
    report = torchquant.ptq.llm_int8(model, threshold=6.0)
    assert report.method == "LLM.int8()" and len(report.quantized) == 2
    layer = model[0]
    assert isinstance(layer, QuantizedLinear) and layer.activations == "llm_int8"
    assert layer.outlier_threshold == 6.0
    with torch.no_grad():
        y = model(x)
    assert torch.nn.functional.cosine_similarity(y, fp, dim=-1).min() > 0.999
    q = layer.weight_codes()
    want = ref.llm_int8_linear(x, q, layer.group_scales, 6.0, layer.bias)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-4)
    # The int8 checkpoint layout, threshold in the config; a reloaded layer computes the same.
    restored = mlp()
    torchquant.ptq.llm_int8(restored, threshold=6.0)
    restored.load_state_dict(model.state_dict())
    assert torch.equal(restored(x), model(x))
    assert "outlier_threshold=6" in repr(layer)


@pytest.mark.parametrize("threshold", [0, -2.0, float("nan"), True])
def test_converter_rejects_bad_thresholds(threshold):
    with pytest.raises(ValueError, match="threshold"):
        torchquant.ptq.llm_int8(mlp(), threshold=threshold)


def test_converter_rejects_nan_weights_and_models_without_linear():
    model = mlp()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="'2'.*NaN"):
        torchquant.ptq.llm_int8(model)
    assert isinstance(model[0], nn.Linear)  # nothing changed
    with pytest.raises(ValueError, match="no nn.Linear"):
        torchquant.ptq.llm_int8(nn.Sequential(nn.ReLU()))


def test_module_rejects_threshold_without_llm_int8():
    layer = mlp()[0]
    from torchquant.layouts.w8a8 import int8_weight, int8_weight_grid
    w = int8_weight(*int8_weight_grid(layer.weight))
    with pytest.raises(ValueError, match="llm_int8"):
        QuantizedLinear(w, activations="int8_per_token", outlier_threshold=6.0)
    with pytest.raises(ValueError, match="positive"):
        QuantizedLinear(w, activations="llm_int8", outlier_threshold=0.0)


def test_against_bitsandbytes():
    bnb = pytest.importorskip("bitsandbytes", reason="bitsandbytes does not install on this machine")
    torch.manual_seed(6)
    linear = nn.Linear(256, 96)
    x = with_outliers(16, 256, torch.Generator().manual_seed(6), columns=(5, 77, 130))
    theirs = bnb.nn.Linear8bitLt(256, 96, has_fp16_weights=False, threshold=6.0)
    theirs.load_state_dict(linear.state_dict())
    theirs = theirs.to("cpu")
    ours = nn.Sequential(linear)
    torchquant.ptq.llm_int8(ours, threshold=6.0)
    with torch.no_grad():
        y_ours, y_theirs = ours(x), theirs(x)
    # Both are LLM.int8(): the same outlier columns in float, int8 elsewhere with grids that differ only in
    # rounding details (127 vs 127.5 steps), so they agree to the int8 error.
    err = (y_ours - y_theirs).abs().max() / y_theirs.abs().max()
    assert err < 0.02
