"""torchquant: quantization for PyTorch.

Fake-quantize custom ops in C++ and CUDA (``torchquant.ops``), registered as
``torch.ops.torchquant.*``, and the ``torchquant.nn.FakeQuantize`` module.
"""
from torchquant import _C  # noqa: F401  (loads the library that registers the ops)
from torchquant import ops
from torchquant.ops import fake_quantize

__all__ = ["ops", "fake_quantize"]
__version__ = "0.1.0"
