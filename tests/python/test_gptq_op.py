"""torchquant.ops.gptq_quantize / gptq_accumulate_hessian against plain PyTorch.

The reference (gptq_reference.py) is the paper's algorithm written column by
column with the paper's own inverse-Hessian formula; torchquant works with
the Cholesky factor of the Hessian itself (no inverse) and runs the inner
loop in a CPU kernel, so results agree to rounding: the loss within 1%, and
on well-conditioned problems the same codes almost everywhere. The loss is
checked against its definition in float64, and the outputs against each
other (codes, grids and g_idx reproduce weight_q exactly).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
from torch.library import opcheck

from gptq_reference import gptq_reference, rtn_loss
from torchquant import ops

OPS = torch.ops.torchquant
LOSS_RTOL = 0.01


# ---------------------------------------------------------------------------
# Calibration data.


def random_inputs(n: int, features: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, generator=g)


def correlated_inputs(n: int, features: int, seed: int) -> torch.Tensor:
    """Inputs driven by a few latent factors (near-singular Hessian), uneven channel scales."""
    g = torch.Generator().manual_seed(seed)
    rank = max(2, features // 8)
    x = torch.randn(n, rank, generator=g) @ torch.randn(rank, features, generator=g)
    x = x + 0.01 * torch.randn(n, features, generator=g)
    return x * torch.exp(torch.randn(features, generator=g))


def near_dead_inputs(n: int, features: int, seed: int) -> torch.Tensor:
    """Correlated inputs where some channels are always 0 and some almost always."""
    x = correlated_inputs(n, features, seed)
    x[:, ::7] = 0.0
    x[:, 3::11] *= 1e-4
    return x


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    return (2.0 * x.double().t() @ x.double() / x.shape[0]).float()


HESSIANS = {"random": random_inputs, "correlated": correlated_inputs, "near_dead": near_dead_inputs}


def make_layer(kind: str, out_features: int, in_features: int, seed: int = 0, device="cpu"):
    x = HESSIANS[kind](4 * in_features, in_features, seed)
    w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed + 1))
    return w.to(device), hessian_of(x).to(device)


def relative_difference(a, b) -> float:
    a, b = float(a), float(b)
    return abs(a - b) / max(abs(b), 1e-30)


def exact_loss(weight: torch.Tensor, weight_q: torch.Tensor, hessian: torch.Tensor) -> float:
    e = (weight.double() - weight_q.double())
    return 0.5 * ((e @ hessian.double()) * e).sum().item()


def check_consistent(result: ops.GPTQResult, weight: torch.Tensor, quant_min: int, quant_max: int,
                     group_size, act_order: bool, static_groups: bool, hessian: torch.Tensor) -> None:
    """Shapes, dtypes and the invariants that tie the outputs together."""
    out_features, in_features = weight.shape
    n_groups = 1 if group_size is None else in_features // group_size
    assert result.weight_q.shape == weight.shape and result.weight_q.dtype == weight.dtype
    assert result.codes.shape == weight.shape and result.codes.dtype == torch.int32
    assert result.scales.shape == (out_features, n_groups) and result.scales.dtype == torch.float32
    assert result.zero_points.shape == (out_features, n_groups) and result.zero_points.dtype == torch.float32
    assert result.g_idx.shape == (in_features,) and result.g_idx.dtype == torch.int32
    assert result.loss.shape == () and result.damp.shape == ()
    assert int(result.codes.min()) >= quant_min and int(result.codes.max()) <= quant_max
    assert torch.equal(result.zero_points, result.zero_points.round())
    assert bool((result.scales > 0).all())

    # g_idx: the group of each original column, as GPTQ checkpoints store it.
    g = group_size or in_features
    columns = torch.arange(in_features, device=weight.device)
    if act_order and not static_groups:
        diag = hessian.diagonal().clone()
        diag[diag == 0] = 1.0
        perm = torch.argsort(diag, descending=True, stable=True)
        expected = torch.empty_like(columns)
        expected[perm] = columns // g
    else:
        expected = columns // g
    assert torch.equal(result.g_idx.long(), expected)

    # Dequantizing the codes reproduces weight_q exactly.
    idx = result.g_idx.long()
    dequantized = (result.codes.float() - result.zero_points[:, idx]) * result.scales[:, idx]
    assert torch.equal(dequantized.to(weight.dtype), result.weight_q)

    # The loss is tr((W - Q) H (W - Q)^T) / 2 with the undamped Hessian.
    assert relative_difference(result.loss, exact_loss(weight.float(), dequantized, hessian)) < 1e-4


# ---------------------------------------------------------------------------
# The Hessian.


def test_accumulate_hessian_matches_float64(device):
    features = 24
    batches = [torch.randn(5, features), torch.randn(2, 3, features), torch.randn(0, features),
               torch.randn(1, 4, 2, features).to(torch.float16), torch.randn(7, features).to(torch.bfloat16)]
    hessian = torch.full((features, features), float("nan"), device=device)  # unread while num_seen == 0
    seen = 0
    for batch in batches:
        seen = ops.gptq_accumulate_hessian(hessian, batch.to(device), seen)
    x = torch.cat([b.reshape(-1, features).double() for b in batches])
    assert seen == x.shape[0] == 26
    expected = 2.0 * x.t() @ x / x.shape[0]
    torch.testing.assert_close(hessian.cpu().double(), expected, rtol=1e-5, atol=1e-5)


def test_accumulate_hessian_continues_a_running_average(device):
    x1, x2 = torch.randn(10, 6, device=device), torch.randn(30, 6, device=device)
    hessian = torch.zeros(6, 6, device=device)
    seen = ops.gptq_accumulate_hessian(hessian, x1, 0)
    seen = ops.gptq_accumulate_hessian(hessian, x2, seen)
    x = torch.cat([x1, x2]).double()
    torch.testing.assert_close(hessian.double(), 2.0 * x.t() @ x / 40, rtol=1e-5, atol=1e-6)
    assert seen == 40


def test_accumulate_hessian_rejects_nan_inputs():
    hessian = torch.zeros(4, 4)
    x = torch.randn(3, 4)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="inputs contain NaN or Inf"):
        ops.gptq_accumulate_hessian(hessian, x, 0)
    assert torch.equal(hessian, torch.zeros(4, 4))


# ---------------------------------------------------------------------------
# Against the reference.

# (bits, symmetric, group_size, act_order, static_groups, block_size): every
# bit width, grid kind and option, with blocks larger than, smaller than and
# not dividing in_features (64), and groups straddling blocks.
CONFIGS = [
    (4, True, None, False, False, 128),
    (4, False, 32, False, False, 128),
    (4, True, 32, True, False, 128),
    (4, False, 32, True, True, 128),
    (4, True, 64, False, True, 24),
    (2, True, 32, True, False, 20),
    (2, False, None, True, False, 16),
    (3, True, 32, False, False, 48),
    (3, False, 64, True, True, 40),
    (8, True, None, True, False, 32),
    (8, False, 32, True, False, 7),
    (4, True, 32, False, False, 64),
]


def _config_id(config):
    bits, symmetric, group, act_order, static, block = config
    return (f"{bits}bit-{'sym' if symmetric else 'asym'}-g{group}" + ("-act" if act_order else "")
            + ("-static" if static else "") + f"-b{block}")


def _quant_range(bits: int, symmetric: bool):
    return ops.quant_range(bits, signed=symmetric)


@pytest.mark.parametrize("kind", list(HESSIANS))
@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
def test_matches_reference(device, kind, config):
    bits, symmetric, group_size, act_order, static_groups, block_size = config
    qmin, qmax = _quant_range(bits, symmetric)
    weight, hessian = make_layer(kind, 12, 64, seed=bits, device=device)
    options = dict(group_size=group_size, act_order=act_order, static_groups=static_groups, block_size=block_size)
    result = ops.gptq_quantize(weight, hessian, qmin, qmax, symmetric, **options)
    expected = gptq_reference(weight, hessian, qmin, qmax, symmetric, **options)
    check_consistent(result, weight, qmin, qmax, group_size, act_order, static_groups, hessian)
    assert relative_difference(result.loss, expected.loss) < LOSS_RTOL
    torch.testing.assert_close(result.damp, expected.damp.to(device), rtol=1e-5, atol=0)
    assert torch.equal(result.g_idx, expected.g_idx)
    if kind == "random":
        # Well conditioned: rounding differences rarely flip a code.
        assert (result.codes != expected.codes).float().mean() < 0.02


@pytest.mark.parametrize("config", [CONFIGS[2], CONFIGS[3], CONFIGS[5]], ids=_config_id)
def test_column_loop_in_aten_matches_reference(monkeypatch, config):
    """The ATen column loop (what devices without a kernel run) on the CPU."""
    monkeypatch.setenv("TORCHQUANT_GPTQ_BLOCK", "aten")
    bits, symmetric, group_size, act_order, static_groups, block_size = config
    qmin, qmax = _quant_range(bits, symmetric)
    weight, hessian = make_layer("correlated", 10, 64, seed=3)
    options = dict(group_size=group_size, act_order=act_order, static_groups=static_groups, block_size=block_size)
    result = ops.gptq_quantize(weight, hessian, qmin, qmax, symmetric, **options)
    check_consistent(result, weight, qmin, qmax, group_size, act_order, static_groups, hessian)
    expected = gptq_reference(weight, hessian, qmin, qmax, symmetric, **options)
    assert relative_difference(result.loss, expected.loss) < LOSS_RTOL


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
def test_clip_search_matches_reference(device, symmetric):
    qmin, qmax = _quant_range(3, symmetric)
    weight, hessian = make_layer("correlated", 8, 64, seed=5, device=device)
    options = dict(group_size=32, act_order=True, clip_search_steps=20, clip_max_shrink=0.5)
    result = ops.gptq_quantize(weight, hessian, qmin, qmax, symmetric, **options)
    check_consistent(result, weight, qmin, qmax, 32, True, False, hessian)
    expected = gptq_reference(weight, hessian, qmin, qmax, symmetric, **options)
    assert relative_difference(result.loss, expected.loss) < LOSS_RTOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_weight(device, dtype):
    weight, hessian = make_layer("correlated", 8, 64, seed=2, device=device)
    weight = weight.to(dtype)
    result = ops.gptq_quantize(weight, hessian, -8, 7, True, group_size=32, act_order=True)
    check_consistent(result, weight, -8, 7, 32, True, False, hessian)
    expected = gptq_reference(weight, hessian, -8, 7, True, group_size=32, act_order=True)
    assert relative_difference(result.loss, expected.loss) < LOSS_RTOL


@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("bits", [3, 4])
def test_beats_round_to_nearest_on_correlated_inputs(device, bits, group_size):
    qmin, qmax = _quant_range(bits, True)
    weight, hessian = make_layer("correlated", 16, 128, seed=7, device=device)
    result = ops.gptq_quantize(weight, hessian, qmin, qmax, True, group_size=group_size, act_order=True)
    assert float(result.loss) < 0.5 * rtn_loss(weight.cpu(), hessian.cpu(), qmin, qmax, True, group_size)


def test_dead_columns_are_zero():
    weight, hessian = make_layer("near_dead", 6, 64, seed=1)
    result = ops.gptq_quantize(weight, hessian, -8, 7, True, group_size=32)
    dead = hessian.diagonal() == 0
    assert bool(dead.any())
    assert bool((result.weight_q[:, dead] == 0).all())
    assert bool(torch.isfinite(result.loss))


@pytest.mark.parametrize("act_order", [False, True])
def test_inputs_not_modified(device, act_order):
    weight, hessian = make_layer("near_dead", 6, 64, device=device)
    w0, h0 = weight.clone(), hessian.clone()
    ops.gptq_quantize(weight, hessian, -8, 7, True, group_size=32, act_order=act_order)
    assert torch.equal(weight, w0) and torch.equal(hessian, h0)


def test_no_rows(device):
    weight = torch.empty(0, 32, device=device)
    hessian = hessian_of(random_inputs(64, 32, 0)).to(device)
    result = ops.gptq_quantize(weight, hessian, -8, 7, True, group_size=16, act_order=True)
    assert result.weight_q.shape == (0, 32) and result.scales.shape == (0, 2)
    assert float(result.loss) == 0.0


def _isa_case():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 8, generator=g) @ torch.randn(8, 72, generator=g) + 0.1 * torch.randn(400, 72, generator=g)
    w = torch.randn(37, 72, generator=g)
    return tuple(ops.gptq_quantize(w, 2 * x.t() @ x / 400, -4, 3, True, group_size=24, act_order=True, block_size=20))


def test_baseline_and_avx2_kernels_agree_bitwise(tmp_path):
    """The CPU kernel's two builds (picked like the fake-quant ones) round alike.

    This process uses the best build for its CPU; a subprocess with
    TORCHQUANT_CPU_ISA=default the baseline one.
    """
    if os.uname().machine not in ("x86_64", "AMD64"):
        pytest.skip("AVX2 kernels exist on x86-64 only")
    path = tmp_path / "baseline.pt"
    script = textwrap.dedent(f"""
        import sys, torch
        sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})
        from test_gptq_op import _isa_case
        torch.save(_isa_case(), sys.argv[1])
    """)
    env = dict(os.environ, TORCHQUANT_CPU_ISA="default")
    subprocess.run([sys.executable, "-c", script, str(path)], check=True, env=env, timeout=300)
    for native, baseline in zip(_isa_case(), torch.load(path)):
        assert torch.equal(native, baseline)


# ---------------------------------------------------------------------------
# Hessians that cannot be factorized.


def indefinite_hessian(features: int, coupling: float) -> torch.Tensor:
    """The identity (mean diagonal 1) with columns 0 and 1 coupled: eigenvalues 1 +- coupling."""
    h = torch.eye(features)
    h[0, 1] = h[1, 0] = coupling
    return h


def test_more_damping_when_cholesky_fails(device):
    # Eigenvalue -0.05 (mean diagonal 1): damping 0.01 fails, 0.1 works.
    hessian = indefinite_hessian(32, 1.05).to(device)
    weight = torch.randn(6, 32, device=device)
    result = ops.gptq_quantize(weight, hessian, -8, 7, True, group_size=16, layer_name="blocks.0.mlp")
    mean_diag = float(hessian.diagonal().mean())
    assert float(result.damp) == pytest.approx(0.1 * mean_diag, rel=1e-5)
    expected = gptq_reference(weight, hessian, -8, 7, True, group_size=16)
    assert relative_difference(result.loss, expected.loss) < LOSS_RTOL


def test_not_positive_definite_names_the_layer(device):
    hessian = indefinite_hessian(32, 3.0).to(device)
    weight = torch.randn(6, 32, device=device)
    with pytest.raises(torch.linalg.LinAlgError, match=r"layer 'blocks\.3\.attn\.q_proj'.*not positive definite"
                                                       r".*percdamp.*calibration data.*rtn_fallback=True"):
        ops.gptq_quantize(weight, hessian, -8, 7, True, layer_name="blocks.3.attn.q_proj")


def test_rtn_fallback_warns_and_rounds_to_nearest(device):
    hessian = indefinite_hessian(32, 3.0).to(device)
    weight = torch.randn(6, 32, device=device)
    with pytest.warns(UserWarning, match=r"layer 'blocks\.3\.attn\.q_proj'.*round-to-nearest"):
        result = ops.gptq_quantize(weight, hessian, -8, 7, True, group_size=16, rtn_fallback=True,
                                   layer_name="blocks.3.attn.q_proj")
    assert float(result.damp) == -1.0
    expected = gptq_reference(weight, hessian, -8, 7, True, group_size=16, rtn=True)
    assert torch.equal(result.weight_q, expected.weight_q)
    assert torch.equal(result.codes, expected.codes)
    check_consistent(result, weight, -8, 7, 16, False, False, hessian)


def test_no_warning_when_gptq_succeeds():
    weight, hessian = make_layer("random", 4, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ops.gptq_quantize(weight, hessian, -8, 7, True, rtn_fallback=True)


# ---------------------------------------------------------------------------
# Autograd, opcheck.


def test_parameter_weight_gives_results_without_grad():
    weight, hessian = make_layer("random", 4, 32)
    weight = torch.nn.Parameter(weight)
    for result in (ops.gptq_quantize(weight, hessian, -8, 7, True),
                   OPS.gptq_quantize(weight, hessian, -8, 7, True)):
        assert not any(t.requires_grad for t in result)


def test_hessian_of_inputs_that_require_grad():
    """Calibration inputs captured with autograd on: the Hessian is data, not a graph node."""
    hessian = torch.zeros(8, 8)
    version = hessian._version
    ops.gptq_accumulate_hessian(hessian, torch.randn(5, 8, requires_grad=True), 0)
    assert not hessian.requires_grad and hessian.grad_fn is None
    assert hessian._version > version  # in-place update seen by autograd's checks


@pytest.mark.parametrize("act_order,static_groups,group_size", [(False, False, None), (True, False, 16),
                                                                 (True, True, 16)])
def test_opcheck_quantize(device, act_order, static_groups, group_size):
    weight, hessian = make_layer("correlated", 6, 32, device=device)
    args = (weight, hessian, -8, 7, True, group_size, act_order, static_groups, 8, 0.01, 0, 0.8, False, "fc1")
    opcheck(OPS.gptq_quantize.default, args)


def test_opcheck_quantize_requires_grad(device):
    weight, hessian = make_layer("random", 6, 32, device=device)
    opcheck(OPS.gptq_quantize.default, (weight.requires_grad_(), hessian, 0, 15, False, 16))


def test_opcheck_accumulate_hessian(device):
    hessian = torch.zeros(12, 12, device=device)
    opcheck(OPS.gptq_accumulate_hessian.default, (hessian, torch.randn(3, 5, 12, device=device), 7))
    opcheck(OPS.gptq_accumulate_hessian.default, (hessian, torch.randn(4, 12, device=device).half(), 0))
