"""Bad arguments of the run-time ops raise TypeError / ValueError naming the
op and the argument, in eager mode on CPU and in the fake kernels (meta
tensors), including a meta tensor mixed with CPU ones."""
from __future__ import annotations

import re

import pytest
import torch

import runtime_reference as ref
from torchquant import ops

OPS = torch.ops.torchquant
K, N = 96, 8


@pytest.fixture(scope="module")
def w():
    return ref.make_weight(N, K, 2, 4)


def _linear_kwargs(w, **over):
    kw = dict(input=torch.randn(3, K), packed=w.packed, scales=w.scales, zeros=w.zeros, bits=4, in_features=K,
              lut=None, perm=None, bias=None)
    kw.update(over)
    return kw


def _call_linear(kw):
    return OPS.quantized_linear(kw["input"], kw["packed"], kw["scales"], kw["zeros"], kw["bits"],
                                kw["in_features"], kw["lut"], kw["perm"], kw["bias"])


def _to_meta(kw):
    return {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in kw.items()}


CASES = [
    # (name, overrides(w) -> dict, exception, text in the message)
    ("packed dtype", lambda w: dict(packed=w.packed.to(torch.int8)), TypeError, "packed must be uint8"),
    ("packed width", lambda w: dict(packed=w.packed[:, :-16]), ValueError, "packed must have shape"),
    ("packed 1-D", lambda w: dict(packed=w.packed.flatten()), ValueError, "packed must have shape"),
    ("bits", lambda w: dict(bits=5), ValueError, "bits must be 2, 3, 4 or 8"),
    ("in_features", lambda w: dict(in_features=K + 32, input=torch.randn(3, K + 32)), ValueError,
     "packed must have shape"),
    ("scales dtype", lambda w: dict(scales=w.scales.double()), TypeError, "scales must be float32"),
    ("scales rows", lambda w: dict(scales=w.scales[:-1], zeros=w.zeros[:-1]), ValueError, "scales must have shape"),
    ("groups divide K", lambda w: dict(scales=torch.rand(N, 5), zeros=torch.rand(N, 5)), ValueError,
     "must divide in_features"),
    ("zeros shape", lambda w: dict(zeros=w.zeros[:, :1]), ValueError, "zeros must have the shape of scales"),
    ("zeros dtype", lambda w: dict(zeros=w.zeros.to(torch.int32)), TypeError, "zeros must be float32"),
    ("lut bits", lambda w: dict(bits=8, packed=ops.pack_weight(w.codes, 8), lut=ref.NF4), ValueError,
     "lut) needs bits == 4"),
    ("lut shape", lambda w: dict(lut=torch.rand(8)), ValueError, "lut must have shape [16]"),
    ("lut dtype", lambda w: dict(lut=ref.NF4.half()), TypeError, "lut must be float32"),
    ("input dtype", lambda w: dict(input=torch.ones(3, K, dtype=torch.int32)), TypeError, "input must be float32"),
    ("input last dim", lambda w: dict(input=torch.randn(3, K - 1)), ValueError,
     "input must have shape [..., in_features"),
    ("perm dtype", lambda w: dict(perm=torch.arange(K, dtype=torch.int32)), TypeError, "perm must be int64"),
    ("perm shape", lambda w: dict(perm=torch.arange(K - 1)), ValueError, "perm must have shape"),
    ("bias shape", lambda w: dict(bias=torch.randn(N + 1)), ValueError, "bias must have shape"),
    ("bias dtype", lambda w: dict(bias=torch.ones(N, dtype=torch.int64)), TypeError, "bias must be a floating"),
]


@pytest.mark.parametrize("name,over,exc,text", CASES, ids=[c[0] for c in CASES])
def test_quantized_linear_errors(w, name, over, exc, text):
    kw = _linear_kwargs(w, **over(w))
    with pytest.raises(exc, match="torchquant.quantized_linear: .*" + _escape(text)):
        _call_linear(kw)
    # The fake kernel decides the same from metadata alone.
    with pytest.raises(exc, match=_escape(text)):
        _call_linear(_to_meta(kw))


def _escape(text):
    return re.escape(text)


def test_perm_values_checked_on_cpu(w):
    bad = torch.arange(K)
    bad[3] = K
    with pytest.raises(ValueError, match=r"perm must hold indices in \[0, 96\), got perm\[3\] = 96"):
        _call_linear(_linear_kwargs(w, perm=bad))
    bad[3] = -1
    with pytest.raises(ValueError, match="perm must hold indices"):
        _call_linear(_linear_kwargs(w, perm=bad))
    dup = torch.arange(K)
    dup[5] = 4
    with pytest.raises(ValueError, match="perm must be a permutation"):
        _call_linear(_linear_kwargs(w, perm=dup))
    with pytest.raises(ValueError, match="perm must hold indices"):
        OPS.quantized_linear_grad_input(torch.randn(2, N), w.packed, w.scales, w.zeros, 4, K, None, bad)


@pytest.mark.parametrize("arg", ["input", "packed", "scales", "zeros", "lut", "perm", "bias"])
def test_meta_mixed_with_cpu(w, arg):
    kw = _linear_kwargs(w, lut=ref.NF4, perm=torch.randperm(K), bias=torch.randn(N))
    kw[arg] = kw[arg].to("meta")
    # The input defines the device: a meta input names the first CPU argument.
    name = "packed" if arg == "input" else arg
    with pytest.raises(ValueError, match=f"{name} must be on the input's device"):
        _call_linear(kw)


def test_all_meta_gives_shapes(w):
    kw = _to_meta(_linear_kwargs(w, input=torch.randn(2, 5, K, dtype=torch.bfloat16), perm=torch.randperm(K)))
    y = _call_linear(kw)
    assert y.device.type == "meta" and y.shape == (2, 5, N) and y.dtype == torch.bfloat16
    dx = OPS.quantized_linear_grad_input(torch.empty(7, N, device="meta", dtype=torch.float16),
                                         kw["packed"], kw["scales"], kw["zeros"], 4, K)
    assert dx.shape == (7, K) and dx.dtype == torch.float16


def test_grad_input_errors(w):
    with pytest.raises(ValueError,
                       match=r"quantized_linear_grad_input: grad_output must have shape \[\.\.\., out_features=8\]"):
        OPS.quantized_linear_grad_input(torch.randn(2, N + 1), w.packed, w.scales, w.zeros, 4, K)
    with pytest.raises(TypeError, match="grad_output must be float32"):
        OPS.quantized_linear_grad_input(torch.ones(2, N, dtype=torch.int64), w.packed, w.scales, w.zeros, 4, K)
    with pytest.raises(ValueError, match="grad_output must be on the input's device|packed must be on the input's"):
        OPS.quantized_linear_grad_input(torch.randn(2, N), w.packed.to("meta"), w.scales, w.zeros, 4, K)


def test_pack_unpack_dequantize_errors(w):
    with pytest.raises(TypeError, match="pack_weight: codes must have an integer dtype"):
        OPS.pack_weight(w.codes.float(), 4)
    with pytest.raises(ValueError, match=r"pack_weight: codes must lie in \[0, 15\]"):
        OPS.pack_weight(w.codes + 1, 4)
    with pytest.raises(ValueError, match="pack_weight: codes must lie in"):
        OPS.pack_weight(w.codes - 1, 4)
    with pytest.raises(ValueError, match="pack_weight: codes must have shape"):
        OPS.pack_weight(w.codes.flatten(), 4)
    for bits in (1, 5, 16):
        with pytest.raises(ValueError, match="bits must be 2, 3, 4 or 8"):
            OPS.pack_weight(w.codes, bits)
        with pytest.raises(ValueError, match="bits must be 2, 3, 4 or 8"):
            OPS.unpack_weight(w.packed, bits, K)
    with pytest.raises(ValueError, match="unpack_weight: packed must have shape"):
        OPS.unpack_weight(w.packed, 2, K)
    with pytest.raises(TypeError, match="unpack_weight: packed must be uint8"):
        OPS.unpack_weight(w.packed.to(torch.int16), 4, K)
    with pytest.raises(ValueError, match="dequantize_weight: zeros must have the shape"):
        OPS.dequantize_weight(w.packed, w.scales, w.zeros[:, :1], 4, K)
    with pytest.raises(ValueError, match="dequantize_weight: scales must be on the input's device"):
        OPS.dequantize_weight(w.packed, w.scales.to("meta"), w.zeros, 4, K)
    # Fake kernels: the same kinds of errors from metadata.
    with pytest.raises(TypeError, match="codes must have an integer dtype"):
        OPS.pack_weight(w.codes.float().to("meta"), 4)
    with pytest.raises(ValueError, match="packed must have shape"):
        OPS.unpack_weight(w.packed.to("meta"), 2, K)
    assert OPS.pack_weight(torch.empty(5, 100, dtype=torch.int32, device="meta"), 3).shape == (5, 48)


def test_w8a8_argument_errors():
    if not torch._C._dispatch_has_kernel_for_dispatch_key("torchquant::w8a8_linear", "CPU"):
        pytest.skip("no CPU kernel of w8a8_linear in this build")
    packed = ops.pack_weight(torch.randint(0, 256, (N, K)), 8)
    scales = torch.rand(N, 1)
    with pytest.raises(ValueError, match="w8a8_linear: packed must have shape"):
        OPS.w8a8_linear(torch.randn(2, K + 16), packed, scales)
    with pytest.raises(ValueError, match="w8a8_linear: scales must have shape"):
        OPS.w8a8_linear(torch.randn(2, K), packed, torch.rand(N, 2))
    with pytest.raises(ValueError, match="w8a8_linear: input_scale must have shape"):
        OPS.w8a8_linear(torch.randn(2, K), packed, scales, torch.rand(2))
    with pytest.raises(TypeError, match="w8a8_linear: packed must be uint8"):
        OPS.w8a8_linear(torch.randn(2, K), packed.to(torch.int8), scales)
