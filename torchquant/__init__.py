"""torchquant: quantization for PyTorch.

* ``torchquant.ops``: fake-quantize custom ops in C++ and CUDA, registered as
  ``torch.ops.torchquant.*`` (eager, autograd, ``torch.compile``, LibTorch);
* ``torchquant.QuantSpec``: one description of how a tensor is quantized;
* ``torchquant.nn.FakeQuantize`` and the observers that calibrate it;
* ``torchquant.prepare_qat`` / ``torchquant.convert``: QAT layers, then real
  integer weights, saved with ``torchquant.save_quantized``;
* ``torchquant.QuantizedWeight`` and ``torchquant.nn.QuantizedLinear``: the one
  integer-weight model every quantized Linear layer runs, from packed codes
  (``torchquant.layouts``: the GPTQ, AWQ, W8A8 and torchquant checkpoint
  layouts of its state dict);
* ``torchquant.ptq``: RTN, GPTQ, AWQ, SmoothQuant, NF4 / FP4 and LLM.int8();
* ``torchquant.qlora``: LoRA adapters over a frozen NF4 base, saved as PEFT does;
* ``torchquant.QuantizedKVCache``: a KIVI-style 2/4/8-bit KV cache for
  ``transformers`` models (``model.generate(..., past_key_values=cache)``).
"""
import torch  # noqa: F401  (loads libtorch, which the extension links against)

from torchquant import _C  # noqa: F401  (loads the library that registers the ops)
from torchquant import layouts, nn, observers, ops, qat
from torchquant import ptq  # noqa: F401  (post-training quantization: torchquant.ptq.gptq, ...)
from torchquant import qlora  # noqa: F401  (LoRA adapters over a frozen NF4 base)
from torchquant import lm  # noqa: F401  (Hugging Face causal LMs: perplexity, generate agreement, speed)
from torchquant.checkpoint import load_quantized, save_quantized
from torchquant.ops import fake_quantize, quant_range
from torchquant.qat import QuantConfig, LayerQuant, convert, parameter_bytes, prepare_qat, qat_report
from torchquant.quantized_weight import QuantizedWeight
from torchquant.spec import QuantSpec

__all__ = [
    "LayerQuant", "QuantConfig", "QuantSpec", "QuantizedKVCache", "QuantizedWeight", "convert", "fake_quantize", "layouts",
    "load_quantized", "nn", "observers", "ops", "parameter_bytes", "prepare_qat", "qat", "qat_report", "qlora", "quant_range",
    "save_quantized",
]
__version__ = "0.1.0"


def __getattr__(name):
    # The quantized KV cache subclasses transformers' Cache: imported on first use, so that
    # importing torchquant does not import transformers.
    if name in ("QuantizedKVCache", "kv_cache"):
        import importlib
        kv_cache = importlib.import_module("torchquant.kv_cache")
        return kv_cache if name == "kv_cache" else kv_cache.QuantizedKVCache
    raise AttributeError(f"module 'torchquant' has no attribute {name!r}")
