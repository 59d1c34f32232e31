"""The baseline and the AVX2 builds of the CPU kernels give identical bits.

The kernel set is chosen once per process, so the baseline build runs in a
subprocess with TORCHQUANT_CPU_ISA=default and both results are compared here.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import torchquant  # noqa: F401

SCRIPT = textwrap.dedent(
    """
    import sys, torch, torchquant
    torch.manual_seed(0)
    cases = [
        (torch.randn(33, 70) * 3, torch.tensor([0.037]), torch.tensor([3.0]), {}),
        (torch.randn(33, 70) * 3, torch.rand(33) * 0.1 + 0.01, torch.randint(0, 9, (33,)).float(), {"axis": 0}),
        (torch.randn(5, 33, 7) * 3, torch.rand(7) * 0.1 + 0.01, torch.zeros(7), {"axis": -1}),
        (torch.randn(12, 96) * 3, torch.rand(12, 3) * 0.1 + 0.01, torch.randint(0, 9, (12, 3)).float(),
         {"group_size": 32}),
    ]
    out = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for x, s, z, kw in cases:
            x = x.to(dtype)
            dy = torch.randn(x.shape).to(dtype)
            y = torchquant.ops.fake_quantize(x, s, z, 0, 15, **kw)
            dx, ds, dz = torchquant.ops.fake_quantize_learnable_backward(dy, x, s, z, 0, 15, grad_factor=0.3, **kw)
            ste = torchquant.ops.fake_quantize_backward(dy, x, s, z, 0, 15, **kw)
            out.append([y, dx, ds, dz, ste])
    torch.save(out, sys.argv[1])
    """
)


def run_with_isa(tmp_path, isa):
    path = tmp_path / f"{isa or 'native'}.pt"
    env = dict(os.environ)
    env.pop("TORCHQUANT_CPU_ISA", None)
    if isa:
        env["TORCHQUANT_CPU_ISA"] = isa
    subprocess.run([sys.executable, "-c", SCRIPT, str(path)], check=True, env=env, timeout=300)
    return torch.load(path)


@pytest.mark.skipif(os.uname().machine not in ("x86_64", "AMD64"), reason="AVX2 kernels exist on x86-64 only")
def test_baseline_and_avx2_kernels_agree_bitwise(tmp_path):
    native = run_with_isa(tmp_path, None)
    baseline = run_with_isa(tmp_path, "default")
    for case_native, case_baseline in zip(native, baseline):
        y, dx, dscale, dzero, ste = case_native
        y_b, dx_b, dscale_b, dzero_b, ste_b = case_baseline
        assert torch.equal(y, y_b)
        assert torch.equal(dx, dx_b)
        assert torch.equal(ste, ste_b)
        # Sums: the partial-sum layout is fixed by the shape, but the vector
        # width changes the order of additions inside each piece.
        torch.testing.assert_close(dscale, dscale_b, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(dzero, dzero_b, rtol=1e-6, atol=1e-5)
