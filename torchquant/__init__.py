"""torchquant: quantization for PyTorch.

* ``torchquant.ops``: fake-quantize custom ops in C++ and CUDA, registered as
  ``torch.ops.torchquant.*`` (eager, autograd, ``torch.compile``, LibTorch);
* ``torchquant.QuantSpec``: one description of how a tensor is quantized;
* ``torchquant.nn.FakeQuantize``: observe a range, then fake-quantize.
"""
import torch  # noqa: F401  (loads libtorch, which the extension links against)

from torchquant import _C  # noqa: F401  (loads the library that registers the ops)
from torchquant import nn, ops
from torchquant.ops import fake_quantize, quant_range
from torchquant.spec import QuantSpec

__all__ = ["QuantSpec", "fake_quantize", "nn", "ops", "quant_range"]
__version__ = "0.1.0"
