"""Small float models and helpers shared by the QAT workflow tests."""
from __future__ import annotations

from typing import Callable, Iterable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchquant import QuantSpec
from torchquant.nn import FakeQuantize
from torchquant.qat import W4A8, W4A16, W8, W8A8, LayerQuant, QuantConfig

VOCAB = 40
HIDDEN = 32
SEQ = 6


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.o_proj = nn.Linear(hidden, hidden)

    def forward(self, h: Tensor) -> Tensor:
        b, t, d = h.shape

        def split(x: Tensor) -> Tensor:
            return x.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.q_proj(h)), split(self.k_proj(h)), split(self.v_proj(h))
        attn = torch.softmax(q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5, dim=-1)
        return self.o_proj((attn @ v).transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.up_proj = nn.Linear(hidden, 2 * hidden)
        self.down_proj = nn.Linear(2 * hidden, hidden)

    def forward(self, h: Tensor) -> Tensor:
        return self.down_proj(F.gelu(self.up_proj(h)))


class Block(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(hidden)
        self.self_attn = Attention(hidden)
        self.post_attention_layernorm = nn.LayerNorm(hidden)
        self.mlp = MLP(hidden)

    def forward(self, h: Tensor) -> Tensor:
        h = h + self.self_attn(self.input_layernorm(h))
        return h + self.mlp(self.post_attention_layernorm(h))


class TinyTransformer(nn.Module):
    """A decoder written like the Hugging Face ones: embeddings, blocks of
    attention (q/k/v/o projections) and MLP, LayerNorms, an LM head."""

    def __init__(self, vocab: int = VOCAB, hidden: int = HIDDEN, layers: int = 2) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(Block(hidden) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)

    def forward(self, idx: Tensor) -> Tensor:
        h = self.embed_tokens(idx)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(self.norm(h))


class ConvNet(nn.Module):
    """Conv1d and Conv2d in a Sequential inside a ModuleDict inside a custom module."""

    def __init__(self) -> None:
        super().__init__()
        self.stages = nn.ModuleDict({
            "image": nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2)),
            "signal": nn.Sequential(nn.Conv1d(4, 16, 4, padding=2), nn.Tanh()),
        })
        self.head = nn.Linear(32, 5)

    def forward(self, x: tuple) -> Tensor:
        image, signal = x
        a = self.stages["image"](image).mean(dim=(2, 3))
        b = self.stages["signal"](signal).mean(dim=2)
        return self.head(torch.cat([a, b], dim=1))


def conv_bn_net() -> nn.Module:
    """Conv2d → BatchNorm2d → ReLU, the pattern ``fold_bn`` folds, with a small head."""
    return nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def seeded(fn: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return fn()


def transformer_input(batch: int = 3, seed: int = 0) -> Tensor:
    return torch.randint(0, VOCAB, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def convnet_input(batch: int = 3, seed: int = 0, scale: float = 1.0) -> tuple:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 8, 9, 9, generator=g) * scale, torch.randn(batch, 4, 12, generator=g) * scale


def image_input(batch: int = 4, seed: int = 0, scale: float = 1.0) -> Tensor:
    return torch.randn(batch, 8, 6, 6, generator=torch.Generator().manual_seed(seed)) * scale


def two_bit_config() -> QuantConfig:
    """2-bit per-channel weights, 8-bit activations."""
    act = QuantSpec(bits=8, symmetric=False, observer="moving_average_minmax", learnable=True)
    return QuantConfig(default=LayerQuant(QuantSpec(bits=2, granularity="channel", learnable=True), act))


# name -> config; group sizes divide every layer of the test models.
CONFIGS = {
    "W8A8": lambda: W8A8(),
    "W4A8": lambda: W4A8(group_size=8),
    "W4A16": lambda: W4A16(group_size=8),
    "W8": lambda: W8(),
    "W2A8": two_bit_config,
    "W8A8-fixed": lambda: W8A8(learnable=False),
}


def fake_quantizers(model: nn.Module) -> Iterable[FakeQuantize]:
    return (m for m in model.modules() if isinstance(m, FakeQuantize))


def train_steps(model: nn.Module, inputs: Iterable, lr: float = 1e-2) -> list:
    """A few SGD steps on the mean square of the output (moves weights and grids); the losses."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    model.train()
    losses = []
    for x in inputs:
        opt.zero_grad()
        loss = model(x).float().square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.fixture(autouse=True, scope="module")
def single_threaded():
    """The test models are tiny: a thread pool only adds synchronisation, which
    costs far more than the work on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
