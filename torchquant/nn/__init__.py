"""Modules built on torchquant's ops."""
from torchquant.nn.fake_quantize import FakeQuantize
from torchquant.nn.gptq_linear import GPTQLinear

__all__ = ["FakeQuantize", "GPTQLinear"]
