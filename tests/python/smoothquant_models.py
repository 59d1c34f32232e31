"""Tiny models for the input-scaling and SmoothQuant tests, named as the real architectures are.

* :class:`LlamaLikeBlock`: pre-LN, ``input_layernorm -> self_attn.{q,k,v}_proj``,
  ``o_proj``, ``post_attention_layernorm -> mlp.{gate,up}_proj``,
  ``down_proj``; RMSNorm or LayerNorm; grouped-query attention with
  ``kv_heads < heads``. ``residual_from_norm`` makes the norm's output feed
  the residual too (post-LN style), which the LLaMA fold rule does not
  allow: the invariance check must catch it.
* :class:`OPTLikeBlock`: ``self_attn_layer_norm``, ``self_attn.out_proj``,
  ``final_layer_norm -> fc1 -> activation_fn -> fc2``.
* :class:`UnknownBlock`: the same computation under names no rule knows.
* :class:`TinyLM`: embeddings, a ``layers`` ModuleList of blocks, a final
  norm and an LM head; padding and causality go into an additive mask.
* Hugging Face models with tiny configs (Bert, Llama, OPT) when
  ``transformers`` is installed.

:func:`with_outliers` gives a few channels of every norm a large weight, so
the inputs of the layers after them have outlier channels, as in LLMs;
:func:`loud_padding` gives the padding token an embedding unlike any real
token's, so statistics that let padding in are visibly wrong.
"""
from __future__ import annotations

import types
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ptq_models import SEQ, VOCAB, low_rank_embedding

HIDDEN = 32
HEADS = 4
PAD = 0  # the token id padded positions hold after loud_padding


def _norm(kind: str, hidden: int) -> nn.Module:
    return nn.RMSNorm(hidden) if kind == "rms" else nn.LayerNorm(hidden)


class Attention(nn.Module):
    """Causal attention with ``q_proj``, ``k_proj``, ``v_proj`` and an output projection named ``out_name``."""

    def __init__(self, hidden: int, heads: int, kv_heads: Optional[int] = None, out_name: str = "o_proj",
                 names=("q_proj", "k_proj", "v_proj")) -> None:
        super().__init__()
        kv_heads = kv_heads or heads
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, hidden // heads
        self.names = names
        self.out_name = out_name
        q, k, v = names
        self.add_module(q, nn.Linear(hidden, hidden))
        self.add_module(k, nn.Linear(hidden, kv_heads * self.head_dim))
        self.add_module(v, nn.Linear(hidden, kv_heads * self.head_dim))
        self.add_module(out_name, nn.Linear(hidden, hidden))

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        b, t, d = h.shape
        q, k, v = (getattr(self, n)(h) for n in self.names)

        def split(x: Tensor, n: int) -> Tensor:
            x = x.view(b, t, n, self.head_dim).transpose(1, 2)
            return x.repeat_interleave(self.heads // n, dim=1)

        q, k, v = split(q, self.heads), split(k, self.kv_heads), split(v, self.kv_heads)
        scores = q @ k.transpose(-1, -2) / self.head_dim ** 0.5 + mask
        out = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, t, d)
        return getattr(self, self.out_name)(out)


class GatedMLP(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, 2 * hidden, bias=False)
        self.up_proj = nn.Linear(hidden, 2 * hidden, bias=False)
        self.down_proj = nn.Linear(2 * hidden, hidden, bias=False)

    def forward(self, h: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class LlamaLikeBlock(nn.Module):
    def __init__(self, hidden: int = HIDDEN, heads: int = HEADS, kv_heads: Optional[int] = None, norm: str = "rms",
                 residual_from_norm: bool = False) -> None:
        super().__init__()
        self.input_layernorm = _norm(norm, hidden)
        self.self_attn = Attention(hidden, heads, kv_heads)
        self.post_attention_layernorm = _norm(norm, hidden)
        self.mlp = GatedMLP(hidden)
        self.residual_from_norm = residual_from_norm

    def forward(self, hidden_states: Tensor, attention_mask: Tensor) -> Tensor:
        normed = self.input_layernorm(hidden_states)
        residual = normed if self.residual_from_norm else hidden_states
        h = residual + self.self_attn(normed, attention_mask)
        return h + self.mlp(self.post_attention_layernorm(h))


class OPTLikeBlock(nn.Module):
    def __init__(self, hidden: int = HIDDEN, heads: int = HEADS, activation: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.self_attn_layer_norm = nn.LayerNorm(hidden)
        self.self_attn = Attention(hidden, heads, out_name="out_proj")
        self.final_layer_norm = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, 2 * hidden)
        self.fc2 = nn.Linear(2 * hidden, hidden)
        self.activation_fn = activation if activation is not None else nn.ReLU()

    def forward(self, hidden_states: Tensor, attention_mask: Tensor) -> Tensor:
        h = hidden_states + self.self_attn(self.self_attn_layer_norm(hidden_states), attention_mask)
        return h + self.fc2(self.activation_fn(self.fc1(self.final_layer_norm(h))))


class UnknownBlock(nn.Module):
    """A pre-LN block under names no rule knows: every layer gets an online scale."""

    def __init__(self, hidden: int = HIDDEN, heads: int = HEADS) -> None:
        super().__init__()
        self.ln_a = nn.LayerNorm(hidden)
        self.attn = Attention(hidden, heads, out_name="wo", names=("wq", "wk", "wv"))
        self.ln_b = nn.LayerNorm(hidden)
        self.w_in = nn.Linear(hidden, 2 * hidden)
        self.w_out = nn.Linear(2 * hidden, hidden)

    def forward(self, hidden_states: Tensor, attention_mask: Tensor) -> Tensor:
        h = hidden_states + self.attn(self.ln_a(hidden_states), attention_mask)
        return h + self.w_out(F.gelu(self.w_in(self.ln_b(h))))


class TinyLM(nn.Module):
    """``forward(input_ids, attention_mask=None)`` -> logits; blocks are called ``block(h, attention_mask=m)``."""

    def __init__(self, make_block: Callable[[], nn.Module], layers: int = 2, hidden: int = HIDDEN,
                 config: Optional[dict] = None) -> None:
        super().__init__()
        self.embed_tokens = low_rank_embedding(VOCAB, hidden, noise=0.3)
        self.layers = nn.ModuleList(make_block() for _ in range(layers))
        self.norm = nn.LayerNorm(hidden)
        self.lm_head = nn.Linear(hidden, VOCAB, bias=False)
        if config is not None:
            self.config = types.SimpleNamespace(**config)

    def forward(self, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        b, t = input_ids.shape
        keep = torch.ones(t, t, dtype=torch.bool).tril()[None, None].expand(b, 1, t, t)
        if attention_mask is not None:
            keep = keep & attention_mask.bool()[:, None, None, :]
        mask = torch.zeros(b, 1, t, t, dtype=self.embed_tokens.weight.dtype).masked_fill(~keep, -1e4)
        h = self.embed_tokens(input_ids)
        for layer in self.layers:
            h = layer(h, attention_mask=mask)
        return self.lm_head(self.norm(h))


def llama_like(**block_kwargs) -> TinyLM:
    return TinyLM(lambda: LlamaLikeBlock(**block_kwargs))


def opt_like(activation: Optional[nn.Module] = None, **config) -> TinyLM:
    return TinyLM(lambda: OPTLikeBlock(activation=activation), config=config or None)


def unknown_arch() -> TinyLM:
    return TinyLM(UnknownBlock)


@torch.no_grad()
def with_outliers(model: nn.Module, channels=(3, 17), factor: float = 40.0) -> nn.Module:
    """Multiplies ``channels`` of every norm weight in the blocks by ``factor`` (LLM-style outlier channels)."""
    for block in model.layers:
        for m in block.modules():
            if isinstance(m, (nn.LayerNorm, nn.RMSNorm)) and m.weight is not None:
                m.weight[list(channels)] *= factor
    return model


@torch.no_grad()
def loud_padding(model: nn.Module, channel: int = 8) -> nn.Module:
    """The PAD token's embedding is one spike in ``channel``, which survives normalisation: statistics that
    count padding positions would show a larger maximum there."""
    model.embed_tokens.weight[PAD] = 0.0
    model.embed_tokens.weight[PAD, channel] = 10.0
    return model


def pad_batches(batches: List[Dict[str, Tensor]]) -> List[Dict[str, Tensor]]:
    """The batches with every padded position holding the PAD token (and no real token being PAD)."""
    out = []
    for b in batches:
        ids = b["input_ids"].clone()
        ids[ids == PAD] = 1
        ids[b["attention_mask"] == 0] = PAD
        out.append({"input_ids": ids, "attention_mask": b["attention_mask"]})
    return out


# ---------------------------------------------------------------- Hugging Face models (tiny configs)

def hf_bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS,
                        intermediate_size=2 * HIDDEN, max_position_embeddings=2 * SEQ)
    return BertModel(config, add_pooling_layer=True).eval()


def hf_llama(kv_heads: int = HEADS) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=2 * HIDDEN, num_hidden_layers=2,
                         num_attention_heads=HEADS, num_key_value_heads=kv_heads, max_position_embeddings=2 * SEQ,
                         use_cache=False)
    return LlamaForCausalLM(config).eval()


def hf_opt() -> nn.Module:
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, ffn_dim=2 * HIDDEN,
                       num_attention_heads=HEADS, max_position_embeddings=2 * SEQ, word_embed_proj_dim=HIDDEN,
                       use_cache=False, pad_token_id=PAD)
    return OPTForCausalLM(config).eval()


def output(model: nn.Module, batch) -> Tensor:
    """The model's main output (logits or last hidden state) for a dict batch."""
    out = model(**batch) if isinstance(batch, dict) else model(batch)
    if isinstance(out, Tensor):
        return out
    return out.logits if hasattr(out, "logits") and out.logits is not None else out.last_hidden_state
