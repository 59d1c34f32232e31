"""What a converted MiniLM costs at run time: resident weight bytes and sentences per second.

A quantized model is only worth deploying if it runs from its packed
integers: it must hold fewer bytes than the fp32 model and embed sentences
at least about as fast. For each model of the demo table this measures

* the bytes of every parameter and buffer the model holds (each storage
  counted once), and of the encoder's Linear layers alone (what quantization
  replaces; embeddings, LayerNorms and the pooler stay float32);
* sentences per second at batch 1 (16 held-out sentences) and at batch 32
  (64 of them), the batches formed as :func:`minilm.embed` forms them, after
  one warm-up pass, best of two (one process, the threads torch uses).

    python examples/runtime_speed.py   # fp32 alone, as a smoke test
"""
from __future__ import annotations

import time
from typing import Dict, NamedTuple, Sequence

import torch
from torch import nn

from minilm import embed

SPEED_BATCHES = (1, 32)


class RuntimeCost(NamedTuple):
    model_bytes: int       # every parameter and buffer of the model
    linear_bytes: int      # those of the encoder blocks' Linear layers (or their quantized replacements)
    per_second: Dict[int, float]  # batch size -> sentences per second


def held_bytes(module: nn.Module) -> int:
    """Bytes of the distinct storages behind ``module``'s parameters and buffers."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        if t is None:
            continue
        key = (t.untyped_storage().data_ptr(), t.device)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def encoder_linear_bytes(model: nn.Module) -> int:
    """Bytes of the leaf layers inside the encoder blocks that are not LayerNorms (the Linear slots)."""
    total = 0
    for block in model.encoder.layer:
        for m in block.modules():
            if next(m.children(), None) is None and not isinstance(m, (nn.LayerNorm, nn.Dropout)):
                total += held_bytes(m)
    return total


def sentences_per_second(model: nn.Module, tokenizer, sentences: Sequence[str], batch_size: int,
                         repeats: int = 2) -> float:
    """Best of ``repeats`` timed passes of :func:`minilm.embed` over ``sentences`` (after a warm-up)."""
    embed(model, tokenizer, sentences[:batch_size], batch_size)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        embed(model, tokenizer, sentences, batch_size)
        best = min(best, time.perf_counter() - start)
    return len(sentences) / best


def runtime_cost(model: nn.Module, tokenizer, sentences: Sequence[str]) -> RuntimeCost:
    """Memory and speed of ``model``; batch 1 embeds the first 16 sentences, batch 32 the first 64."""
    speeds = {}
    for b in SPEED_BATCHES:
        subset = sentences[:16] if b == 1 else sentences[:64]
        speeds[b] = sentences_per_second(model, tokenizer, subset, b)
    return RuntimeCost(held_bytes(model), encoder_linear_bytes(model), speeds)


def cost_table(costs: Dict[str, RuntimeCost]) -> str:
    """Markdown: bytes and speed of each model, and their ratios to the first (fp32) one."""
    base = next(iter(costs.values()))
    lines = ["| model | model MiB | encoder Linear MiB | Linear bytes vs fp32 | "
             + " | ".join(f"sentences/s at batch {b} (vs fp32)" for b in SPEED_BATCHES) + " |",
             "|---|---:|---:|---:|" + "---:|" * len(SPEED_BATCHES)]
    for name, c in costs.items():
        speed = " | ".join(f"{c.per_second[b]:.1f} ({c.per_second[b] / base.per_second[b]:.2f}x)"
                           for b in SPEED_BATCHES)
        lines.append(f"| {name} | {c.model_bytes / 2**20:.1f} | {c.linear_bytes / 2**20:.2f} | "
                     f"{c.linear_bytes / base.linear_bytes:.3f} | {speed} |")
    return "\n".join(lines)


if __name__ == "__main__":
    from minilm import corpora, load_minilm

    fp32, tok = load_minilm()
    _, heldout = corpora()
    torch.manual_seed(0)
    print(cost_table({"fp32": runtime_cost(fp32, tok, heldout)}))
