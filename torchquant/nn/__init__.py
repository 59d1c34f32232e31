"""Modules built on torchquant's ops.

Every quantized Linear layer is a :class:`QuantizedLinear` running from
packed integers; :class:`GPTQLinear`, :class:`AWQLinear`,
:class:`W8A8Linear` and :class:`InputScaledW8A8Linear` are the names of
those whose state dict keeps an ecosystem's checkpoint layout.
"""
from torchquant.nn.awq_linear import AWQLinear
from torchquant.nn.fake_quantize import FakeQuantize
from torchquant.nn.gptq_linear import GPTQLinear
from torchquant.nn.input_scaled_linear import InputScaledLinear, InputScaledW8A8Linear
from torchquant.nn.quantized import QuantizedConv1d, QuantizedConv2d, QuantizedEmbedding, QuantizedModule
from torchquant.nn.quantized_linear import QuantizedLinear
from torchquant.nn.w8a8_linear import W8A8Linear

__all__ = ["AWQLinear", "FakeQuantize", "GPTQLinear", "InputScaledLinear", "InputScaledW8A8Linear",
           "QuantizedConv1d", "QuantizedConv2d", "QuantizedEmbedding", "QuantizedLinear", "QuantizedModule",
           "W8A8Linear"]
