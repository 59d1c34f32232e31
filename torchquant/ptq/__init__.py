"""Post-training quantization: passes that calibrate a trained model on a few batches.

* :func:`gptq`: GPTQ weight quantization, block by block;
* :mod:`torchquant.ptq.calibration`: the block-by-block walk the passes share
  (:func:`calibrate_blocks` and the :class:`BlockwisePass` a pass implements);
* :mod:`torchquant.ptq.report`: what a pass did per layer, and the integer
  weights it produced;
* :func:`rtn`: round to nearest, the baseline;
* :func:`to_quantized_modules`: any pass's integer results as
  :class:`~torchquant.nn.QuantizedLinear` layers in torchquant's own layout
  (``torchquant.save_quantized``);
* :mod:`torchquant.ptq.checkpoint`: GPTQ checkpoints as the GPTQ ecosystem
  writes and reads them;
  :func:`to_gptq_modules` turns a GPTQ-quantized model and its report into
  :class:`~torchquant.nn.GPTQLinear` layers, ``save_gptq(model, path,
  report=report)`` does that and saves.

Padded calibration batches are fine: the token mask of each batch (a dict
batch's ``attention_mask`` by default) keeps padding out of every pass's
statistics; see :func:`calibrate_blocks`.
"""
from torchquant.ptq.calibration import (BlockContext, BlockInput, BlockwisePass, BlockwiseRun, CalibratedLayer,
                                        CalibrationWarning, TokenMask, calibrate_blocks, capture_block_inputs,
                                        find_blocks, linear_layers, prepare_batches, select_tokens)
from torchquant.ptq.checkpoint import GPTQFormatWarning, load_gptq, save_gptq, to_gptq_modules
from torchquant.ptq.convert import to_quantized_modules
from torchquant.ptq.gptq import DEFAULT_EXCLUDE, GPTQConfig, GPTQReport, gptq
from torchquant.ptq.packing import pack_int32, unpack_int32
from torchquant.ptq.report import LayerReport, LayerResult, PTQReport
from torchquant.ptq.rtn import rtn

__all__ = [
    "BlockContext", "BlockInput", "BlockwisePass", "BlockwiseRun", "CalibratedLayer", "CalibrationWarning",
    "DEFAULT_EXCLUDE", "GPTQConfig", "GPTQFormatWarning", "GPTQReport", "LayerReport", "LayerResult", "PTQReport",
    "TokenMask", "calibrate_blocks", "capture_block_inputs", "find_blocks", "gptq", "linear_layers", "load_gptq",
    "pack_int32", "prepare_batches", "rtn", "save_gptq", "select_tokens", "to_gptq_modules", "to_quantized_modules",
    "unpack_int32",
]

# AWQ: the driver, AWQ followed by GPTQ, and AutoAWQ's GEMM checkpoints.
from torchquant.ptq.awq import AWQConfig, AWQGroup, AWQReport, AWQThenGPTQ, awq, awq_then_gptq, to_awq_modules
from torchquant.ptq.awq_format import load_awq, save_awq

__all__ += ["AWQConfig", "AWQGroup", "AWQReport", "AWQThenGPTQ", "awq", "awq_then_gptq", "load_awq", "save_awq",
            "to_awq_modules"]

# SmoothQuant: input-channel smoothing, then W8A8 layers.
from torchquant.ptq.smoothquant import SmoothQuantConfig, SmoothQuantReport, quantize_w8a8, smoothquant

__all__ += ["SmoothQuantConfig", "SmoothQuantReport", "quantize_w8a8", "smoothquant"]

# No calibration: NF4 / FP4 weights (QLoRA's base), LLM.int8().
from torchquant.ptq.llm_int8 import llm_int8
from torchquant.ptq.lookup_table import lookup_table_weight, nf4

__all__ += ["llm_int8", "lookup_table_weight", "nf4"]

# Mixed precision: a bit width per layer from its sensitivity, under a size budget.
from torchquant.ptq.allocate import BitPlan, allocate_bits, layer_sensitivity, quantize_mixed

__all__ += ["BitPlan", "allocate_bits", "layer_sensitivity", "quantize_mixed"]
