#!/usr/bin/env python
"""Speed of ``torchquant.ops.fake_quantize`` against the alternatives.

For each granularity and dtype, in one process, it times:

* torchquant, eager and under ``torch.compile``;
* PyTorch's own fake-quant ops (``torch._fake_quantize_learnable_*`` for
  training, ``torch.fake_quantize_per_*_affine`` for inference), where they
  exist and accept the dtype;
* the same math written with plain PyTorch tensor ops, eager and under
  ``torch.compile`` (the straight-through tricks below make autograd produce
  the LSQ+ gradients).

Training rows time forward + backward with input, scale and zero-point all
requiring grad; inference rows time the forward alone under ``no_grad``.
Every candidate's forward output (and, for training rows, its gradients) is
checked against torchquant before it is timed, so a wrong implementation
stops the run instead of producing a number.

    python benchmarks/bench_fake_quant.py            # 4096 x 4096, CPU
    python benchmarks/bench_fake_quant.py --quick    # smoke test, seconds

On CPU, first-touch page faults of fresh 64 MiB outputs can cost more than the
arithmetic. torchquant's kernels advise huge pages for their outputs; run with
THP_MEM_ALLOC_ENABLE=1 in the environment to give every implementation huge
pages and compare the arithmetic alone.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import math
import os
import statistics
import sys
import time
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

import torchquant
from torchquant.ops import fake_quantize, quant_range

QUANT_MIN, QUANT_MAX = quant_range(8)
GROUP_SIZE = 128

# Bytes an ideal kernel moves per element, in units of the input element size:
# the forward reads x and writes y; the backward reads x and dy and writes dx.
FORWARD_TRAFFIC = 2
FORWARD_BACKWARD_TRAFFIC = 5


# ---------------------------------------------------------------------------
# The math in plain PyTorch.

def _round_ste(t: Tensor) -> Tensor:
    """round(t) in the forward, identity in the backward (straight-through).

    The value is exactly round(t): ``round(t) - t`` is exact for floats, so
    adding ``t`` back restores ``round(t)`` without error.
    """
    return (t.round() - t).detach() + t


def _scale_grad(t: Tensor, factor: float) -> Tensor:
    """``t`` in the forward; its gradient is multiplied by ``factor``.

    ``t - t.detach()`` is exactly zero, so the value is ``t`` to the bit.
    """
    return t.detach() + (t - t.detach()) * factor


def plain_fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, quant_min: int, quant_max: int,
                        axis: Optional[int] = None, group_size: Optional[int] = None,
                        grad_factor: float = 1.0) -> Tensor:
    """``torchquant.ops.fake_quantize`` with PyTorch tensor ops.

    Autograd gives the same gradients: straight-through for ``x`` (zero where
    the code is clipped, as ``clamp`` passes no gradient there) and LSQ+ for
    ``scale`` and ``zero_point`` (scaled by ``grad_factor``). The forward
    multiplies by the reciprocal of the scale, as torchquant does, so the
    outputs agree to the bit.
    """
    scale = _scale_grad(scale, grad_factor)
    zero = _round_ste(_scale_grad(zero_point, grad_factor))
    xf = x.float()
    if group_size is not None:
        xf = xf.unflatten(-1, (-1, group_size))
        scale, zero = scale.unsqueeze(-1), zero.unsqueeze(-1)
    elif axis is not None:
        shape = [1] * x.dim()
        shape[axis] = -1
        scale, zero = scale.view(shape), zero.view(shape)
    code = torch.clamp(_round_ste(xf * scale.reciprocal()) + zero, quant_min, quant_max)
    return ((code - zero) * scale).reshape(x.shape).to(x.dtype)


# ---------------------------------------------------------------------------
# What is benchmarked.

@dataclasses.dataclass(frozen=True)
class Granularity:
    label: str
    axis: Optional[int] = None
    group_size: Optional[int] = None

    def param_shape(self, input_shape: Sequence[int]) -> Tuple[int, ...]:
        if self.group_size is not None:
            return tuple(input_shape[:-1]) + (input_shape[-1] // self.group_size,)
        if self.axis is not None:
            return (input_shape[self.axis],)
        return (1,)


PER_TENSOR = Granularity("per-tensor")
PER_CHANNEL = Granularity("per-channel (axis 0)", axis=0)
PER_GROUP = Granularity(f"per-group ({GROUP_SIZE})", group_size=GROUP_SIZE)


@dataclasses.dataclass
class Problem:
    """Inputs of one case.

    The zero-points are whole and non-negative, the values on which
    PyTorch's ops agree with torchquant: they round a zero-point half away
    from zero, and the backward of the learnable per-tensor op truncates
    ``zero_point + 0.5`` toward zero, one step off for negative zero-points.
    """
    granularity: Granularity
    x: Tensor
    scale: Tensor
    zero_point: Tensor
    grad_factor: float
    grad_output: Optional[Tensor]  # None for inference cases

    @property
    def training(self) -> bool:
        return self.grad_output is not None

    def args(self) -> Tuple[Tensor, Tensor, Tensor]:
        return self.x, self.scale, self.zero_point

    def bytes_moved(self) -> int:
        traffic = FORWARD_BACKWARD_TRAFFIC if self.training else FORWARD_TRAFFIC
        return traffic * self.x.numel() * self.x.element_size()


def _absmax(x: Tensor, granularity: Granularity) -> Tensor:
    """max |x| over each tensor, channel or group."""
    magnitude = x.detach().float().abs()
    if granularity.group_size is not None:
        return magnitude.unflatten(-1, (-1, granularity.group_size)).amax(dim=-1)
    if granularity.axis is not None:
        return magnitude.amax(dim=[d for d in range(x.dim()) if d != granularity.axis])
    return magnitude.amax()


def make_problem(granularity: Granularity, size: int, dtype: torch.dtype, device: torch.device,
                 training: bool) -> Problem:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    shape = granularity.param_shape(x.shape)
    # Scales that put 80% of each max |x| on the top code: the largest
    # elements clip, so every gradient branch runs.
    scale = (_absmax(x, granularity).reshape(shape) * 0.8 / QUANT_MAX).clamp_min(1e-6)
    zero_point = torch.randint(0, 9, shape, generator=gen).float().to(device)
    grad_factor = 1.0 / math.sqrt(x.numel() / scale.numel() * QUANT_MAX)  # LSQ's gradient scale
    grad_output = torch.randn(x.shape, generator=gen).to(device=device, dtype=dtype) if training else None
    for t in (x, scale, zero_point):
        t.requires_grad_(training)
    return Problem(granularity, x, scale, zero_point, grad_factor, grad_output)


# A candidate maps (x, scale, zero_point) to the fake-quantized x.
FakeQuantFn = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclasses.dataclass
class Candidate:
    name: str
    build: Callable[[Problem], FakeQuantFn]
    # PyTorch's ops reject some dtypes; such a failure is reported as "n/a".
    may_reject_dtype: bool = False
    # How far its scale and zero-point gradients may stray from torchquant's,
    # relative to their norm.
    qparam_grad_rtol: float = 1e-3
    # The fraction of elements (rounded up) it may clip differently.
    clip_mismatch_fraction: float = 0.0


def _torchquant(p: Problem) -> FakeQuantFn:
    g = p.granularity
    return functools.partial(fake_quantize, quant_min=QUANT_MIN, quant_max=QUANT_MAX, axis=g.axis,
                             group_size=g.group_size, grad_factor=p.grad_factor)


def _plain(p: Problem) -> FakeQuantFn:
    g = p.granularity
    return functools.partial(plain_fake_quantize, quant_min=QUANT_MIN, quant_max=QUANT_MAX, axis=g.axis,
                             group_size=g.group_size, grad_factor=p.grad_factor)


# The torch.compile backend; --quick swaps inductor for aot_eager, which
# traces forward and backward the same way but generates no code, so the smoke
# test exercises the compiled path without minutes of compilation.
COMPILE_BACKEND = "inductor"


def _compiled(build: Callable[[Problem], FakeQuantFn]) -> Callable[[Problem], FakeQuantFn]:
    def build_compiled(p: Problem) -> FakeQuantFn:
        # A fresh Dynamo state per case: the cases share code objects, and
        # piling their graphs onto one would hit the recompile limit, after
        # which Dynamo silently runs eager.
        torch._dynamo.reset()
        return torch.compile(build(p), backend=COMPILE_BACKEND, dynamic=False)
    return build_compiled


def _pytorch_learnable(p: Problem) -> FakeQuantFn:
    g = p.granularity
    if g.axis is None:
        return lambda x, s, z: torch._fake_quantize_learnable_per_tensor_affine(
            x, s, z, QUANT_MIN, QUANT_MAX, p.grad_factor)
    return lambda x, s, z: torch._fake_quantize_learnable_per_channel_affine(
        x, s, z, g.axis, QUANT_MIN, QUANT_MAX, p.grad_factor)


def _pytorch_inference(p: Problem) -> FakeQuantFn:
    g = p.granularity
    # Integer zero-points, prepared once outside the timed call.
    zero_int = p.zero_point.detach().to(torch.int32)
    if g.axis is None:
        scale0, zero0 = p.scale.detach().reshape(()), zero_int.reshape(())
        return lambda x, s, z: torch.fake_quantize_per_tensor_affine(x, scale0, zero0, QUANT_MIN, QUANT_MAX)
    return lambda x, s, z: torch.fake_quantize_per_channel_affine(x, s, zero_int, g.axis, QUANT_MIN, QUANT_MAX)


TORCHQUANT = Candidate("torchquant", _torchquant)
TORCHQUANT_COMPILED = Candidate("torchquant + torch.compile", _compiled(_torchquant))
PLAIN = Candidate("plain PyTorch", _plain)
PLAIN_COMPILED = Candidate("plain PyTorch + torch.compile", _compiled(_plain))
# PyTorch's learnable ops agree with torchquant less closely in the backward:
# they round zero_point + x / scale as one value, so an element with an exact
# tie x / scale = k + 0.5 at the clipping boundary can land on the other side
# of it (a few in 16M elements), and they round each element's scale and
# zero-point term to the input dtype before summing (about 2% of the norm in
# bf16).
PYTORCH_LEARNABLE = Candidate("torch._fake_quantize_learnable_*", _pytorch_learnable, may_reject_dtype=True,
                              qparam_grad_rtol=5e-2, clip_mismatch_fraction=1e-6)
PYTORCH_INFERENCE = Candidate("torch.fake_quantize_per_*_affine", _pytorch_inference, may_reject_dtype=True)


@dataclasses.dataclass(frozen=True)
class Case:
    granularity: Granularity
    training: bool
    candidates: Tuple[Candidate, ...]  # the first is torchquant, the baseline of the ratios

    @property
    def label(self) -> str:
        return ("fwd+bwd " if self.training else "fwd ") + self.granularity.label


CASES = (
    Case(PER_TENSOR, True, (TORCHQUANT, TORCHQUANT_COMPILED, PYTORCH_LEARNABLE, PLAIN, PLAIN_COMPILED)),
    Case(PER_CHANNEL, True, (TORCHQUANT, TORCHQUANT_COMPILED, PYTORCH_LEARNABLE, PLAIN, PLAIN_COMPILED)),
    Case(PER_GROUP, True, (TORCHQUANT, TORCHQUANT_COMPILED, PLAIN, PLAIN_COMPILED)),
    Case(PER_TENSOR, False, (TORCHQUANT, PYTORCH_INFERENCE, PLAIN, PLAIN_COMPILED)),
    Case(PER_CHANNEL, False, (TORCHQUANT, PYTORCH_INFERENCE, PLAIN, PLAIN_COMPILED)),
)
DTYPES = (torch.float32, torch.bfloat16)


# ---------------------------------------------------------------------------
# Running a candidate: checked once, then timed.

def make_step(fn: FakeQuantFn, p: Problem) -> Callable[[], Tuple[Tensor, ...]]:
    """One timed call: the forward, plus the gradients of all three inputs when training."""
    if p.training:
        def step() -> Tuple[Tensor, ...]:
            y = fn(*p.args())
            return (y,) + torch.autograd.grad(y, p.args(), p.grad_output)
    else:
        def step() -> Tuple[Tensor, ...]:
            with torch.no_grad():
                return (fn(*p.args()),)
    return step


def check_agrees(name: str, got: Sequence[Tensor], want: Sequence[Tensor], candidate: Candidate) -> None:
    """Raise AssertionError unless a candidate computed what torchquant did.

    The forward must match to the bit. The input gradient must be zero
    (clipped) at the same elements, but for the candidate's allowance, and
    otherwise equal up to rounding: plain PyTorch's autograd forms it as
    dy * scale * (1 / scale). The scale and zero-point gradients are sums over
    many elements, added in an order that differs between implementations, so
    they need only agree within the candidate's tolerance of their norm.
    """
    def fail(label: str, detail: str) -> None:
        raise AssertionError(f"{name}: {label} differs from torchquant: {detail}")

    y, y_ref = got[0].detach().float(), want[0].detach().float()
    if not torch.equal(y, y_ref):
        fail("output", f"{int((y != y_ref).sum())} of {y.numel()} elements, max |diff| "
                       f"{float((y - y_ref).abs().max()):.3g}")
    if len(want) == 1:
        return
    dx, dx_ref = got[1].detach(), want[1].detach()
    clipped_differently = (dx == 0) != (dx_ref == 0)
    allowed = math.ceil(candidate.clip_mismatch_fraction * dx.numel())
    if int(clipped_differently.sum()) > allowed:
        fail("grad input", f"clipped at {int(clipped_differently.sum())} different elements (allowed {allowed})")
    same_clip = ~clipped_differently
    try:
        torch.testing.assert_close(dx[same_clip], dx_ref[same_clip])
    except AssertionError as e:
        fail("grad input", str(e))
    for label, g, w in zip(("grad scale", "grad zero_point"), got[2:], want[2:]):
        err, norm = float((g - w).detach().norm()), float(w.detach().norm())
        if not err <= candidate.qparam_grad_rtol * norm + 1e-6:
            fail(label, f"|diff| {err:.3g}, |torchquant| {norm:.3g}")


def median_ms(step: Callable[[], object], warmup: int, repeats: int, sync: Callable[[], None]) -> float:
    for _ in range(warmup):
        step()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


@dataclasses.dataclass
class Row:
    case: str
    dtype: torch.dtype
    implementation: str
    ms: Optional[float]  # None: the implementation does not support the case
    bytes_moved: int
    note: str = ""


def run_case(case: Case, dtype: torch.dtype, args: argparse.Namespace, device: torch.device,
             sync: Callable[[], None]) -> List[Row]:
    p = make_problem(case.granularity, args.size, dtype, device, case.training)
    rows: List[Row] = []
    reference: Optional[Tuple[Tensor, ...]] = None
    for candidate in case.candidates:
        started = time.perf_counter()
        step = make_step(candidate.build(p), p)
        try:
            result = step()  # also compiles, for the compiled candidates
        except (RuntimeError, NotImplementedError) as e:
            if not candidate.may_reject_dtype:
                raise
            rows.append(Row(case.label, dtype, candidate.name, None, p.bytes_moved(),
                            note=str(e).splitlines()[0]))
            continue
        if reference is None:
            reference = tuple(t.detach() for t in result)
        else:
            check_agrees(f"{case.label}, {dtype_name(dtype)}, {candidate.name}", result, reference, candidate)
        del result
        ms = median_ms(step, args.warmup, args.repeats, sync)
        rows.append(Row(case.label, dtype, candidate.name, ms, p.bytes_moved()))
        print(f"  {case.label}, {dtype_name(dtype)}, {candidate.name}: {ms:.2f} ms "
              f"({time.perf_counter() - started:.1f} s with checks and compilation)", file=sys.stderr, flush=True)
        del step
        gc.collect()
    return rows


# ---------------------------------------------------------------------------
# Report.

def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def torchquant_cpu_isa() -> str:
    # Reported only where the extension exposes it.
    probe = getattr(torchquant._C, "cpu_kernel_isa", None)
    return probe() if callable(probe) else "not exposed"


def print_header(args: argparse.Namespace, device: torch.device) -> None:
    print(f"torch {torch.__version__}, torchquant {torchquant.__version__}, device {device}")
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(device)}")
    else:
        print(f"CPU: {cpu_model()}, threads: {torch.get_num_threads()}, "
              f"PyTorch CPU capability: {torch.backends.cpu.get_cpu_capability()}, "
              f"torchquant CPU kernels: {torchquant_cpu_isa()}")
    preload = os.environ.get("LD_PRELOAD")
    if preload:  # an allocator that keeps freed memory changes what a call costs
        print(f"LD_PRELOAD={preload} MALLOC_CONF={os.environ.get('MALLOC_CONF', '')}")
    if device.type == "cpu":
        # torchquant's CPU kernels back their large outputs with huge pages;
        # THP_MEM_ALLOC_ENABLE=1 gives every implementation the same.
        thp = os.environ.get("THP_MEM_ALLOC_ENABLE") == "1"
        print("huge pages: " + ("every allocation (THP_MEM_ALLOC_ENABLE=1)" if thp
                                else "torchquant's outputs only (set THP_MEM_ALLOC_ENABLE=1 for all)"))
    print(f"input {args.size} x {args.size}, int8 grid [{QUANT_MIN}, {QUANT_MAX}], "
          f"median of {args.repeats} after {args.warmup} warm-up, torch.compile backend {COMPILE_BACKEND}")
    print()


def print_table(rows: Sequence[Row]) -> None:
    print("| case | dtype | implementation | time (ms) | ratio vs torchquant | effective GB/s |")
    print("|---|---|---|---:|---:|---:|")
    baseline: Optional[float] = None
    notes: List[str] = []
    for row in rows:
        if row.implementation == TORCHQUANT.name:
            baseline = row.ms
        if row.ms is None:
            notes.append(f"{row.case}, {dtype_name(row.dtype)}, {row.implementation}: {row.note}")
            cells = ("n/a", "n/a", "n/a")
        else:
            cells = (f"{row.ms:.2f}", f"{row.ms / baseline:.2f}", f"{row.bytes_moved / row.ms / 1e6:.1f}")
        print(f"| {row.case} | {dtype_name(row.dtype)} | {row.implementation} | " + " | ".join(cells) + " |")
    for note in notes:
        print(f"\nn/a: {note}")


# ---------------------------------------------------------------------------

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda runs on the GPU when one is available, else falls back to cpu")
    parser.add_argument("--size", type=int, default=4096, help="the input is size x size (default 4096)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per row; the median is shown")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls per row after the checked one (the first rows of a process also warm the kernel's pool of huge pages)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: unchanged)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: a {GROUP_SIZE} x {GROUP_SIZE} input, 2 repeats, and "
                             "torch.compile with the aot_eager backend (no code generation)")
    args = parser.parse_args(argv)
    if args.quick:
        # Below PyTorch's parallel grain, so each op runs on one thread and a
        # busy machine cannot stall it at thread barriers.
        args.size, args.repeats, args.warmup = GROUP_SIZE, 2, 1
    if args.size <= 0 or args.size % GROUP_SIZE:
        parser.error(f"--size must be a positive multiple of the group size {GROUP_SIZE}, got {args.size}")
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be at least 1 and --warmup at least 0")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> None:
    global COMPILE_BACKEND
    args = parse_args(argv)
    if args.quick:
        COMPILE_BACKEND = "aot_eager"
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    sync: Callable[[], None] = lambda: None
    if args.device == "cuda":
        if torch.cuda.is_available():
            device, sync = torch.device("cuda"), torch.cuda.synchronize
        else:
            print("CUDA is not available; running on cpu", file=sys.stderr)
    print_header(args, device)
    start = time.perf_counter()
    rows: List[Row] = []
    for case in CASES:
        for dtype in DTYPES:
            rows.extend(run_case(case, dtype, args, device, sync))
    print_table(rows)
    print(f"\n(total {time.perf_counter() - start:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
