#!/usr/bin/env python
"""Speed of ``torchquant.ops.gptq_quantize`` against GPTQ in plain PyTorch.

For each layer shape (out x in) and with and without ``act_order``, in one
process on the same weight and Hessian, it runs torchquant's op and the
plain-PyTorch reference of the test suite (``tests/python/gptq_reference.py``:
the paper's algorithm column by column, lazy block updates, the paper's
``cholesky(cholesky_inverse(cholesky(H)), upper=True)``), both at 4 bits,
symmetric, groups of 128, block size 128, percdamp 0.01, and prints:

* **seconds**: one call each, wall clock (after ``torch.cuda.synchronize`` on
  CUDA), Hessian given;
* **ratio**: reference seconds / torchquant seconds (above 1: torchquant is
  faster);
* **loss**: ``tr((W - Q) H (W - Q)^T) / 2`` of each result (undamped H; the
  reference sums it in float32 products here, as torchquant does), and their
  relative difference, which must stay under 1% (the run stops otherwise);
* **peak MiB**: on CPU the largest increase of the resident set over the
  call, sampled every 2 ms from ``/proc/self/statm`` by a thread; on CUDA
  ``torch.cuda.max_memory_allocated`` above what was allocated before.

The Hessian comes from correlated inputs, as a layer of a transformer sees
them: ``samples`` rows of a low-rank mix of latent factors plus noise, with a
few high-magnitude channels, accumulated in batches with
``torchquant.ops.gptq_accumulate_hessian``.

    python benchmarks/bench_gptq.py                  # 4096x4096 and 11008x4096, CPU; slow (the reference)
    python benchmarks/bench_gptq.py --quick          # 512x512 and 1376x512: seconds
    python benchmarks/bench_gptq.py --device cuda --threads 8

Options: ``--device cpu|cuda``, ``--threads N`` (``torch.set_num_threads``),
``--samples N`` (calibration rows, default 4096), ``--no-reference`` (time
torchquant alone).
"""
from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from typing import Callable, List, NamedTuple, Tuple

import torch
from torch import Tensor

import torchquant
from torchquant import ops

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "python"))
from gptq_reference import gptq_reference  # noqa: E402

QUANT_MIN, QUANT_MAX = ops.quant_range(4)
GROUP_SIZE = 128
BLOCK_SIZE = 128
PERCDAMP = 0.01
LOSS_RTOL = 0.01


class Run(NamedTuple):
    seconds: float
    loss: float
    peak_mib: float


class PeakRss:
    """Largest resident-set increase while the ``with`` block runs (CPU)."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self._stop = threading.Event()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss())
            time.sleep(self.interval)

    def __enter__(self):
        self.base = self._rss()
        self.peak = self.base
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())

    @property
    def mib(self) -> float:
        return (self.peak - self.base) / 2**20


def measure(fn: Callable[[], Tensor], device: torch.device) -> Run:
    """Runs ``fn`` (returning the loss) once: seconds, loss, peak memory."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        loss = fn()
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        return Run(seconds, float(loss), (torch.cuda.max_memory_allocated() - base) / 2**20)
    with PeakRss() as rss:
        start = time.perf_counter()
        loss = fn()
        seconds = time.perf_counter() - start
    return Run(seconds, float(loss), rss.mib)


def calibration_hessian(in_features: int, samples: int, device: torch.device, seed: int = 0) -> Tensor:
    """Hessian of correlated inputs: low-rank latent factors + noise, a few outlier channels."""
    g = torch.Generator().manual_seed(seed)
    rank = max(8, in_features // 8)
    mixing = torch.randn(rank, in_features, generator=g) / rank**0.5
    channel_scale = torch.ones(in_features)
    outliers = torch.randperm(in_features, generator=g)[: max(1, in_features // 256)]
    channel_scale[outliers] = 20.0
    hessian = torch.zeros(in_features, in_features, device=device)
    seen = 0
    for start in range(0, samples, 512):
        n = min(512, samples - start)
        x = torch.randn(n, rank, generator=g) @ mixing + 0.3 * torch.randn(n, in_features, generator=g)
        seen = ops.gptq_accumulate_hessian(hessian, (x * channel_scale).to(device), seen)
    return hessian


def layer_weight(out_features: int, in_features: int, device: torch.device, seed: int = 1) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g) * 0.02
    w[torch.rand(out_features, in_features, generator=g) < 1e-3] *= 10  # a few large weights
    return w.to(device)


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small layers (512 inputs): a smoke test")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--samples", type=int, default=None, help="calibration rows (default 4096; 1024 quick)")
    parser.add_argument("--no-reference", action="store_true", help="time torchquant alone")
    args = parser.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available; running on the CPU")
        args.device = "cpu"
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    shapes: List[Tuple[int, int]] = [(512, 512), (1376, 512)] if args.quick else [(4096, 4096), (11008, 4096)]
    samples = args.samples or (1024 if args.quick else 4096)

    print(f"torch {torch.__version__}, torchquant {torchquant.__version__}, device {device}, "
          f"{torch.get_num_threads()} threads, {samples} calibration rows")
    print(f"4-bit symmetric [{QUANT_MIN}, {QUANT_MAX}], group {GROUP_SIZE}, block {BLOCK_SIZE}, "
          f"percdamp {PERCDAMP}\n")
    header = ("| layer (out x in) | act_order | torchquant s | reference s | ratio | loss torchquant | "
              "loss reference | loss rel. diff | peak MiB torchquant | peak MiB reference |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))

    hessians = {}
    for out_features, in_features in shapes:
        if in_features not in hessians:
            hessians[in_features] = calibration_hessian(in_features, samples, device)
        hessian = hessians[in_features]
        weight = layer_weight(out_features, in_features, device)
        for act_order in (False, True):
            options = dict(group_size=GROUP_SIZE, act_order=act_order, block_size=BLOCK_SIZE, percdamp=PERCDAMP)
            tq = measure(lambda: ops.gptq_quantize(weight, hessian, QUANT_MIN, QUANT_MAX, True, **options).loss,
                         device)
            row = f"| {out_features} x {in_features} | {act_order} | {tq.seconds:.2f} | "
            if args.no_reference:
                print(row + f"- | - | {tq.loss:.6g} | - | - | {tq.peak_mib:.0f} | - |", flush=True)
                continue
            ref = measure(lambda: gptq_reference(weight, hessian, QUANT_MIN, QUANT_MAX, True, **options,
                                                 loss_dtype=torch.float32).loss, device)
            rel = abs(tq.loss - ref.loss) / abs(ref.loss)
            print(row + f"{ref.seconds:.2f} | {ref.seconds / tq.seconds:.2f} | {tq.loss:.6g} | {ref.loss:.6g} | "
                  f"{rel:.2e} | {tq.peak_mib:.0f} | {ref.peak_mib:.0f} |", flush=True)
            if rel > LOSS_RTOL:
                raise SystemExit(f"losses differ by {rel:.2%} (more than {LOSS_RTOL:.0%}): stopping")


if __name__ == "__main__":
    main()
