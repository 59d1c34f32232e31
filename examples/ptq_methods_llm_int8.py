"""LLM.int8() and NF4 rows of the real-model table, and where LLM.int8() finds its outliers.

* LLM.int8() (``torchquant.ptq.llm_int8``, threshold 6, no calibration):
  int8 weights per output channel, int8 activations per token, and the input
  columns holding a value of magnitude >= 6 in any token of the batch
  multiplied in float;
* NF4 (``torchquant.ptq.nf4``, blocks of 64, no calibration), with and
  without double quantization of the block scales (QLoRA's base).

:func:`outlier_share` runs a converted LLM.int8() model over sentences and
reports, per layer, the share of its input columns that went through the
float path, the statistic the LLM.int8() paper's decomposition rests on.

    python examples/ptq_methods_llm_int8.py     # these rows and the outlier table, against fp32
"""
import sys
import time
from collections import defaultdict
from typing import Callable, Dict, Sequence

import torch
from torch import nn

import torchquant
from minilm import cosine_table, demo_inputs, embed, markdown_table

BLOCKS = "encoder.layer"
THRESHOLD = 6.0

Method = Callable[[nn.Module], None]


def llm_int8(threshold: float = THRESHOLD) -> Method:
    def apply(model: nn.Module) -> None:
        torchquant.ptq.llm_int8(model, threshold, blocks=BLOCKS)
    return apply


def nf4(double_quant: bool) -> Method:
    def apply(model: nn.Module) -> None:
        torchquant.ptq.nf4(model, block_size=64, double_quant=double_quant, blocks=BLOCKS)
    return apply


def methods() -> Dict[str, Method]:
    return {
        f"LLM.int8() threshold {THRESHOLD:g}": llm_int8(),
        "NF4 g64": nf4(False),
        "NF4 g64 + double quant": nf4(True),
    }


def outlier_share(model: nn.Module, tokenizer, sentences: Sequence[str], batch_size: int = 64) -> Dict[str, float]:
    """Per LLM.int8() layer (by name): the mean share of its input columns that were outliers, over the batches.

    Measured with forward pre-hooks on the converted model's layers, from the
    same rule the kernel applies (``|x| >= threshold`` in any token of the batch).
    """
    shares = defaultdict(list)

    def hook(name, layer):
        def record(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1])
            shares[name].append(float((x.abs() >= module.outlier_threshold).any(dim=0).float().mean()))
        return layer.register_forward_pre_hook(record)

    handles = [hook(name, m) for name, m in model.named_modules()
               if isinstance(m, torchquant.nn.QuantizedLinear) and m.activations == "llm_int8"]
    try:
        with torch.no_grad():
            embed(model, tokenizer, sentences, batch_size)
    finally:
        for h in handles:
            h.remove()
    return {name: sum(v) / len(v) for name, v in shares.items()}


def outlier_table(shares: Dict[str, float]) -> str:
    """Rows: the layer's role in a block; columns: the blocks."""
    by_role: Dict[str, Dict[str, float]] = defaultdict(dict)
    blocks = []
    for name, share in shares.items():
        _, _, block, role = name.split(".", 3)  # encoder.layer.<i>.<role>
        by_role[role][block] = share
        if block not in blocks:
            blocks.append(block)
    lines = ["| layer input | " + " | ".join(f"block {b}" for b in blocks) + " |",
             "|---|" + "---:|" * len(blocks)]
    for role, row in by_role.items():
        lines.append(f"| {role} | " + " | ".join(f"{row.get(b, 0.0):.2%}" for b in blocks) + " |")
    return "\n".join(lines)


def main() -> int:
    start = time.perf_counter()
    model, tokenizer, _, heldout, _ = demo_inputs(__doc__.split("\n")[0], 16)
    kept = {}

    def inspect(name, quantized):
        if name.startswith("LLM.int8()"):
            kept["shares"] = outlier_share(quantized, tokenizer, heldout)

    print(markdown_table(cosine_table(methods(), model, tokenizer, heldout, inspect=inspect)))
    print(f"\nShare of input columns in the float path of LLM.int8() (threshold {THRESHOLD:g}), mean over "
          "batches of 64 held-out sentences:\n")
    print(outlier_table(kept["shares"]))
    print(f"\ntotal {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
