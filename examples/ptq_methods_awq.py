"""AWQ rows of the MiniLM table: AWQ alone and AWQ's scales followed by GPTQ.

``ptq_demo.py`` imports the two methods; run alone, this script prints the
fp32, RTN, GPTQ, AWQ and AWQ+GPTQ rows at W4 g128 (asymmetric, like the
demo's other rows) on the demo's sentences:

    python examples/ptq_methods_awq.py

all-MiniLM-L6-v2 is a post-LN BERT: the LayerNorm outputs feed the
residual connections too, so only the ``value -> attention.output.dense``
scales fold into a layer; the other groups (q/k/v, the FFN's two layers)
divide their input online (``torchquant.nn.InputScaledLinear``). The
AWQ+GPTQ row keeps AWQ's scales and clipping and lets GPTQ do the rounding.
"""
import sys
import time

import torchquant
from torchquant import QuantSpec
from torchquant.ptq.awq import awq as run_awq
from torchquant.ptq.awq import awq_then_gptq as run_awq_then_gptq

BLOCKS = "encoder.layer"


def awq(spec: QuantSpec, calibration, keep=None):
    """AWQ over the encoder blocks (scale search, clip search, round to nearest), fed the tokenized batches.

    ``keep``: a dict that receives the quantized ``model`` and its ``report``.
    """
    def apply(model):
        report = run_awq(model, calibration, spec, blocks=BLOCKS, progress=False)
        # Packed run-time layers; layers whose AWQ scale could not fold keep it as input_scale.
        torchquant.ptq.to_quantized_modules(model, report)
        if keep is not None:
            keep.update(model=model, report=report)
    return apply


def awq_then_gptq(spec: QuantSpec, calibration, keep=None):
    """AWQ's scales and clipping, then GPTQ on the scaled model (``keep`` receives the two reports)."""
    def apply(model):
        options = {"blocks": BLOCKS, "progress": False}
        reports = run_awq_then_gptq(model, calibration, spec, awq_kwargs=options, gptq_kwargs=options)
        torchquant.ptq.to_quantized_modules(model, reports.gptq)
        if keep is not None:
            keep.update(model=model, awq_report=reports.awq, gptq_report=reports.gptq)
    return apply


def main() -> int:
    # The demo's helpers; imported here because the demo imports this module.
    from minilm import cosine_table, demo_inputs, markdown_table
    from ptq_demo import CALIBRATION_BATCH_SIZE, gptq, row_name, rtn, weight_spec

    start = time.perf_counter()
    model, tokenizer, _, heldout, batches = demo_inputs(__doc__.split("\n")[0], CALIBRATION_BATCH_SIZE)
    spec = weight_spec(4)
    methods = {row_name("RTN", 4): rtn(spec), row_name("GPTQ", 4): gptq(spec, batches),
               row_name("AWQ", 4): awq(spec, batches), row_name("AWQ+GPTQ", 4): awq_then_gptq(spec, batches)}
    rows = cosine_table(methods, model, tokenizer, heldout)
    print(markdown_table(rows))
    print(f"\ntotal {time.perf_counter() - start:.1f} s")

    by_name = {r.method: r for r in rows}
    rtn_row, awq_row = by_name[row_name("RTN", 4)], by_name[row_name("AWQ", 4)]
    if awq_row.mean_cos < rtn_row.mean_cos:
        print(f"SANITY CHECK FAILED: AWQ W4 mean cosine {awq_row.mean_cos:.4f} < RTN {rtn_row.mean_cos:.4f}",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
