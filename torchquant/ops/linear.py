"""Weight-only quantized linear ops: packed low-bit weights at run time.

A weight ``W [N, K]`` (out_features x in_features) is held as

* ``packed``: uint8 ``[N, packed_row_bytes(K, bits)]``, the run-time layout of
  ``csrc/runtime/packed_layout.h`` (chunks of 16 / 32 / 64 / 128 codes for 8 / 4 /
  2 / 3 bits, so one 16-byte load gives 16 consecutive columns per slice);
* ``scales``, ``zeros``: float32 ``[N, G]``, groups of ``g = K // G`` consecutive
  input columns (``G = 1`` is per-channel);
* optionally ``lut``: float32 ``[16]`` levels of 4-bit lookup-table codes (NF4 /
  FP4), so that ``v(u) = lut[u]`` instead of ``u``;

and ``W[n, k] = (v(u[n, k]) - zeros[n, k // g]) * scales[n, k // g]``. The
linear ops never form the float weight: on CPU, small batches read each packed
byte once and dequantize in registers; large ones dequantize one cache-sized
panel of rows at a time and multiply there.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "dequantize_weight",
    "pack_weight",
    "packed_row_bytes",
    "quantized_linear",
    "quantized_linear_grad_input",
    "unpack_weight",
]

_OPS = torch.ops.torchquant
_SUPPORTED_BITS = (2, 3, 4, 8)
_FLOAT_INPUTS = (torch.float32, torch.float16, torch.bfloat16)


def packed_row_bytes(in_features: int, bits: int) -> int:
    """Bytes of one packed row of ``in_features`` codes of ``bits`` bits.

    Rows are whole chunks: 48 bytes per 128 codes at 3 bits, otherwise 16 bytes
    per ``128 // bits`` codes; the last chunk is padded with zero codes.

    >>> packed_row_bytes(4096, 4), packed_row_bytes(100, 3), packed_row_bytes(100, 8)
    (2048, 48, 112)
    """
    codes, nbytes = (128, 48) if bits == 3 else (128 // bits, 16)
    return -(-in_features // codes) * nbytes


def pack_weight(codes: Tensor, bits: int) -> Tensor:
    """Packs unsigned codes ``[N, K]`` (any integer dtype, values in ``[0, 2**bits)``)
    into the run-time layout: uint8 ``[N, packed_row_bytes(K, bits)]``."""
    return _OPS.pack_weight(codes, bits)


def unpack_weight(packed: Tensor, bits: int, in_features: int) -> Tensor:
    """The codes of a packed weight: uint8 ``[N, in_features]`` (inverse of :func:`pack_weight`)."""
    return _OPS.unpack_weight(packed, bits, in_features)


def dequantize_weight(packed: Tensor, scales: Tensor, zeros: Tensor, bits: int, in_features: int,
                      lut: Optional[Tensor] = None) -> Tensor:
    """The float32 weight ``[N, in_features]`` of a packed one.

    For references, tests and export to float; :func:`quantized_linear` never forms it.
    """
    return _OPS.dequantize_weight(packed, scales, zeros, bits, in_features, lut)


def quantized_linear(input: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor, bits: int,
                     in_features: int, lut: Optional[Tensor] = None, perm: Optional[Tensor] = None,
                     bias: Optional[Tensor] = None) -> Tensor:
    """``y = input[..., perm] @ W.T + bias`` from a packed low-bit weight.

    Args:
        input: float32, float16 or bfloat16 ``[..., in_features]``; the result has its
            dtype and leading dims; the math is float32.
        packed, scales, zeros, bits, in_features, lut: the weight (see the module doc).
        perm: int64 ``[in_features]``, for act-order (``g_idx``) weights repacked so that
            each group's columns are contiguous: column ``j`` of the packed weight
            multiplies ``input[..., perm[j]]``.
        bias: ``[N]``, any float dtype, added in float32.

    Autograd: ``input`` gets ``dy @ W`` (through :func:`quantized_linear_grad_input`),
    ``bias`` gets ``dy`` summed; the weight's tensors get no gradient.
    """
    return _OPS.quantized_linear(input, packed, scales, zeros, bits, in_features, lut, perm, bias)


def quantized_linear_grad_input(grad_output: Tensor, packed: Tensor, scales: Tensor, zeros: Tensor,
                                bits: int, in_features: int, lut: Optional[Tensor] = None,
                                perm: Optional[Tensor] = None) -> Tensor:
    """``dx = grad_output @ W`` with the columns put back in input order
    (``dx[..., perm[j]] = (grad_output @ W)[..., j]``), in ``grad_output``'s dtype."""
    return _OPS.quantized_linear_grad_input(grad_output, packed, scales, zeros, bits, in_features, lut, perm)


# ---------------------------------------------------------------------------
# Fake kernels: output metadata only. They repeat the checks that metadata
# alone can decide, raising the same TypeError / ValueError as the C++ ops.
# They also run for meta tensors, so a meta tensor mixed with real ones is
# rejected here, naming the argument.

def _check_bits(op: str, bits: int) -> None:
    torch._check_value(bits in _SUPPORTED_BITS, lambda: f"{op}: bits must be 2, 3, 4 or 8, got {bits}")


def _check_device(op: str, name: str, t: Tensor, device: torch.device) -> None:
    torch._check_value(t.device == device,
                       lambda: f"{op}: {name} must be on the input's device ({device}), got {t.device}")


def _check_packed(op: str, packed: Tensor, bits: int, in_features: int) -> None:
    _check_bits(op, bits)
    torch._check_value(in_features >= 1, lambda: f"{op}: in_features must be positive, got {in_features}")
    torch._check_type(packed.dtype == torch.uint8, lambda: f"{op}: packed must be uint8, got {packed.dtype}")
    row_bytes = packed_row_bytes(in_features, bits)
    torch._check_value(packed.dim() == 2 and packed.shape[1] == row_bytes,
                       lambda: f"{op}: packed must have shape [out_features, {row_bytes}] (packed_row_bytes("
                               f"in_features={in_features}, bits={bits})), got {list(packed.shape)}")


def _check_weight(op: str, packed: Tensor, scales: Tensor, zeros: Tensor, bits: int, in_features: int,
                  lut: Optional[Tensor], device: torch.device) -> None:
    _check_packed(op, packed, bits, in_features)
    _check_device(op, "packed", packed, device)
    n = packed.shape[0]
    torch._check_type(scales.dtype == torch.float32, lambda: f"{op}: scales must be float32, got {scales.dtype}")
    torch._check_type(zeros.dtype == torch.float32, lambda: f"{op}: zeros must be float32, got {zeros.dtype}")
    _check_device(op, "scales", scales, device)
    _check_device(op, "zeros", zeros, device)
    torch._check_value(scales.dim() == 2 and scales.shape[0] == n and scales.shape[1] >= 1,
                       lambda: f"{op}: scales must have shape [out_features={n}, groups], got {list(scales.shape)}")
    torch._check_value(in_features % scales.shape[1] == 0,
                       lambda: f"{op}: the number of groups (scales.size(1) = {scales.shape[1]}) must divide "
                               f"in_features = {in_features}")
    torch._check_value(zeros.shape == scales.shape,
                       lambda: f"{op}: zeros must have the shape of scales {list(scales.shape)}, "
                               f"got {list(zeros.shape)}")
    if lut is not None:
        torch._check_value(bits == 4, lambda: f"{op}: a lookup table (lut) needs bits == 4, got bits = {bits}")
        torch._check_type(lut.dtype == torch.float32, lambda: f"{op}: lut must be float32, got {lut.dtype}")
        torch._check_value(lut.dim() == 1 and lut.shape[0] == 16,
                           lambda: f"{op}: lut must have shape [16], got {list(lut.shape)}")
        _check_device(op, "lut", lut, device)


def _check_activation(op: str, name: str, x: Tensor, last_dim: int, last_dim_name: str) -> None:
    torch._check_type(x.dtype in _FLOAT_INPUTS,
                      lambda: f"{op}: {name} must be float32, float16 or bfloat16, got {x.dtype}")
    torch._check_value(x.dim() >= 1 and x.shape[-1] == last_dim,
                       lambda: f"{op}: {name} must have shape [..., {last_dim_name}={last_dim}], "
                               f"got {list(x.shape)}")


def _check_perm(op: str, perm: Optional[Tensor], in_features: int, device: torch.device) -> None:
    if perm is None:
        return
    torch._check_type(perm.dtype == torch.int64, lambda: f"{op}: perm must be int64, got {perm.dtype}")
    torch._check_value(perm.dim() == 1 and perm.shape[0] == in_features,
                       lambda: f"{op}: perm must have shape [in_features={in_features}], got {list(perm.shape)}")
    _check_device(op, "perm", perm, device)


@torch.library.register_fake("torchquant::pack_weight")
def _pack_weight_fake(codes, bits):
    op = "torchquant.pack_weight"
    _check_bits(op, bits)
    torch._check_type(not codes.dtype.is_floating_point and not codes.dtype.is_complex and codes.dtype != torch.bool,
                      lambda: f"{op}: codes must have an integer dtype, got {codes.dtype}")
    torch._check_value(codes.dim() == 2 and codes.shape[1] >= 1,
                       lambda: f"{op}: codes must have shape [out_features, in_features], got {list(codes.shape)}")
    return codes.new_empty((codes.shape[0], packed_row_bytes(codes.shape[1], bits)), dtype=torch.uint8)


@torch.library.register_fake("torchquant::unpack_weight")
def _unpack_weight_fake(packed, bits, in_features):
    _check_packed("torchquant.unpack_weight", packed, bits, in_features)
    return packed.new_empty((packed.shape[0], in_features), dtype=torch.uint8)


@torch.library.register_fake("torchquant::dequantize_weight")
def _dequantize_weight_fake(packed, scales, zeros, bits, in_features, lut=None):
    _check_weight("torchquant.dequantize_weight", packed, scales, zeros, bits, in_features, lut, packed.device)
    return packed.new_empty((packed.shape[0], in_features), dtype=torch.float32)


@torch.library.register_fake("torchquant::quantized_linear")
def _quantized_linear_fake(input, packed, scales, zeros, bits, in_features, lut=None, perm=None, bias=None):
    op = "torchquant.quantized_linear"
    _check_weight(op, packed, scales, zeros, bits, in_features, lut, input.device)
    _check_activation(op, "input", input, in_features, "in_features")
    _check_perm(op, perm, in_features, input.device)
    n = packed.shape[0]
    if bias is not None:
        torch._check_type(bias.dtype.is_floating_point,
                          lambda: f"{op}: bias must be a floating-point tensor, got {bias.dtype}")
        torch._check_value(bias.dim() == 1 and bias.shape[0] == n,
                           lambda: f"{op}: bias must have shape [out_features={n}], got {list(bias.shape)}")
        _check_device(op, "bias", bias, input.device)
    return input.new_empty((*input.shape[:-1], n))


@torch.library.register_fake("torchquant::quantized_linear_grad_input")
def _quantized_linear_grad_input_fake(grad_output, packed, scales, zeros, bits, in_features, lut=None, perm=None):
    op = "torchquant.quantized_linear_grad_input"
    _check_weight(op, packed, scales, zeros, bits, in_features, lut, grad_output.device)
    _check_activation(op, "grad_output", grad_output, packed.shape[0], "out_features")
    _check_perm(op, perm, in_features, grad_output.device)
    return grad_output.new_empty((*grad_output.shape[:-1], in_features))
