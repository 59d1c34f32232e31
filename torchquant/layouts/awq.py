"""The AWQ GEMM checkpoint layout of a quantized Linear weight (AutoAWQ's ``WQLinear_GEMM``).

For a layer with ``in`` inputs, ``out`` outputs and groups of ``g`` input
columns, the state dict holds exactly what AutoAWQ writes and vLLM /
transformers read:

* ``qweight``: int32 ``[in, out / 8]``. Row ``i`` holds the unsigned 4-bit
  codes ``u = code - quant_min`` of input column ``i`` for every output, eight
  per word along the *output* dimension in AWQ's interleaved order
  :data:`AWQ_ORDER` = (0, 2, 4, 6, 1, 3, 5, 7): bits ``[4k, 4k + 4)`` of word
  ``j`` hold output ``8j + AWQ_ORDER[k]``, the order AutoAWQ's packer
  (``WQLinear_GEMM.from_linear``) writes and ``unpack_awq`` /
  ``reverse_awq_order`` read (:data:`AWQ_REVERSE_ORDER` is the inverse);
* ``qzeros``: int32 ``[in / g, out / 8]``, the unsigned zero-points
  ``zero - quant_min`` packed the same way, stored as they are (GPTQ's v1
  format stores ``zero - 1``; AWQ does not);
* ``scales``: float16 ``[in / g, out]``;

and ``W[o, i] = (u[i, o] - zero_u[i // g, o]) * scales[i // g, o]``. A
symmetric layer (signed codes, zero-point 0) stores the zero-point 8
everywhere, so readers that always apply ``qzeros`` and readers that take
``zero_point: false`` to mean "subtract 8" agree. Only 4-bit codes exist in
this layout (AutoAWQ refuses other widths).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor

from torchquant.layouts.base import CheckpointLayout, check_devices, check_fp16_range, check_packed_tensors, \
    check_tensor, is_int, prefixed
from torchquant.quantized_weight import QuantizedWeight
from torchquant.spec import QuantSpec

__all__ = ["AWQ_ORDER", "AWQ_REVERSE_ORDER", "BITS", "PACK", "AWQLayout", "check_bits", "pack_awq", "unpack_awq"]

BITS = 4
PACK = 32 // BITS  # codes per int32 word
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # the column held by nibble k of a word
AWQ_REVERSE_ORDER = tuple(AWQ_ORDER.index(c) for c in range(PACK))  # the nibble holding column c

_SHIFTS = tuple(range(0, 32, BITS))
_WORD = 1 << 32


def check_bits(bits) -> None:
    if isinstance(bits, bool) or bits != BITS:
        raise ValueError(f"the AWQ GEMM layout holds {BITS}-bit codes only (AutoAWQ's WQLinear_GEMM), got "
                         f"bits={bits!r}. A 3-bit AWQ result stays usable inside torchquant (apply the searched "
                         f"scales and clips, then fake-quantize), or store it in the GPTQ layout "
                         f"(torchquant.nn.GPTQLinear), which has 3 bits")


def pack_awq(values: Tensor, bits: int = BITS) -> Tensor:
    """Unsigned 4-bit codes ``[rows, cols]`` packed along the columns in AWQ order: int32 ``[rows, cols / 8]``.

    ``cols`` must be a multiple of 8. Words are two's complement (bit 31 set
    reads as negative), as in the checkpoints.
    """
    check_bits(bits)
    if not isinstance(values, Tensor):
        raise TypeError(f"values must be a torch.Tensor, got {type(values).__name__}")
    if values.dtype.is_floating_point or values.dtype.is_complex or values.dtype == torch.bool:
        raise TypeError(f"values must be an integer tensor, got {values.dtype}")
    if values.dim() != 2 or values.shape[1] % PACK:
        raise ValueError(f"values must be 2-D with a multiple of {PACK} columns (packed {PACK} to an int32 word), "
                         f"got shape {list(values.shape)}")
    if values.numel() and (int(values.min()) < 0 or int(values.max()) > (1 << bits) - 1):
        raise ValueError(f"values must lie in [0, {(1 << bits) - 1}] (unsigned {bits}-bit codes), got values in "
                         f"[{int(values.min())}, {int(values.max())}]")
    rows, cols = values.shape
    # Nibble k of word j takes column 8j + AWQ_ORDER[k]; int64 keeps bit 31 well defined.
    nibbles = values.to(torch.int64).reshape(rows, cols // PACK, PACK)[..., list(AWQ_ORDER)]
    shifts = torch.tensor(_SHIFTS, dtype=torch.int64, device=values.device)
    words = (nibbles << shifts).sum(dim=-1)  # disjoint bits: the sum is the bitwise or
    return torch.where(words >= _WORD // 2, words - _WORD, words).to(torch.int32)


def unpack_awq(words: Tensor, bits: int = BITS) -> Tensor:
    """Inverse of :func:`pack_awq`: int32 codes ``[rows, words * 8]`` in ``[0, 15]``."""
    check_bits(bits)
    if not isinstance(words, Tensor):
        raise TypeError(f"words must be a torch.Tensor, got {type(words).__name__}")
    if words.dtype != torch.int32 or words.dim() != 2:
        raise ValueError(f"words must be a 2-D int32 tensor (packed AWQ words), got {words.dtype} of shape "
                         f"{list(words.shape)}")
    shifts = torch.tensor(_SHIFTS, dtype=torch.int64, device=words.device)
    nibbles = (words.to(torch.int64)[..., None] >> shifts) & ((1 << bits) - 1)  # [rows, words, 8]: nibble k
    return nibbles[..., list(AWQ_REVERSE_ORDER)].reshape(words.shape[0], -1).to(torch.int32)


class AWQLayout(CheckpointLayout):
    """AWQ GEMM's tensors (see the module docstring) for one layer's settings.

    Args:
        group_size: input columns per grid; None or -1 for one grid per row
            (AutoAWQ's -1).
        symmetric: signed codes with zero-point 0 (stored as 8).
        quant_min: the lowest code; -8 when symmetric, 0 otherwise by default.
        bits: 4, the only width of the format.
    """

    name = "awq"

    def __init__(self, group_size: Optional[int] = 128, *, symmetric: bool = False, quant_min: Optional[int] = None,
                 bits: int = BITS) -> None:
        check_bits(bits)
        if group_size is None or group_size == -1:
            group_size = -1
        elif not is_int(group_size) or group_size <= 0:
            raise ValueError(f"group_size must be a positive integer, or -1 / None for one group per row, got "
                             f"{group_size!r}")
        if quant_min is None:
            quant_min = -(1 << (bits - 1)) if symmetric else 0
        if not is_int(quant_min):
            raise TypeError(f"quant_min must be an integer, got {quant_min!r}")
        self.bits, self.group_size, self.symmetric, self.quant_min = bits, group_size, bool(symmetric), quant_min

    @property
    def quant_max(self) -> int:
        return self.quant_min + (1 << self.bits) - 1

    @property
    def symmetric_zero(self) -> int:
        """The unsigned zero-point of a symmetric layer: the middle of the range."""
        return 1 << (self.bits - 1)

    def group_columns(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def n_groups(self, in_features: int) -> int:
        return in_features // self.group_columns(in_features)

    def check_features(self, in_features: int, out_features: int) -> None:
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not is_int(value) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if out_features % PACK:
            raise ValueError(f"out_features must be a multiple of {PACK} for an AWQ layer (qweight packs {PACK} "
                             f"output columns per int32 word), got {out_features}")
        if in_features % self.group_columns(in_features):
            raise ValueError(f"group_size must be a positive divisor of in_features = {in_features}, or -1 / None "
                             f"for one group per row, got {self.group_size!r}")

    def check_symmetric_zeros(self, zero_u: Tensor, name: str) -> None:
        if self.symmetric and not bool((zero_u == self.symmetric_zero).all()):
            raise ValueError(f"{name}: a symmetric (zero_point: false) layer must store the zero-point "
                             f"{self.symmetric_zero} everywhere; found values in [{int(zero_u.min())}, "
                             f"{int(zero_u.max())}]")

    # ---- the adapter -----------------------------------------------------------------------

    def state_keys(self) -> Tuple[str, ...]:
        return ("qweight", "qzeros", "scales")

    def check_weight(self, weight: QuantizedWeight) -> None:
        if weight.bits != self.bits or weight.lut is not None or weight.perm is not None:
            raise ValueError(f"an AWQ layer holds 4-bit integer codes over consecutive columns; the weight has "
                             f"{weight.bits}-bit {weight.code_kind} codes"
                             f"{' in act-order' if weight.perm is not None else ''}")
        self.check_features(weight.in_features, weight.out_features)
        if weight.num_groups != self.n_groups(weight.in_features):
            raise ValueError(f"an AWQ layer of group_size {self.group_size} has {self.n_groups(weight.in_features)} "
                             f"groups per row; the weight has {weight.num_groups}")

    def to_state(self, weight: QuantizedWeight) -> Dict[str, Tensor]:
        return {"qweight": pack_awq(weight.unsigned_codes().t(), self.bits),
                "qzeros": pack_awq(weight.zeros.to(torch.int32).t(), self.bits),
                "scales": weight.scales.t().to(torch.float16).contiguous()}

    def from_state(self, tensors: Dict[str, Tensor], in_features: int, out_features: int,
                   where: str = "") -> QuantizedWeight:
        p = prefixed(where)
        qweight, qzeros, scales = tensors["qweight"], tensors["qzeros"], tensors["scales"]
        check_packed_tensors(qweight, qzeros, scales, p)
        words, n_groups = out_features // PACK, self.n_groups(in_features)
        check_tensor(qweight, p + "qweight", (in_features, words))
        check_tensor(qzeros, p + "qzeros", (n_groups, words))
        check_tensor(scales, p + "scales", (n_groups, out_features))
        check_fp16_range(scales, p + "scales", positive=True, fmt="AWQ")
        check_devices({"qweight": qweight, "qzeros": qzeros, "scales": scales}, "qweight", p)
        zero_u = unpack_awq(qzeros, self.bits).t()
        self.check_symmetric_zeros(zero_u, p + "qzeros")
        u = unpack_awq(qweight, self.bits).t()
        return QuantizedWeight.from_codes(u, scales.float().t(), zero_u.float(), self.bits)

    def empty_weight(self, in_features: int, out_features: int, device=None) -> QuantizedWeight:
        self.check_features(in_features, out_features)
        return QuantizedWeight.empty(out_features, in_features, self.bits, self.n_groups(in_features), device=device)

    def config(self) -> Dict[str, Any]:
        return {"name": self.name, "bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric,
                "quant_min": self.quant_min}

    def weight_spec(self, in_features: int) -> QuantSpec:
        grid = {"granularity": "channel", "axis": 0} if self.group_size == -1 else \
            {"granularity": "group", "group_size": self.group_size}
        return QuantSpec(bits=self.bits, symmetric=self.symmetric, **grid)

    def extra_repr(self) -> str:
        return f"layout=awq, symmetric={self.symmetric}"
