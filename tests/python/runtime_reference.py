"""Plain-PyTorch references of the weight-only run-time ops, written from the
layout and the formula, never calling the ops under test.

Layout (csrc/runtime/packed_layout.h): a row is a sequence of chunks of C codes
in B bytes (8 bits: 16 in 16, 4 bits: 32 in 16, 2 bits: 64 in 16, 3 bits: 128 in
48). Code c = j + 16 i of a chunk (j < 16) is bits [bits*i, bits*(i+1)) of byte j;
at 3 bits its low two bits are bits [2 (i % 4), 2 (i % 4) + 2) of byte
16 (i // 4) + j and its high bit is bit i of byte 32 + j.

Weight: W[n, k] = (v(u[n, k]) - zeros[n, k // g]) * scales[n, k // g], v(u) = u or lut[u].
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

NF4 = torch.tensor([-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0,
                    0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0])

# float32 sums of products in any order: relative to the sum of |terms|.
ACC_RTOL = 3e-5
# Rounding of the result to the output dtype: relative to |y|.
OUT_RTOL = {torch.float32: 2.0 ** -22, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -10}


def chunk_geometry(bits: int) -> tuple[int, int]:
    """(codes, bytes) of one chunk."""
    return (128, 48) if bits == 3 else (128 // bits, 16)


def row_bytes(in_features: int, bits: int) -> int:
    codes, nbytes = chunk_geometry(bits)
    return -(-in_features // codes) * nbytes


def _positions(in_features: int, bits: int):
    codes, nbytes = chunk_geometry(bits)
    k = torch.arange(in_features)
    chunk, c = k // codes, k % codes
    return chunk * nbytes, c % 16, c // 16


def codes_of(packed: Tensor, bits: int, in_features: int) -> Tensor:
    """code_at for every column: int64 [N, in_features]."""
    base, j, i = _positions(in_features, bits)
    p = packed.long()
    if bits == 3:
        low = (p[:, base + 16 * (i // 4) + j] >> (2 * (i % 4))) & 3
        high = (p[:, base + 32 + j] >> i) & 1
        return low | (high << 2)
    return (p[:, base + j] >> (bits * i)) & ((1 << bits) - 1)


def pack(codes: Tensor, bits: int) -> Tensor:
    """set_code for every column, one column at a time (small shapes only)."""
    n, k = codes.shape
    out = torch.zeros(n, row_bytes(k, bits), dtype=torch.int64)
    base, j, i = _positions(k, bits)
    u = codes.long()
    for col in range(k):
        b, jj, ii = int(base[col]), int(j[col]), int(i[col])
        if bits == 3:
            out[:, b + 16 * (ii // 4) + jj] |= (u[:, col] & 3) << (2 * (ii % 4))
            out[:, b + 32 + jj] |= ((u[:, col] >> 2) & 1) << ii
        else:
            out[:, b + jj] |= u[:, col] << (bits * ii)
    return out.to(torch.uint8)


class Weight(NamedTuple):
    codes: Tensor  # int64 [N, K]
    packed: Tensor  # uint8
    scales: Tensor  # float32 [N, G]
    zeros: Tensor  # float32 [N, G]
    bits: int
    lut: Optional[Tensor]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    def args(self):
        """(packed, scales, zeros, bits, in_features, lut) as the ops take them."""
        return self.packed, self.scales, self.zeros, self.bits, self.in_features, self.lut


def make_weight(n: int, k: int, groups: int, bits: int, lut: bool = False, seed: int = 0) -> Weight:
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, k), generator=gen)
    scales = torch.rand(n, groups, generator=gen) * 0.1 + 0.01
    if lut:
        zeros = torch.rand(n, groups, generator=gen) * 0.2 - 0.1
    else:
        zeros = torch.randint(0, 1 << bits, (n, groups), generator=gen).float() + 0.25
    return Weight(codes, pack(codes, bits), scales, zeros, bits, NF4.clone() if lut else None)


def values(w: Weight) -> Tensor:
    """v(u), float64 [N, K]."""
    return w.lut.double()[w.codes] if w.lut is not None else w.codes.double()


def weight(w: Weight) -> Tensor:
    """The float64 weight [N, K]."""
    g = w.in_features // w.scales.shape[1]
    s = w.scales.double().repeat_interleave(g, dim=1)
    z = w.zeros.double().repeat_interleave(g, dim=1)
    return (values(w) - z) * s


def abs_weight_terms(w: Weight) -> Tensor:
    """s (|v| + |z|): the kernels may add v x and z x separately, so rounding is
    relative to the sum of both."""
    g = w.in_features // w.scales.shape[1]
    s = w.scales.double().repeat_interleave(g, dim=1)
    z = w.zeros.double().repeat_interleave(g, dim=1)
    return s * (values(w).abs() + z.abs())


def linear(x: Tensor, w: Weight, perm: Optional[Tensor] = None, bias: Optional[Tensor] = None):
    """(y float64, sum of |terms| float64) for y = x[..., perm] W^T + bias."""
    xd = x.double()
    if perm is not None:
        xd = xd[..., perm]
    y = xd @ weight(w).T
    terms = xd.abs() @ abs_weight_terms(w).T
    if bias is not None:
        y = y + bias.double()
        terms = terms + bias.double().abs()
    return y, terms


def grad_input(dy: Tensor, w: Weight, perm: Optional[Tensor] = None):
    """(dx float64, sum of |terms|) for dx[..., perm[j]] = (dy W)[..., j]."""
    dx_perm = dy.double() @ weight(w)
    terms_perm = dy.double().abs() @ abs_weight_terms(w)
    if perm is None:
        return dx_perm, terms_perm
    dx, terms = torch.empty_like(dx_perm), torch.empty_like(terms_perm)
    dx[..., perm] = dx_perm
    terms[..., perm] = terms_perm
    return dx, terms


def assert_close(actual: Tensor, expected: Tensor, terms: Tensor, dtype: torch.dtype, what: str = "") -> None:
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype} != {dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual.double() - expected).abs()
    tol = ACC_RTOL * terms + OUT_RTOL[dtype] * expected.abs() + 1e-30
    bad = diff > tol
    assert not bool(bad.any()), (
        f"{what}: {int(bad.sum())} of {bad.numel()} values off; worst diff {float(diff.max()):.3g}, "
        f"tolerance there {float(tol.flatten()[int(diff.flatten().argmax())]):.3g}")
