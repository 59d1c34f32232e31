#!/usr/bin/env bash
# One-shot GPU check of torchquant's CUDA run-time kernels, for a fresh
# H100 / H200 machine with the repository checked out and a CUDA build of
# torch already installed (no network assumed). From the repository root:
#
#     bash scripts/gpu_check.sh            # or: PYTHON=/path/to/python bash scripts/gpu_check.sh
#
# Stages (each under `timeout`, about 8 minutes in all):
#   0. environment: GPU, torch / CUDA versions, nvcc, ninja           (seconds)
#   1. build the extension in place with the CUDA kernels            (<= 270 s)
#   2. tests/python/test_runtime_cuda.py                             (<= 110 s)
#   3. a micro-benchmark of the GEMV kernels at M = 1, CUDA graphs   (<= 40 s)
#   4. benchmarks/bench_linear.py --device cuda (short timing budget) (<= 130 s)
# Everything is printed; the exit status is that of the first failing stage
# (a later stage still runs where it can, so one run shows as much as possible).
set -u
[ -f setup.py ] && [ -d csrc/cuda ] || { echo "run from the repository root (no setup.py / csrc/cuda in $(pwd))"; exit 2; }

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x .venv/bin/python ] && .venv/bin/python -c 'import torch, sys; sys.exit(torch.version.cuda is None)' 2>/dev/null; then
    PY=.venv/bin/python
  else
    PY=python3
  fi
fi
STATUS=0
fail() { echo "!!! $1"; [ "$STATUS" -eq 0 ] && STATUS="$2"; }
t0=$(date +%s)
stamp() { echo "=== [$(( $(date +%s) - t0 )) s] $*"; }

stamp "0. environment ($PY)"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,clocks.max.mem --format=csv 2>&1 | head -3
"$PY" - <<'EOF' || { echo "!!! torch with CUDA is needed"; exit 3; }
import sys, torch
print("torch", torch.__version__, "| built for CUDA", torch.version.cuda, "| cuda available", torch.cuda.is_available())
if not torch.cuda.is_available():
    sys.exit(1)
p = torch.cuda.get_device_properties(0)
print("device", p.name, f"sm_{p.major}{p.minor}", p.multi_processor_count, "SMs,", p.total_memory >> 30, "GiB")
EOF
ARCH=$("$PY" -c 'import torch; p = torch.cuda.get_device_properties(0); print(f"{p.major}.{p.minor}")')
NVCC=$(command -v nvcc || echo "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc")
if [ -x "$NVCC" ]; then "$NVCC" --version | tail -2; else echo "!!! nvcc not found: setup.py would build without CUDA kernels"; fi
"$PY" -c 'import ninja' 2>/dev/null || command -v ninja >/dev/null || echo "!!! ninja not found: the build runs one file at a time (slow)"

stamp "1. build (TORCH_CUDA_ARCH_LIST=$ARCH, MAX_JOBS=$(nproc))"
export TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)" TORCHQUANT_CUDA=auto
timeout 270 "$PY" setup.py build_ext --inplace > /tmp/tq_build.log 2>&1 || fail "build failed or timed out (log: /tmp/tq_build.log)" 4
grep -iE "warning|error" /tmp/tq_build.log | grep -v "^Warning: .*is deprecated" | head -40
tail -5 /tmp/tq_build.log
"$PY" - <<'EOF' || fail "the extension has no CUDA kernels for the run-time ops" 5
import sys, torch, torchquant  # noqa: F401
ops = ["pack_weight", "unpack_weight", "dequantize_weight", "quantized_linear", "quantized_linear_grad_input",
       "w8a8_linear"]
missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(f"torchquant::{op}", "CUDA")]
print("CUDA kernels missing:", missing or "none")
sys.exit(1 if missing else 0)
EOF

stamp "2. tests/python/test_runtime_cuda.py"
OMP_NUM_THREADS=8 timeout 110 "$PY" -m pytest -q -rfs --durations=8 -p no:cacheprovider \
  tests/python/test_runtime_cuda.py 2>&1 | tail -60
[ "${PIPESTATUS[0]}" -eq 0 ] || fail "CUDA tests failed or timed out" 6

stamp "3. GEMV micro-benchmark (M = 1, 16 distinct layers per CUDA graph replay)"
timeout 40 "$PY" - <<'EOF' || fail "micro-benchmark failed" 7
import torch
ops = torch.ops.torchquant
dev = "cuda"
torch.manual_seed(0)

def gbps(make_call, nbytes, layers=16, replays=20):
    calls = [make_call(i) for i in range(layers)]
    for c in calls:  # warm up (allocations, autotuning of nothing)
        c()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls:
            c()
        with torch.cuda.graph(g, stream=s):
            for c in calls:
                c()
    torch.cuda.current_stream().wait_stream(s)
    g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    sec = start.elapsed_time(end) / 1e3 / (replays * layers)
    return nbytes / sec / 1e9, sec * 1e6

src = torch.empty(1 << 28, dtype=torch.uint8, device=dev)
dst = torch.empty_like(src)
copy_gbps, _ = gbps(lambda i: (lambda: dst.copy_(src)), 2 * src.numel(), layers=4, replays=10)
print(f"device-to-device copy: {copy_gbps:7.0f} GB/s (read + write)")
for n, k in ((4096, 4096), (11008, 4096)):
    for bits, g, dtype in ((4, 128, torch.float32), (4, 128, torch.bfloat16), (3, 128, torch.float16),
                           (2, 128, torch.float32), (8, k, torch.float32)):
        rb = {2: k // 4, 3: k * 3 // 8, 4: k // 2, 8: k}[bits]
        layers = [(torch.randint(0, 256, (n, rb), dtype=torch.uint8, device=dev),
                   torch.rand(n, k // g, device=dev) * 0.01, torch.randint(0, 1 << bits, (n, k // g), device=dev).float())
                  for _ in range(16)]
        x = torch.randn(1, k, device=dev, dtype=dtype)
        nbytes = n * rb + 8 * n * (k // g)
        rate, us = gbps(lambda i: (lambda: ops.quantized_linear(x, *layers[i], bits, k)), nbytes)
        print(f"W{bits} g{g:<5} {n:5d}x{k} M=1 {str(dtype):15s} {us:7.1f} us  {rate:6.0f} GB/s "
              f"({100 * rate / copy_gbps:3.0f}% of copy)")
    w8 = [(torch.randint(0, 256, (n, k), dtype=torch.uint8, device=dev), torch.rand(n, 1, device=dev) * 0.01)
          for _ in range(16)]
    x = torch.randn(1, k, device=dev)
    rate, us = gbps(lambda i: (lambda: ops.w8a8_linear(x, *w8[i])), n * k + 4 * n)
    print(f"W8A8 dynamic     {n:5d}x{k} M=1 torch.float32   {us:7.1f} us  {rate:6.0f} GB/s "
          f"({100 * rate / copy_gbps:3.0f}% of copy)")
EOF

stamp "4. benchmarks/bench_linear.py --device cuda"
if [ -f benchmarks/bench_linear.py ]; then
  OMP_NUM_THREADS=8 timeout 130 "$PY" benchmarks/bench_linear.py --device cuda --max-seconds 1 --repeat 3 2>&1 | tail -80
  [ "${PIPESTATUS[0]}" -eq 0 ] || fail "bench_linear.py failed or timed out" 8
else
  echo "benchmarks/bench_linear.py not found"
fi

stamp "done, status $STATUS"
exit "$STATUS"
