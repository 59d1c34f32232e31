"""torchquant.ops.w8a8_linear on CPU: int8 activations x int8 weights, int32 accumulation.

The reference is written from the formula in plain PyTorch (float64 integer
products are exact): the op must match it bit for bit in every dtype, grid and
instruction set, because the kernel's float32 epilogue performs the same
operations in the same order.
"""
import os

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import torchquant  # noqa: F401
from torchquant.ops import quantize_per_token, w8a8_linear

# Every kernel build the CPU can run: the choice is read on every call.
ISAS = ["default", "avx2", "native"] if os.uname().machine in ("x86_64", "AMD64") else ["default"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
EPS = torch.finfo(torch.float32).eps


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    if request.param == "native":
        monkeypatch.delenv("TORCHQUANT_CPU_ISA", raising=False)
    else:
        monkeypatch.setenv("TORCHQUANT_CPU_ISA", request.param)
    return request.param


def make_weight(n, k, gen, codes=None):
    """int8 codes q [n, k] -> (packed u = q + 128 with rows zero-padded to 16 bytes, scales [n, 1])."""
    q = torch.randint(-128, 128, (n, k), generator=gen) if codes is None else codes
    packed = torch.zeros(n, -(-k // 16) * 16, dtype=torch.uint8)
    packed[:, :k] = (q + 128).to(torch.uint8)
    scales = torch.rand(n, 1, generator=gen) * 0.01 + 1e-3
    return q, packed, scales


def reference(x, q_w, scales, input_scale=None, bias=None):
    """y = acc * s_x * s_w + bias from the formula; acc exact in float64."""
    xf = x.float().reshape(-1, x.shape[-1])
    if input_scale is None:
        s_x = torch.clamp(xf.abs().amax(dim=1, keepdim=True) / 127.5, min=EPS)
    else:
        s_x = input_scale.reshape(1, 1).expand(xf.shape[0], 1)
    codes = torch.clamp(torch.round(xf * (1.0 / s_x)), -128, 127)
    acc = codes.double() @ q_w.double().T
    y = acc.float() * s_x * scales.T
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*x.shape[:-1], -1).to(x.dtype)


# M: 1 and 3 (small-M tiles), 17 (token tiles plus a remainder), 64; K: the
# packed rows end with 16, 48 or 32 bytes of a 64-byte chunk.
@pytest.mark.parametrize("m", [1, 3, 17, 64])
@pytest.mark.parametrize("k", [200, 100, 96])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("static", [False, True])
def test_matches_reference(isa, m, k, dtype, static):
    gen = torch.Generator().manual_seed(m * 1000 + k)
    n = 37  # not a multiple of any tile width
    q_w, packed, scales = make_weight(n, k, gen)
    x = (torch.randn(m, k, generator=gen) * 3).to(dtype)
    input_scale = torch.tensor([0.03]) if static else None
    bias = torch.randn(n, generator=gen).to(dtype) if (m + k) % 2 else None
    y = w8a8_linear(x, packed, scales, input_scale, bias)
    assert y.dtype == dtype and y.shape == (m, n)
    torch.testing.assert_close(y, reference(x, q_w, scales, input_scale, bias), rtol=0, atol=0)


def test_large_layer_all_paths(isa):
    """Several L2 panels per thread, threads splitting the rows, M from decode to batch."""
    gen = torch.Generator().manual_seed(1)
    q_w, packed, scales = make_weight(200, 4096, gen)
    bias = torch.randn(200, generator=gen)
    for m in (1, 2, 5, 8, 9, 40):
        x = torch.randn(m, 4096, generator=gen)
        torch.testing.assert_close(w8a8_linear(x, packed, scales, None, bias),
                                   reference(x, q_w, scales, None, bias), rtol=0, atol=0)


def test_int32_accumulation_is_exact(isa):
    """acc itself: unit scales, integer x, the extreme codes (u = 255 or 0 against q_x = -128,
    which would saturate a 16-bit pairwise product); |acc| < 2^24 so float32 holds it."""
    k = 1000
    gen = torch.Generator().manual_seed(2)
    q_w = torch.randint(-128, 128, (19, k), generator=gen)
    q_w[0] = 127
    q_w[1] = -128
    q_w[2, ::2], q_w[2, 1::2] = 127, -128
    _, packed, _ = make_weight(19, k, gen, codes=q_w)
    x = torch.randint(-128, 128, (5, k), generator=gen).float()
    x[0] = -128.0
    x[1] = 127.0
    y = w8a8_linear(x, packed, torch.ones(19, 1), torch.tensor([1.0]))
    acc = x.double() @ q_w.double().T
    assert acc.abs().max() < 2**24
    assert torch.equal(y.double(), acc)


def test_dynamic_grid_is_quantize_per_token():
    """The fused per-token quantization gives quantize_per_token's codes and scales."""
    gen = torch.Generator().manual_seed(3)
    q_w, packed, scales = make_weight(24, 300, gen)
    x = torch.randn(6, 300, generator=gen) * torch.logspace(-3, 2, 6).unsqueeze(1)
    x[2] = 0.0  # the smallest scale, zero codes
    codes, s_x = quantize_per_token(x, -128, 127)
    expected = (codes.double() @ q_w.double().T).float() * s_x * scales.T
    torch.testing.assert_close(w8a8_linear(x, packed, scales), expected, rtol=0, atol=0)


def test_leading_dims_and_strides():
    gen = torch.Generator().manual_seed(4)
    q_w, packed, scales = make_weight(10, 48, gen)
    x = torch.randn(2, 3, 48, generator=gen)
    y = w8a8_linear(x, packed, scales)
    assert y.shape == (2, 3, 10)
    torch.testing.assert_close(y, reference(x, q_w, scales), rtol=0, atol=0)
    torch.testing.assert_close(w8a8_linear(x[0, 1], packed, scales), y[0, 1], rtol=0, atol=0)
    xt = torch.randn(48, 4, generator=gen).T  # not contiguous
    torch.testing.assert_close(w8a8_linear(xt, packed, scales), reference(xt, q_w, scales), rtol=0, atol=0)
    assert w8a8_linear(torch.randn(0, 48), packed, scales).shape == (0, 10)


@pytest.mark.parametrize("static", [False, True])
def test_nonfinite_input_raises(static):
    _, packed, scales = make_weight(4, 32, torch.Generator().manual_seed(5))
    x = torch.randn(3, 32)
    x[1, 7] = float("nan")
    with pytest.raises(ValueError, match="w8a8_linear.*finite"):
        w8a8_linear(x, packed, scales, torch.tensor([0.1]) if static else None)


def _args(n=8, k=40):
    _, packed, scales = make_weight(n, k, torch.Generator().manual_seed(6))
    return torch.randn(3, k), packed, scales


@pytest.mark.parametrize("device", ["cpu", "meta"])
@pytest.mark.parametrize("case, error, needle", [
    (lambda x, p, s: (x.int(), p, s), TypeError, "input"),
    (lambda x, p, s: (x, p.to(torch.int8), s), TypeError, "packed"),
    (lambda x, p, s: (x, p[:, :32], s), ValueError, "packed"),        # wrong packed width
    (lambda x, p, s: (x, p[0], s), ValueError, "packed"),             # 1-D
    (lambda x, p, s: (x[:, :20], p, s), ValueError, "packed"),        # wrong last dim of x
    (lambda x, p, s: (x, p, s.double()), TypeError, "scales"),
    (lambda x, p, s: (x, p, s.reshape(-1)), ValueError, "scales"),
    (lambda x, p, s: (x, p, s[:4]), ValueError, "scales"),
    (lambda x, p, s: (x, p, s, torch.tensor([0.1, 0.2])), ValueError, "input_scale"),
    (lambda x, p, s: (x, p, s, torch.tensor([1], dtype=torch.int32)), TypeError, "input_scale"),
    (lambda x, p, s: (x, p, s, None, torch.zeros(9)), ValueError, "bias"),
    (lambda x, p, s: (x, p, s, None, torch.zeros(8, dtype=torch.int64)), TypeError, "bias"),
])
def test_bad_arguments(device, case, error, needle):
    """The CPU kernel and the fake (meta) kernel raise the same kind of error."""
    args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in case(*_args())]
    with pytest.raises(error, match=f"w8a8_linear.*{needle}"):
        w8a8_linear(*args)


@pytest.mark.parametrize("value", [0.0, -1.0, float("inf"), float("nan")])
def test_bad_static_scale_value(value):
    x, packed, scales = _args()
    with pytest.raises(ValueError, match="input_scale"):
        w8a8_linear(x, packed, scales, torch.tensor([value]))


@pytest.mark.parametrize("name", ["input", "packed", "scales", "input_scale", "bias"])
def test_meta_mixed_with_cpu(name):
    x, packed, scales = _args()
    args = {"input": x, "packed": packed, "scales": scales, "input_scale": torch.tensor([0.1]),
            "bias": torch.zeros(8)}
    args[name] = args[name].to("meta")
    # The argument that differs from input's device is named (all the others when input moved).
    with pytest.raises(ValueError, match="device"):
        w8a8_linear(**args)


def test_opcheck():
    gen = torch.Generator().manual_seed(7)
    _, packed, scales = make_weight(12, 40, gen)
    x = torch.randn(2, 3, 40, generator=gen)
    for extra in [(), (torch.tensor([0.05]),), (None, torch.randn(12, generator=gen))]:
        torch.library.opcheck(torch.ops.torchquant.w8a8_linear, (x, packed, scales, *extra))
    torch.library.opcheck(torch.ops.torchquant.w8a8_linear, (x.bfloat16(), packed, scales))


def test_compile_fullgraph_dynamic_without_recompiles():
    gen = torch.Generator().manual_seed(8)
    _, packed, scales = make_weight(16, 64, gen)
    bias = torch.randn(16, generator=gen)
    counter = CompileCounterWithBackend("aot_eager")

    @torch.compile(fullgraph=True, dynamic=True, backend=counter)
    def layer(x):
        return torch.relu(w8a8_linear(x, packed, scales, None, bias))

    torch._dynamo.reset()
    for m in (2, 3, 7, 16):
        x = torch.randn(m, 64, generator=gen)
        torch.testing.assert_close(layer(x), torch.relu(w8a8_linear(x, packed, scales, None, bias)),
                                   rtol=0, atol=0)
    assert counter.frame_count == 1


def test_export_dynamic_batch():
    gen = torch.Generator().manual_seed(9)
    _, packed, scales = make_weight(16, 64, gen)

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("packed", packed)
            self.register_buffer("scales", scales)

        def forward(self, x):
            return w8a8_linear(x, self.packed, self.scales)

    batch = torch.export.Dim("batch", min=1, max=1024)
    ep = torch.export.export(Layer(), (torch.randn(4, 64),), dynamic_shapes={"x": {0: batch}})
    x = torch.randn(9, 64, generator=gen)
    torch.testing.assert_close(ep.module()(x), w8a8_linear(x, packed, scales), rtol=0, atol=0)
