"""Quantization-aware training of a small MLP on scikit-learn's handwritten digits.

Trains an fp32 MLP, then, at W8A8, W4A8 and W4A4, compares
* RTN: round-to-nearest on grids observed from the training set, no training;
* QAT: the same grids made learnable (LSQ) and fine-tuned with the weights.

Weights use per-channel symmetric grids (one per output row), activations
per-tensor asymmetric grids. Runs on CPU in well under a minute:

    python examples/qat_demo.py

Exits with status 1 if a sanity check fails (e.g. 8-bit QAT losing more than
3 accuracy points against fp32).
"""
import copy
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from tqdm import tqdm

import torchquant
from torchquant import QuantSpec
from torchquant.nn import FakeQuantize

SEED = 0
BATCH_SIZE = 64
FP32_STEPS, FP32_LR = 400, 1e-3
QAT_STEPS, QAT_LR = 300, 1e-3
SETTINGS = [(8, 8), (4, 8), (4, 4)]  # (weight bits, activation bits)
CHECKPOINTS = 5  # points of the printed loss curve


def load_data():
    """Standardised 8x8 digit images as 64 features; statistics from the training split only."""
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=0.25, random_state=SEED, stratify=digits.target
    )
    x_train, x_test = (torch.tensor(a, dtype=torch.float32) for a in (x_train, x_test))
    mean, std = x_train.mean(dim=0), x_train.std(dim=0).clamp_min(1e-3)  # some border pixels are always 0
    return ((x_train - mean) / std, torch.tensor(y_train)), ((x_test - mean) / std, torch.tensor(y_test))


def make_mlp():
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))


class QuantLinear(nn.Module):
    """A Linear whose input and weight go through learnable fake-quantizers.

    Kept local to this example: it shows the few lines QAT needs on top of
    ``FakeQuantize``.
    """

    def __init__(self, linear: nn.Linear, weight_bits: int, act_bits: int):
        super().__init__()
        self.linear = linear
        self.weight_fq = FakeQuantize(QuantSpec(bits=weight_bits, granularity="channel", axis=0, learnable=True))
        self.input_fq = FakeQuantize(QuantSpec(bits=act_bits, symmetric=False, learnable=True))

    def forward(self, x):
        return F.linear(self.input_fq(x), self.weight_fq(self.linear.weight), self.linear.bias)


def quantized_copy(model, weight_bits, act_bits, calibration_x):
    """A copy of ``model`` with every Linear wrapped, its grids observed on ``calibration_x``."""
    model = copy.deepcopy(model)
    for i, layer in enumerate(model):
        if isinstance(layer, nn.Linear):
            model[i] = QuantLinear(layer, weight_bits, act_bits)
    with torch.no_grad():
        model.train()(calibration_x)  # one batch initialises every learnable grid
    return model


@torch.no_grad()
def evaluate(model, data):
    x, y = data
    logits = model.eval()(x)
    return (logits.argmax(dim=1) == y).float().mean().item() * 100, F.cross_entropy(logits, y).item()


def train(model, train_data, steps, lr, desc):
    """Adam on minibatches; returns the full training-set loss at evenly spaced steps."""
    x, y = train_data
    generator = torch.Generator().manual_seed(SEED)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    checkpoints = {round(i * steps / (CHECKPOINTS - 1)) for i in range(CHECKPOINTS - 1)}
    curve = []
    for step in tqdm(range(steps), desc=desc):
        if step in checkpoints:
            curve.append(evaluate(model, train_data)[1])
        batch = torch.randint(len(x), (BATCH_SIZE,), generator=generator)
        model.train()
        loss = F.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    curve.append(evaluate(model, train_data)[1])
    return curve


def main() -> int:
    # Every op here is tiny: one thread is faster than waking a thread pool
    # each time, and the results no longer depend on the core count.
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    print(f"torchquant {torchquant.__version__} from {Path(torchquant.__file__).parent}")
    train_data, test_data = load_data()
    print(f"digits: {len(train_data[0])} train / {len(test_data[0])} test samples, 64 features, 10 classes")

    rows = []  # (setting, method, test accuracy, final train loss, curve)
    fp32 = make_mlp()
    curve = train(fp32, train_data, FP32_STEPS, FP32_LR, "fp32")
    rows.append(("fp32", "fp32", evaluate(fp32, test_data)[0], curve[-1], curve))

    for weight_bits, act_bits in SETTINGS:
        setting = f"W{weight_bits}A{act_bits}"
        rtn = quantized_copy(fp32, weight_bits, act_bits, train_data[0])
        rows.append((setting, "RTN", evaluate(rtn, test_data)[0], evaluate(rtn, train_data)[1], None))
        qat = copy.deepcopy(rtn)  # QAT starts from the trained weights and the RTN grids
        curve = train(qat, train_data, QAT_STEPS, QAT_LR, f"{setting} QAT")
        rows.append((setting, "QAT", evaluate(qat, test_data)[0], curve[-1], curve))

    print("\n| setting | method | test accuracy (%) | final train loss | train loss curve |")
    print("|---|---|---:|---:|---|")
    for setting, method, acc, loss, curve in rows:
        shown = " → ".join(f"{v:.3f}" for v in curve) if curve else "–"
        print(f"| {setting} | {method} | {acc:.2f} | {loss:.4f} | {shown} |")

    accuracy = {(setting, method): acc for setting, method, acc, _, _ in rows}
    checks = {
        "fp32 reaches 90% test accuracy": accuracy["fp32", "fp32"] >= 90.0,
        "W8A8 RTN within 3 points of fp32": accuracy["W8A8", "RTN"] >= accuracy["fp32", "fp32"] - 3.0,
        "W8A8 QAT within 3 points of fp32": accuracy["W8A8", "QAT"] >= accuracy["fp32", "fp32"] - 3.0,
        "W4A4 QAT at least as good as W4A4 RTN (1 point slack)":
            accuracy["W4A4", "QAT"] >= accuracy["W4A4", "RTN"] - 1.0,
        "every loss is finite": all(math.isfinite(v) for r in rows for v in [r[3], *(r[4] or [])]),
    }
    print()
    for name, ok in checks.items():
        print(f"[{'ok' if ok else 'FAILED'}] {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
