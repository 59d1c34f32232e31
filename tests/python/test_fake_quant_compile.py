"""torch.compile(fullgraph=True) of a small model built on fake_quantize:
no graph break, and the outputs and gradients of eager mode, with static
and dynamic batch sizes. (Kept to two compilations: compiling is slow.)"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

from torchquant.ops import fake_quantize


class TinyQuantMLP(nn.Module):
    """Two linear layers whose activations and weights are fake-quantized
    with learnable scales, one granularity each:

        input   uint8 per-tensor, learnable scale and zero-point
        fc1.w   int4 per-channel (rows), learnable scale, integer zero-point
        hidden  uint8 per-channel (features), learnable scale, fixed zero-point
        fc2.w   int4 per-group (groups of 8 along rows), learnable scale
    """

    def __init__(self, in_features=16, hidden=32, out_features=8, group_size=8):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, out_features)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        self.group_size = group_size
        w1, w2 = self.fc1.weight.detach(), self.fc2.weight.detach()
        self.input_scale = nn.Parameter(torch.tensor([0.02]))
        self.input_zero = nn.Parameter(torch.tensor([128.0]))
        self.w1_scale = nn.Parameter(w1.abs().amax(1) / 7)
        self.register_buffer("w1_zero", torch.zeros(hidden, dtype=torch.int32))
        self.hidden_scale = nn.Parameter(torch.full((hidden,), 0.01))
        self.register_buffer("hidden_zero", torch.zeros(hidden))
        self.w2_scale = nn.Parameter(w2.abs().reshape(out_features, -1, group_size).amax(-1) / 7)
        self.register_buffer("w2_zero", torch.zeros_like(self.w2_scale))

    def forward(self, x):
        x = fake_quantize(x, self.input_scale, self.input_zero, 0, 255, grad_factor=0.1)
        w1 = fake_quantize(self.fc1.weight, self.w1_scale, self.w1_zero, -8, 7, axis=0, grad_factor=0.05)
        h = torch.relu(F.linear(x, w1, self.fc1.bias))
        h = fake_quantize(h, self.hidden_scale, self.hidden_zero, 0, 255, axis=-1)
        w2 = fake_quantize(self.fc2.weight, self.w2_scale, self.w2_zero, -8, 7, group_size=self.group_size)
        return F.linear(h, w2, self.fc2.bias)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _output_and_grads(model, batch: int):
    gen = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, 16, generator=gen).requires_grad_(True)
    out = model(x)
    dy = torch.randn(out.shape, generator=gen)
    params = [x] + list(model.parameters())
    return [out] + list(torch.autograd.grad(out, params, dy))


def _assert_same(compiled, eager):
    assert len(compiled) == len(eager)
    for c, e in zip(compiled, eager):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-6)


def test_fullgraph_compile_matches_eager():
    model = TinyQuantMLP()
    eager = _output_and_grads(model, batch=4)

    compiled = _output_and_grads(torch.compile(model, fullgraph=True), batch=4)

    assert not counters["graph_break"], dict(counters["graph_break"])
    _assert_same(compiled, eager)


def test_dynamic_batch_does_not_recompile():
    model = TinyQuantMLP()
    backend = CompileCounterWithBackend("inductor")
    compiled_model = torch.compile(model, fullgraph=True, dynamic=True, backend=backend)

    _assert_same(_output_and_grads(compiled_model, 3), _output_and_grads(model, 3))
    # (Not necessarily 1: Dynamo may restart its analysis of the frame once.)
    compilations = backend.frame_count
    _assert_same(_output_and_grads(compiled_model, 7), _output_and_grads(model, 7))

    assert compilations >= 1 and backend.frame_count == compilations
    assert not counters["graph_break"], dict(counters["graph_break"])
