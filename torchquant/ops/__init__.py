"""Typed Python entry points of torchquant's C++ operators.

Each function is a thin wrapper over ``torch.ops.torchquant.<name>``: the C++
op checks its arguments (raising ``TypeError`` / ``ValueError`` that name the
argument) and autograd is registered in C++. This module also registers the
fake (shape-only) kernels that let ``torch.compile(fullgraph=True)`` and
``torch.export`` trace the ops without running them.
"""
from torchquant.ops.awq import *  # noqa: F401,F403
from torchquant.ops.awq import __all__ as _awq_all
from torchquant.ops.fake_quant import *  # noqa: F401,F403
from torchquant.ops.fake_quant import __all__ as _fake_quant_all
from torchquant.ops.gptq import *  # noqa: F401,F403
from torchquant.ops.gptq import __all__ as _gptq_all
from torchquant.ops.smoothquant import *  # noqa: F401,F403
from torchquant.ops.smoothquant import __all__ as _smoothquant_all

__all__ = [*_fake_quant_all, *_gptq_all, *_awq_all, *_smoothquant_all]

from .linear import (
    dequantize_weight,
    pack_weight,
    packed_row_bytes,
    quantized_linear,
    quantized_linear_grad_input,
    unpack_weight,
)

__all__ += ["dequantize_weight", "pack_weight", "packed_row_bytes", "quantized_linear",
            "quantized_linear_grad_input", "unpack_weight"]

# W8A8 linear (int8 activations x int8 weights).
from .int8 import w8a8_linear

__all__ += ["w8a8_linear"]

# Block-wise lookup-table codes (NF4 / FP4, double quantization).
from .lut import lut_dequantize, lut_quantize

__all__ += ["lut_dequantize", "lut_quantize"]

# Rows on their own asymmetric grid (the quantized KV cache).
from .rows import quantize_rows

__all__ += ["quantize_rows"]
