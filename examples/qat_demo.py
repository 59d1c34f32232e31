"""Post-training quantization vs quantization-aware training of a small MLP on scikit-learn's digits.

Trains an fp32 MLP, then at W8A8, W4A8 and W2A8 (weights per-channel
symmetric, activations per-tensor asymmetric 8-bit) compares
* RTN: ``prepare_qat`` with fixed grids, calibration batches, ``convert``;
* QAT: ``prepare_qat`` with learnable (LSQ) grids, fine-tuning, ``convert``.
Both are evaluated as converted models holding integer weights. The W4A8
model is also saved with ``save_quantized`` and reloaded into a fresh float
model with ``load_quantized``. Runs on CPU in a minute or two:

    python examples/qat_demo.py

Exits with status 1 if a sanity check fails (e.g. W8A8 QAT more than 2
accuracy points below fp32, or QAT worse than RTN at 2 bits).
"""
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from tqdm import tqdm

import torchquant
from torchquant import LayerQuant, QuantConfig, QuantSpec, convert, parameter_bytes, prepare_qat

SEED = 0
BATCH_SIZE = 64
CALIBRATION_BATCH_SIZE = 256
# fp32 is trained to convergence, so that what QAT gains is not just more training.
FP32_STEPS, FP32_LR = 2000, 1e-3
QAT_STEPS, QAT_LR = 300, 1e-3
WEIGHT_BITS = {"W8A8": 8, "W4A8": 4, "W2A8": 2}


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


def quant_config(weight_bits: int, learnable: bool) -> QuantConfig:
    """Every Linear: per-channel symmetric weights, per-tensor asymmetric 8-bit inputs."""
    weight = QuantSpec(bits=weight_bits, symmetric=True, granularity="channel", axis=0, learnable=learnable)
    activation = QuantSpec(bits=8, symmetric=False, granularity="tensor", observer="minmax", learnable=learnable)
    return QuantConfig(default=LayerQuant(weight, activation))


@torch.no_grad()
def calibrate(model, x):
    """Forward passes in training mode, no optimizer: the activation observers see the data.

    Fixed grids keep the running min / max of every batch; learnable grids
    are initialised from the first batch and then left to training.
    """
    model.train()
    for batch in x.split(CALIBRATION_BATCH_SIZE):
        model(batch)


@torch.no_grad()
def accuracy(model, data):
    x, y = data
    return (model.eval()(x).argmax(dim=1) == y).float().mean().item() * 100


def train(model, train_data, steps, lr, desc):
    """Adam on random minibatches, the loss shown on the progress bar; returns the loss curve."""
    x, y = train_data
    generator = torch.Generator().manual_seed(SEED)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)  # after calibration: every grid has its shape
    model.train()
    losses = []
    for _ in (bar := tqdm(range(steps), desc=desc, leave=False)):
        batch = torch.randint(len(x), (BATCH_SIZE,), generator=generator)
        loss = F.cross_entropy(model(x[batch]), y[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    return losses


def curve(losses, points=5):
    """The training loss at evenly spaced steps, each averaged over its neighbourhood."""
    chunk = max(1, len(losses) // points)
    return " → ".join(f"{sum(losses[i:i + chunk]) / len(losses[i:i + chunk]):.2e}"
                      for i in range(0, chunk * points, chunk))


def post_training_rtn(fp32, weight_bits, train_x):
    """Round-to-nearest on min/max grids: calibrate, convert, no training."""
    model = prepare_qat(fp32, quant_config(weight_bits, learnable=False))
    calibrate(model, train_x)
    return convert(model)


def quantization_aware(fp32, weight_bits, train_data, desc):
    """Learnable grids initialised like RTN's, fine-tuned with the weights, then converted."""
    model = prepare_qat(fp32, quant_config(weight_bits, learnable=True))
    calibrate(model, train_data[0])
    losses = train(model, train_data, QAT_STEPS, QAT_LR, desc)
    return convert(model), losses


def check_checkpoint(model, test_x) -> bool:
    """save_quantized, then load_quantized into a freshly built float model: same predictions?"""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mlp_w4a8.safetensors"
        torchquant.save_quantized(model, path)
        size = path.stat().st_size
        reloaded = torchquant.load_quantized(make_mlp(), path)
    with torch.no_grad():
        same = torch.equal(reloaded(test_x), model.eval()(test_x))
    print(f"W4A8 checkpoint: {size} bytes; reloaded into a fresh float model, identical outputs: {same}")
    return same


def main() -> int:
    # Every op here is tiny: one thread is faster than waking a thread pool
    # each time, and the results no longer depend on the core count.
    torch.set_num_threads(1)
    torch.manual_seed(SEED)
    print(f"torchquant {torchquant.__version__} from {Path(torchquant.__file__).parent}")
    train_data, test_data = load_data()
    print(f"digits: {len(train_data[0])} train / {len(test_data[0])} test samples, 64 features, 10 classes")

    fp32 = make_mlp()
    curves = {"fp32": train(fp32, train_data, FP32_STEPS, FP32_LR, "fp32")}
    fp32_acc, fp32_bytes = accuracy(fp32, test_data), parameter_bytes(fp32)

    results, converted = {}, {}
    for setting, bits in WEIGHT_BITS.items():
        rtn = post_training_rtn(fp32, bits, train_data[0])
        qat, curves[f"{setting} QAT"] = quantization_aware(fp32, bits, train_data, f"{setting} QAT")
        converted[setting] = qat
        results[setting] = (accuracy(rtn, test_data), accuracy(qat, test_data), parameter_bytes(qat))

    print(f"\nfp32 test accuracy: {fp32_acc:.2f}%\n")
    print("| setting | RTN accuracy (%) | QAT accuracy (%) | RTN loss recovered by QAT | bytes fp32 → converted |")
    print("|---|---:|---:|---:|---:|")
    for setting, (rtn_acc, qat_acc, nbytes) in results.items():
        lost = fp32_acc - rtn_acc
        # With fewer than 2 test samples lost, the fraction is noise.
        recovered = f"{(qat_acc - rtn_acc) / lost:.0%}" if lost >= 2 * 100 / len(test_data[0]) else "–"
        print(f"| {setting} | {rtn_acc:.2f} | {qat_acc:.2f} | {recovered} | {fp32_bytes} → {nbytes} |")
    print("\ntraining loss (5 points from first to last step):")
    for name, losses in curves.items():
        print(f"  {name:9s} {curve(losses)}")
    print()

    rtn_acc = {s: r[0] for s, r in results.items()}
    qat_acc = {s: r[1] for s, r in results.items()}
    size = {s: r[2] for s, r in results.items()}
    checks = {
        "fp32 reaches 90% test accuracy": fp32_acc >= 90.0,
        "W8A8 QAT within 2 points of fp32": qat_acc["W8A8"] >= fp32_acc - 2.0,
        "W2A8 QAT at least as accurate as W2A8 RTN": qat_acc["W2A8"] >= rtn_acc["W2A8"],
        "converted models shrink with the weight width": fp32_bytes > size["W8A8"] > size["W4A8"] > size["W2A8"],
        "the W4A8 checkpoint reloads with identical outputs": check_checkpoint(converted["W4A8"], test_data[0]),
    }
    for name, ok in checks.items():
        print(f"[{'ok' if ok else 'FAILED'}] {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
