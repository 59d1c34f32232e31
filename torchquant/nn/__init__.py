"""Modules built on torchquant's ops."""
from torchquant.nn.fake_quantize import FakeQuantize

__all__ = ["FakeQuantize"]
