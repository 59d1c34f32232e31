#!/usr/bin/env python
"""Speed of torchquant's quantized linear ops against PyTorch's linear layers.

For each layer shape (out x in) and batch size M, in one process, it times
``y = x W^T`` (no bias, float32 activations unless the row says otherwise):

* torchquant's weight-only ops (``torch.ops.torchquant.quantized_linear``) at
  W4, W3 and W2 with groups of 128, W8 per-channel, and the 4-bit lookup table
  with the NF4 levels (groups of 64); W8A8 (``torch.ops.torchquant.w8a8_linear``,
  dynamic per-token activation grids, per-channel weights);
* LLM.int8() (the same op with ``outlier_threshold=6``: outlier input
  columns in float, the rest int8); the inputs hold outlier columns in
  every 512th feature (magnitude 8 in every token), as LLM activations do;
* ``nn.Linear`` in float32 (the baseline of the ratios) and in bfloat16
  (bfloat16 activations);
* ``torch._weight_int8pack_mm`` (int8 per-channel weights) and
  ``torch._weight_int4pack_mm_for_cpu`` (4-bit, groups of 128; on CUDA
  ``torch._weight_int4pack_mm`` with bfloat16 activations);
* FBGEMM's dynamic int8 ``Linear`` (``torch.ao.nn.quantized.dynamic.Linear``,
  per-channel qint8 weights; CPU only);
* dequantize-then-matmul: ``torchquant.ops.dequantize_weight`` of the W4 g128
  weight, then ``F.linear`` (the naive path).

torchquant's ops are called through ``torch.ops.torchquant``. Every row
cycles through several distinct layers of the shape, so that its
working set is larger than the last-level cache, as the layers of a model
are: at least ``--min-layers`` (8), more where that many layers would hold
less than 3x the cache. The effective bandwidth on the row's weight bytes is
printed next to a memory-copy bandwidth measured in the same run.

Before a row is timed, its output on the first layer is checked at every M:
torchquant's weight-only rows against ``dequantize_weight`` then ``F.linear``
(whose weight must equal the plain-PyTorch dequantization of the codes),
W8A8 against an int8 reference in plain PyTorch, the baselines against the
float product of their own weights. A disagreement stops the run with a
non-zero exit status.

    python benchmarks/bench_linear.py                    # 4096x4096 and 11008x4096, CPU
    python benchmarks/bench_linear.py --quick            # smoke test: 512-wide layers, a minute at most
    python benchmarks/bench_linear.py --device cuda --m 1,16

Options: ``--device cpu|cuda``, ``--shapes OUTxIN,...``, ``--m M,...``,
``--rows KEY,...`` (a subset of the rows), ``--threads N``
(``torch.set_num_threads``), ``--repeat N`` / ``--warmup N`` (passes over
the layers), ``--max-seconds S`` (timing budget of one row at one M),
``--min-layers N``, ``--llc-mib MiB``, ``--copy-mib MiB``, ``--no-graphs``,
``--quick``. After the tables it prints the resident bytes of each
torchquant format's layer and whether each target of the run-time kernels is
met. Exit status: 1 when an implementation disagrees with its reference, 2
when a torchquant row cannot run in this build.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import math
import os
import statistics
import sys
import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import torchquant

TQ = torch.ops.torchquant
GROUP_SIZE = 128
LUT_GROUP_SIZE = 64  # QLoRA's block size for NF4
# NF4: the 16 quantiles of a standard normal of the QLoRA paper, normalised to [-1, 1].
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
EPS32 = torch.finfo(torch.float32).eps
# An exact row may differ from its reference only by float32 summation order:
# |y - y_ref| <= SUM_ORDER_ULPS * sqrt(K) * eps * (|x| @ |W|^T), elementwise. A
# zero-point one step off in one group of 128 of 4096 columns exceeds it
# tenfold or more; an unrelated result, hundreds of times.
SUM_ORDER_ULPS = 8.0
FULL_SHAPES = "4096x4096,11008x4096"
QUICK_SHAPES = "512x512,1376x512"
DEFAULT_M = "1,8,32,512"
WORKING_SET_FACTOR = 3  # a row's layers hold at least this many times the last-level cache


class CheckFailed(Exception):
    """A row computes something else than its reference, or a torchquant op fails: the run stops."""


class RowUnavailable(Exception):
    """A baseline that this torch build cannot run (an op rejects the device or dtype): the row is skipped."""


# ---------------------------------------------------------------------------
# Quantized weights, in plain PyTorch.

@dataclasses.dataclass
class Codes:
    """Codes and grids of one weight: W[n, k] = (v(codes[n, k]) - zeros[n, k / g]) * scales[n, k / g]."""
    codes: Tensor  # uint8 [N, K], values in [0, 2^bits)
    scales: Tensor  # float32 [N, G]
    zeros: Tensor  # float32 [N, G]
    bits: int
    lut: Optional[Tensor] = None  # float32 [16]: v(u) = lut[u]
    int8_activations: bool = False  # W8A8: codes are int8 + 128, zeros 128, per-channel scales

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    def dequantize(self) -> Tensor:
        """The float32 weight, from the formula above."""
        v = self.codes.float() if self.lut is None else self.lut[self.codes.long()]
        g = self.in_features // self.scales.shape[1]
        return ((v.unflatten(1, (-1, g)) - self.zeros.unsqueeze(-1)) * self.scales.unsqueeze(-1)).flatten(1)


def rtn(w: Tensor, bits: int, group_size: int) -> Codes:
    """Round-to-nearest, asymmetric, from each group's min and max."""
    qmax = (1 << bits) - 1
    wg = w.unflatten(1, (-1, group_size))
    lo, hi = wg.amin(-1), wg.amax(-1)
    scales = ((hi - lo) / qmax).clamp_min(1e-8)
    zeros = torch.round(-lo / scales).clamp(0, qmax)
    codes = (torch.round(wg / scales.unsqueeze(-1)) + zeros.unsqueeze(-1)).clamp(0, qmax)
    return Codes(codes.flatten(1).to(torch.uint8), scales, zeros, bits)


def nf4(w: Tensor, group_size: int) -> Codes:
    """Each group scaled by its max |w|, then the nearest NF4 level (zeros 0)."""
    levels = torch.tensor(NF4_LEVELS)
    wg = w.unflatten(1, (-1, group_size))
    scales = wg.abs().amax(-1).clamp_min(1e-8)
    codes = torch.bucketize(wg / scales.unsqueeze(-1), (levels[1:] + levels[:-1]) / 2)
    return Codes(codes.flatten(1).to(torch.uint8), scales, torch.zeros_like(scales), 4, lut=levels)


def int8_per_channel(w: Tensor) -> Tuple[Tensor, Tensor]:
    """Symmetric int8 codes [-127, 127] and float32 scales [N] (max |w| / 127)."""
    scales = (w.abs().amax(1) / 127).clamp_min(1e-8)
    return torch.round(w / scales.unsqueeze(1)).clamp(-127, 127).to(torch.int8), scales


# LLM.int8()'s threshold, and the share of input columns the inputs make outliers (the paper finds
# them in about 0.1% of the hidden dimensions, in most tokens, from 6.7B parameters on).
OUTLIER_THRESHOLD = 6.0
OUTLIER_COLUMN_SHARE = 1 / 512


def with_outlier_columns(x: Tensor) -> Tensor:
    """``x`` with a few systematic outlier feature columns: every 512th column at magnitude 8 in every token."""
    x = x.clone()
    x[:, :: int(1 / OUTLIER_COLUMN_SHARE)] *= 8.0 / x[:, :: int(1 / OUTLIER_COLUMN_SHARE)].abs().clamp_min(1e-3)
    return x


def w8a8_weight(w: Tensor) -> Codes:
    q, scales = int8_per_channel(w)
    scales = scales.unsqueeze(1)
    return Codes((q.to(torch.int16) + 128).to(torch.uint8), scales, torch.full_like(scales, 128.0), 8,
                           int8_activations=True)


def w8a8_reference(x: Tensor, q: Codes, zero_columns: Optional[Tensor] = None) -> Tensor:
    """W8A8 with dynamic per-token grids in plain PyTorch (the op's documented semantics).

    s_x = max(max |x[m, :]| / 127.5, eps); codes = clamp(round(x * (1 / s_x)), -128, 127)
    (round half to even); the integer products are summed exactly (float64 holds
    every partial sum of int8 x int8 products over K < 2^37 columns), then
    y = acc * s_x * s_w.
    """
    s_x = (x.abs().amax(-1, keepdim=True) / 127.5).clamp_min(EPS32)
    codes = torch.round(x * s_x.reciprocal()).clamp(-128, 127)
    if zero_columns is not None:  # LLM.int8(): the outlier columns leave the int8 product
        codes[:, zero_columns] = 0
    acc = codes.double() @ (q.codes.double() - 128).t()
    return acc.float() * s_x * q.scales.t()


# ---------------------------------------------------------------------------
# The layer as the library's module holds it (for the resident-bytes table).

def library_layer(q: Codes) -> nn.Module:
    """torchquant's Linear module, built from the codes as a converted model holds it."""
    from torchquant.nn import QuantizedLinear
    from torchquant.quantized_weight import QuantizedWeight as LibraryWeight
    weight = LibraryWeight.from_codes(q.codes, q.scales, q.zeros, q.bits, lut=q.lut)
    if q.lut is not None and not bool(q.zeros.any()):  # lookup-table codes store no zero grid (as ptq.nf4's)
        weight = LibraryWeight(weight.packed, weight.scales, None, weight.bits, weight.in_features, lut=weight.lut)
    return QuantizedLinear(weight, activations="int8_per_token" if q.int8_activations else "float")


# The module the resident-bytes table measures (one line to change to measure another).
LAYER_FROM_CODES: Callable[[Codes], nn.Module] = library_layer


def resident_bytes(module: nn.Module) -> int:
    """Bytes of every tensor the module holds (parameters, buffers and tensor
    attributes such as caches, one level into lists, tuples and dicts), each
    storage counted once."""
    seen, total = set(), 0
    for m in module.modules():
        found: List[Any] = list(m._parameters.values()) + list(m._buffers.values())
        for value in vars(m).values():
            if isinstance(value, Tensor):
                found.append(value)
            elif isinstance(value, (list, tuple)):
                found.extend(value)
            elif isinstance(value, dict) and value is not m._parameters and value is not m._buffers:
                found.extend(value.values())
        for t in found:
            if isinstance(t, Tensor):
                storage = t.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
    return total


# ---------------------------------------------------------------------------
# The implementations. Each builds a layer from a float weight, calls it, and
# says what its output must be.

def has_kernel(op: str, device: torch.device) -> bool:
    """Whether the operator exists and has a kernel for the device (its own or a composite one)."""
    keys = ("CUDA" if device.type == "cuda" else "CPU", "CompositeExplicitAutograd", "CompositeImplicitAutograd")
    try:
        return any(torch._C._dispatch_has_kernel_for_dispatch_key(op, key) for key in keys)
    except RuntimeError:  # no such operator in this build
        return False


def tensor_bytes(*tensors: Optional[Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class Impl:
    key = ""
    label = ""
    torchquant = False  # a torchquant row (its absence is an error, not a skip)
    resident = False  # a torchquant format: a row of the resident-bytes table
    # None: exact up to summation order (the elementwise bound above); a float:
    # the largest |y - y_ref| / |y_ref| (Frobenius) for rows that round their
    # inputs (bfloat16, quantized activations).
    rel_tol: Optional[float] = None

    def unavailable(self, device: torch.device) -> Optional[str]:
        return None

    def input_dtype(self, device: torch.device) -> torch.dtype:
        return torch.float32

    def build(self, w: Tensor, device: torch.device) -> Any:
        raise NotImplementedError

    def weight_bytes(self, layer: Any) -> int:
        raise NotImplementedError

    def __call__(self, layer: Any, x: Tensor) -> Tensor:
        raise NotImplementedError

    def reference(self, layer: Any, w: Tensor) -> Optional[Reference]:
        """What the row must compute on ``layer`` (built from the float weight ``w``), or None."""
        raise NotImplementedError


# x -> (the output a row must produce, |x| @ |W|^T for the elementwise bound or None).
Reference = Callable[[Tensor], Tuple[Tensor, Optional[Tensor]]]


def exact_reference(weight: Tensor) -> Reference:
    """F.linear with the float32 weight, and the magnitudes of the bound."""
    magnitude = weight.abs()
    return lambda x: (F.linear(x.float(), weight), F.linear(x.float().abs(), magnitude))


def rounded_reference(weight: Tensor) -> Reference:
    return lambda x: (F.linear(x.float(), weight), None)


class Fp32Linear(Impl):
    key, label = "fp32", "nn.Linear fp32"

    def build(self, w, device):
        layer = nn.Linear(w.shape[1], w.shape[0], bias=False, device=device)
        layer.weight.data.copy_(w)
        return layer

    def weight_bytes(self, layer):
        return tensor_bytes(layer.weight)

    def __call__(self, layer, x):
        return layer(x)

    def reference(self, layer, w):
        return None  # the baseline itself


class Bf16Linear(Fp32Linear):
    key, label = "bf16", "nn.Linear bf16"
    rel_tol = 2e-2  # bfloat16 weights and activations: 8 significant bits

    def input_dtype(self, device):
        return torch.bfloat16

    def build(self, w, device):
        return super().build(w, device).to(torch.bfloat16)

    def reference(self, layer, w):
        return rounded_reference(w.to(layer.weight.device))


class TorchquantWeightOnly(Impl):
    torchquant = resident = True

    def __init__(self, key: str, label: str, quantize: Callable[[Tensor], Codes]):
        self.key, self.label, self.quantize = key, label, quantize

    def unavailable(self, device):
        needed = [("torchquant::pack_weight", torch.device("cpu")), ("torchquant::dequantize_weight", device),
                  ("torchquant::quantized_linear", device)]
        missing = [op for op, d in needed if not has_kernel(op, d)]
        return f"no {device.type} kernel for {', '.join(missing)} in this build" if missing else None

    def build(self, w, device):
        q = self.quantize(w)
        packed = TQ.pack_weight(q.codes, q.bits)
        lut = None if q.lut is None else q.lut.to(device)
        return (packed.to(device), q.scales.to(device), q.zeros.to(device), q.bits, q.in_features, lut)

    def weight_bytes(self, layer):
        packed, scales, zeros, _, _, lut = layer
        return tensor_bytes(packed, scales, zeros, lut)

    def __call__(self, layer, x):
        return TQ.quantized_linear(x, *layer)

    def reference(self, layer, w):
        weight = TQ.dequantize_weight(*layer)
        want = self.quantize(w).dequantize().to(weight.device)
        close = torch.isclose(weight, want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))
        if not bool(close.all()):
            raise CheckFailed(f"{self.label}: dequantize_weight differs from the plain-PyTorch dequantization of "
                              f"the codes at {int((~close).sum())} of {want.numel()} weights, max |diff| "
                              f"{float((weight - want).abs().max()):.3g}")
        return exact_reference(weight)


class DequantizeThenMatmul(TorchquantWeightOnly):
    resident = False  # the W4 format's row stands for it
    def __call__(self, layer, x):
        return F.linear(x, TQ.dequantize_weight(*layer))


class TorchquantW8A8(Impl):
    key, label = "w8a8", "torchquant W8A8 (per-token, per-channel)"
    torchquant = resident = True

    def unavailable(self, device):
        needed = [("torchquant::pack_weight", torch.device("cpu")), ("torchquant::w8a8_linear", device)]
        missing = [op for op, d in needed if not has_kernel(op, d)]
        return f"no {device.type} kernel for {', '.join(missing)} in this build" if missing else None

    @staticmethod
    def quantize(w: Tensor) -> Codes:
        return w8a8_weight(w)

    def build(self, w, device):
        q = w8a8_weight(w)
        return TQ.pack_weight(q.codes, 8).to(device), q.scales.to(device)

    def weight_bytes(self, layer):
        return tensor_bytes(*layer)

    def __call__(self, layer, x):
        return TQ.w8a8_linear(x, *layer)

    def reference(self, layer, w):
        q = w8a8_weight(w)
        magnitude = ((q.codes.float() - 128) * q.scales).abs().to(layer[0].device)
        return lambda x: (w8a8_reference(x.cpu(), q).to(x.device), F.linear(x.abs(), magnitude))


class TorchquantLlmInt8(TorchquantW8A8):
    """LLM.int8(): W8A8 per token with the outlier columns (|x| >= 6 in any token) multiplied in float."""
    key, label = "llm_int8", f"torchquant LLM.int8() (threshold {OUTLIER_THRESHOLD:g})"

    def __call__(self, layer, x):
        return TQ.w8a8_linear(x, *layer, outlier_threshold=OUTLIER_THRESHOLD)

    def reference(self, layer, w):
        q = w8a8_weight(w)
        w_float = (q.codes.float() - 128) * q.scales
        magnitude = w_float.abs().to(layer[0].device)

        def ref(x):
            xc = x.cpu()
            outliers = (xc.abs() >= OUTLIER_THRESHOLD).any(dim=0)
            inliers = xc.masked_fill(xc.abs() >= OUTLIER_THRESHOLD, 0.0)
            y = w8a8_reference(inliers, q, zero_columns=outliers) + xc[:, outliers] @ w_float[:, outliers].t()
            return y.to(x.device), F.linear(x.abs(), magnitude)
        return ref


class Int8PackMM(Impl):
    key, label = "int8pack", "torch._weight_int8pack_mm (per-channel)"

    def unavailable(self, device):
        if not has_kernel("aten::_weight_int8pack_mm", device):
            return f"torch._weight_int8pack_mm has no {device.type} kernel in this build"
        return None

    def build(self, w, device):
        q, scales = int8_per_channel(w)
        return q.to(device), scales.to(device)

    def weight_bytes(self, layer):
        return tensor_bytes(*layer)

    def __call__(self, layer, x):
        return torch._weight_int8pack_mm(x, *layer)

    def reference(self, layer, w):
        q, scales = layer
        return exact_reference(q.float() * scales.float().unsqueeze(1))


class Int4PackMM(Impl):
    """PyTorch's 4-bit kernels (tinygemm layout): W = (q - 8) * scale + offset per group,
    so RTN's (q - zero) * scale becomes offset = (8 - zero) * scale."""
    # The rewritten grid rounds differently from (q - zero) * scale; on CUDA the
    # activations, scales and offsets are bfloat16.
    rel_tol = 1e-3

    def __init__(self, device: torch.device):
        cuda = device.type == "cuda"
        self.key = "int4pack"
        self.label = f"torch._weight_int4pack_mm{'' if cuda else '_for_cpu'} (g{GROUP_SIZE})"
        self.mm = "_weight_int4pack_mm" if cuda else "_weight_int4pack_mm_for_cpu"
        self.convert = "_convert_weight_to_int4pack" if cuda else "_convert_weight_to_int4pack_for_cpu"
        if cuda:
            self.rel_tol = 2e-2

    def unavailable(self, device):
        for op in (self.mm, self.convert):
            if not hasattr(torch, op) or not has_kernel(f"aten::{op}", device):
                return f"torch.{op} has no {device.type} kernel in this build"
        return None

    def input_dtype(self, device):
        return torch.bfloat16 if device.type == "cuda" else torch.float32

    def build(self, w, device):
        q = rtn(w, 4, GROUP_SIZE)
        grid = torch.stack([q.scales.t(), ((8 - q.zeros) * q.scales).t()], -1).contiguous()  # [G, N, 2]
        if device.type == "cuda":
            nibbles = (q.codes[:, ::2] << 4 | q.codes[:, 1::2]).to(device)
            packed = torch._convert_weight_to_int4pack(nibbles, 8)
            grid = grid.to(device=device, dtype=torch.bfloat16)
        else:
            packed = torch._convert_weight_to_int4pack_for_cpu(q.codes.to(torch.int32), 2)
        return packed, grid

    def weight_bytes(self, layer):
        return tensor_bytes(*layer)

    def __call__(self, layer, x):
        return getattr(torch, self.mm)(x, layer[0], GROUP_SIZE, layer[1])

    def reference(self, layer, w):
        return rounded_reference(rtn(w, 4, GROUP_SIZE).dequantize().to(layer[0].device))


class FbgemmDynamic(Impl):
    key, label = "fbgemm", "FBGEMM dynamic int8 Linear (per-channel)"
    # FBGEMM quantizes the activations per tensor to 7 bits (reduce_range).
    rel_tol = 0.1

    def unavailable(self, device):
        if device.type != "cpu":
            return "FBGEMM runs on the CPU only"
        if "fbgemm" not in torch.backends.quantized.supported_engines:
            return "this torch build has no FBGEMM quantized engine"
        return None

    def build(self, w, device):
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
        torch.backends.quantized.engine = "fbgemm"
        q, scales = int8_per_channel(w)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notices
            qweight = torch._make_per_channel_quantized_tensor(q, scales.double(),
                                                               torch.zeros(w.shape[0], dtype=torch.long), 0)
            layer = DynamicLinear(w.shape[1], w.shape[0], bias_=False, dtype=torch.qint8)
            layer.set_weight_bias(qweight, None)
        return layer

    def weight_bytes(self, layer):
        # What FBGEMM holds per layer: the int8 codes and, per output channel, a
        # float scale, an int32 zero-point and an int32 column offset.
        n, k = layer.out_features, layer.in_features
        return n * k + 12 * n

    def __call__(self, layer, x):
        return layer(x)

    def reference(self, layer, w):
        weight, _ = layer._weight_bias()
        return rounded_reference(weight.dequantize())


def implementations(device: torch.device) -> List[Impl]:
    """In the order of the table; the first (fp32 nn.Linear) is the baseline of the ratios."""
    g = GROUP_SIZE
    return [
        Fp32Linear(),
        Bf16Linear(),
        TorchquantWeightOnly("w4", f"torchquant W4 g{g}", lambda w: rtn(w, 4, g)),
        TorchquantWeightOnly("w3", f"torchquant W3 g{g}", lambda w: rtn(w, 3, g)),
        TorchquantWeightOnly("w2", f"torchquant W2 g{g}", lambda w: rtn(w, 2, g)),
        TorchquantWeightOnly("w8", "torchquant W8 per-channel", lambda w: rtn(w, 8, w.shape[1])),
        TorchquantWeightOnly("nf4", f"torchquant NF4 lookup table g{LUT_GROUP_SIZE}",
                             lambda w: nf4(w, LUT_GROUP_SIZE)),
        TorchquantW8A8(),
        TorchquantLlmInt8(),
        Int8PackMM(),
        Int4PackMM(device),
        FbgemmDynamic(),
        DequantizeThenMatmul("dequant", f"dequantize_weight + F.linear (W4 g{g})", lambda w: rtn(w, 4, g)),
    ]


WEIGHT_ONLY_KEYS = ("w4", "w3", "w2", "w8", "nf4")


# ---------------------------------------------------------------------------
# Checks and timing.

def check_output(label: str, m: int, got: Tensor, want: Tensor, absum: Optional[Tensor],
                 rel_tol: Optional[float], in_features: int) -> None:
    got, want = got.float(), want.float()
    if got.shape != want.shape:
        raise CheckFailed(f"{label}, M={m}: output shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    if not torch.isfinite(got).all():
        raise CheckFailed(f"{label}, M={m}: output has NaN or Inf")
    diff = (got - want).abs()
    if rel_tol is not None:
        rel = float(diff.norm() / want.norm().clamp_min(1e-30))
        if not rel <= rel_tol:
            raise CheckFailed(f"{label}, M={m}: |y - y_ref| / |y_ref| = {rel:.3g}, more than {rel_tol:g}")
        return
    bound = SUM_ORDER_ULPS * math.sqrt(in_features) * EPS32 * absum.float() + 1e-30
    bad = diff > bound
    if bool(bad.any()):
        worst = int((diff / bound).flatten().argmax())
        raise CheckFailed(f"{label}, M={m}: {int(bad.sum())} of {got.numel()} outputs differ from the reference by "
                          f"more than float32 summation order allows; worst {float(diff.flatten()[worst]):.3g} "
                          f"against a bound of {float(bound.flatten()[worst]):.3g}")


class Timer:
    """Milliseconds per call of one row: the median over passes of (pass time / layers)."""

    def __init__(self, device: torch.device, use_graphs: bool):
        self.device, self.use_graphs = device, use_graphs and device.type == "cuda"

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def prepare(self, run_pass: Callable[[], None]) -> Tuple[Callable[[], None], str]:
        """On CUDA, one pass is captured in a CUDA graph where possible, so the
        times measure the kernels rather than Python's launches."""
        if not self.use_graphs:
            return run_pass, ""
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                run_pass()
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                run_pass()
            self.sync()
            return graph.replay, ""
        except Exception as e:  # noqa: BLE001 - any capture failure falls back to eager launches
            self.sync()
            return run_pass, f"eager launches (CUDA graph capture failed: {str(e).splitlines()[0]})"

    def ms_per_call(self, run_pass: Callable[[], None], calls_per_pass: int, warmup: int, repeats: int) -> float:
        for _ in range(warmup):
            run_pass()
        self.sync()
        times = []
        for _ in range(repeats):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                run_pass()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                start_s = time.perf_counter()
                run_pass()
                times.append((time.perf_counter() - start_s) * 1e3)
        return statistics.median(times) / calls_per_pass


@dataclasses.dataclass
class Bandwidth:
    copied_gbs: float  # bytes copied / s
    traffic_gbs: float  # (bytes read + bytes written) / s

    def reference(self, device: torch.device) -> float:
        # CPU: the memcpy figure (bytes copied per second); GPU: HBM traffic of
        # a device-to-device copy (read + write, as CUDA's bandwidthTest counts it).
        return self.traffic_gbs if device.type == "cuda" else self.copied_gbs


def copy_bandwidth(nbytes: int, device: torch.device, timer: Timer, repeats: int) -> Bandwidth:
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    ms = timer.ms_per_call(lambda: dst.copy_(src), 1, warmup=2, repeats=max(repeats, 7))
    del src, dst
    copied = nbytes / ms / 1e6
    return Bandwidth(copied, 2 * copied)


@dataclasses.dataclass
class Result:
    ms: Optional[float] = None  # None: not run
    weight_bytes: int = 0
    layers: int = 0
    note: str = ""

    def gbs(self) -> float:
        return self.weight_bytes / self.ms / 1e6


class WeightPool:
    """Float weights of one shape, one per layer index, shared by the rows
    (normal, std 0.02, each layer from its own seed)."""

    def __init__(self, out_features: int, in_features: int):
        self.shape = (out_features, in_features)
        self.cache: Dict[int, Tensor] = {}

    def get(self, index: int) -> Tensor:
        if index not in self.cache:
            gen = torch.Generator().manual_seed(1000 + index)
            self.cache[index] = torch.randn(self.shape, generator=gen) * 0.02
        return self.cache[index]


def plan_timing(layers: int, call_s: float, args: argparse.Namespace) -> Tuple[int, int, int, str]:
    """(layers per pass, warm-up passes, timed passes, note) within --max-seconds.

    The checked call gives the estimate. A row too slow for every pass gets
    fewer passes (at least 3, or --repeat if smaller; the checked call stands
    in for the warm-up); one whose calls take so long that even those passes
    over all layers do not fit cycles through fewer layers: at that speed the
    cache does not matter.
    """
    affordable = args.max_seconds / max(call_s, 1e-9)  # calls
    if affordable >= layers * (args.warmup + args.repeat):
        return layers, args.warmup, args.repeat, ""
    least = min(3, args.repeat)
    if affordable >= least * layers:
        passes = min(args.repeat, int(affordable // layers))
        return layers, 0, passes, f"slow: {passes} timed pass(es) (--max-seconds {args.max_seconds:g})"
    timed = max(1, min(layers, int(affordable // least)))
    return timed, 0, least, (f"slow: {least} timed pass(es) over {timed} of {layers} layers "
                             f"(--max-seconds {args.max_seconds:g})")


def attempt(impl: Impl, what: str, fn: Callable[[], Any]) -> Any:
    """fn(); an exception of a baseline skips its row, one of a torchquant row stops the run."""
    try:
        return fn()
    except (RuntimeError, NotImplementedError, TypeError, ValueError) as e:
        message = f"{what} raised {type(e).__name__}: {(str(e).splitlines() or [''])[0]}"
        if impl.torchquant:
            raise CheckFailed(f"{impl.label}: {message}") from e
        raise RowUnavailable(message) from e


def run_row(impl: Impl, pool: WeightPool, inputs: Dict[int, Tensor], args: argparse.Namespace,
            device: torch.device, timer: Timer, working_set: int) -> Dict[int, Result]:
    started = time.perf_counter()
    first = attempt(impl, "building a layer", lambda: impl.build(pool.get(0), device))
    layer_bytes = impl.weight_bytes(first)
    count = max(args.min_layers, math.ceil(working_set / layer_bytes))
    layers = [first] + [impl.build(pool.get(i), device) for i in range(1, count)]
    built_s = time.perf_counter() - started
    n, k = pool.shape
    dtype = impl.input_dtype(device)
    reference = attempt(impl, "the reference", lambda: impl.reference(first, pool.get(0)))
    results: Dict[int, Result] = {}
    for m, x32 in inputs.items():
        x = x32.to(dtype)
        want, absum = attempt(impl, f"the reference at M={m}", lambda: reference(x)) if reference else (None, None)
        timer.sync()
        call_started = time.perf_counter()
        got = attempt(impl, f"the call at M={m}", lambda: impl(first, x))
        timer.sync()
        call_s = time.perf_counter() - call_started
        if want is not None:
            check_output(impl.label, m, got, want, absum, impl.rel_tol, k)
        del want, absum, got

        timed, warmup, repeat, note = plan_timing(len(layers), call_s, args)

        def run_pass() -> None:
            for layer in layers[:timed]:
                impl(layer, x)

        step, graph_note = timer.prepare(run_pass)
        ms = timer.ms_per_call(step, timed, warmup, repeat)
        results[m] = Result(ms, layer_bytes, timed, "; ".join(text for text in (note, graph_note) if text))
        del step
    print(f"  {n}x{k} {impl.label}: {len(layers)} layers of {layer_bytes / 2**20:.2f} MiB built in "
          f"{built_s:.1f} s; " + ", ".join(f"M={m} {r.ms:.3f} ms" for m, r in results.items())
          + f" ({time.perf_counter() - started:.1f} s)", file=sys.stderr, flush=True)
    del layers, first, reference
    return results


def resident_row(impl: Impl, pool: WeightPool, device: torch.device, x: Tensor) -> Tuple[int, int, str]:
    """(resident bytes of the module after a forward, bytes of its packed codes + grids, its class)."""
    q = impl.quantize(pool.get(0))
    try:
        module = LAYER_FROM_CODES(q).to(device)
        module(x)  # a forward first: a module that caches a float weight shows it
    except Exception as e:  # noqa: BLE001 - any failure of the library's module stops the run
        raise CheckFailed(f"resident bytes, {impl.label}: building or calling the layer raised {type(e).__name__}: "
                          f"{(str(e).splitlines() or [''])[0]}") from e
    packed = tensor_bytes(TQ.pack_weight(q.codes, q.bits), q.scales,
                          None if q.int8_activations else q.zeros, q.lut)
    cls = type(module)
    return resident_bytes(module), packed, f"{cls.__module__}.{cls.__qualname__}"


# ---------------------------------------------------------------------------
# Report.

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def last_level_cache_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20))
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            try:
                with open(os.path.join(base, entry, "size")) as f:
                    text = f.read().strip()
            except OSError:
                continue
            units = {"K": 2**10, "M": 2**20, "G": 2**30}
            size = int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
            best = max(best, size)
    except OSError:
        pass
    return best or 32 * 2**20


def torchquant_cpu_isa() -> str:
    probe = getattr(torchquant._C, "cpu_kernel_isa", None)
    return probe() if callable(probe) else "not exposed"


def fmt_shape(shape: Tuple[int, int]) -> str:
    return f"{shape[0]}x{shape[1]}"


def print_table(shape: Tuple[int, int], impls: Sequence[Impl], results: Dict[str, Dict[int, Result]],
                skipped: Dict[str, str], ms_list: Sequence[int], bandwidth: float, ref_name: str) -> None:
    print(f"\n### {shape[0]} x {shape[1]} (out x in)\n")
    print(f"| M | implementation | ms / call | vs fp32 nn.Linear | layers x MiB | weight GB/s | % of {ref_name} |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    notes: List[str] = []
    for m in ms_list:
        base = results.get("fp32", {}).get(m)
        for impl in impls:
            if impl.key in skipped:
                print(f"| {m} | {impl.label} | n/a | n/a | n/a | n/a | n/a |")
                continue
            r = results.get(impl.key, {}).get(m)
            if r is None or r.ms is None:
                continue
            if r.note:
                notes.append(f"{impl.label}, M={m}: {r.note}")
            ratio = f"{base.ms / r.ms:.2f}" if base is not None and base.ms else "-"
            print(f"| {m} | {impl.label} | {r.ms:.3f} | {ratio} | {r.layers} x {r.weight_bytes / 2**20:.2f} | "
                  f"{r.gbs():.1f} | {100 * r.gbs() / bandwidth:.0f}% |")
    for key, reason in skipped.items():
        label = next(i.label for i in impls if i.key == key)
        notes.append(f"{label}: skipped: {reason}")
    if notes:
        print("\n" + "\n".join(f"- {note}" for note in notes))


def verdict(ok: bool) -> str:
    return "met" if ok else "NOT met"


def print_targets(device: torch.device, all_results: Dict[Tuple[int, int], Dict[str, Dict[int, Result]]],
                  bandwidth: float, resident: Dict[Tuple[int, int], Dict[str, Tuple[int, int, str]]]) -> None:
    print("\n### Targets\n")

    def get(shape, key, m) -> Optional[Result]:
        r = all_results[shape].get(key, {}).get(m)
        return r if r is not None and r.ms is not None else None

    def line(text: str, parts: List[Tuple[str, Optional[bool], str]]) -> None:
        measured = [ok for _, ok, _ in parts if ok is not None]
        overall = "not measured" if not measured else verdict(all(measured))
        detail = "; ".join(f"{shape}: {'not measured' if ok is None else verdict(ok)} ({why})"
                           for shape, ok, why in parts)
        print(f"- {text}: **{overall}** ({detail})")

    shapes = list(all_results)
    if device.type == "cuda":
        parts = []
        for shape in shapes:
            w4 = get(shape, "w4", 1)
            if w4 is None:
                parts.append((fmt_shape(shape), None, "no W4 row at M=1"))
                continue
            pct = 100 * w4.gbs() / bandwidth
            parts.append((fmt_shape(shape), pct >= 70, f"{pct:.0f}% of HBM bandwidth"))
        line("W4 at M=1 at least 70% of HBM bandwidth", parts)
    else:
        parts = []
        for shape in shapes:
            w4, fp32 = get(shape, "w4", 1), get(shape, "fp32", 1)
            if w4 is None or fp32 is None:
                parts.append((fmt_shape(shape), None, "no W4 or fp32 row at M=1"))
                continue
            speedup, pct = fp32.ms / w4.ms, 100 * w4.gbs() / bandwidth
            parts.append((fmt_shape(shape), speedup >= 6 and pct >= 70, f"{speedup:.2f}x, {pct:.0f}% of memcpy"))
        line("W4 at M=1 at least 6x faster than fp32 nn.Linear and at least 70% of memcpy bandwidth", parts)

        parts = []
        for shape in shapes:
            pairs = [(m, get(shape, "w8a8", m), get(shape, "fbgemm", m)) for m in all_results[shape].get("w8a8", {})]
            pairs = [(m, a, b) for m, a, b in pairs if a is not None and b is not None]
            if not pairs:
                parts.append((fmt_shape(shape), None, "no W8A8 or FBGEMM row"))
                continue
            why = ", ".join(f"M={m} {b.ms / a.ms:.2f}x" for m, a, b in pairs)
            parts.append((fmt_shape(shape), all(a.ms <= b.ms for _, a, b in pairs), "FBGEMM ms / W8A8 ms: " + why))
        line("W8A8 at least as fast as FBGEMM's dynamic int8 Linear at every M", parts)

        parts = []
        for shape in shapes:
            fp32 = get(shape, "fp32", 512)
            rows = [(key, get(shape, key, 512)) for key in WEIGHT_ONLY_KEYS]
            rows = [(key, r) for key, r in rows if r is not None]
            if fp32 is None or not rows:
                parts.append((fmt_shape(shape), None, "no M=512 rows"))
                continue
            why = ", ".join(f"{key} {r.ms / fp32.ms:.2f}x" for key, r in rows)
            parts.append((fmt_shape(shape), all(r.ms <= 1.3 * fp32.ms for _, r in rows),
                          "time / fp32 time: " + why))
        line("every weight-only format at M=512 within 1.3x of fp32 nn.Linear", parts)

    parts = []
    for shape in shapes:
        rows = resident.get(shape, {})
        if not rows:
            parts.append((fmt_shape(shape), None, "no torchquant rows"))
            continue
        ratios = {key: res / packed for key, (res, packed, _) in rows.items()}
        parts.append((fmt_shape(shape), all(r <= 1.05 for r in ratios.values()),
                      ", ".join(f"{key} {r:.3f}" for key, r in ratios.items())))
    line("resident bytes of a converted layer at most 1.05x its packed bytes", parts)


def print_resident(resident: Dict[Tuple[int, int], Dict[str, Tuple[int, int, str]]]) -> None:
    if not any(resident.values()):
        return
    classes = sorted({cls for rows in resident.values() for _, _, cls in rows.values()})
    print(f"\n### Resident bytes (one {', '.join(classes)} per format, after one forward)\n")
    print("| layer | format | packed MiB | resident MiB | resident / packed | bits per weight | vs fp32 weight |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for shape, rows in resident.items():
        for key, (res, packed, _) in rows.items():
            n, k = shape
            print(f"| {fmt_shape(shape)} | {key} | {packed / 2**20:.2f} | {res / 2**20:.2f} | {res / packed:.3f} | "
                  f"{8 * packed / (n * k):.2f} | {packed / (4 * n * k):.3f} |")


# ---------------------------------------------------------------------------

def parse_list(text: str, parse: Callable[[str], Any], what: str, parser: argparse.ArgumentParser) -> List[Any]:
    try:
        values = [parse(part.strip()) for part in text.split(",") if part.strip()]
    except ValueError:
        parser.error(f"cannot read {what} from {text!r}")
    if not values:
        parser.error(f"no {what} in {text!r}")
    return values


def parse_shape(text: str) -> Tuple[int, int]:
    out_features, in_features = text.lower().split("x")
    return int(out_features), int(in_features)


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    keys = [impl.key for impl in implementations(torch.device("cpu"))]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda runs on the GPU when one is available, else falls back to cpu")
    parser.add_argument("--shapes", default=None,
                        help=f"comma-separated OUTxIN layer shapes (default {FULL_SHAPES}; --quick {QUICK_SHAPES}); "
                             f"IN must be a multiple of {GROUP_SIZE}")
    parser.add_argument("--m", default=DEFAULT_M, help=f"comma-separated batch sizes (rows of x; default {DEFAULT_M})")
    parser.add_argument("--rows", default=None,
                        help=f"comma-separated rows to run (default all: {','.join(keys)}); fp32 always runs")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--repeat", type=int, default=None,
                        help="timed passes over all layers per row and M; the median is shown (default 5; --quick 2)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed passes before them (default 1; --quick 0: the checked call warms up)")
    parser.add_argument("--min-layers", type=int, default=8, help="fewest distinct layers per row (default 8)")
    parser.add_argument("--llc-mib", type=float, default=None,
                        help="last-level cache in MiB (default: read from the system; the GPU's L2 on cuda); "
                             f"each row's layers hold at least {WORKING_SET_FACTOR}x it")
    parser.add_argument("--copy-mib", type=int, default=None,
                        help="size of the bandwidth-reference copy (default 256; --quick 64)")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="about how long to time one row at one M (default 30; --quick 2); a slower row "
                             "gets fewer passes, and, when one call takes seconds, fewer layers")
    parser.add_argument("--no-graphs", action="store_true", help="cuda: time eager launches, not CUDA graphs")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke test: {QUICK_SHAPES} layers, min-layers only (no cache rule), 2 passes, "
                             "no warm-up pass, a 64 MiB copy, --max-seconds 2; its times mean nothing")
    args = parser.parse_args(argv)
    # --quick changes the defaults only; an option given explicitly wins.
    for name, full, quick in (("repeat", 5, 2), ("warmup", 1, 0), ("copy_mib", 256, 64), ("max_seconds", 30.0, 2.0)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if args.max_seconds <= 0:
        parser.error("--max-seconds must be positive")
    args.shape_list = parse_list(args.shapes or (QUICK_SHAPES if args.quick else FULL_SHAPES), parse_shape,
                                 "shapes", parser)
    args.m_list = parse_list(args.m, int, "batch sizes", parser)
    args.row_keys = set(parse_list(args.rows, str, "rows", parser)) if args.rows else set(keys)
    unknown = args.row_keys - set(keys)
    if unknown:
        parser.error(f"unknown rows {sorted(unknown)}; choose from {','.join(keys)}")
    args.row_keys.add("fp32")
    for n, k in args.shape_list:
        if n <= 0 or k <= 0 or k % GROUP_SIZE:
            parser.error(f"shape {n}x{k}: sizes must be positive and IN a multiple of {GROUP_SIZE}")
    if any(m <= 0 for m in args.m_list):
        parser.error("batch sizes must be positive")
    if args.repeat < 1 or args.warmup < 0 or args.min_layers < 1 or args.copy_mib < 1:
        parser.error("--repeat, --min-layers and --copy-mib must be at least 1, --warmup at least 0")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    if args.device == "cuda":
        if torch.cuda.is_available():
            device = torch.device("cuda")
        else:
            print("CUDA is not available; running on cpu", file=sys.stderr)
    timer = Timer(device, use_graphs=not args.no_graphs)
    impls = [impl for impl in implementations(device) if impl.key in args.row_keys]
    llc = int(args.llc_mib * 2**20) if args.llc_mib is not None else last_level_cache_bytes(device)
    working_set = 0 if args.quick else WORKING_SET_FACTOR * llc
    ref_name = "HBM" if device.type == "cuda" else "memcpy"

    bandwidth = copy_bandwidth(args.copy_mib * 2**20, device, timer, args.repeat)
    print(f"torch {torch.__version__}, torchquant {torchquant.__version__}, device {device}")
    if device.type == "cuda":
        print(f"GPU: {torch.cuda.get_device_name(device)}, L2 {llc / 2**20:.0f} MiB, "
              f"timing: {'eager launches' if args.no_graphs else 'CUDA graphs of one pass'}")
    else:
        print(f"CPU: {cpu_model()}, threads: {torch.get_num_threads()}, last-level cache {llc / 2**20:.0f} MiB, "
              f"PyTorch CPU capability: {torch.backends.cpu.get_cpu_capability()}, "
              f"torchquant CPU kernels: {torchquant_cpu_isa()}")
    preload = os.environ.get("LD_PRELOAD")
    if preload:
        print(f"LD_PRELOAD={preload} MALLOC_CONF={os.environ.get('MALLOC_CONF', '')}")
    print(f"copy of {args.copy_mib} MiB ({'device to device' if device.type == 'cuda' else 'tensor.copy_'}, "
          f"median): {bandwidth.copied_gbs:.1f} GB/s copied, {bandwidth.traffic_gbs:.1f} GB/s read + written; "
          f"reference for '% of {ref_name}': {bandwidth.reference(device):.1f} GB/s")
    layers_rule = (f"max({args.min_layers}, enough to hold {WORKING_SET_FACTOR} x {llc / 2**20:.0f} MiB)"
                   if working_set else f"{args.min_layers} (--quick: no cache rule)")
    print(f"each row cycles through {layers_rule} distinct layers; ms / call is the median over {args.repeat} "
          f"passes (after {args.warmup} warm-up) of pass time / layers")
    print("weight GB/s: the row's weight bytes per layer / ms per call (torchquant: packed codes + scales + zeros "
          "(+ lookup table); baselines: their own weight tensors); vs fp32 nn.Linear: fp32 ms / row ms")

    start = time.perf_counter()
    all_results: Dict[Tuple[int, int], Dict[str, Dict[int, Result]]] = {}
    resident: Dict[Tuple[int, int], Dict[str, Tuple[int, int, str]]] = {}
    missing_torchquant: List[str] = []
    try:
        with torch.no_grad():
            for shape in args.shape_list:
                pool = WeightPool(*shape)
                gen = torch.Generator().manual_seed(7)
                inputs = {m: with_outlier_columns(torch.randn(m, shape[1], generator=gen)).to(device)
                          for m in args.m_list}
                results: Dict[str, Dict[int, Result]] = {}
                skipped: Dict[str, str] = {}
                resident[shape] = {}
                for impl in impls:
                    reason = impl.unavailable(device)
                    if reason is not None:
                        skipped[impl.key] = reason
                        if impl.torchquant:
                            missing_torchquant.append(f"{impl.label}: {reason}")
                        continue
                    try:
                        results[impl.key] = run_row(impl, pool, inputs, args, device, timer, working_set)
                    except RowUnavailable as e:
                        skipped[impl.key] = str(e)
                        print(f"  {fmt_shape(shape)} {impl.label}: skipped: {e}", file=sys.stderr, flush=True)
                        continue
                    if impl.resident:
                        resident[shape][impl.key] = resident_row(impl, pool, device, inputs[args.m_list[0]])
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                all_results[shape] = results
                print_table(shape, impls, results, skipped, args.m_list, bandwidth.reference(device), ref_name)
                del pool
                gc.collect()
    except CheckFailed as e:
        print(f"\nerror: {e}\nstopping: no further rows are timed", file=sys.stderr)
        return 1
    print_resident(resident)
    print_targets(device, all_results, bandwidth.reference(device), resident)
    end_bandwidth = copy_bandwidth(args.copy_mib * 2**20, device, timer, args.repeat)
    print(f"\ncopy bandwidth at the end of the run: {end_bandwidth.reference(device):.1f} GB/s "
          f"(at the start {bandwidth.reference(device):.1f} GB/s; a large change means a busy machine)")
    print(f"(total {time.perf_counter() - start:.0f} s)", file=sys.stderr)
    if missing_torchquant:
        print("\nerror: torchquant rows could not run (leave them out with --rows):\n  "
              + "\n  ".join(missing_torchquant), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
