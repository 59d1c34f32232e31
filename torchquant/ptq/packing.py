"""GPTQ's int32 word packing, where the GPTQ checkpoint layout lives (:mod:`torchquant.layouts.gptq_words`)."""
from torchquant.layouts.gptq_words import SUPPORTED_BITS, codes_per_block, pack_int32, unpack_int32

__all__ = ["SUPPORTED_BITS", "pack_int32", "unpack_int32", "codes_per_block"]
