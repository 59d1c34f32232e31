"""One quantized weight, held as the run-time kernels read it.

A :class:`QuantizedWeight` is the single representation every quantized
Linear layer of torchquant computes from, whoever produced it (QAT's
``convert()``, RTN, GPTQ, AWQ, SmoothQuant) and whichever checkpoint layout
it is saved in. A weight ``W [N, K]`` (out_features x in_features) is

* ``packed``: uint8 ``[N, packed_row_bytes(K, layout_bits)]``, unsigned codes
  ``u`` in ``[0, 2^bits)`` in the run-time layout of
  ``csrc/runtime/packed_layout.h`` (packed by ``torchquant.ops.pack_weight``);
* ``scales``, ``zeros``: float32 ``[N, G]``, groups of ``g = K / G``
  consecutive (packed) columns; zeros are in the unsigned code domain, so
  ``W = (v(u) - zeros) * scales`` with ``v(u) = u``, or ``v(u) = lut[u]``
  for 4-bit lookup-table codes (NF4 / FP4: a float32 ``lut`` of 16 levels);
* ``perm``: int64 ``[K]`` or None. Act-order weights (GPTQ's ``g_idx``) are
  repacked so that each group's columns are contiguous; column ``j`` of the
  packed weight is column ``perm[j]`` of the original one, and the kernels
  compute ``x[..., perm] @ W_packed^T`` instead of gathering the weight.

``scales`` may themselves be quantized (QLoRA's double quantization,
:class:`QuantizedScales`): 8-bit codes on the dynamic map in blocks of 256,
plus an offset. The weight then holds those codes, and the float32 grid the
kernels read is formed for each call (``G`` values per row, ``1 / group_size``
of the weight's). Lookup-table codes need no zero-points (their levels are
centred on 0): ``zeros`` may then be None, and the zero grid is formed per
call too, so that an NF4 weight holds 4.5 bits per value at blocks of 64, as
bitsandbytes' does.

Widths 5 to 7 are stored in the 8-bit layout (one byte per code): the
kernels read 2, 3, 4 and 8 bits (``layout_bits``); ``bits`` stays the width
of the codes, so converting back gives the same codes.

Constructors take torchquant's code domain (signed codes with ``quant_min``,
zero-points in the code domain, ``g_idx``); :meth:`codes`,
:meth:`zero_points`, :meth:`g_idx` and :attr:`scales` give them back bit for
bit.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from torchquant import ops

__all__ = ["QuantizedWeight", "QuantizedScales", "LAYOUT_BITS", "layout_bits", "packed_row_bytes"]

# The widths the run-time layout packs (csrc/runtime/packed_layout.h).
LAYOUT_BITS = (2, 3, 4, 8)
_LUT_LEVELS = 16


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def layout_bits(bits: int) -> int:
    """The packed width that holds ``bits``-wide codes: 2, 3, 4, or 8 for 5 to 8 bits."""
    if not _is_int(bits) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an integer in [2, 8] (the run-time kernels read 2-, 3-, 4- and 8-bit codes; "
                         f"5 to 7 bits are held in the 8-bit layout), got {bits!r}")
    return next(b for b in LAYOUT_BITS if b >= bits)


def packed_row_bytes(in_features: int, bits: int) -> int:
    """Bytes of one packed row of ``bits``-wide codes (in the layout width that holds them)."""
    return ops.packed_row_bytes(in_features, layout_bits(bits))


def _check_tensor(t, name: str, dtype: torch.dtype, shape, device: torch.device) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"QuantizedWeight: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != dtype:
        raise TypeError(f"QuantizedWeight: {name} must be {dtype}, got {t.dtype}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"QuantizedWeight: {name} must have shape {list(shape)}, got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"QuantizedWeight: {name} is on {t.device} but packed is on {device}; every tensor of a "
                         "weight must be on one device")


class QuantizedScales:
    """Per-group scales ``[N, G]`` stored in 8 bits: QLoRA's double quantization.

    ``scales = lut_dequantize(codes, absmax, code_map, block_size) + offset``:
    the scales minus their mean, in blocks of ``block_size`` (256) consecutive
    values of the flattened ``[N, G]`` grid, each block coded on the signed
    dynamic 8-bit map (:func:`torchquant.lookup_tables.dynamic_map`) over its
    absmax, as bitsandbytes' ``compress_statistics`` does.

    Args:
        codes: uint8 ``[N, G]``.
        absmax: float32 ``[ceil(N * G / block_size)]``.
        offset: float32 ``[1]``, the mean that was subtracted.
        code_map: float32 ``[256]``, the levels of the codes.
        block_size: values per block.
    """

    def __init__(self, codes: Tensor, absmax: Tensor, offset: Tensor, code_map: Tensor,
                 block_size: int = 256) -> None:
        if not _is_int(block_size) or block_size < 1:
            raise ValueError(f"QuantizedScales: block_size must be a positive integer, got {block_size!r}")
        if not isinstance(codes, Tensor) or codes.dim() != 2:
            raise ValueError("QuantizedScales: codes must be a 2-D uint8 tensor [out_features, groups]")
        device = codes.device
        _check_tensor(codes, "codes", torch.uint8, tuple(codes.shape), device)
        blocks = -(-codes.numel() // block_size)
        _check_tensor(absmax, "absmax", torch.float32, (blocks,), device)
        _check_tensor(offset, "offset", torch.float32, (1,), device)
        _check_tensor(code_map, "code_map", torch.float32, (256,), device)
        self.codes, self.absmax, self.offset, self.code_map = codes, absmax, offset, code_map
        self.block_size = block_size

    @classmethod
    def quantize(cls, scales: Tensor, block_size: int = 256) -> "QuantizedScales":
        """The 8-bit form of float32 ``scales [N, G]`` (finite)."""
        from torchquant.lookup_tables import dynamic_map
        scales = scales.detach().to(torch.float32)
        offset = scales.mean().reshape(1)
        code_map = dynamic_map().to(scales.device)
        codes, absmax = ops.lut_quantize(scales - offset, code_map, block_size)
        return cls(codes, absmax, offset, code_map, block_size)

    @property
    def shape(self):
        return self.codes.shape

    def dequantize(self) -> Tensor:
        """float32 ``[N, G]``: the scales the kernels read."""
        return ops.lut_dequantize(self.codes, self.absmax, self.code_map, self.block_size) + self.offset

    def tensors(self):
        return (self.codes, self.absmax, self.offset, self.code_map)

    def to(self, device) -> "QuantizedScales":
        return QuantizedScales(*(t.to(device) for t in self.tensors()), block_size=self.block_size)


class QuantizedWeight:
    """A quantized weight ``[out_features, in_features]`` in the run-time layout (see the module docstring).

    The constructor takes the run-time tensors as they are (not copied) and
    checks them; :meth:`from_codes` builds one from integer codes.

    Args:
        packed: uint8 ``[N, packed_row_bytes(in_features, bits)]``.
        scales: float32 ``[N, G]``, ``G`` dividing ``in_features``, or their
            8-bit form (:class:`QuantizedScales`).
        zeros: float32 ``[N, G]``, zero-points in the unsigned code domain;
            None (all zero) for lookup-table codes.
        bits: width of the codes, 2 to 8.
        in_features: ``K``.
        lut: float32 ``[16]``, the value of each 4-bit code (4 bits only), or None.
        perm: int64 ``[K]``, the original column of each packed column, or None.
    """

    def __init__(self, packed: Tensor, scales: Union[Tensor, QuantizedScales], zeros: Optional[Tensor], bits: int,
                 in_features: int, *, lut: Optional[Tensor] = None, perm: Optional[Tensor] = None) -> None:
        lbits = layout_bits(bits)
        if not _is_int(in_features) or in_features <= 0:
            raise ValueError(f"QuantizedWeight: in_features must be a positive integer, got {in_features!r}")
        if not isinstance(packed, Tensor) or packed.dim() != 2:
            got = f"shape {list(packed.shape)}" if isinstance(packed, Tensor) else type(packed).__name__
            raise ValueError(f"QuantizedWeight: packed must be a 2-D uint8 tensor [out_features, packed row bytes], "
                             f"got {got}")
        device = packed.device
        out_features = packed.shape[0]
        _check_tensor(packed, "packed", torch.uint8, (out_features, packed_row_bytes(in_features, bits)), device)
        quantized_scales = scales if isinstance(scales, QuantizedScales) else None
        shape = scales.shape if isinstance(scales, (Tensor, QuantizedScales)) else None
        if shape is None or len(shape) != 2 or shape[0] != out_features:
            got = f"shape {list(shape)}" if shape is not None else type(scales).__name__
            raise ValueError(f"QuantizedWeight: scales must be 2-D [{out_features}, groups], got {got}")
        groups = shape[1]
        if groups < 1 or in_features % groups:
            raise ValueError(f"QuantizedWeight: scales has {groups} groups per row, which must divide in_features = "
                             f"{in_features} (groups of in_features / G consecutive columns)")
        if quantized_scales is not None:
            if quantized_scales.codes.device != device:
                raise ValueError(f"QuantizedWeight: scales are on {quantized_scales.codes.device} but packed is on "
                                 f"{device}; every tensor of a weight must be on one device")
        else:
            _check_tensor(scales, "scales", torch.float32, (out_features, groups), device)
        if zeros is None:
            if lut is None:
                raise ValueError("QuantizedWeight: zeros may be None only for lookup-table codes (lut given); "
                                 "integer codes need their zero-points")
        else:
            _check_tensor(zeros, "zeros", torch.float32, (out_features, groups), device)
        if lut is not None:
            if lbits != 4:
                raise ValueError(f"QuantizedWeight: a lookup table (lut) holds the levels of 4-bit codes; got "
                                 f"bits={bits}")
            _check_tensor(lut, "lut", torch.float32, (_LUT_LEVELS,), device)
        if perm is not None:
            _check_tensor(perm, "perm", torch.int64, (in_features,), device)
        self.packed, self.lut, self.perm = packed, lut, perm
        self.stored_zeros = zeros
        self._groups = groups
        self.quantized_scales = quantized_scales
        self._scales = None if quantized_scales is not None else scales
        self.bits, self.in_features = bits, in_features

    @property
    def zeros(self) -> Tensor:
        """float32 ``[N, G]``, the zero grid the kernels read (formed, all zero, when none is stored)."""
        if self.stored_zeros is not None:
            return self.stored_zeros
        return torch.zeros(self.out_features, self._groups, device=self.device)

    @property
    def scales(self) -> Tensor:
        """float32 ``[N, G]``, the grid the kernels read (formed from the 8-bit form if double-quantized)."""
        return self._scales if self._scales is not None else self.quantized_scales.dequantize()

    # ---- construction from torchquant's code domain ------------------------------------------

    @classmethod
    def from_codes(cls, codes: Tensor, scales: Tensor, zero_points: Tensor, bits: int, *, quant_min: int = 0,
                   g_idx: Optional[Tensor] = None, lut: Optional[Tensor] = None) -> "QuantizedWeight":
        """A weight from integer codes, packed for the kernels (act-order columns regrouped).

        Args:
            codes: integer ``[N, K]`` in ``[quant_min, quant_min + 2^bits - 1]``.
            scales: floating ``[N, G]`` (stored as float32).
            zero_points: ``[N, G]``, the code-domain zero-point of each group:
                integers in the code range for integer codes; any float with
                a lookup table (whose codes are unsigned, ``quant_min`` 0).
            bits: 2 to 8.
            quant_min: the lowest code (``-2^(bits-1)`` on a signed grid).
            g_idx: integer ``[K]``, the group of each column (GPTQ act-order),
                or None for ``column // (K / G)``. Every group must hold
                exactly ``K / G`` columns.
            lut: float ``[16]`` levels of 4-bit codes, or None.
        """
        if not isinstance(codes, Tensor) or not _integer(codes) or codes.dim() != 2:
            got = f"{codes.dtype} of shape {list(codes.shape)}" if isinstance(codes, Tensor) else type(codes).__name__
            raise TypeError(f"QuantizedWeight.from_codes: codes must be a 2-D integer tensor [out_features, "
                            f"in_features], got {got}")
        layout_bits(bits)
        if not _is_int(quant_min):
            raise TypeError(f"QuantizedWeight.from_codes: quant_min must be an integer, got {quant_min!r}")
        out_features, in_features = codes.shape
        quant_max = quant_min + (1 << bits) - 1
        if codes.numel() and (int(codes.min()) < quant_min or int(codes.max()) > quant_max):
            raise ValueError(f"QuantizedWeight.from_codes: codes must lie in [quant_min, quant_min + 2^bits - 1] = "
                             f"[{quant_min}, {quant_max}], got values in [{int(codes.min())}, {int(codes.max())}]")
        for name, t in (("scales", scales), ("zero_points", zero_points)):
            if not isinstance(t, Tensor) or t.dim() != 2 or t.shape[0] != out_features:
                got = f"shape {list(t.shape)}" if isinstance(t, Tensor) else type(t).__name__
                raise ValueError(f"QuantizedWeight.from_codes: {name} must be 2-D [{out_features}, groups], got {got}")
            if t.device != codes.device:
                raise ValueError(f"QuantizedWeight.from_codes: {name} is on {t.device} but codes are on "
                                 f"{codes.device}")
        if zero_points.shape != scales.shape:
            raise ValueError(f"QuantizedWeight.from_codes: zero_points must have the shape of scales "
                             f"{list(scales.shape)}, got {list(zero_points.shape)}")
        groups = scales.shape[1]
        if groups < 1 or in_features % groups:
            raise ValueError(f"QuantizedWeight.from_codes: scales has {groups} groups per row, which must divide "
                             f"in_features = {in_features}")
        zeros = zero_points.detach().to(torch.float64) - quant_min
        if lut is None:
            _check_integer_zeros(zeros, quant_min, quant_max)
        elif quant_min != 0:
            raise ValueError(f"QuantizedWeight.from_codes: lookup-table codes are unsigned indices (quant_min 0), "
                             f"got quant_min={quant_min}")
        perm = None if g_idx is None else group_order(g_idx, in_features, groups)
        unsigned = (codes.detach().to(torch.int32) - quant_min).to(torch.uint8)
        if perm is not None:
            unsigned = unsigned.index_select(1, perm)
        return cls(ops.pack_weight(unsigned.contiguous(), layout_bits(bits)),
                   scales.detach().to(torch.float32).contiguous().clone(), zeros.to(torch.float32).contiguous(),
                   bits, in_features,
                   lut=None if lut is None else lut.detach().to(codes.device, torch.float32).contiguous().clone(),
                   perm=perm)

    @classmethod
    def empty(cls, out_features: int, in_features: int, bits: int, groups: int = 1, *,
              lookup_table: bool = False, zero_points: bool = True, device=None) -> "QuantizedWeight":
        """A weight of zero codes (scales 1, zeros 0) of the right shapes, to be filled by a state dict.

        Zero codes pack to zero bytes in every width of the layout. ``zero_points=False``
        (lookup-table codes only) stores no zero grid.
        """
        lut = torch.zeros(_LUT_LEVELS, device=device) if lookup_table else None
        zeros = torch.zeros(out_features, groups, device=device) if zero_points else None
        return cls(torch.zeros(out_features, packed_row_bytes(in_features, bits), dtype=torch.uint8, device=device),
                   torch.ones(out_features, groups, device=device), zeros, bits, in_features, lut=lut)

    # ---- shape and size ------------------------------------------------------------------------

    @property
    def out_features(self) -> int:
        return self.packed.shape[0]

    @property
    def layout_bits(self) -> int:
        """The packed width the kernels read (``bits`` rounded up to 2, 3, 4 or 8)."""
        return layout_bits(self.bits)

    @property
    def num_groups(self) -> int:
        return self._groups

    @property
    def group_size(self) -> int:
        """Consecutive (packed) columns per group; ``in_features`` for one group per row."""
        return self.in_features // self.num_groups

    @property
    def code_kind(self) -> str:
        """``"int"`` (``v(u) = u``) or ``"lut"`` (``v(u) = lut[u]``)."""
        return "int" if self.lut is None else "lut"

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor: the packed codes plus the grids (and the table and permutation, if any)."""
        stored = (self.packed, self._scales, self.stored_zeros, self.lut, self.perm) + \
            (self.quantized_scales.tensors() if self.quantized_scales is not None else ())
        return sum(t.numel() * t.element_size() for t in stored if t is not None)

    def to(self, device) -> "QuantizedWeight":
        """The same weight on ``device``."""
        def move(t):
            return None if t is None else t.to(device)
        scales = self.quantized_scales.to(device) if self.quantized_scales is not None else move(self._scales)
        return QuantizedWeight(move(self.packed), scales, move(self.stored_zeros), self.bits, self.in_features,
                               lut=move(self.lut), perm=move(self.perm))

    # ---- back to the code domain (exact inverses of from_codes) -------------------------------

    def unsigned_codes(self) -> Tensor:
        """uint8 ``[N, K]``, ``u`` in the original column order."""
        u = ops.unpack_weight(self.packed, self.layout_bits, self.in_features)
        return self._original_order(u)

    def codes(self, quant_min: int = 0) -> Tensor:
        """int32 codes ``u + quant_min`` ``[N, K]`` in the original column order."""
        return self.unsigned_codes().to(torch.int32) + quant_min

    def zero_points(self, quant_min: int = 0) -> Tensor:
        """float32 ``[N, G]``: the code-domain zero-points ``zeros + quant_min``."""
        return self.zeros + quant_min

    def g_idx(self) -> Tensor:
        """int32 ``[K]``: the group of each original column."""
        groups = torch.arange(self.in_features, dtype=torch.int32, device=self.device) // self.group_size
        return self._original_order(groups.unsqueeze(0)).squeeze(0)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``[N, K]`` in the original column order, formed in float32 and rounded once to ``dtype``.

        For references and checks: the linear ops never form this tensor.
        """
        w = ops.dequantize_weight(self.packed, self.scales, self.zeros, self.layout_bits, self.in_features,
                                  lut=self.lut)
        return self._original_order(w).to(dtype)

    def _original_order(self, packed_order: Tensor) -> Tensor:
        """Columns of a ``[rows, K]`` tensor in packed order put back in the original order."""
        if self.perm is None:
            return packed_order
        out = torch.empty_like(packed_order)
        out[:, self.perm] = packed_order
        return out

    def __repr__(self) -> str:
        kind = "lut" if self.lut is not None else "int"
        return (f"QuantizedWeight(out_features={self.out_features}, in_features={self.in_features}, bits={self.bits}, "
                f"group_size={self.group_size}, kind={kind}, act_order={self.perm is not None}, "
                f"double_quant={self.quantized_scales is not None}, device={self.device})")


def _integer(t: Tensor) -> bool:
    return not (t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool)


def _check_integer_zeros(zeros: Tensor, quant_min: int, quant_max: int) -> None:
    """Unsigned zero-points (float64) hold integers in ``[0, 2^bits)``: they convert back exactly."""
    if not zeros.numel():
        return
    if not bool(torch.isfinite(zeros).all()) or not bool((zeros == zeros.round()).all()):
        raise ValueError("QuantizedWeight.from_codes: zero_points must hold integers (the code-domain zero-point of "
                         "each group)")
    lo, hi = float(zeros.min()) + quant_min, float(zeros.max()) + quant_min
    if lo < quant_min or hi > quant_max:
        raise ValueError(f"QuantizedWeight.from_codes: zero_points must lie in [{quant_min}, {quant_max}], got "
                         f"values in [{lo:g}, {hi:g}]")


def group_order(g_idx: Tensor, in_features: int, groups: int) -> Optional[Tensor]:
    """int64 ``perm`` putting the columns of each group together (stable), or None if they already are.

    Raises ValueError unless every group holds exactly ``in_features / groups``
    columns: the kernels read groups of equal size.
    """
    if not isinstance(g_idx, Tensor) or not _integer(g_idx):
        got = g_idx.dtype if isinstance(g_idx, Tensor) else type(g_idx).__name__
        raise TypeError(f"g_idx must be an integer tensor (the group of each input column), got {got}")
    if tuple(g_idx.shape) != (in_features,):
        raise ValueError(f"g_idx must have shape [{in_features}] (one group index per input column), got "
                         f"{list(g_idx.shape)}")
    g = g_idx.detach().to(torch.int64)
    lo, hi = int(g.min()), int(g.max())
    if lo < 0 or hi >= groups:
        raise ValueError(f"g_idx must hold group indices in [0, {groups - 1}], got values in [{lo}, {hi}]")
    counts = torch.bincount(g, minlength=groups)
    size = in_features // groups
    uneven = (counts != size).nonzero().flatten()
    if uneven.numel():
        first = int(uneven[0])
        raise ValueError(f"g_idx must put exactly in_features / groups = {size} columns in every group (the kernels "
                         f"read groups of equal size); group {first} has {int(counts[first])}")
    perm = torch.sort(g, stable=True).indices
    if torch.equal(perm, torch.arange(in_features, device=perm.device)):
        return None
    return perm
