"""torchquant.qlora: LoRA adapters over a frozen NF4 base, merging, and PEFT's adapter files."""
import json

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import torchquant
from torchquant import qlora
from torchquant.nn import QuantizedLinear


class Block(nn.Module):
    def __init__(self, width=64):
        super().__init__()
        self.query = nn.Linear(width, width)
        self.value = nn.Linear(width, width)
        self.dense = nn.Linear(width, width)

    def forward(self, x):
        return x + self.dense(torch.tanh(self.query(x)) * self.value(x))


class Net(nn.Module):
    def __init__(self, width=64, classes=5, use_checkpoint=False):
        super().__init__()
        self.blocks = nn.ModuleList([Block(width) for _ in range(2)])
        self.head = nn.Linear(width, classes)
        self.use_checkpoint = use_checkpoint

    def forward(self, x):
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False) if self.use_checkpoint else block(x)
        return self.head(x)


def net(**kwargs):
    torch.manual_seed(0)
    return Net(**kwargs)


def randomise_adapters(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in qlora.lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.1)


def test_prepare_starts_at_the_base_and_trains_only_adapters():
    model = net()
    x = torch.randn(6, 64)
    base_out = model(x)
    qlora.prepare(model, rank=4, alpha=8, dropout=0.0, target_modules=["query", "value"], quant_type=None,
                  modules_to_save=["head"])
    assert torch.equal(model(x), base_out)  # B = 0
    layers = qlora.lora_layers(model)
    assert sorted(layers) == ["blocks.0.query", "blocks.0.value", "blocks.1.query", "blocks.1.value"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_" in n or n.startswith("head.") for n in trainable)
    assert qlora.trainable_parameters(model) == 4 * (4 * 64 * 2) + 64 * 5 + 5


@pytest.mark.parametrize("double_quant", [False, True])
def test_qlora_base_is_nf4_and_gradients_reach_the_adapters(double_quant):
    model = net()
    qlora.prepare(model, rank=4, target_modules=r".*\.(query|value|dense)", double_quant=double_quant)
    layer = model.blocks[0].query
    assert isinstance(layer.base, QuantizedLinear) and layer.base.code_table is not None
    assert (layer.base.group_scales is None) == double_quant
    randomise_adapters(model)
    x = torch.randn(8, 64)
    loss = model(x).square().mean()
    loss.backward()
    for name, p in model.named_parameters():
        if "lora_" in name:
            assert p.grad is not None and bool(p.grad.abs().sum() > 0), name
        else:
            assert p.grad is None, name


def test_input_gradient_through_the_base_matches_the_dequantized_reference():
    model = net()
    qlora.prepare(model, rank=4, target_modules=["query", "value", "dense"], dropout=0.0)
    randomise_adapters(model)
    x = torch.randn(5, 64, requires_grad=True)
    model(x).sum().backward()
    # Reference: every LoRA layer as a float Linear holding its dequantized base, plus the same adapters.
    reference = net()
    for name, layer in qlora.lora_layers(model).items():
        block, _, leaf = name.rpartition(".")
        linear = reference.get_submodule(name)
        with torch.no_grad():
            linear.weight.copy_(layer.merged_weight())
    x2 = x.detach().clone().requires_grad_()
    reference(x2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-4, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    plain, ckpt = net(), net(use_checkpoint=True)
    for m in (plain, ckpt):
        qlora.prepare(m, rank=4, target_modules=["query", "value"], dropout=0.0)
    randomise_adapters(plain)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(4, 64)
    plain(x).sum().backward()
    ckpt(x).sum().backward()
    for (n, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-6, msg=n)


def test_training_under_torch_compile():
    model = net()
    qlora.prepare(model, rank=4, target_modules=["query", "value"], dropout=0.0)
    randomise_adapters(model)
    eager = net()
    qlora.prepare(eager, rank=4, target_modules=["query", "value"], dropout=0.0)
    eager.load_state_dict(model.state_dict())
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    for rows in (3, 5):
        x = torch.randn(rows, 64)
        compiled(x).sum().backward()
        eager(x).sum().backward()
    a = model.blocks[0].query.lora_A.weight.grad
    b = eager.blocks[0].query.lora_A.weight.grad
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_bf16_adapters():
    model = net()
    qlora.prepare(model, rank=4, target_modules=["query"], compute_dtype=torch.bfloat16)
    assert model.blocks[0].query.lora_A.weight.dtype == torch.bfloat16
    randomise_adapters(model)
    model(torch.randn(3, 64)).sum().backward()
    assert model.blocks[0].query.lora_B.weight.grad.dtype == torch.bfloat16


def test_merge_to_float_and_requantize():
    model = net()
    qlora.prepare(model, rank=4, target_modules=["query", "value"], dropout=0.0)
    randomise_adapters(model)
    x = torch.randn(6, 64)
    with torch.no_grad():
        want = model(x)
    qlora.merge(model)
    assert type(model.blocks[0].query) is nn.Linear
    torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    qlora.merge  # a second merge has nothing to merge
    with pytest.raises(ValueError, match="no LoRA layers"):
        qlora.merge(model)
    requantized = net()
    qlora.prepare(requantized, rank=4, target_modules=["query", "value"], dropout=0.0)
    randomise_adapters(requantized)
    qlora.merge(requantized, requantize=lambda m: torchquant.ptq.nf4(m, blocks="blocks"))
    assert isinstance(requantized.blocks[0].query, QuantizedLinear)
    assert torch.nn.functional.cosine_similarity(requantized(x), want, dim=-1).min() > 0.98


def test_adapters_save_and_load_round_trip(tmp_path):
    model = net()
    qlora.prepare(model, rank=4, alpha=8, target_modules=["query", "value"], dropout=0.0)
    randomise_adapters(model)
    qlora.save_adapters(model, tmp_path)
    config = json.loads((tmp_path / qlora.ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    fresh = net()
    qlora.prepare(fresh, rank=4, alpha=8, target_modules=["query", "value"], dropout=0.0)
    qlora.load_adapters(fresh, tmp_path)
    x = torch.randn(3, 64)
    assert torch.equal(fresh(x), model(x))


def test_peft_loads_the_adapters_onto_the_float_base(tmp_path):
    peft = pytest.importorskip("peft", reason="peft does not install on this machine")
    model = net()
    qlora.prepare(model, rank=4, alpha=8, target_modules=["query", "value"], dropout=0.0, quant_type=None)
    randomise_adapters(model)
    qlora.save_adapters(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(net(), str(tmp_path))
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), model(x), rtol=1e-6, atol=1e-6)


def test_peft_on_the_dequantized_base_matches_qlora(tmp_path):
    peft = pytest.importorskip("peft", reason="peft does not install on this machine")
    model = net()
    qlora.prepare(model, rank=4, alpha=8, target_modules=["query", "value"], dropout=0.0, double_quant=True)
    randomise_adapters(model)
    qlora.save_adapters(model, tmp_path)
    base = net()
    with torch.no_grad():
        for name, layer in qlora.lora_layers(model).items():
            base.get_submodule(name).weight.copy_(layer.base_weight())
    theirs = peft.PeftModel.from_pretrained(base, str(tmp_path))
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kwargs,match", [
    ({"rank": 0}, "rank must be"),
    ({"rank": 65}, "rank=65 is larger"),
    ({"target_modules": ["nothing"]}, "matches no nn.Linear"),
    ({"alpha": -1}, "alpha"),
    ({"dropout": 1.0}, "dropout"),
    ({"quant_type": "int4"}, "quant_type"),
    ({"block_size": 48}, "does not divide"),
    ({"modules_to_save": ["nope"]}, "no submodule"),
])
def test_prepare_errors_leave_the_model_alone(kwargs, match):
    model = net()
    settings = {"rank": 4, "target_modules": ["query"], **kwargs}
    with pytest.raises(ValueError, match=match):
        qlora.prepare(model, **settings)
    assert type(model.blocks[0].query) is nn.Linear
    assert all(p.requires_grad for p in model.parameters())


def test_nan_weights_are_refused():
    model = net()
    with torch.no_grad():
        model.blocks[1].value.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="blocks.1.value.*NaN"):
        qlora.prepare(model, rank=4, target_modules=["value"])


def test_load_adapters_errors(tmp_path):
    model = net()
    qlora.prepare(model, rank=4, alpha=8, target_modules=["query"], dropout=0.0)
    qlora.save_adapters(model, tmp_path / "a")
    other_rank = net()
    qlora.prepare(other_rank, rank=2, alpha=8, target_modules=["query"], dropout=0.0)
    with pytest.raises(ValueError, match="r=4"):
        qlora.load_adapters(other_rank, tmp_path / "a")
    other_layers = net()
    qlora.prepare(other_layers, rank=4, alpha=8, target_modules=["value"], dropout=0.0)
    with pytest.raises(ValueError, match="do not fit"):
        qlora.load_adapters(other_layers, tmp_path / "a")
    wider = Net(width=128)
    qlora.prepare(wider, rank=4, alpha=8, target_modules=["query"], dropout=0.0)
    with pytest.raises(ValueError, match="has shape"):
        qlora.load_adapters(wider, tmp_path / "a")
    with pytest.raises(FileNotFoundError):
        qlora.load_adapters(model, tmp_path / "missing")
    with pytest.raises(ValueError, match="no LoRA layers"):
        qlora.save_adapters(net(), tmp_path / "b")
