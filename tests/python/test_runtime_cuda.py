"""The run-time ops on CUDA (pack / unpack / dequantize, quantized_linear and its
input gradient, w8a8_linear).

Each op is checked against a plain-PyTorch reference written from the formula
``W[n, k] = (v(u) - zeros[n, k // g]) * scales[n, k // g]`` (float64 products,
never calling the op under test) and against the CPU op, over the shapes that
take each CUDA path: the GEMV kernel (M <= 16; every bit width, fold per chunk
or per 16-column slice, padded last chunks, rows that do not fill a block) and
the panel path (M > 16, or a group size that is not a multiple of 16). Then
opcheck, torch.compile(fullgraph=True, dynamic=True) without recompiles, and
the device checks. Skipped without a GPU or without torchquant's CUDA kernels.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import pytest
import torch
from torch import Tensor

import torchquant.ops  # noqa: F401  (registers the ops and their fake kernels)

OPS = torch.ops.torchquant


def _skip_reason() -> Optional[str]:
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("torchquant::quantized_linear", "CUDA"):
        return "torchquant was built without CUDA kernels"
    return None


_SKIP = _skip_reason()
pytestmark = [pytest.mark.cuda, pytest.mark.skipif(_SKIP is not None, reason=_SKIP or "")]

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Rounding of one result: float32 sums of K products in any order (relative to
# the sum of |terms|), then the output dtype's rounding (relative to |y|).
ACC_RTOL = 2e-5
OUT_RTOL = {torch.float32: 2.0 ** -22, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -10}
NF4 = torch.tensor([-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
                    0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0])


@pytest.fixture(autouse=True)
def exact_float32_matmul():
    """The panel path multiplies float32 panels with cuBLAS: no TF32 in these tests."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


class Weight(NamedTuple):
    codes: Tensor  # int32 [N, K] in [0, 2^bits)
    scales: Tensor  # float32 [N, G]
    zeros: Tensor  # float32 [N, G]
    bits: int
    lut: Optional[Tensor]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    def args(self, device="cuda"):
        """(packed, scales, zeros, bits, in_features, lut) on `device`, packed by the CPU op."""
        lut = None if self.lut is None else self.lut.to(device)
        return (OPS.pack_weight(self.codes, self.bits).to(device), self.scales.to(device),
                self.zeros.to(device), self.bits, self.in_features, lut)


def make_weight(n: int, k: int, bits: int, groups: int, lut: bool = False, frac_zeros: bool = False,
                seed: int = 0) -> Weight:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, k), generator=gen, dtype=torch.int32)
    scales = torch.empty(n, groups).uniform_(1e-3, 2e-2, generator=gen)
    if lut:
        zeros = torch.zeros(n, groups)
    else:
        zeros = torch.randint(0, 1 << bits, (n, groups), generator=gen).float()
        if frac_zeros:  # any float zero point is allowed
            zeros += torch.rand(n, groups, generator=gen)
    return Weight(codes, scales, zeros, bits, NF4.clone() if lut else None)


def _columns(w: Weight):
    """v(u) and the scale / zero point of every element, [N, K] each."""
    group = torch.arange(w.in_features) // (w.in_features // w.scales.shape[1])
    v = w.lut[w.codes.long()] if w.lut is not None else w.codes.float()
    return v, w.scales[:, group], w.zeros[:, group]


def reference_weight(w: Weight) -> Tensor:
    """float32 [N, K] from the formula, rounded as the formula reads: (v - z) * s."""
    v, s, z = _columns(w)
    return (v - z) * s


def weight_magnitude(w: Weight) -> Tensor:
    """float64 (|v| + |z|) s: bounds the rounding of an element however a kernel forms it."""
    v, s, z = _columns(w)
    return (v.double().abs() + z.double().abs()) * s.double()


def assert_within(actual: Tensor, expected: Tensor, terms: Tensor, dtype: torch.dtype, what: str) -> None:
    """|actual - expected| <= ACC_RTOL * terms + OUT_RTOL[dtype] * |expected| (float64 references)."""
    assert actual.dtype == dtype and actual.shape == expected.shape, (what, actual.dtype, actual.shape)
    diff = (actual.detach().double().cpu() - expected).abs()
    tol = ACC_RTOL * terms + OUT_RTOL[dtype] * expected.abs() + 1e-30
    bad = diff > tol
    assert not bool(bad.any()), (
        f"{what}: {int(bad.sum())} of {bad.numel()} differ; worst |diff| {diff.max().item():.3g}, "
        f"at {tuple(int(i) for i in torch.nonzero(bad)[0])}")


def reference_linear(x: Tensor, w: Weight, perm=None, bias=None):
    """(y, sum of |terms|) in float64: x[..., perm] @ W^T + bias."""
    xs = x.detach().double().cpu()
    if perm is not None:
        xs = xs[..., perm.cpu()]
    y = xs @ reference_weight(w).double().T
    terms = xs.abs() @ weight_magnitude(w).T
    if bias is not None:
        y = y + bias.detach().double().cpu()
        terms = terms + bias.detach().double().cpu().abs()
    return y, terms


# (bits, out_features, in_features, groups, lut, fractional zeros): each line takes a path of the kernels.
LINEAR_CASES = [
    (4, 64, 512, 4, False, False),  # g = 128: one group per chunk
    (4, 37, 256, 16, False, True),  # g = 16: folds per slice; 37 rows end inside a block
    (4, 48, 208, 1, False, False),  # per channel, K = 208: a padded last chunk, folds per slice
    (4, 40, 256, 4, True, False),  # NF4 lookup table, g = 64
    (4, 24, 192, 4, True, False),  # lookup table, g = 48: folds per slice
    (3, 40, 384, 3, False, False),  # g = 128
    (3, 33, 256, 4, False, True),  # g = 64: folds per slice
    (3, 16, 144, 1, False, False),  # per channel, padded last chunk
    (2, 40, 256, 2, False, False),  # g = 128
    (2, 20, 96, 3, False, False),  # g = 32: folds per slice, padded last chunk
    (8, 36, 320, 1, False, True),  # per channel
    (8, 30, 256, 8, False, False),  # g = 32
    (4, 24, 120, 5, False, False),  # g = 24: not a multiple of 16, panel path at every M
    (2, 8, 100, 1, False, False),  # per channel, K = 100: panel path at every M
]
CASE_IDS = [f"w{b}_{n}x{k}_G{g}{'_lut' if lut else ''}{'_fz' if fz else ''}" for b, n, k, g, lut, fz in LINEAR_CASES]
# GEMV with 1, 4 and 8 rows per launch, two launches, the largest GEMV, the panel path.
M_VALUES = (1, 3, 8, 13, 16, 17, 40)


def _input(m: int, k: int, dtype, seed: int = 1) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=gen).to(dtype).cuda()


@pytest.mark.parametrize("case", LINEAR_CASES, ids=CASE_IDS)
def test_pack_unpack_dequantize(case):
    bits, n, k, groups, lut, frac = case
    w = make_weight(n, k, bits, groups, lut, frac)
    packed, scales, zeros, _, _, lut_t = w.args()
    assert torch.equal(OPS.pack_weight(w.codes.cuda(), bits).cpu(), packed.cpu())
    assert torch.equal(OPS.unpack_weight(packed, bits, k).cpu(), w.codes.to(torch.uint8))
    deq = OPS.dequantize_weight(packed, scales, zeros, bits, k, lut_t)
    assert deq.shape == (n, k) and deq.dtype == torch.float32 and deq.is_contiguous()
    # The same float32 operations as the formula: bit-identical.
    assert torch.equal(deq.cpu(), reference_weight(w))
    assert torch.equal(deq.cpu(), OPS.dequantize_weight(*w.args("cpu")))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", M_VALUES)
@pytest.mark.parametrize("case", LINEAR_CASES, ids=CASE_IDS)
def test_linear_matches_reference_and_cpu(case, m, dtype):
    bits, n, k, groups, lut, frac = case
    w = make_weight(n, k, bits, groups, lut, frac)
    x = _input(m, k, dtype)
    y = OPS.quantized_linear(x, *w.args())
    expected, terms = reference_linear(x, w)
    assert_within(y, expected, terms, dtype, "cuda vs reference")
    y_cpu = OPS.quantized_linear(x.cpu(), *w.args("cpu"))
    assert_within(y, y_cpu.double(), 2 * terms, dtype, "cuda vs cpu")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", (1, 8, 17))
@pytest.mark.parametrize("case", LINEAR_CASES[::3], ids=CASE_IDS[::3])
def test_linear_perm_bias_and_leading_dims(case, m, dtype):
    bits, n, k, groups, lut, frac = case
    w = make_weight(n, k, bits, groups, lut, frac, seed=2)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(3)).cuda()
    bias = torch.randn(n).to(torch.bfloat16).cuda()  # any float dtype, added in float32
    x = _input(2 * m, k, dtype).view(2, m, k)
    y = OPS.quantized_linear(x, *w.args(), perm, bias)
    assert y.shape == (2, m, n)
    expected, terms = reference_linear(x, w, perm, bias)
    assert_within(y, expected, terms, dtype, "perm + bias")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", (1, 5, 40))
@pytest.mark.parametrize("case", LINEAR_CASES[1::2], ids=CASE_IDS[1::2])
def test_grad_input(case, m, dtype):
    bits, n, k, groups, lut, frac = case
    w = make_weight(n, k, bits, groups, lut, frac, seed=4)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(5)).cuda()
    dy = _input(m, n, dtype, seed=6)
    dx = OPS.quantized_linear_grad_input(dy, *w.args(), perm)
    # dx[..., perm[j]] = (dy W)[..., j]
    dy64 = dy.double().cpu()
    expected, terms = torch.empty(m, k, dtype=torch.float64), torch.empty(m, k, dtype=torch.float64)
    expected[:, perm.cpu()] = dy64 @ reference_weight(w).double()
    terms[:, perm.cpu()] = dy64.abs() @ weight_magnitude(w)
    assert_within(dx, expected, terms, dtype, "grad_input")


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_autograd(dtype):
    w = make_weight(24, 256, 4, 2, seed=7)
    args = w.args()
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(8)).cuda()
    bias = torch.randn(24, device="cuda", requires_grad=True)
    x = _input(6, 256, dtype).requires_grad_(True)
    y = OPS.quantized_linear(x, *args, perm, bias)
    dy = torch.randn_like(y)
    y.backward(dy)
    assert torch.equal(x.grad, OPS.quantized_linear_grad_input(dy, *args, perm))
    torch.testing.assert_close(bias.grad, dy.float().sum(0))


def test_large_layer_m1():
    """The benchmark's shape: 4096 x 4096, W4 groups of 128, one token."""
    w = make_weight(4096, 4096, 4, 32, seed=9)
    for dtype in (torch.float32, torch.bfloat16):
        x = _input(1, 4096, dtype)
        expected, terms = reference_linear(x, w)
        assert_within(OPS.quantized_linear(x, *w.args()), expected, terms, dtype, f"4096x4096 {dtype}")


@pytest.mark.parametrize("m", (1, 20))
def test_deterministic_and_unaligned(m):
    """Same bits on every run, and views at odd offsets (x, packed) give the same result."""
    w = make_weight(40, 256, 4, 2, seed=10)
    packed, scales, zeros, bits, k, lut = w.args()
    x = _input(m, 256, torch.float32)
    y = OPS.quantized_linear(x, packed, scales, zeros, bits, k, lut)
    assert torch.equal(y, OPS.quantized_linear(x, packed, scales, zeros, bits, k, lut))
    x_odd = torch.empty(x.numel() + 1, device="cuda")[1:].view_as(x).copy_(x)
    p_odd = torch.empty(packed.numel() + 1, dtype=torch.uint8, device="cuda")[1:].view_as(packed).copy_(packed)
    assert torch.equal(y, OPS.quantized_linear(x_odd, p_odd, scales, zeros, bits, k, lut))
    empty = OPS.quantized_linear(x[:0], packed, scales, zeros, bits, k, lut)
    assert empty.shape == (0, 40)


# ---------------------------------------------------------------------------
# W8A8

def w8a8_weight(n: int, k: int, seed: int = 0):
    """(int8 codes q [N, K], scales [N, 1], packed u = q + 128 on the GPU)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-128, 128, (n, k), generator=gen, dtype=torch.int32)
    scales = torch.empty(n, 1).uniform_(1e-3, 1e-2, generator=gen)
    return q, scales, OPS.pack_weight(q + 128, 8).cuda()


def reference_w8a8(x: Tensor, q: Tensor, scales: Tensor, input_scale=None, bias=None):
    """(y float64, tolerance) from the formula: int8 activation codes, exact products."""
    xf = x.detach().float().cpu().reshape(-1, x.shape[-1])
    if input_scale is None:
        s = torch.clamp(xf.abs().amax(-1, keepdim=True) / 127.5, min=torch.finfo(torch.float32).eps)
    else:
        s = input_scale.cpu().reshape(1, 1)
    codes = torch.clamp(torch.round(xf * torch.reciprocal(s)), -128, 127).double()
    qd = q.double()
    y = (codes @ qd.T) * s.double() * scales.double().T
    # One code may round the other way where the scale differs by an ulp between devices
    # (the GPU divides by 127.5 as a multiplication): allow two such flips per output.
    tol = (2 * 128 * s.double() * scales.double().T + 1e-5 * (codes.abs() @ qd.abs().T) * s.double()
           * scales.double().T)
    if bias is not None:
        y = y + bias.double().cpu()
    return y.reshape(*x.shape[:-1], -1), tol.reshape(*x.shape[:-1], -1)


@pytest.mark.parametrize("static", (False, True), ids=("dynamic", "static"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m", (1, 5, 16, 17, 40))  # GEMV, two launches, largest GEMV, torch._int_mm
@pytest.mark.parametrize("n,k", [(37, 100), (64, 256)])
def test_w8a8_matches_reference_and_cpu(n, k, m, dtype, static):
    q, scales, packed = w8a8_weight(n, k, seed=m)
    x = _input(m, k, dtype, seed=m + 1)
    input_scale = torch.tensor([0.02]) if static else None
    bias = torch.randn(n) if m % 2 else None
    dev = lambda t: None if t is None else t.cuda()  # noqa: E731
    y = OPS.w8a8_linear(x, packed, scales.cuda(), dev(input_scale), dev(bias))
    expected, tol = reference_w8a8(x, q, scales, input_scale, bias)
    tol = tol + OUT_RTOL[dtype] * expected.abs()
    assert y.dtype == dtype and y.shape == (m, n)
    diff = (y.double().cpu() - expected).abs()
    assert bool((diff <= tol).all()), f"worst |diff| {diff.max().item():.3g}"
    y_cpu = OPS.w8a8_linear(x.cpu(), packed.cpu(), scales, input_scale, bias)
    assert bool(((y.double().cpu() - y_cpu.double()).abs() <= 2 * tol).all())


def test_w8a8_panels_and_autograd():
    """Several weight panels of torch._int_mm (N past a panel, not a multiple of 8), and the
    straight-through input gradient dy W."""
    n, k, m = 4100, 4096, 20
    q, scales, packed = w8a8_weight(n, k, seed=11)
    x = _input(m, k, torch.float32, seed=12).requires_grad_(True)
    y = OPS.w8a8_linear(x, packed, scales.cuda())
    expected, tol = reference_w8a8(x, q, scales)
    assert bool(((y.detach().double().cpu() - expected).abs() <= tol + 1e-6 * expected.abs()).all())
    dy = torch.randn_like(y)
    y.backward(dy)
    w_ref = (q.double() * scales.double())
    terms = dy.double().cpu().abs() @ w_ref.abs()
    assert_within(x.grad, dy.double().cpu() @ w_ref, terms, torch.float32, "w8a8 grad")


# ---------------------------------------------------------------------------
# Devices, opcheck, torch.compile

def test_device_mismatch_names_the_argument():
    w = make_weight(8, 64, 4, 1)
    packed, scales, zeros, bits, k, _ = w.args()
    x = _input(2, 64, torch.float32)
    with pytest.raises(ValueError, match="packed"):
        OPS.quantized_linear(x, packed.cpu(), scales, zeros, bits, k)
    with pytest.raises(ValueError, match="perm"):
        OPS.quantized_linear(x, packed, scales, zeros, bits, k, None, torch.arange(64))
    with pytest.raises(ValueError, match="input"):
        OPS.quantized_linear(x.to("meta"), packed, scales, zeros, bits, k)
    with pytest.raises(ValueError, match="scales"):
        OPS.w8a8_linear(x, OPS.pack_weight(w.codes, 8).cuda(), torch.ones(8, 1))


def test_opcheck():
    w = make_weight(24, 96, 4, 3, lut=True)
    packed, scales, zeros, bits, k, lut = w.args()
    perm = torch.randperm(96).cuda()
    bias = torch.randn(24, device="cuda")
    for m in (1, 20):
        x = torch.randn(m, 96, device="cuda", requires_grad=True)
        torch.library.opcheck(OPS.quantized_linear.default, (x, packed, scales, zeros, bits, k, lut, perm, bias))
        torch.library.opcheck(OPS.quantized_linear_grad_input.default,
                              (torch.randn(m, 24, device="cuda"), packed, scales, zeros, bits, k, lut, perm))
        q, s8, p8 = w8a8_weight(24, 96)
        torch.library.opcheck(OPS.w8a8_linear.default, (x, p8, s8.cuda(), None, bias))
        torch.library.opcheck(OPS.w8a8_linear.default, (x, p8, s8.cuda(), torch.tensor([0.05], device="cuda"), None))
    torch.library.opcheck(OPS.pack_weight.default, (w.codes.cuda(), 4))
    torch.library.opcheck(OPS.unpack_weight.default, (packed, 4, 96))
    torch.library.opcheck(OPS.dequantize_weight.default, (packed, scales, zeros, 4, 96, lut))


def test_compile_fullgraph_dynamic_no_recompile():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    w = make_weight(48, 128, 4, 4)
    packed, scales, zeros, bits, k, lut = w.args()
    q, s8, p8 = w8a8_weight(48, 128)
    s8 = s8.cuda()

    def f(x):
        h = OPS.quantized_linear(x, packed, scales, zeros, bits, k, lut, None, None)
        return torch.relu(h) + OPS.w8a8_linear(x, p8, s8, None, None)

    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(f, fullgraph=True, dynamic=True, backend=counter)
    for m in (3, 5, 24):  # the GEMV and panel paths, one graph
        x = _input(m, 128, torch.float32, seed=m).requires_grad_(True)
        y = compiled(x)
        torch.testing.assert_close(y, f(x), rtol=1e-5, atol=1e-5)
        y.sum().backward()
        assert x.grad is not None and x.grad.shape == x.shape
    assert counter.frame_count == 1
    torch._dynamo.reset()


def test_export_dynamic_batch():
    w = make_weight(32, 128, 3, 1)
    packed, scales, zeros, bits, k, _ = w.args()

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            for name, t in (("packed", packed), ("scales", scales), ("zeros", zeros)):
                self.register_buffer(name, t)

        def forward(self, x):
            return OPS.quantized_linear(x, self.packed, self.scales, self.zeros, bits, k)

    batch = torch.export.Dim("batch", min=1)
    exported = torch.export.export(Layer(), (_input(3, 128, torch.float32),), dynamic_shapes={"x": {0: batch}})
    for m in (1, 20):
        x = _input(m, 128, torch.float32, seed=m)
        assert torch.equal(exported.module()(x), OPS.quantized_linear(x, packed, scales, zeros, bits, k))
