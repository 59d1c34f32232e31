"""A quantized KV cache for ``transformers`` models, the KIVI way (Liu et al. 2024).

>>> cache = torchquant.QuantizedKVCache(model.config, bits=4, residual_length=128)
>>> model.generate(input_ids, cache=cache, max_new_tokens=256)   # past_key_values= before transformers 5.x
>>> cache.nbytes(), cache.float_nbytes()            # what it holds, what a float cache would

Keys and values leave full precision in groups of ``group_size`` tokens, once
more than ``residual_length`` tokens wait in full precision (the newest
tokens, which attention weighs most, stay exact):

* keys are quantized **per channel** over each group of tokens (their
  outliers live in fixed channels, so a channel's grid fits them);
* values **per token** (their error is averaged by the attention weights).

Each is an asymmetric min/max grid of 2, 4 or 8 bits, quantized and packed by
the C++ op :func:`torchquant.ops.quantize_rows` and read back by
:func:`torchquant.ops.dequantize_weight` (CPU and CUDA kernels); the cache
holds the packed codes and one float16 scale and zero-point per
channel-group (keys) or token (values): 0.5 bit per value at groups of 64
(zero-points are integers, exact in float16; a scale rounds by at most
2^-11 of itself, far below the grid's step). At each step attention gets the dequantized cache
followed by the full-precision tokens, as transformers' own ``QuantizedCache``
does.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor
from transformers.cache_utils import Cache, DynamicLayer

from torchquant import ops

__all__ = ["QuantizedKVCache", "QuantizedKVLayer", "KV_BITS", "chunked_perplexity"]

KV_BITS = (2, 4, 8)
# The keyword (and output field) of the cache: `cache` from transformers 5.x on, `past_key_values` before.
_CACHE_ARG = "cache" if "cache" in __import__("inspect").signature(
    __import__("transformers").LlamaForCausalLM.forward).parameters else "past_key_values"


def _check_settings(bits, residual_length, group_size) -> None:
    if isinstance(bits, bool) or bits not in KV_BITS:
        raise ValueError(f"bits must be one of {KV_BITS} (the cache's code widths), got {bits!r}")
    if isinstance(residual_length, bool) or not isinstance(residual_length, int) or residual_length < 0:
        raise ValueError(f"residual_length must be an integer >= 0 (tokens kept in full precision), got "
                         f"{residual_length!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive integer (tokens per key grid), got {group_size!r}")


class _Packed:
    """Packed rows with one scale and zero-point each: ``packed [..., rows, bytes]``, ``scales`` / ``zeros``
    ``[..., rows, 1]``, grown along the rows."""

    def __init__(self) -> None:
        self.packed = self.scales = self.zeros = None

    def append(self, packed: Tensor, scales: Tensor, zeros: Tensor, dim: int) -> None:
        scales, zeros = scales.half(), zeros.half()
        if self.packed is None:
            self.packed, self.scales, self.zeros = packed, scales, zeros
        else:
            self.packed = torch.cat([self.packed, packed], dim=dim)
            self.scales = torch.cat([self.scales, scales], dim=dim)
            self.zeros = torch.cat([self.zeros, zeros], dim=dim)

    def tensors(self):
        return () if self.packed is None else (self.packed, self.scales, self.zeros)

    def select(self, index: Tensor, repeats: Optional[int] = None) -> None:
        """Batch rows ``index`` (or each row ``repeats`` times) of every tensor (batch is dim 0)."""
        if self.packed is None:
            return
        if repeats is not None:
            self.packed, self.scales, self.zeros = (t.repeat_interleave(repeats, dim=0) for t in self.tensors())
        else:
            self.packed, self.scales, self.zeros = (t.index_select(0, index.to(t.device)) for t in self.tensors())


class QuantizedKVLayer(DynamicLayer):
    """One attention layer's cache: packed keys / values plus a full-precision window (module docstring)."""

    is_croppable = False
    is_compileable = False

    def __init__(self, bits: int = 4, residual_length: int = 128, group_size: int = 64) -> None:
        _check_settings(bits, residual_length, group_size)
        super().__init__()
        self.bits, self.residual_length, self.group_size = bits, residual_length, group_size
        self._clear()

    def _clear(self) -> None:
        self._keys = _Packed()    # [B, H, groups * D, bytes(group_size)]: per channel, per group of tokens
        self._values = _Packed()  # [B, H, tokens, bytes(D)]: per token
        self.quantized_length = 0

    def update(self, key_states: Tensor, value_states: Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys = torch.cat([self.keys, key_states], dim=-2)
        self.values = torch.cat([self.values, value_states], dim=-2)
        waiting = self.keys.shape[-2] - self.residual_length
        if waiting >= self.group_size:
            self._flush(waiting // self.group_size * self.group_size)
        return self._full(self._keys_float(), self.keys), self._full(self._values_float(), self.values)

    @staticmethod
    def _full(quantized: Optional[Tensor], window: Tensor) -> Tensor:
        return window if quantized is None else torch.cat([quantized.to(window.dtype), window], dim=-2)

    def _flush(self, n: int) -> None:
        """Quantize the oldest ``n`` (a multiple of group_size) full-precision tokens into the packed cache."""
        k, v = self.keys[..., :n, :], self.values[..., :n, :]
        b, h, _, d = k.shape
        g = self.group_size
        groups = n // g
        # Keys per channel: each (group of g tokens, channel) is one row of g values.
        rows = k.reshape(b, h, groups, g, d).transpose(-1, -2).reshape(-1, g)
        packed, scales, zeros = ops.quantize_rows(rows, self.bits)
        self._keys.append(packed.view(b, h, groups * d, -1), scales.view(b, h, groups * d, 1),
                          zeros.view(b, h, groups * d, 1), dim=2)
        # Values per token: each token's d values are one row.
        packed, scales, zeros = ops.quantize_rows(v.reshape(-1, v.shape[-1]), self.bits)
        self._values.append(packed.view(b, h, n, -1), scales.view(b, h, n, 1), zeros.view(b, h, n, 1), dim=2)
        self.quantized_length += n
        self.keys, self.values = self.keys[..., n:, :], self.values[..., n:, :]

    def _keys_float(self) -> Optional[Tensor]:
        if self._keys.packed is None:
            return None
        p = self._keys
        b, h, rows, nbytes = p.packed.shape
        d, g = self.keys.shape[-1], self.group_size
        w = ops.dequantize_weight(p.packed.reshape(-1, nbytes), p.scales.reshape(-1, 1).float(),
                                  p.zeros.reshape(-1, 1).float(), self.bits, g)
        return w.view(b, h, rows // d, d, g).transpose(-1, -2).reshape(b, h, -1, d)

    def _values_float(self) -> Optional[Tensor]:
        if self._values.packed is None:
            return None
        p = self._values
        b, h, tokens, nbytes = p.packed.shape
        d = self.values.shape[-1]
        w = ops.dequantize_weight(p.packed.reshape(-1, nbytes), p.scales.reshape(-1, 1).float(),
                                  p.zeros.reshape(-1, 1).float(), self.bits, d)
        return w.view(b, h, tokens, d)

    def get_seq_length(self) -> int:
        if not self.is_initialized:
            return 0
        return self.quantized_length + self.keys.shape[-2]

    def get_mask_sizes(self, query_length: int):
        return self.get_seq_length() + query_length, 0

    def reset(self) -> None:
        super().reset()
        self._clear()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)

    def batch_select_indices(self, indices: Tensor) -> None:
        if not self.is_initialized:
            return
        self.keys, self.values = self.keys[indices, ...], self.values[indices, ...]
        index = torch.as_tensor(indices)
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        self._keys.select(index)
        self._values.select(index)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if not self.is_initialized:
            return
        self.keys = self.keys.repeat_interleave(repeats, dim=0)
        self.values = self.values.repeat_interleave(repeats, dim=0)
        self._keys.select(None, repeats)
        self._values.select(None, repeats)

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("QuantizedKVLayer cannot drop tokens: they may already be packed")

    def nbytes(self) -> int:
        """Bytes held: packed codes, grids and the full-precision window."""
        tensors = [*self._keys.tensors(), *self._values.tensors()]
        if self.is_initialized:
            tensors += [self.keys, self.values]
        return sum(t.numel() * t.element_size() for t in tensors)

    def float_nbytes(self) -> int:
        """Bytes a float cache of the same tokens would hold (in the activations' dtype)."""
        if not self.is_initialized:
            return 0
        b, h, _, d = self.keys.shape
        return 2 * b * h * d * self.get_seq_length() * self.keys.element_size()


class QuantizedKVCache(Cache):
    """A ``transformers`` ``Cache`` of :class:`QuantizedKVLayer` layers, one per decoder layer of ``config``.

    Args:
        config: the model's config (``model.config``).
        bits: 2, 4 or 8.
        residual_length: newest tokens kept in full precision (KIVI's R), >= 0.
        group_size: tokens per key grid (KIVI's G); tokens are packed a group at a time. 64 by
            default: a 2-bit row of the packed layout holds 64 codes, and each grid's
            scale and zero-point cost 0.5 bit per value at 64.
    """

    def __init__(self, config, bits: int = 4, residual_length: int = 128, group_size: int = 64) -> None:
        _check_settings(bits, residual_length, group_size)
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        layers = getattr(text, "num_hidden_layers", None)
        if not isinstance(layers, int) or layers < 1:
            raise ValueError(f"config must describe a decoder with num_hidden_layers >= 1, got {layers!r}")
        self.bits, self.residual_length, self.group_size = bits, residual_length, group_size
        super().__init__(layers=[QuantizedKVLayer(bits, residual_length, group_size) for _ in range(layers)])

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers)

    def float_nbytes(self) -> int:
        return sum(layer.float_nbytes() for layer in self.layers)

    def __repr__(self) -> str:
        return (f"QuantizedKVCache(bits={self.bits}, residual_length={self.residual_length}, "
                f"group_size={self.group_size}, layers={len(self.layers)})")


@torch.no_grad()
def chunked_perplexity(model, input_ids: Tensor, make_cache: Callable[[], Optional[Cache]],
                       chunk: int = 64) -> float:
    """Teacher-forced perplexity of ``input_ids [1, T]`` fed ``chunk`` tokens at a time through a cache.

    Every chunk attends to the cached earlier tokens, so a quantized cache's
    error shows in the loss. ``make_cache()`` builds a fresh cache (None: the
    model's default float cache).
    """
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1 or \
            input_ids.shape[1] < 2:
        raise ValueError(f"input_ids must be [1, T] with T >= 2, got "
                         f"{list(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__}")
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive integer, got {chunk!r}")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and input_ids.shape[1] > limit:
        raise ValueError(f"input_ids holds {input_ids.shape[1]} tokens, more than the model's position limit "
                         f"{limit} (max_position_embeddings)")
    cache = make_cache()
    total, count = 0.0, 0
    for start in range(0, input_ids.shape[1] - 1, chunk):
        piece = input_ids[:, start:start + chunk + 1]
        out = model(piece[:, :-1], **{_CACHE_ARG: cache}, use_cache=True)
        cache = getattr(out, _CACHE_ARG)
        logp = torch.log_softmax(out.logits.float(), dim=-1)
        nll = -logp.gather(-1, piece[:, 1:].unsqueeze(-1)).squeeze(-1)
        total += float(nll.sum())
        count += nll.numel()
    return math.exp(total / count)
