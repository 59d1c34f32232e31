"""The weight-only run-time ops on CPU against plain-PyTorch references.

pack / unpack / dequantize against the layout written out in
runtime_reference.py; quantized_linear and its input gradient over every bit
width, group sizes 32 / 64 / 128 / per-channel / 48 (a multiple of 16 that cuts
chunks) / 40 (not a multiple of 16: the scalar-decode path), K that is not a
multiple of the chunk, every activation dtype, M on both sides of the GEMV /
panel threshold, bias, lookup tables and act-order permutations.
"""
from __future__ import annotations

import pytest
import torch

import runtime_reference as ref
from torchquant import ops

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BITS = (2, 3, 4, 8)
# (in_features, groups): g = 32, 64, 128, per-channel with K not a multiple of
# any chunk, g = 48, g = 40 (not a multiple of 16), g = 16 with the padding of
# a 3-bit chunk longer than a group.
GROUPINGS = [(64, 2), (128, 2), (256, 2), (100, 1), (96, 2), (120, 3), (48, 3)]
MS = (1, 3, 8, 33)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("k,groups", GROUPINGS)
def test_pack_unpack_dequantize(bits, k, groups):
    w = ref.make_weight(20, k, groups, bits)
    packed = ops.pack_weight(w.codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (20, ops.packed_row_bytes(k, bits))
    assert torch.equal(packed, w.packed)
    for dtype in (torch.uint8, torch.int32, torch.int64):
        assert torch.equal(ops.pack_weight(w.codes.to(dtype), bits), w.packed)
    unpacked = ops.unpack_weight(packed, bits, k)
    assert unpacked.dtype == torch.uint8 and torch.equal(unpacked.long(), w.codes)
    assert torch.equal(ref.codes_of(packed, bits, k), w.codes)
    deq = ops.dequantize_weight(*w.args())
    assert deq.dtype == torch.float32
    torch.testing.assert_close(deq, ref.weight(w).float(), rtol=1e-6, atol=1e-6)


def test_dequantize_lut():
    w = ref.make_weight(12, 64, 2, 4, lut=True)
    torch.testing.assert_close(ops.dequantize_weight(*w.args()), ref.weight(w).float(), rtol=1e-6, atol=1e-7)


def _check_linear(w, m, dtype, bias, perm, leading=()):
    k = w.in_features
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(*leading, m, k, generator=gen).to(dtype)
    b = torch.randn(w.codes.shape[0], generator=gen).to(dtype) if bias else None
    p = torch.randperm(k, generator=gen) if perm else None
    y = ops.quantized_linear(x, *w.args(), perm=p, bias=b)
    expected, terms = ref.linear(x, w, p, b)
    ref.assert_close(y, expected, terms, dtype, f"y (M={m}, {dtype}, bias={bias}, perm={perm})")
    dy = torch.randn(*leading, m, w.codes.shape[0], generator=gen).to(dtype)
    dx = ops.quantized_linear_grad_input(dy, *w.args(), perm=p)
    expected, terms = ref.grad_input(dy, w, p)
    ref.assert_close(dx, expected, terms, dtype, f"dx (M={m}, {dtype}, perm={perm})")


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("k,groups", GROUPINGS)
def test_linear_matches_reference(bits, k, groups):
    w = ref.make_weight(40, k, groups, bits, seed=bits * 1000 + k)
    for dtype in DTYPES:
        for m in MS:
            for bias, perm in ((False, False), (True, True), (dtype == torch.float32, not dtype == torch.float32)):
                _check_linear(w, m, dtype, bias, perm)


@pytest.mark.parametrize("k,groups", [(64, 1), (128, 2), (96, 2), (120, 3)])
def test_linear_lut_matches_reference(k, groups):
    w = ref.make_weight(40, k, groups, 4, lut=True, seed=k)
    for dtype in DTYPES:
        for m in MS:
            _check_linear(w, m, dtype, bias=m % 2 == 1, perm=m > 3)


@pytest.mark.parametrize("bits", [3, 4])
def test_many_panels_and_tiles(bits):
    # Several panels of the large-M path, several tiles (and a partial one) of
    # the GEMV, and the input gradient's split over panels and over rows.
    w = ref.make_weight(300, 64, 2, bits, seed=7)
    for m in (1, 5, 17, 70):
        _check_linear(w, m, torch.float32, bias=True, perm=True)


def test_leading_dims_and_empty_batch():
    w = ref.make_weight(24, 64, 2, 4)
    _check_linear(w, 3, torch.float32, bias=True, perm=False, leading=(2,))
    x = torch.randn(2, 0, 64)
    assert ops.quantized_linear(x, *w.args()).shape == (2, 0, 24)
    assert ops.quantized_linear_grad_input(torch.randn(0, 24), *w.args()).shape == (0, 64)
    # Non-contiguous input and a 1-D input.
    x = torch.randn(64, 5).T
    expected, terms = ref.linear(x, w)
    ref.assert_close(ops.quantized_linear(x, *w.args()), expected, terms, torch.float32, "transposed x")
    expected, terms = ref.linear(x[0], w)
    ref.assert_close(ops.quantized_linear(x[0], *w.args()), expected, terms, torch.float32, "1-D x")


def test_inference_mode():
    w = ref.make_weight(40, 128, 2, 4)
    with torch.inference_mode():
        for m in (1, 40):
            x = torch.randn(m, 128)
            expected, terms = ref.linear(x, w)
            ref.assert_close(ops.quantized_linear(x, *w.args()), expected, terms, torch.float32, "inference")
            dy = torch.randn(m, 40)
            expected, terms = ref.grad_input(dy, w)
            ref.assert_close(ops.quantized_linear_grad_input(dy, *w.args()), expected, terms, torch.float32, "dx")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [2, 33])
def test_autograd(dtype, m):
    w = ref.make_weight(24, 96, 2, 3)
    perm = torch.randperm(96)
    x = torch.randn(m, 96).to(dtype).requires_grad_()
    bias = torch.randn(24).to(dtype).requires_grad_()
    scales = w.scales.clone().requires_grad_()
    y = ops.quantized_linear(x, w.packed, scales, w.zeros, 3, 96, perm=perm, bias=bias)
    dy = torch.randn(m, 24).to(dtype)
    y.backward(dy)
    expected, terms = ref.grad_input(dy, w, perm)
    ref.assert_close(x.grad, expected, terms, dtype, "x.grad")
    torch.testing.assert_close(bias.grad, dy.float().sum(0).to(dtype), rtol=1e-2 if dtype != torch.float32 else 1e-5,
                               atol=1e-2 if dtype != torch.float32 else 1e-5)
    assert scales.grad is None  # the weight is frozen: no gradient


def test_autograd_input_only_and_bias_only():
    w = ref.make_weight(16, 64, 1, 8)
    x = torch.randn(3, 64, requires_grad=True)
    ops.quantized_linear(x, *w.args()).sum().backward()
    expected, terms = ref.grad_input(torch.ones(3, 16), w)
    ref.assert_close(x.grad, expected, terms, torch.float32, "x.grad")
    bias = torch.randn(16, requires_grad=True)
    ops.quantized_linear(torch.randn(3, 64), *w.args(), perm=None, bias=bias).sum().backward()
    torch.testing.assert_close(bias.grad, torch.full((16,), 3.0))
