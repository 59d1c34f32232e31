"""What a causal LM's family decides: where its blocks are, how long its positions reach, its vocabulary.

Also the argument checks every function of :mod:`torchquant.lm` shares (token
ids, lengths against the position limit) and calibration batches for the
:mod:`torchquant.ptq` passes.
"""
from __future__ import annotations

import itertools
from contextlib import contextmanager
from typing import Dict, Iterator, List, Optional

import torch
from torch import Tensor, nn

from torchquant.ptq.calibration import find_blocks
from torchquant.ptq.convert import set_submodule

__all__ = ["calibration_batches", "conv1d_to_linear", "decoder_blocks_path", "load_causal_lm", "position_limit"]

_BLOCK_PATHS: Dict[str, str] = {
    "llama": "model.layers", "mistral": "model.layers", "qwen2": "model.layers", "qwen3": "model.layers",
    "gemma": "model.layers", "phi3": "model.layers", "opt": "model.decoder.layers", "gpt2": "transformer.h",
    "gpt_neox": "gpt_neox.layers", "gptj": "transformer.h", "bloom": "transformer.h", "falcon": "transformer.h",
}
# Config attributes that hold the longest sequence a model's positions cover, by family.
POSITION_ATTRIBUTES = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


# ---------------------------------------------------------------------------- model structure

def check_model(model, where: str) -> None:
    """A clear error unless ``model`` looks like a Hugging Face causal LM (``where``: the argument's name)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{where} must be a Hugging Face causal LM (an nn.Module), got {type(model).__name__}")
    if not hasattr(model, "get_input_embeddings") or not hasattr(model, "config"):
        raise TypeError(f"{where} must be a Hugging Face causal LM (with .config and get_input_embeddings()), "
                        f"got {type(model).__name__}")


def position_limit(model: nn.Module) -> Optional[int]:
    """The longest sequence the model's positions cover (``config.max_position_embeddings`` or its
    family's name for it), or ``None`` when its config names none."""
    check_model(model, "model")
    for name in POSITION_ATTRIBUTES:
        value = getattr(model.config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def vocab_size(model: nn.Module) -> int:
    """Rows of the input embedding: the ids the model accepts (``config.vocab_size`` may be padded otherwise)."""
    return int(model.get_input_embeddings().weight.shape[0])


def model_device(model: nn.Module) -> torch.device:
    """Where the model's first parameter lives: inputs are moved there."""
    for t in itertools.chain(model.parameters(), model.buffers()):
        return t.device
    return torch.device("cpu")


def decoder_blocks_path(model: nn.Module) -> str:
    """The attribute path of the decoder block list, for a pass's ``blocks=`` argument.

    ``"model.layers"`` (Llama, Qwen2, Mistral), ``"model.decoder.layers"``
    (OPT), ``"transformer.h"`` (GPT-2), ...; for other families the block
    list :func:`torchquant.ptq.find_blocks` finds. GPT-2's blocks hold no
    ``nn.Linear`` until :func:`conv1d_to_linear` has run; the path is the
    same before and after.
    """
    check_model(model, "model")
    path = _BLOCK_PATHS.get(getattr(model.config, "model_type", None))
    if path is not None:
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            blocks = None
        if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and len(blocks) > 0:
            return path
    found = find_blocks(model)
    if found is None:
        raise ValueError(f"decoder_blocks_path: found no decoder block list in {type(model).__name__} (model_type "
                         f"{getattr(model.config, 'model_type', None)!r}); pass blocks='attribute.path' to the pass")
    return found[0]


@torch.no_grad()
def conv1d_to_linear(model: nn.Module) -> List[str]:
    """Replace every ``transformers`` ``Conv1D`` of ``model`` (GPT-2's projections) by an equal ``nn.Linear``, in place.

    ``Conv1D`` computes ``x @ W + b`` with ``W`` ``[in, out]``; the Linear
    holds ``W^T`` (same dtype and device), so the model computes the same
    function and the post-training passes, which quantize ``nn.Linear``
    layers, can see them. Returns the names of the replaced layers (empty
    for models without Conv1D layers).
    """
    from transformers.pytorch_utils import Conv1D

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    replaced = [(name, m) for name, m in model.named_modules() if isinstance(m, Conv1D)]
    for name, conv in replaced:
        if not name:
            raise ValueError("conv1d_to_linear: the model is itself a Conv1D, which cannot be replaced in place")
        in_features, out_features = conv.weight.shape
        linear = nn.Linear(in_features, out_features, bias=conv.bias is not None, device=conv.weight.device,
                           dtype=conv.weight.dtype)
        linear.weight.copy_(conv.weight.t())
        if conv.bias is not None:
            linear.bias.copy_(conv.bias)
        linear.train(conv.training)
        set_submodule(model, name, linear)
    return [name for name, _ in replaced]


def load_causal_lm(directory, *, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A Hugging Face causal-LM folder (``config.json`` + weights) as a model the passes can quantize.

    ``AutoModelForCausalLM.from_pretrained`` without network access, in
    ``dtype`` and eval mode, then :func:`conv1d_to_linear` (a no-op outside
    the GPT-2 family). The tokenizer is the folder's too:
    ``AutoTokenizer.from_pretrained(directory)``.
    """
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    if not isinstance(directory, (str, Path)):
        raise TypeError(f"directory must be a path, got {type(directory).__name__}")
    if not (Path(directory) / "config.json").is_file():
        raise ValueError(f"directory={str(directory)!r} holds no config.json: not a Hugging Face model folder")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, dtype=dtype).eval()
    conv1d_to_linear(model)
    return model


# ---------------------------------------------------------------------------- token ids

def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def token_ids(ids, model: nn.Module, where: str) -> Tensor:
    """``ids`` as a 1-D int64 tensor of in-vocabulary token ids (a ``[1, T]`` tensor or a list of ints is fine)."""
    if isinstance(ids, (list, tuple)) and all(is_int(i) for i in ids):
        ids = torch.tensor(ids, dtype=torch.long)
    if not isinstance(ids, Tensor):
        raise TypeError(f"{where} must be a tensor of token ids (or a list of ints), got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{where} must hold integer token ids, got dtype {ids.dtype}")
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise ValueError(f"{where} must be one sequence of token ids, [tokens] or [1, tokens], got shape "
                         f"{list(ids.shape)}")
    if ids.numel() == 0:
        raise ValueError(f"{where} is empty: there are no tokens")
    vocab = vocab_size(model)
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab:
        bad = low if low < 0 else high
        raise ValueError(f"{where} holds token id {bad}, outside the model's vocabulary [0, {vocab}); was it "
                         "tokenized with this model's tokenizer?")
    return ids.to(torch.long)


def check_fits(model: nn.Module, length: int, where: str, what: str) -> None:
    limit = position_limit(model)
    if limit is not None and length > limit:
        raise ValueError(f"{where}: {what} is {length} tokens, longer than the model's position limit of {limit} "
                         f"(config.max_position_embeddings or its family's name for it)")


def calibration_batches(sequences, batch_size: int = 8) -> List[Dict[str, object]]:
    """Calibration batches for the :mod:`torchquant.ptq` passes: dicts of ``input_ids`` ``[B, T]``,
    an all-ones ``attention_mask`` and ``use_cache=False`` (the passes run each block several times).

    ``sequences``: a ``[N, T]`` tensor of token ids or a sequence of ``[T]``
    tensors of one length; ``batch_size`` of them per batch (the last batch
    may be smaller).
    """
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(sequences, Tensor):
        if sequences.dim() != 2:
            raise ValueError(f"sequences must be a [N, tokens] tensor, got shape {list(sequences.shape)}")
        rows = sequences
    else:
        items = list(sequences)
        if not items or not all(isinstance(s, Tensor) and s.dim() == 1 for s in items):
            raise TypeError("sequences must be a [N, tokens] tensor or a non-empty sequence of 1-D tensors")
        if len({s.numel() for s in items}) != 1:
            raise ValueError("sequences must all have the same length (the batches hold no padding)")
        rows = torch.stack(items)
    if rows.dtype.is_floating_point or rows.dtype.is_complex or rows.dtype == torch.bool:
        raise TypeError(f"sequences must hold integer token ids, got dtype {rows.dtype}")
    if rows.shape[0] == 0 or rows.shape[1] == 0:
        raise ValueError(f"sequences is empty (shape {list(rows.shape)})")
    return [{"input_ids": chunk, "attention_mask": torch.ones_like(chunk), "use_cache": False}
            for chunk in rows.long().split(batch_size)]


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no autograd for the duration; each module's mode is restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for m, training in modes:
            m.training = training
