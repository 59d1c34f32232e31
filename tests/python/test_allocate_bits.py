"""torchquant.ptq.layer_sensitivity / allocate_bits / quantize_mixed: mixed precision under a size budget."""
import itertools

import pytest
import torch
from torch import nn

import torchquant
from torchquant.nn import QuantizedLinear
from torchquant.ptq import allocate_bits, layer_sensitivity, quantize_mixed


class Block(nn.Module):
    def __init__(self, width=128):
        super().__init__()
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([Block() for _ in range(2)])
        with torch.no_grad():  # one layer much more sensitive than the others
            self.layers[0].down.weight.mul_(8)

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return x


def batches():
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(16, 128, generator=gen) for _ in range(2)]


def loss_fn(model, batch):
    with torch.no_grad():
        return Net.target(batch).sub(model(batch)).pow(2).mean()


Net.target = Net()


def test_measured_and_proxy_rank_the_sensitive_layer_first():
    model = Net()
    before = {n: p.clone() for n, p in model.state_dict().items()}
    measured = layer_sensitivity(model, batches(), loss_fn, bits=(2, 4, 8))
    proxy = layer_sensitivity(model, batches(), bits=(2, 4, 8), proxy="hessian")
    assert all(torch.equal(before[n], p) for n, p in model.state_dict().items())  # model unchanged
    for table in (measured, proxy):
        assert set(table) == {"layers.0.up", "layers.0.down", "layers.1.up", "layers.1.down"}
        assert max(table, key=lambda n: table[n][2]) == "layers.0.down"
        for row in table.values():
            assert row[2] > row[4] > row[8] >= 0


def test_allocation_is_exact_against_brute_force():
    model = Net()
    sens = layer_sensitivity(model, batches(), bits=(2, 3, 4, 8), proxy="hessian")
    for average in (3.0, 3.6, 4.5, 6.0):
        plan = allocate_bits(sens, model, average_bits=average)
        assert plan.average_bits <= average
        names = list(sens)
        sizes = {n: model.get_submodule(n).weight.numel() for n in names}
        total = sum(sizes.values())
        best = min((sum(sens[n][b] for n, b in zip(names, combo)), combo)
                   for combo in itertools.product((2, 3, 4, 8), repeat=len(names))
                   if sum(sizes[n] * b + sizes[n] // 128 * 32 for n, b in zip(names, combo)) <= average * total)
        assert plan.cost == pytest.approx(best[0], rel=1e-12)


def test_budget_below_the_smallest_model_and_other_errors():
    model = Net()
    sens = layer_sensitivity(model, batches(), bits=(2, 4), proxy="hessian")
    with pytest.raises(ValueError, match="below the smallest possible model"):
        allocate_bits(sens, model, average_bits=1.5)
    with pytest.raises(ValueError, match="exactly one budget"):
        allocate_bits(sens, model)
    with pytest.raises(ValueError, match="bits must be"):
        layer_sensitivity(model, batches(), bits=(5,), proxy="hessian")
    with pytest.raises(ValueError, match="no nn.Linear"):
        layer_sensitivity(nn.Sequential(nn.ReLU()), batches(), proxy="hessian")
    with pytest.raises(ValueError, match="loss_fn"):
        layer_sensitivity(model, batches())


def test_quantize_mixed_applies_the_plan_with_any_method():
    model = Net()
    plan = {"layers.0.up": 4, "layers.0.down": 8, "layers.1.up": 2, "layers.1.down": 4}

    def run_gptq(spec, exclude):
        report = torchquant.ptq.gptq(model, batches(), spec, exclude=exclude, blocks="layers", progress=False)
        torchquant.ptq.to_quantized_modules(model, report)  # packed layers of this width
        return report

    reports = quantize_mixed(model, plan, run_gptq)
    assert [r.results[next(iter(r.results))].bits for r in reports] == [8, 4, 2]
    for name, bits in plan.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, QuantizedLinear) and layer.bits == bits, name
