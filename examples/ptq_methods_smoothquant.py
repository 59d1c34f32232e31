"""W8A8 rows of the real-model table: int8 weights and int8 activations, with and without SmoothQuant.

Every Linear of all-MiniLM-L6-v2's 6 encoder blocks gets symmetric int8
weights per output channel and int8 activations with one static scale per
tensor (``max |x| / 127.5`` over the calibration tokens), by
``torchquant.ptq.quantize_w8a8``; the activations' outlier channels decide
that scale. SmoothQuant first moves part of their range into the weights
(``torchquant.ptq.smoothquant``, calibrated on the same batches); MiniLM is a
post-LN encoder, so only ``value -> attention.output.dense`` folds offline and
its other layers divide their input online (``InputScaledLinear``).

    python examples/ptq_methods_smoothquant.py      # these rows alone, against fp32

``examples/ptq_demo.py`` adds them to its table with :func:`smoothquant_methods`.
"""
import sys
import time
from typing import Callable, Dict, Optional

import torch
from torch import nn

from minilm import cosine_table, demo_inputs, markdown_table

BLOCKS = "encoder.layer"
CALIBRATION_BATCH_SIZE = 16

Method = Callable[[nn.Module], None]


def smoothquant_available() -> bool:
    """The SmoothQuant driver and the compiled ops it calls (an extension built before them lacks them)."""
    try:
        import torchquant.ptq.smoothquant  # noqa: F401
    except ImportError:
        return False
    return hasattr(torch.ops.torchquant, "smoothquant_scales") and hasattr(torch.ops.torchquant, "smoothquant_fold_")


def w8a8(calibration) -> Method:
    """Static per-tensor W8A8 on the model as it is."""
    from torchquant.ptq.smoothquant import quantize_w8a8

    def apply(model: nn.Module) -> None:
        quantize_w8a8(model, act_granularity="tensor", calibration_batches=calibration, blocks=BLOCKS, progress=False)
    return apply


def smoothquant_w8a8(calibration, alpha, keep: Optional[dict] = None) -> Method:
    """SmoothQuant (``alpha`` a number or ``"search"``), then static per-tensor W8A8.

    ``keep``: a dict that receives the SmoothQuant ``report``.
    """
    from torchquant.ptq.smoothquant import quantize_w8a8, smoothquant

    def apply(model: nn.Module) -> None:
        report = smoothquant(model, calibration, alpha=alpha, act_granularity="tensor", blocks=BLOCKS,
                             progress=False)
        quantize_w8a8(model, act_granularity="tensor", calibration_batches=calibration, blocks=BLOCKS, progress=False)
        if keep is not None:
            keep["report"] = report
    return apply


def smoothquant_methods(calibration, keep: Optional[dict] = None) -> Dict[str, Method]:
    """The three rows, by name. ``keep`` receives the searched run's SmoothQuant report."""
    return {
        "W8A8 per-tensor (no smoothing)": w8a8(calibration),
        "W8A8 + SmoothQuant α=0.5": smoothquant_w8a8(calibration, 0.5),
        "W8A8 + SmoothQuant searched α": smoothquant_w8a8(calibration, "search", keep),
    }


def searched_alphas(report) -> str:
    """One line per block: the alpha each group got."""
    lines = []
    by_block: Dict[str, list] = {}
    for group in report.groups.values():
        _, _, block, rest = group.name.split(".", 3)  # encoder.layer.<i>.<rest>
        by_block.setdefault(block, []).append(f"{rest} {group.alpha:g}")
    for block, items in by_block.items():
        lines.append(f"  block {block}: " + ", ".join(items))
    return "\n".join(lines)


def sanity_failures(rows) -> list:
    """The searched alpha must not lose to no smoothing: it minimises each group's W8A8 error.

    A fixed alpha may: on MiniLM, alpha = 0.5 doubles the weight range of the feed-forward output layers,
    whose weights have outlier columns of their own, and their W8A8 error grows (see the report's losses).
    """
    by_name = {r.method: r for r in rows}
    plain, searched = by_name["W8A8 per-tensor (no smoothing)"], by_name["W8A8 + SmoothQuant searched α"]
    if searched.mean_cos < plain.mean_cos:
        return [f"searched alpha: mean cosine {searched.mean_cos:.4f} < no smoothing {plain.mean_cos:.4f}"]
    return []


def main() -> int:
    if not smoothquant_available():
        print("SmoothQuant is not available (torchquant.ptq.smoothquant or its ops are missing)", file=sys.stderr)
        return 1
    start = time.perf_counter()
    model, tokenizer, _, heldout, batches = demo_inputs(__doc__.split("\n")[0], CALIBRATION_BATCH_SIZE)
    keep: dict = {}
    rows = cosine_table(smoothquant_methods(batches, keep), model, tokenizer, heldout)
    print(markdown_table(rows))
    print("\nsearched alpha per group:\n" + searched_alphas(keep["report"]))
    print(f"\ntotal {time.perf_counter() - start:.1f} s")
    failures = sanity_failures(rows)
    for failure in failures:
        print(f"SANITY CHECK FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
