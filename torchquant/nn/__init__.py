"""Modules built on torchquant's ops."""
from torchquant.nn.awq_linear import AWQLinear
from torchquant.nn.fake_quantize import FakeQuantize
from torchquant.nn.gptq_linear import GPTQLinear
from torchquant.nn.input_scaled_linear import InputScaledLinear, InputScaledW8A8Linear
from torchquant.nn.w8a8_linear import W8A8Linear

__all__ = ["AWQLinear", "FakeQuantize", "GPTQLinear", "InputScaledLinear", "InputScaledW8A8Linear", "W8A8Linear"]
