"""Unsigned codes packed into int32 words, in the layout of GPTQ checkpoints.

Along the packed dimension the codes form one little-endian bit stream: code
``i`` occupies stream bits ``[i * bits, (i + 1) * bits)`` and stream bit ``k``
is bit ``k % 32`` of word ``k // 32``. For 2, 4 and 8 bits this puts
``32 / bits`` codes in each word, lowest bits first. For 3 bits, 32 codes fill
3 words and two of them straddle a word boundary: code 10 has its low two bits
in bits 30-31 of word 0 and its high bit in bit 0 of word 1; code 21 has its
low bit in bit 31 of word 1 and its high two bits in bits 0-1 of word 2. This
is the layout AutoGPTQ / GPTQModel write and vLLM / exllama read (``qweight``
packs along the input dimension, ``qzeros`` along the output dimension).

Unlike :func:`torchquant.formats.pack_codes` (bytes, torchquant's own
checkpoint), the words here are what the GPTQ kernels consume.
"""
from __future__ import annotations

import math
from typing import Tuple

import torch
from torch import Tensor

__all__ = ["SUPPORTED_BITS", "pack_int32", "unpack_int32", "codes_per_block"]

SUPPORTED_BITS = (2, 3, 4, 8)

_WORD = 32
_WORD_MASK = (1 << _WORD) - 1


def _check_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS} (the GPTQ packed widths), got {bits!r}")


def codes_per_block(bits: int) -> Tuple[int, int]:
    """``(codes, words)``: the smallest whole number of codes that fills whole words.

    (8, 1) for 4 bits, (32, 3) for 3 bits: a packed dimension must hold a
    multiple of ``codes`` values.
    """
    _check_bits(bits)
    g = math.gcd(bits, _WORD)
    return _WORD // g, bits // g


def _positions(bits: int):
    """For each code of a block: (word, bit offset, whether it spills into the next word)."""
    codes, _ = codes_per_block(bits)
    for j in range(codes):
        word, offset = divmod(j * bits, _WORD)
        yield j, word, offset, offset + bits > _WORD


def _check_dim(t: Tensor, dim: int, name: str) -> int:
    if t.dim() == 0:
        raise ValueError(f"{name} must have at least one dimension, got a 0-d tensor")
    if not -t.dim() <= dim < t.dim():
        raise ValueError(f"dim must be in [{-t.dim()}, {t.dim()}) for {name} of shape {tuple(t.shape)}, got {dim}")
    return dim % t.dim()


def pack_int32(values: Tensor, bits: int, dim: int = 0) -> Tensor:
    """Pack unsigned ``bits``-wide codes along ``dim`` into int32 words.

    Args:
        values: integer tensor with entries in ``[0, 2^bits - 1]``;
            ``values.shape[dim]`` must be a multiple of
            ``codes_per_block(bits)[0]`` (8 codes for 4 bits, 32 for 3 bits).
        bits: 2, 3, 4 or 8.
        dim: the dimension to pack.

    Returns:
        int32 tensor, ``values.shape`` with ``shape[dim] * bits / 32`` at
        ``dim``. Words are two's-complement: bit 31 set reads as negative.
    """
    _check_bits(bits)
    if not isinstance(values, Tensor):
        raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
    if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
        raise TypeError(f"values must be an integer tensor, got {values.dtype}")
    dim = _check_dim(values, dim, "values")
    codes, words = codes_per_block(bits)
    n = values.shape[dim]
    if n % codes:
        raise ValueError(f"values.shape[{dim}] = {n} must be a multiple of {codes}: {bits}-bit codes pack "
                         f"{codes} to {words} int32 word{'s' if words > 1 else ''}")
    if values.numel():
        lo, hi = int(values.min()), int(values.max())
        if lo < 0 or hi > (1 << bits) - 1:
            raise ValueError(f"values must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing (unsigned codes); "
                             f"got values in [{lo}, {hi}]")

    # int64 so that shifting into bit 31 and beyond is well defined.
    u = values.movedim(dim, -1).to(torch.int64)
    u = u.reshape(*u.shape[:-1], n // codes, codes)
    out = torch.zeros(*u.shape[:-1], words, dtype=torch.int64, device=values.device)
    for j, word, offset, spills in _positions(bits):
        out[..., word] |= (u[..., j] << offset) & _WORD_MASK
        if spills:
            out[..., word + 1] |= u[..., j] >> (_WORD - offset)
    out = out.reshape(*out.shape[:-2], -1)
    # Reinterpret the unsigned 32-bit value as two's complement int32.
    out = torch.where(out >= (1 << 31), out - (1 << _WORD), out).to(torch.int32)
    return out.movedim(-1, dim).contiguous()


def unpack_int32(words: Tensor, bits: int, dim: int = 0) -> Tensor:
    """Inverse of :func:`pack_int32`: int32 codes in ``[0, 2^bits - 1]``.

    ``words.shape[dim]`` must be a multiple of ``codes_per_block(bits)[1]``
    (3 words for 3 bits, 1 otherwise); the result has
    ``shape[dim] * 32 / bits`` at ``dim``.
    """
    _check_bits(bits)
    if not isinstance(words, Tensor):
        raise TypeError(f"words must be a torch.Tensor, got {type(words).__name__}")
    if words.dtype != torch.int32:
        raise TypeError(f"words must be an int32 tensor (packed GPTQ words), got {words.dtype}")
    dim = _check_dim(words, dim, "words")
    codes, per_block = codes_per_block(bits)
    n = words.shape[dim]
    if n % per_block:
        raise ValueError(f"words.shape[{dim}] = {n} must be a multiple of {per_block}: {bits}-bit codes fill "
                         f"{per_block} int32 words per {codes} codes")

    w = words.movedim(dim, -1).to(torch.int64) & _WORD_MASK
    w = w.reshape(*w.shape[:-1], n // per_block, per_block)
    mask = (1 << bits) - 1
    parts = []
    for j, word, offset, spills in _positions(bits):
        v = w[..., word] >> offset
        if spills:
            v = v | (w[..., word + 1] << (_WORD - offset))
        parts.append(v & mask)
    out = torch.stack(parts, dim=-1).reshape(*w.shape[:-2], -1).to(torch.int32)
    return out.movedim(-1, dim).contiguous()
