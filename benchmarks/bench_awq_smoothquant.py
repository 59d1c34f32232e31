#!/usr/bin/env python
"""Speed of torchquant's AWQ and SmoothQuant ops and passes against plain-PyTorch references.

Everything runs in one process, on the same inputs, with the references of
the test suite (``tests/python/awq_reference.py``, AutoAWQ's search step by
step; ``tests/python/smoothquant_reference.py``, the paper's formulas).

**Synthetic 4096-wide block** (``--width``, ``--ffn``, ``--tokens``): q, k, v
``width x width`` reading one LayerNorm output, an MLP ``width -> ffn ->
width``, ``tokens`` calibration rows of correlated activations with a few
outlier channels (the MLP's intermediate activations are drawn directly,
non-negative, with their own outliers). One row per op:

* ``awq_search_scales`` over q, k, v (4-bit asymmetric, groups of 128, grid
  20); the reference evaluates its objective with float32 products, as
  AutoAWQ runs it;
* ``awq_search_clip`` on q's weight: the reference holds a float64
  ``[rows, tokens, in]`` tensor per candidate, so both are timed on the
  first ``--clip-rows`` output rows (each row's search is independent of the
  others); a second row times torchquant alone on the whole layer;
* ``smoothquant_scales`` (alpha 0.5) for q, k, v and for the MLP's down
  projection; the reference computes in float64;
* ``smoothquant_fold_`` of the LayerNorm into q, k, v and of up into down;
  the reference returns folded copies, the op folds in place;
* ``quantize_per_token`` of the block's input and of the MLP's intermediate
  activations (int8 grid ``[-128, 127]``).

Before its row is printed, each result is checked against the reference's:
the run stops on a disagreement. Checked: the scale search's chosen alpha
(or, on a near-tie, a reference loss within 1e-4 of the best) and its scales
against that alpha's candidate; that every clip range is one of the
reference's candidates, with an error within 1e-5 of the best one; the
smoothing factors to 2e-6 relative; the folded tensors and the codes and
scales of the per-token quantization bit for bit.

**all-MiniLM-L6-v2** (``examples/minilm.py``, offline; ``--calibration``
sentences of the Python Language Reference): whole passes, each on a fresh
copy of the fp32 model, with torchquant's ops and again with the
references plugged in their place (``torchquant.ops.<name>`` replaced for
the duration of the pass, which calls the ops through that module):

* ``torchquant.ptq.awq``, 4-bit asymmetric, groups of 128, with clipping: the
  reference scale search; with ``--reference-clip`` the reference clip
  search too (slow: its float64 temporaries make it about two minutes per
  MiniLM block on a busy 2-core machine);
* ``torchquant.ptq.smoothquant``, alpha 0.5, W8A8 errors with a static
  per-tensor activation scale (the default) and with per-token scales (which
  calls ``quantize_per_token``): the reference scales and fold (and
  per-token quantization).

Columns:

* **seconds**: wall clock (after ``torch.cuda.synchronize`` on CUDA); ops
  below 1 s are the median of ``--repeats`` calls after one untimed checked
  call, longer ones one call;
* **ratio**: reference seconds / torchquant seconds (above 1: torchquant is
  faster);
* **ops s (share: each)**: for a pass, the time spent inside the ops that
  the reference run replaces (for AWQ also the fold its scaling calls), its
  share of the pass, and each op's seconds;
* **agreement**: what the check compared (see above); for a pass, whether
  the two runs chose the same alpha per group (AWQ) or the largest relative
  difference of the smoothing factors (SmoothQuant);
* **peak MiB**: on CPU the largest increase of the resident set over a
  call, sampled every 2 ms from ``/proc/self/statm`` after glibc's
  ``malloc_trim`` has returned earlier rows' freed memory; on CUDA
  ``torch.cuda.max_memory_allocated`` above what was allocated before.

    python benchmarks/bench_awq_smoothquant.py                 # 4096-wide block + MiniLM: a few minutes on 2 cores
    python benchmarks/bench_awq_smoothquant.py --quick         # 256-wide block, MiniLM's first block: seconds
    python benchmarks/bench_awq_smoothquant.py --threads 1 --reference-clip

Options: ``--device cpu|cuda``, ``--threads N`` (``torch.set_num_threads``),
``--repeats N``, ``--no-reference`` (torchquant alone), ``--no-model`` (skip
MiniLM), ``--reference-clip``, ``--width``, ``--ffn``, ``--tokens``,
``--clip-rows``, ``--calibration``.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import os
import statistics
import sys
import time
from typing import Any, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

import torchquant
from torchquant import ops
from torchquant.spec import QuantSpec

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "python"))
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
import awq_reference as awq_ref  # noqa: E402
import smoothquant_reference as sq_ref  # noqa: E402
from bench_gptq import PeakRss, layer_weight  # noqa: E402

BITS = 4
GROUP_SIZE = 128
QUANT_MIN, QUANT_MAX = ops.quant_range(BITS, signed=False)  # asymmetric: [0, 15]
SYMMETRIC = False
GRID = 20
ALPHA = 0.5
INT8_MIN, INT8_MAX = ops.quant_range(8)
BLOCKS = "encoder.layer"
CALIBRATION_BATCH_SIZE = 16

SCALES_TIE_RTOL = 1e-4  # float32 losses summed in different orders
CLIP_TIE_RTOL = 1e-5
SMOOTHING_RTOL = 2e-6  # the float32 op against the float64 reference
ONE_CALL_ABOVE_S = 1.0  # slower ops are timed once


# ---- timing -----------------------------------------------------------------------------------

class Timing(NamedTuple):
    seconds: float
    peak_mib: float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _release_freed_memory() -> None:
    """Returns what glibc keeps of freed tensors to the system, so that a resident-set peak counts what the
    next call allocates, not only what it cannot take from memory an earlier row left behind."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


@contextlib.contextmanager
def peak_memory(device: torch.device) -> Iterator[Callable[[], float]]:
    """Yields a function giving the peak MiB above the start (valid after the block)."""
    if device.type == "cuda":
        _sync(device)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        yield lambda: (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        _release_freed_memory()
        with PeakRss() as rss:
            yield lambda: rss.mib


def timed(fn: Callable[[], Any], device: torch.device) -> tuple:
    """``(result, seconds)`` of one call."""
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return result, time.perf_counter() - start


def first_call(fn: Callable[..., Any], device: torch.device, setup: Callable[[], Sequence] = tuple) -> tuple:
    """``(result, Timing)`` of one call of ``fn(*setup())``, ``setup`` untimed and outside the memory peak."""
    args = setup()
    with peak_memory(device) as peak:
        result, seconds = timed(lambda: fn(*args), device)
    return result, Timing(seconds, peak())


def measure(fn: Callable[..., Any], device: torch.device, repeats: int,
            setup: Callable[[], Sequence] = tuple) -> Timing:
    """Median seconds and largest peak of ``repeats`` calls of ``fn(*setup())``."""
    runs = [first_call(fn, device, setup)[1] for _ in range(repeats)]
    return Timing(statistics.median(r.seconds for r in runs), max(r.peak_mib for r in runs))


# ---- the references in the ops' calling conventions --------------------------------------------

def reference_awq_search_scales(x, weights, biases, quant_min, quant_max, symmetric, group_size, grid=20,
                                duo_scaling=False) -> ops.AWQScales:
    found = awq_ref.search_scales(x, weights, biases, quant_min, quant_max, symmetric, group_size, grid, duo_scaling,
                                  dtype=torch.float32)
    return ops.AWQScales(found.scales, found.losses.float())


def reference_awq_search_clip(x, weight, quant_min, quant_max, symmetric, group_size, steps=20, max_shrink=0.5,
                              max_tokens=512, out_chunk=256) -> ops.AWQClip:
    # Rows in chunks, as AutoAWQ does (its oc_batch_size): each row's search is independent of the others.
    parts = [awq_ref.search_clip(x, weight[i:i + out_chunk], quant_min, quant_max, symmetric, group_size, steps,
                                 max_shrink, max_tokens) for i in range(0, weight.shape[0], out_chunk)]
    return ops.AWQClip(torch.cat([p.min_val for p in parts]), torch.cat([p.max_val for p in parts]))


def reference_smoothquant_scales(act_absmax, weights, alpha=0.5, eps=1e-5) -> Tensor:
    s = sq_ref.smoothing_scales(act_absmax, weights, alpha, eps)
    return s if act_absmax.dtype == torch.float64 else s.float()


@torch.no_grad()
def reference_smoothquant_fold_(prev_weight, prev_bias, next_weights, scales) -> None:
    new_prev, new_bias, new_next = sq_ref.fold(prev_weight.detach(), None if prev_bias is None else prev_bias.detach(),
                                               [w.detach() for w in next_weights], scales)
    for tensor, value in zip([prev_weight, prev_bias, *next_weights], [new_prev, new_bias, *new_next]):
        if tensor is not None:
            tensor.data.copy_(value)


def reference_quantize_per_token(x, quant_min=-128, quant_max=127):
    codes, scales = sq_ref.quantize_rows(x, quant_min, quant_max)
    fits_int8 = quant_min >= -128 and quant_max <= 127
    return codes.to(torch.int8 if fits_int8 else torch.int32), scales


REFERENCES: Dict[str, Callable] = {
    "awq_search_scales": reference_awq_search_scales,
    "awq_search_clip": reference_awq_search_clip,
    "smoothquant_scales": reference_smoothquant_scales,
    "smoothquant_fold_": reference_smoothquant_fold_,
    "quantize_per_token": reference_quantize_per_token,
}


@contextlib.contextmanager
def ops_timed(names: Sequence[str], use_reference: Sequence[str], device: torch.device) -> Iterator[Dict[str, float]]:
    """Inside the block ``torchquant.ops.<name>`` is timed (seconds per name in the yielded dict) for every name,
    and is the reference for the names of ``use_reference``."""
    saved = {name: getattr(ops, name) for name in names}
    clock = dict.fromkeys(names, 0.0)

    def wrap(name: str, fn: Callable) -> Callable:
        def call(*args, **kwargs):
            _sync(device)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                _sync(device)
                clock[name] += time.perf_counter() - start
        return call

    for name in names:
        setattr(ops, name, wrap(name, REFERENCES[name] if name in use_reference else saved[name]))
    try:
        yield clock
    finally:
        for name, fn in saved.items():
            setattr(ops, name, fn)


# ---- the synthetic block ------------------------------------------------------------------------

class Block(NamedTuple):
    x: Tensor  # [tokens, width]: the LayerNorm output q, k, v and up read
    h: Tensor  # [tokens, ffn]: the MLP's intermediate activations, down's input
    ln_weight: Tensor
    ln_bias: Tensor
    qkv: List[Tensor]  # 3 x [width, width]
    up: Tensor  # [ffn, width]
    up_bias: Tensor
    down: Tensor  # [width, ffn]


def activations(tokens: int, width: int, g: torch.Generator, positive: bool = False) -> Tensor:
    """Correlated rows (low-rank factors + noise) with a few channels 20x larger than the rest."""
    rank = max(8, width // 8)
    x = torch.randn(tokens, rank, generator=g) @ (torch.randn(rank, width, generator=g) / rank**0.5)
    x += 0.3 * torch.randn(tokens, width, generator=g)
    channel_scale = torch.rand(width, generator=g) + 0.5
    channel_scale[torch.randperm(width, generator=g)[: max(1, width // 256)]] *= 20.0
    x *= channel_scale
    return x.abs() if positive else x


def synthetic_block(width: int, ffn: int, tokens: int, device: torch.device, seed: int = 0) -> Block:
    g = torch.Generator().manual_seed(seed)
    x = activations(tokens, width, g)
    h = activations(tokens, ffn, g, positive=True)
    ln_weight = 1.0 + 0.1 * torch.randn(width, generator=g)
    ln_bias = 0.1 * torch.randn(width, generator=g)
    up_bias = 0.1 * torch.randn(ffn, generator=g)
    qkv = [layer_weight(width, width, device, seed=seed + 1 + k) for k in range(3)]
    up = layer_weight(ffn, width, device, seed=seed + 4)
    down = layer_weight(width, ffn, device, seed=seed + 5)
    to = dict(device=device)
    return Block(x.to(**to), h.to(**to), ln_weight.to(**to), ln_bias.to(**to), qkv, up, up_bias.to(**to), down)


# ---- the checks ---------------------------------------------------------------------------------

def check_scale_search(got: ops.AWQScales, want: awq_ref.ScaleSearch) -> str:
    chosen, best = int(got.losses.argmin()), want.best
    losses = want.losses.to(got.losses.device)
    if chosen != best and not losses[chosen] <= losses[best] * (1 + SCALES_TIE_RTOL):
        raise SystemExit(f"awq_search_scales chose alpha {chosen / GRID} (reference loss {float(losses[chosen]):.6g}),"
                           f" the reference {best / GRID} ({float(losses[best]):.6g}): stopping")
    candidate = want.candidates[chosen].to(got.scales.device)
    if not torch.allclose(got.scales, candidate, rtol=1e-6, atol=0):
        raise SystemExit(f"awq_search_scales: the scales are not the reference's candidate for alpha {chosen / GRID}")
    rel = float(((got.losses.double() - losses) / losses).abs().max())
    tie = "" if chosen == best else f" (reference: {best / GRID}, a tie)"
    return f"alpha {chosen / GRID:g}{tie}; losses within {rel:.0e}"


def check_clip(got: ops.AWQClip, want: awq_ref.ClipSearch) -> str:
    f = want.factors.view(-1, 1, 1)
    match = (want.lo * f == got.min_val) & (want.hi * f == got.max_val)
    if not bool(match.any(0).all()):
        raise SystemExit("awq_search_clip returned a range that is none of the reference's candidates: stopping")
    chosen = match.to(torch.uint8).argmax(0)
    ours = want.errors.gather(0, chosen.unsqueeze(0))[0]
    best = want.errors.min(0).values
    worse = int((ours > best * (1 + CLIP_TIE_RTOL) + 1e-30).sum())
    if worse:
        raise SystemExit(f"awq_search_clip: {worse} groups got a range with a larger error than the reference's best")
    same = float((chosen == want.errors.argmin(0)).float().mean())
    return "same shrink factor in every group" if same == 1 else \
        f"same shrink factor in {same:.1%} of groups, the others ties"


def check_smoothing(got: Tensor, want: Tensor) -> str:
    rel = float(((got.double() - want) / want).abs().max())
    if rel > SMOOTHING_RTOL:
        raise SystemExit(f"smoothquant_scales differ from the reference by {rel:.1e} (> {SMOOTHING_RTOL}): stopping")
    return f"max rel. diff {rel:.0e}"


def check_equal(what: str, got: Sequence[Optional[Tensor]], want: Sequence[Optional[Tensor]]) -> str:
    for a, b in zip(got, want):
        if (a is None) != (b is None) or (a is not None and not torch.equal(a, b)):
            raise SystemExit(f"{what} differs from the reference: stopping")
    return "bit-equal"


# ---- the synthetic table ------------------------------------------------------------------------

class Case(NamedTuple):
    op: str
    shape: str
    torchquant: Callable[..., Any]
    reference: Optional[Callable[..., Any]]
    check: Callable[[Any, Any], str]
    setup: Callable[[], Sequence] = tuple


def fold_case(name: str, prev: Tensor, prev_bias: Optional[Tensor], nexts: List[Tensor], s: Tensor,
              shape: str) -> Case:
    def fresh():  # the op folds in place: each call gets its own copies (untimed)
        return prev.clone(), None if prev_bias is None else prev_bias.clone(), [w.clone() for w in nexts], s

    def run_op(p, b, ws, scales):
        ops.smoothquant_fold_(p, b, ws, scales)
        return p, b, ws

    def check(got, want):
        (p, b, ws), (rp, rb, rws) = got, want
        return check_equal(name, [p, b, *ws], [rp, rb, *rws])
    return Case("smoothquant_fold_", shape, run_op, sq_ref.fold, check, fresh)


def synthetic_cases(block: Block, clip_rows: int) -> List[Case]:
    width, ffn, tokens = block.x.shape[1], block.h.shape[1], block.x.shape[0]
    grid_args = (QUANT_MIN, QUANT_MAX, SYMMETRIC, GROUP_SIZE)
    act_x, act_h = block.x.abs().amax(0), block.h.abs().amax(0)
    s_qkv = ops.smoothquant_scales(act_x, block.qkv, ALPHA)
    s_down = ops.smoothquant_scales(act_h, [block.down], ALPHA)
    q_rows = block.qkv[0][:clip_rows]
    return [
        Case("awq_search_scales", f"x {tokens}x{width}, q/k/v 3x{width}x{width}",
             lambda: ops.awq_search_scales(block.x, block.qkv, None, *grid_args, GRID),
             lambda: awq_ref.search_scales(block.x, block.qkv, None, *grid_args, GRID, dtype=torch.float32),
             check_scale_search),
        Case("awq_search_clip", f"x {tokens}x{width}, q rows 0-{clip_rows - 1} of {width}",
             lambda: ops.awq_search_clip(block.x, q_rows, *grid_args),
             lambda: awq_ref.search_clip(block.x, q_rows, *grid_args), check_clip),
        Case("awq_search_clip", f"x {tokens}x{width}, q {width}x{width}",
             lambda: ops.awq_search_clip(block.x, block.qkv[0], *grid_args), None, lambda got, want: "-"),
        Case("smoothquant_scales", f"q/k/v 3x{width}x{width}, alpha {ALPHA}",
             lambda: ops.smoothquant_scales(act_x, block.qkv, ALPHA),
             lambda: sq_ref.smoothing_scales(act_x, block.qkv, ALPHA), check_smoothing),
        Case("smoothquant_scales", f"down {width}x{ffn}, alpha {ALPHA}",
             lambda: ops.smoothquant_scales(act_h, [block.down], ALPHA),
             lambda: sq_ref.smoothing_scales(act_h, [block.down], ALPHA), check_smoothing),
        fold_case("fold LayerNorm -> q/k/v", block.ln_weight, block.ln_bias, block.qkv, s_qkv,
                  f"LayerNorm [{width}] -> q/k/v 3x{width}x{width}"),
        fold_case("fold up -> down", block.up, block.up_bias, [block.down], s_down,
                  f"up {ffn}x{width} -> down {width}x{ffn}"),
        Case("quantize_per_token", f"x {tokens}x{width}, int8",
             lambda: ops.quantize_per_token(block.x, INT8_MIN, INT8_MAX),
             lambda: sq_ref.quantize_rows(block.x, INT8_MIN, INT8_MAX),
             lambda got, want: check_equal("quantize_per_token", [got[0].long(), got[1]], list(want))),
        Case("quantize_per_token", f"h {tokens}x{ffn}, int8",
             lambda: ops.quantize_per_token(block.h, INT8_MIN, INT8_MAX),
             lambda: sq_ref.quantize_rows(block.h, INT8_MIN, INT8_MAX),
             lambda got, want: check_equal("quantize_per_token", [got[0].long(), got[1]], list(want))),
    ]


def table(header: Sequence[str]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header), flush=True)


def run_case(case: Case, device: torch.device, repeats: int, no_reference: bool) -> str:
    """One row: the torchquant call (checked against the reference's result), then the reference's timing."""
    got, tq = first_call(case.torchquant, device, case.setup)
    if tq.seconds < ONE_CALL_ABOVE_S:
        tq = measure(case.torchquant, device, repeats, case.setup)
    row = f"| `{case.op}` | {case.shape} | {tq.seconds:.4g} | "
    if no_reference or case.reference is None:
        return row + f"- | - | - | {tq.peak_mib:.0f} | - |"
    want, ref = first_call(case.reference, device, case.setup)
    agreement = case.check(got, want)
    if ref.seconds < ONE_CALL_ABOVE_S:
        ref = measure(case.reference, device, repeats, case.setup)
    return row + (f"{ref.seconds:.4g} | {ref.seconds / tq.seconds:.1f} | {agreement} | {tq.peak_mib:.0f} | "
                  f"{ref.peak_mib:.0f} |")


def bench_synthetic(args, device: torch.device) -> None:
    start = time.perf_counter()
    block = synthetic_block(args.width, args.ffn, args.tokens, device)
    print(f"### Synthetic block: width {args.width}, MLP {args.width} -> {args.ffn} -> {args.width}, "
          f"{args.tokens} calibration tokens\n")
    table(["op", "inputs", "torchquant s", "reference s", "ratio", "agreement", "peak MiB torchquant",
           "peak MiB reference"])
    for case in synthetic_cases(block, args.clip_rows):
        print(run_case(case, device, args.repeats, args.no_reference), flush=True)
    print(f"\n({time.perf_counter() - start:.0f} s)\n")


# ---- the real model -----------------------------------------------------------------------------

class Pass(NamedTuple):
    name: str
    run: Callable[[nn.Module, list], Any]  # (model, batches) -> report
    ops: Sequence[str]  # the ops timed; the reference run replaces ``reference_ops`` of them
    reference_ops: Sequence[str]
    agreement: Callable[[Any, Any], str]


def awq_agreement(ours, theirs) -> str:
    same = sum(ours.groups[name].alpha == theirs.groups[name].alpha for name in ours.groups)
    return f"same alpha in {same} of {len(ours.groups)} groups"


def smoothing_agreement(ours, theirs) -> str:
    rel = max(float(((a.scales.double() - b.scales.double()) / b.scales.double()).abs().max())
              for a, b in ((ours.groups[n], theirs.groups[n]) for n in ours.groups))
    return f"scales within {rel:.0e} in {len(ours.groups)} groups"


def model_passes(reference_clip: bool) -> List[Pass]:
    from torchquant.ptq import awq
    from torchquant.ptq.smoothquant import smoothquant

    spec = QuantSpec(bits=BITS, symmetric=SYMMETRIC, granularity="group", group_size=GROUP_SIZE)
    awq_ops = ["awq_search_scales", "awq_search_clip", "smoothquant_fold_"]
    awq_reference = ["awq_search_scales", "awq_search_clip"] if reference_clip else ["awq_search_scales"]
    sq_static = ["smoothquant_scales", "smoothquant_fold_"]
    sq_token = sq_static + ["quantize_per_token"]
    return [
        Pass(f"`awq` W{BITS} g{GROUP_SIZE} asym, clip (reference: {' + '.join(awq_reference)})",
             lambda m, b: awq(m, b, spec, blocks=BLOCKS, progress=False), awq_ops, awq_reference, awq_agreement),
        Pass(f"`smoothquant` alpha {ALPHA}, per-tensor W8A8 errors (reference: {' + '.join(sq_static)})",
             lambda m, b: smoothquant(m, b, alpha=ALPHA, blocks=BLOCKS, progress=False), sq_static, sq_static,
             smoothing_agreement),
        Pass(f"`smoothquant` alpha {ALPHA}, per-token W8A8 errors (reference: {' + '.join(sq_token)})",
             lambda m, b: smoothquant(m, b, alpha=ALPHA, act_granularity="token", blocks=BLOCKS, progress=False),
             sq_token, sq_token, smoothing_agreement),
    ]


def run_pass(p: Pass, model: nn.Module, batches: list, device: torch.device, reference: bool):
    """``(report, Timing, ops cell)`` of the pass on a fresh copy of ``model``; the cell gives the seconds inside
    the timed ops, their share of the pass and the seconds of each op."""
    fresh = copy.deepcopy(model)
    with ops_timed(p.ops, p.reference_ops if reference else (), device) as clock:
        report, timing = first_call(lambda: p.run(fresh, batches), device)
    each = ", ".join(f"{name.split('_', 1)[1]} {seconds:.2f}" for name, seconds in clock.items())
    total = sum(clock.values())
    return report, timing, f"{total:.2f} ({total / timing.seconds:.0%}: {each})"


def bench_model(args, device: torch.device) -> None:
    try:
        from minilm import calibration_batches, load_minilm, python_reference_sentences, sample
        model, tokenizer = load_minilm()
    except ModuleNotFoundError as error:
        print(f"### all-MiniLM-L6-v2: skipped ({error})\n")
        return
    start = time.perf_counter()
    if args.quick:  # the first encoder block alone
        model.encoder.layer = model.encoder.layer[:1]
    model = model.to(device)
    sentences = sample(python_reference_sentences(), args.calibration, seed=0)
    batches = [{k: v.to(device) for k, v in b.items()}
               for b in calibration_batches(tokenizer, sentences, CALIBRATION_BATCH_SIZE)]
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    print(f"### all-MiniLM-L6-v2: {len(model.encoder.layer)} blocks, {args.calibration} calibration sentences "
          f"({tokens} tokens)\n")
    table(["pass", "torchquant s", "with references s", "ratio", "ops s torchquant (share: each)",
           "ops s with references (share: each)",
           "agreement", "peak MiB torchquant", "peak MiB reference"])
    for p in model_passes(args.reference_clip):
        ours, tq, tq_ops = run_pass(p, model, batches, device, reference=False)
        row = f"| {p.name} | {tq.seconds:.2f} | "
        if args.no_reference:
            print(row + f"- | - | {tq_ops} | - | - | {tq.peak_mib:.0f} | - |", flush=True)
            continue
        theirs, ref, ref_ops = run_pass(p, model, batches, device, reference=True)
        print(row + f"{ref.seconds:.2f} | {ref.seconds / tq.seconds:.2f} | {tq_ops} | {ref_ops} | "
              f"{p.agreement(ours, theirs)} | {tq.peak_mib:.0f} | {ref.peak_mib:.0f} |", flush=True)
    print(f"\n({time.perf_counter() - start:.0f} s)\n")


def main(argv: List[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="256-wide block, MiniLM's first block on 16 sentences: a smoke test")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of ops faster than 1 s (median)")
    parser.add_argument("--no-reference", action="store_true", help="time torchquant alone")
    parser.add_argument("--no-model", action="store_true", help="skip all-MiniLM-L6-v2")
    parser.add_argument("--reference-clip", action="store_true",
                        help="plug the reference clip search into the MiniLM AWQ pass too (minutes)")
    parser.add_argument("--width", type=int, default=None, help="hidden size of the synthetic block (4096; quick 256)")
    parser.add_argument("--ffn", type=int, default=None, help="MLP width of the synthetic block (11008; quick 688)")
    parser.add_argument("--tokens", type=int, default=None, help="calibration tokens of the block (512; quick 128)")
    parser.add_argument("--clip-rows", type=int, default=None,
                        help="output rows the clip search is compared on (32; quick 16)")
    parser.add_argument("--calibration", type=int, default=None, help="MiniLM calibration sentences (128; quick 16)")
    args = parser.parse_args(argv)
    for name, full, quick in (("width", 4096, 256), ("ffn", 11008, 688), ("tokens", 512, 128), ("clip_rows", 32, 16),
                              ("calibration", 128, 16)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.width % GROUP_SIZE:
        parser.error(f"--width must be a multiple of the group size {GROUP_SIZE}")
    if args.repeats < 1:
        parser.error("--repeats must be positive")
    args.clip_rows = min(args.clip_rows, args.width)

    if args.device == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available; running on the CPU")
        args.device = "cpu"
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, torchquant {torchquant.__version__}, device {device}, "
          f"{torch.get_num_threads()} threads")
    print(f"AWQ: {BITS}-bit asymmetric [{QUANT_MIN}, {QUANT_MAX}], group {GROUP_SIZE}, grid {GRID}; "
          f"SmoothQuant: alpha {ALPHA}, int8 [{INT8_MIN}, {INT8_MAX}]\n")
    start = time.perf_counter()
    bench_synthetic(args, device)
    if not args.no_model:
        bench_model(args, device)
    print(f"total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
