"""Every CPU build of the weight-only kernels (baseline, AVX2, AVX-512) and
both paths (GEMV, panels) against the reference.

The instruction set is chosen once per process, so each one runs in a
subprocess with TORCHQUANT_CPU_ISA; TORCHQUANT_GEMV_MAX_M moves the GEMV /
panel threshold so both paths see the same shapes.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

SCRIPT = textwrap.dedent(
    """
    import torch
    import runtime_reference as ref
    from test_runtime_linear import _check_linear
    torch.set_num_threads(2)
    for bits in (2, 3, 4, 8):
        for k, groups in ((64, 2), (100, 1), (96, 2), (120, 3), (48, 3)):
            w = ref.make_weight(40, k, groups, bits, seed=bits + k)
            for m in (1, 5, 9):
                _check_linear(w, m, torch.float32, bias=True, perm=m == 5)
            _check_linear(w, 2, torch.bfloat16, bias=False, perm=True)
    for lut_groups in (1, 2):
        w = ref.make_weight(40, 128, lut_groups, 4, lut=True)
        for m in (1, 8):
            _check_linear(w, m, torch.float16, bias=True, perm=True)
    print("ok")
    """
)


def _run(isa, gemv_max_m):
    env = dict(os.environ)
    env["PYTHONPATH"] = HERE + os.pathsep + env.get("PYTHONPATH", "")
    env["TORCHQUANT_GEMV_MAX_M"] = str(gemv_max_m)
    env.pop("TORCHQUANT_CPU_ISA", None)
    if isa is not None:
        env["TORCHQUANT_CPU_ISA"] = isa
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("ok")


X86 = os.uname().machine in ("x86_64", "AMD64")


@pytest.mark.parametrize("isa", [None, "default", pytest.param("avx2", marks=pytest.mark.skipif(
    not X86, reason="AVX2 kernels exist on x86-64 only"))])
@pytest.mark.parametrize("gemv_max_m", [0, 16])
def test_isa_and_path(isa, gemv_max_m):
    # gemv_max_m = 0: everything through the panels; 16: everything through the GEMV.
    _run(isa, gemv_max_m)
