"""opcheck, torch.compile and torch.export of the weight-only run-time ops."""
from __future__ import annotations

import pytest
import torch

import runtime_reference as ref
from torchquant import ops

OPS = torch.ops.torchquant


def _weight_args(lut=False):
    w = ref.make_weight(24, 96, 2, 4, lut=lut)
    return w, w.args()


@pytest.mark.parametrize("lut", [False, True])
def test_opcheck(lut):
    w, (packed, scales, zeros, bits, k, lut_t) = _weight_args(lut)
    perm = torch.randperm(k)
    torch.library.opcheck(OPS.pack_weight, (w.codes, bits))
    torch.library.opcheck(OPS.unpack_weight, (packed, bits, k))
    torch.library.opcheck(OPS.dequantize_weight, (packed, scales, zeros, bits, k, lut_t))
    for m in (1, 12):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(2, m, k).to(dtype)
            bias = torch.randn(24)
            torch.library.opcheck(OPS.quantized_linear, (x, packed, scales, zeros, bits, k, lut_t, perm, bias))
            torch.library.opcheck(OPS.quantized_linear, (x.requires_grad_(), packed, scales, zeros, bits, k))
            dy = torch.randn(2, m, 24).to(dtype)
            torch.library.opcheck(OPS.quantized_linear_grad_input, (dy, packed, scales, zeros, bits, k, lut_t, perm))


class _Layer(torch.nn.Module):
    def __init__(self, w, perm=None, bias=None):
        super().__init__()
        self.register_buffer("packed", w.packed)
        self.register_buffer("scales", w.scales)
        self.register_buffer("zeros", w.zeros)
        self.register_buffer("lut", w.lut)
        self.register_buffer("perm", perm)
        self.bias = None if bias is None else torch.nn.Parameter(bias)
        self.bits, self.k = w.bits, w.in_features

    def forward(self, x):
        return ops.quantized_linear(x, self.packed, self.scales, self.zeros, self.bits, self.k, self.lut, self.perm,
                                    self.bias)


def test_compile_fullgraph_dynamic_no_recompile():
    torch._dynamo.reset()
    w = ref.make_weight(24, 96, 2, 4, lut=True)
    layer = _Layer(w, torch.randperm(96), torch.randn(24))
    counts = {"frames": 0}

    def backend(gm, example_inputs):
        counts["frames"] += 1
        return gm

    compiled = torch.compile(layer, backend=backend, fullgraph=True, dynamic=True)
    for m in (2, 5, 17, 40):
        x = torch.randn(m, 96)
        torch.testing.assert_close(compiled(x), layer(x))
    assert counts["frames"] == 1


def test_compile_inductor_with_backward():
    torch._dynamo.reset()
    w = ref.make_weight(24, 64, 2, 3)
    layer = _Layer(w, torch.randperm(64), torch.randn(24))
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    for m in (3, 9):
        x = torch.randn(m, 64, requires_grad=True)
        x_ref = x.detach().clone().requires_grad_()
        compiled(x).square().sum().backward()
        layer(x_ref).square().sum().backward()
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-4)


def test_export_dynamic_batch():
    w = ref.make_weight(24, 96, 3, 2)
    layer = _Layer(w, torch.randperm(96), torch.randn(24))
    batch = torch.export.Dim("batch", min=1, max=1024)
    ep = torch.export.export(layer, (torch.randn(4, 96),), dynamic_shapes={"x": {0: batch}})
    assert any(n.target == OPS.quantized_linear.default for n in ep.graph.nodes)
    for m in (1, 7, 33):
        x = torch.randn(m, 96)
        torch.testing.assert_close(ep.module()(x), layer(x))
