"""Perplexity with the sliding window, greedy-token agreement and decode speed of a Hugging Face causal LM."""
from __future__ import annotations

import math
import time
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from torchquant.lm.models import (POSITION_ATTRIBUTES, check_fits, check_model, evaluating, is_int, model_device,
                                  position_limit, token_ids, vocab_size)

__all__ = ["decode_tokens_per_second", "generate_agreement", "perplexity"]


# ---------------------------------------------------------------------------- perplexity

def _windows(length: int, max_length: int, stride: int) -> List[Tuple[int, int, int]]:
    """``(begin, end, first)`` of each window: tokens ``[begin, end)`` are fed, and the tokens at window
    positions ``first .. end - begin - 1`` are scored (the new ones; position 0 has no context)."""
    windows, previous_end = [], 0
    for begin in range(0, length, stride):
        end = min(begin + max_length, length)
        new = end - previous_end
        windows.append((begin, end, max(end - begin - new, 1)))
        previous_end = end
        if end == length:
            break
    return windows


def perplexity(model: nn.Module, input_ids, *, max_length: Optional[int] = None, stride: Optional[int] = None,
               batch_size: int = 1, progress: bool = False) -> float:
    """Perplexity of ``model`` on one token stream, with the usual sliding window.

    Windows of ``max_length`` tokens start every ``stride`` tokens; each is
    run through the model, and only the tokens it adds after the previous
    window's end are scored, each predicted from up to ``max_length - 1``
    tokens before it (the first window scores all its tokens). This is the
    evaluation of Hugging Face's perplexity guide and of the WikiText
    numbers quoted for GPT-2 / Llama. The result is ``exp`` of the mean
    negative log-likelihood over every scored token (the stream's first token
    is never scored, nor, with ``stride == max_length``, the first token of
    each window, which has no context inside it).

    Args:
        model: a Hugging Face causal LM (float or quantized); run in eval
            mode without gradients, its modes restored after.
        input_ids: the token ids of the text, ``[tokens]`` or ``[1, tokens]``
            (at least two tokens).
        max_length: tokens per window; default: the model's position limit
            (:func:`position_limit`); at least 2 and at most that limit.
        stride: tokens between window starts, at most ``max_length``; default
            ``max_length // 2``. Smaller strides give each token more
            context and cost more windows.
        batch_size: windows run together (windows of equal length; the last
            one, usually shorter, runs on its own).
        progress: a tqdm bar over the windows.
    """
    check_model(model, "model")
    ids = token_ids(input_ids, model, "input_ids")
    if ids.numel() < 2:
        raise ValueError("input_ids must hold at least 2 tokens: the first token of a text is never scored")
    limit = position_limit(model)
    if max_length is None:
        if limit is None:
            raise ValueError("max_length=None takes the model's position limit, but its config names none "
                             f"({', '.join(POSITION_ATTRIBUTES)}); pass max_length")
        max_length = limit
    if not is_int(max_length) or max_length < 2:
        raise ValueError(f"max_length must be an integer >= 2 (tokens per window), got {max_length!r}")
    check_fits(model, max_length, "perplexity", "max_length")
    if stride is None:
        stride = max(max_length // 2, 1)
    if not is_int(stride) or stride < 1:
        raise ValueError(f"stride must be a positive integer, got {stride!r}")
    if stride > max_length:
        raise ValueError(f"stride={stride} must be at most max_length={max_length}: a larger stride would skip the "
                         "tokens between windows")
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")

    ids = ids.to(model_device(model))
    windows = _windows(ids.numel(), max_length, stride)
    # Runs of windows of one length, batch_size at a time: no padding, so every model sees plain windows.
    batches: List[List[Tuple[int, int, int]]] = []
    for w in windows:
        if batches and len(batches[-1]) < batch_size and batches[-1][0][1] - batches[-1][0][0] == w[1] - w[0]:
            batches[-1].append(w)
        else:
            batches.append([w])
    nll, scored = 0.0, 0
    with evaluating(model), tqdm(total=len(windows), desc="perplexity", unit="window", disable=not progress,
                                  dynamic_ncols=True) as bar:
        for batch in batches:
            tokens = torch.stack([ids[begin:end] for begin, end, _ in batch])
            logits = model(input_ids=tokens, attention_mask=torch.ones_like(tokens), use_cache=False).logits
            for row, (begin, end, first) in enumerate(batch):
                # Position p's logits predict token p + 1.
                predicted = logits[row, first - 1:end - begin - 1].float()
                nll += float(F.cross_entropy(predicted, tokens[row, first:], reduction="sum"))
                scored += end - begin - first
            bar.update(len(batch))
    return math.exp(nll / scored)


# ---------------------------------------------------------------------------- generation

def _greedy_config(model: nn.Module, max_new_tokens: int, min_new_tokens: int = 0):
    """Greedy decoding, whatever sampling settings the model's own generation config holds."""
    from transformers import GenerationConfig

    own = getattr(model, "generation_config", None)
    eos = getattr(own, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    pad = getattr(own, "pad_token_id", None)
    if pad is None:
        pad = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    return GenerationConfig(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=False,
                            num_beams=1, eos_token_id=eos, pad_token_id=pad,
                            bos_token_id=getattr(own, "bos_token_id", None))


def _stop_ids(config) -> set:
    eos = config.eos_token_id
    if eos is None:
        return set()
    return set(eos) if isinstance(eos, (list, tuple)) else {eos}


def _generate(model: nn.Module, prompt: Tensor, config) -> Tensor:
    """The new tokens of a greedy ``model.generate`` on one prompt, cut after the first stop token."""
    tokens = prompt.to(model_device(model))[None]
    out = model.generate(tokens, attention_mask=torch.ones_like(tokens), generation_config=config)
    new = out[0, tokens.shape[1]:].cpu()
    stops = _stop_ids(config)
    for i, t in enumerate(new.tolist()):
        if t in stops:
            return new[:i + 1]
    return new


def _prompts(prompts_ids, model: nn.Module, where: str) -> List[Tensor]:
    if isinstance(prompts_ids, Tensor):
        if prompts_ids.dim() != 2:
            raise ValueError(f"{where} must be a [prompts, tokens] tensor or a sequence of 1-D tensors, got shape "
                             f"{list(prompts_ids.shape)}")
        prompts_ids = list(prompts_ids)
    if isinstance(prompts_ids, (str, bytes)) or not isinstance(prompts_ids, Sequence):
        raise TypeError(f"{where} must be a sequence of token-id tensors, got {type(prompts_ids).__name__}")
    if not prompts_ids:
        raise ValueError(f"{where} is empty: no prompt to generate from")
    return [token_ids(p, model, f"{where}[{i}]") for i, p in enumerate(prompts_ids)]


def _check_new_tokens(value, name: str) -> None:
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def generate_agreement(reference_model: nn.Module, model: nn.Module, prompts_ids, max_new_tokens: int) -> float:
    """The share of ``model``'s greedy tokens that equal ``reference_model``'s, position by position.

    Both models continue each prompt with greedy ``generate`` (at most
    ``max_new_tokens`` new tokens, stopping at their end-of-sequence token).
    Each reference continuation is compared up to and including its first
    stop token; where ``model`` stopped earlier, the missing positions count
    as disagreements. Agreement is cumulative: after one differing token the
    two continuations usually part ways, so it measures how long a quantized
    model follows the float one.

    Args:
        reference_model, model: Hugging Face causal LMs sharing a tokenizer.
        prompts_ids: a ``[prompts, tokens]`` tensor or a sequence of 1-D
            token-id tensors (lengths may differ).
        max_new_tokens: new tokens per prompt; prompt plus new tokens must fit
            each model's position limit.

    Returns:
        Matching positions over compared positions, in ``[0, 1]``.
    """
    check_model(reference_model, "reference_model")
    check_model(model, "model")
    _check_new_tokens(max_new_tokens, "max_new_tokens")
    prompts = _prompts(prompts_ids, reference_model, "prompts_ids")
    if vocab_size(model) != vocab_size(reference_model):
        raise ValueError(f"model has a vocabulary of {vocab_size(model)} tokens, reference_model of "
                         f"{vocab_size(reference_model)}: they do not share a tokenizer")
    for m, where in ((reference_model, "reference_model"), (model, "model")):
        for i, p in enumerate(prompts):
            check_fits(m, p.numel() + max_new_tokens, f"generate_agreement ({where})",
                       f"prompts_ids[{i}] plus max_new_tokens")
    matches = compared = 0
    with evaluating(reference_model), evaluating(model):
        ref_config = _greedy_config(reference_model, max_new_tokens)
        config = _greedy_config(model, max_new_tokens)
        for prompt in prompts:
            expected = _generate(reference_model, prompt, ref_config)
            got = _generate(model, prompt, config)
            n = min(expected.numel(), got.numel())
            matches += int((expected[:n] == got[:n]).sum())
            compared += expected.numel()
    return matches / compared if compared else 1.0


def decode_tokens_per_second(model: nn.Module, prompt_ids, new_tokens: int, *, repeats: int = 2) -> float:
    """Greedy decoding speed after the prompt: new tokens per second, best of ``repeats``.

    Each measurement times ``generate`` of ``new_tokens`` tokens (no early
    stop: ``min_new_tokens`` holds the end-of-sequence token back) and of a
    single token on the same prompt, and divides the ``new_tokens - 1``
    extra tokens by the difference: the prompt's prefill is not counted. One
    short warm-up generation runs first. ``new_tokens`` must be at least 2
    and, with the prompt, fit the model's position limit.
    """
    check_model(model, "model")
    if not is_int(new_tokens) or new_tokens < 2:
        raise ValueError(f"new_tokens must be an integer >= 2 (one token is the prefill's), got {new_tokens!r}")
    if not is_int(repeats) or repeats < 1:
        raise ValueError(f"repeats must be a positive integer, got {repeats!r}")
    prompt = token_ids(prompt_ids, model, "prompt_ids")
    check_fits(model, prompt.numel() + new_tokens, "decode_tokens_per_second", "prompt_ids plus new_tokens")
    full, one = _greedy_config(model, new_tokens, new_tokens), _greedy_config(model, 1, 1)
    best = math.inf
    with evaluating(model):
        _generate(model, prompt, _greedy_config(model, 2, 2))
        for _ in range(repeats):
            start = time.perf_counter()
            _generate(model, prompt, one)
            prefill = time.perf_counter() - start
            start = time.perf_counter()
            _generate(model, prompt, full)
            best = min(best, max(time.perf_counter() - start - prefill, 1e-9))
    return (new_tokens - 1) / best
