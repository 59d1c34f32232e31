"""Tiny models and calibration data for the post-training quantization tests.

* :class:`TinyDecoder`: a decoder written like the Hugging Face ones: token
  embeddings, a ``layers`` ModuleList of blocks (LayerNorm, attention with
  q/k/v/o projections, a gated MLP with gate/up/down), a final LayerNorm and
  an LM head. The model turns the padding mask into an additive causal mask
  and computes rotary-style position embeddings; both reach every block as
  keyword arguments, as in Llama.
* :func:`plain_mlp`: Linear layers in an ``nn.Sequential``, no block list.
* :class:`TinyMoE`: blocks whose MLP routes each token to one of four
  experts; the router never picks expert ``DEAD_EXPERT``.

Their embeddings are low rank plus a little noise, so the inputs of every
layer are strongly correlated, the situation GPTQ exists for.
"""
from __future__ import annotations

import copy
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchquant import QuantSpec, formats
from torchquant.observers import qparams_from_range

VOCAB = 48
HIDDEN = 32
HEADS = 2
SEQ = 8
EXPERTS = 4
DEAD_EXPERT = 2

DECODER_BLOCK_LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
DECODER_GROUPS = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
                  ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def low_rank_embedding(vocab: int, hidden: int, rank: int = 4, noise: float = 0.05) -> nn.Embedding:
    emb = nn.Embedding(vocab, hidden)
    with torch.no_grad():
        emb.weight.copy_(torch.randn(vocab, rank) @ torch.randn(rank, hidden) + noise * torch.randn(vocab, hidden))
    return emb


class Attention(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.o_proj = nn.Linear(hidden, hidden)

    def forward(self, h: Tensor, attention_mask: Tensor, position_embeddings: Tuple[Tensor, Tensor]) -> Tensor:
        b, t, d = h.shape
        cos, sin = position_embeddings

        def heads(x: Tensor) -> Tensor:
            return x.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        def rotate(x: Tensor) -> Tensor:
            return x * cos + x.roll(1, dims=-1) * sin

        q, k, v = rotate(heads(self.q_proj(h))), rotate(heads(self.k_proj(h))), heads(self.v_proj(h))
        scores = q @ k.transpose(-1, -2) / (d // self.heads) ** 0.5 + attention_mask
        return self.o_proj((torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, t, d))


class GatedMLP(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, 2 * hidden, bias=False)
        self.up_proj = nn.Linear(hidden, 2 * hidden, bias=False)
        self.down_proj = nn.Linear(2 * hidden, hidden, bias=False)

    def forward(self, h: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class DecoderBlock(nn.Module):
    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(hidden)
        self.self_attn = Attention(hidden, heads)
        self.post_attention_layernorm = nn.LayerNorm(hidden)
        self.mlp = GatedMLP(hidden)

    def forward(self, hidden_states: Tensor, attention_mask: Optional[Tensor] = None,
                position_embeddings: Optional[Tuple[Tensor, Tensor]] = None) -> Tuple[Tensor]:
        h = hidden_states + self.self_attn(self.input_layernorm(hidden_states), attention_mask, position_embeddings)
        return (h + self.mlp(self.post_attention_layernorm(h)),)


class TinyDecoder(nn.Module):
    """``forward(input_ids, attention_mask=None)`` → logits. ``hidden_as_kwarg``
    calls the blocks with ``hidden_states=`` instead of positionally."""

    def __init__(self, layers: int = 2, hidden: int = HIDDEN, heads: int = HEADS, vocab: int = VOCAB,
                 hidden_as_kwarg: bool = False) -> None:
        super().__init__()
        self.embed_tokens = low_rank_embedding(vocab, hidden)
        self.layers = nn.ModuleList(DecoderBlock(hidden, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self.head_dim = hidden // heads
        self.hidden_as_kwarg = hidden_as_kwarg

    def additive_mask(self, attention_mask: Optional[Tensor], b: int, t: int) -> Tensor:
        keep = torch.ones(t, t, dtype=torch.bool).tril()[None, None].expand(b, 1, t, t)
        if attention_mask is not None:
            keep = keep & attention_mask.bool()[:, None, None, :]
        return torch.zeros(b, 1, t, t, dtype=self.embed_tokens.weight.dtype).masked_fill(~keep, -1e4)

    def position_embeddings(self, t: int) -> Tuple[Tensor, Tensor]:
        angle = torch.arange(t, dtype=torch.float32)[:, None] / (10.0 ** (torch.arange(self.head_dim) / 8))
        dtype = self.embed_tokens.weight.dtype
        return angle.cos().to(dtype), angle.sin().to(dtype)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        b, t = input_ids.shape
        h = self.embed_tokens(input_ids)
        kwargs = {"attention_mask": self.additive_mask(attention_mask, b, t),
                  "position_embeddings": self.position_embeddings(t)}
        for layer in self.layers:
            h = layer(hidden_states=h, **kwargs)[0] if self.hidden_as_kwarg else layer(h, **kwargs)[0]
        return self.lm_head(self.norm(h))


def plain_mlp(features: int = 16, hidden: int = 32, out: int = 8) -> nn.Sequential:
    return nn.Sequential(nn.Linear(features, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                         nn.Linear(hidden, out))


class Expert(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(hidden, 2 * hidden)
        self.down = nn.Linear(2 * hidden, hidden)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x)))


class MoEBlock(nn.Module):
    """Top-1 routing. ``call_empty_experts``: call an expert even on zero tokens
    (some implementations do; others skip it, as by default here)."""

    def __init__(self, hidden: int, call_empty_experts: bool = False) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.router = nn.Linear(hidden, EXPERTS)
        with torch.no_grad():
            self.router.bias[DEAD_EXPERT] = -1e4  # no token is ever routed there
        self.experts = nn.ModuleList(Expert(hidden) for _ in range(EXPERTS))
        self.call_empty_experts = call_empty_experts

    def forward(self, hidden_states: Tensor) -> Tensor:
        x = self.norm(hidden_states).reshape(-1, hidden_states.shape[-1])
        choice = self.router(x).argmax(dim=-1)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            rows = (choice == e).nonzero().squeeze(1)
            if rows.numel() or self.call_empty_experts:
                out[rows] = expert(x[rows])
        return hidden_states + out.view_as(hidden_states)


class TinyMoE(nn.Module):
    def __init__(self, layers: int = 2, hidden: int = HIDDEN, call_empty_experts: bool = False) -> None:
        super().__init__()
        self.embed_tokens = low_rank_embedding(VOCAB, hidden)
        self.layers = nn.ModuleList(MoEBlock(hidden, call_empty_experts) for _ in range(layers))
        self.lm_head = nn.Linear(hidden, VOCAB, bias=False)

    def forward(self, input_ids: Tensor) -> Tensor:
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(h)


# ---------------------------------------------------------------- data

def token_batches(n: int = 3, batch: int = 2, seq: int = SEQ, seed: int = 0) -> List[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (batch, seq), generator=g) for _ in range(n)]


def padded_batches(n: int = 3, batch: int = 2, seq: int = SEQ, seed: int = 0) -> List[Dict[str, Tensor]]:
    """Dict batches whose second sequence is padded (mask 0) after its first half."""
    batches = []
    for ids in token_batches(n, batch, seq, seed):
        mask = torch.ones_like(ids)
        mask[1, seq // 2:] = 0
        batches.append({"input_ids": ids, "attention_mask": mask})
    return batches


def real_token_count(batches) -> int:
    """Positions whose attention_mask is 1, over dict batches (every position of other batches)."""
    return sum(int(b["attention_mask"].sum()) if isinstance(b, dict) and "attention_mask" in b
               else b.numel() if isinstance(b, Tensor) else b[0].numel() for b in batches)


def real_tokens(inputs: List[Tensor], batches) -> List[Tensor]:
    """Each call's input ``[B, T, ...]`` restricted to the rows of its batch's real tokens (one call per batch)."""
    assert len(inputs) == len(batches)
    return [x[b["attention_mask"] == 1] if isinstance(b, dict) and "attention_mask" in b else x
            for x, b in zip(inputs, batches)]


def unpadded_sentences(batches: List[Dict[str, Tensor]]) -> List[Tensor]:
    """Every sequence of right-padded dict batches alone, as a ``[1, length]`` batch of its real tokens."""
    sentences = []
    for batch in batches:
        for ids, mask in zip(batch["input_ids"], batch["attention_mask"]):
            n = int(mask.sum())
            assert bool((mask[:n] == 1).all()) and bool((mask[n:] == 0).all()), "right padding expected"
            sentences.append(ids[None, :n])
    return sentences


def correlated_features(n: int = 3, batch: int = 16, features: int = 16, seed: int = 0) -> List[Tensor]:
    """Inputs for :func:`plain_mlp`: rank-3 plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(3, features, generator=g)
    return [torch.randn(batch, 3, generator=g) @ mix + 0.05 * torch.randn(batch, features, generator=g)
            for _ in range(n)]


def seeded(make: Callable[[], nn.Module], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return make().eval()


# ---------------------------------------------------------------- references

@torch.no_grad()
def layer_inputs(model: nn.Module, names: List[str], batches) -> Dict[str, List[Tensor]]:
    """The input of each named layer on each call, running ``model`` normally on the batches."""
    seen: Dict[str, List[Tensor]] = {name: [] for name in names}
    handles = [model.get_submodule(name).register_forward_hook(
        lambda m, args, out, name=name: seen[name].append(args[0].detach().clone())) for name in names]
    try:
        for batch in batches:
            call(model, batch)
    finally:
        for h in handles:
            h.remove()
    return seen


def call(model: nn.Module, batch):
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def reference_hessian(inputs: List[Tensor]) -> Tensor:
    """``2/n X^T X`` over all rows of the inputs, in float64."""
    x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs]).double()
    return 2.0 * x.T @ x / x.shape[0]


@torch.no_grad()
def round_to_nearest(model: nn.Module, spec: QuantSpec, names: List[str]) -> nn.Module:
    """A copy of ``model`` whose named Linear weights are rounded to nearest on min/max grids."""
    model = copy.deepcopy(model)
    group = spec.group_size if spec.granularity == "group" else None
    for name in names:
        w = model.get_submodule(name).weight
        rows = w.reshape(w.shape[0], -1, group) if group else w.reshape(w.shape[0], 1, -1)
        scale, zero = qparams_from_range(rows.amin(-1), rows.amax(-1), spec)
        kwargs = {"group_size": group} if group else {"axis": 0}
        if not group:
            scale, zero = scale.squeeze(1), zero.squeeze(1)
        codes = formats.quantize(w, scale, zero, spec.quant_min, spec.quant_max, **kwargs)
        w.copy_(formats.dequantize(codes, scale, zero, dtype=w.dtype, **kwargs))
    return model
