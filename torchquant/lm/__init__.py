"""Causal language models end to end: perplexity, greedy agreement, decode speed, and where the blocks are.

Works with any Hugging Face causal LM (``transformers.AutoModelForCausalLM``:
the Llama, Qwen2, Mistral, GPT-2 and OPT families among others), float or
converted by a :mod:`torchquant.ptq` pass:

>>> ppl = perplexity(model, ids, max_length=512, stride=256)      # sliding window, as WikiText evaluations do
>>> agree = generate_agreement(fp32_model, quantized, prompts, max_new_tokens=32)
>>> tps = decode_tokens_per_second(quantized, prompts[0], new_tokens=64)
>>> model = load_causal_lm("path/to/hf-model")                   # any family, offline, ready for the passes
>>> conv1d_to_linear(gpt2)                                        # GPT-2's Conv1D layers as nn.Linear
>>> torchquant.ptq.gptq(model, calibration_batches(windows, 8), spec, blocks=decoder_blocks_path(model))

The post-training passes quantize ``nn.Linear`` layers inside a list of
blocks. Llama, Qwen2, Mistral and OPT hold their projections as
``nn.Linear`` and :func:`torchquant.ptq.find_blocks` finds their blocks
(``model.layers``, ``model.decoder.layers``). GPT-2 holds them as
``transformers.pytorch_utils.Conv1D`` (a Linear with a transposed weight),
so the passes find no Linear layer in its blocks and ``find_blocks`` finds
no block list: :func:`conv1d_to_linear` turns those layers into ``nn.Linear``
first (the model computes the same function), after which ``transformer.h``
is found like any other block list.
"""
from torchquant.lm.evaluation import decode_tokens_per_second, generate_agreement, perplexity
from torchquant.lm.models import (calibration_batches, conv1d_to_linear, decoder_blocks_path, load_causal_lm,
                                  position_limit)

__all__ = [
    "calibration_batches", "conv1d_to_linear", "decode_tokens_per_second", "decoder_blocks_path",
    "generate_agreement", "load_causal_lm", "perplexity", "position_limit",
]
