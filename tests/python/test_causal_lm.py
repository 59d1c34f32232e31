"""torchquant.lm on tiny randomly initialised Llama, Qwen2, Mistral, GPT-2 and OPT models (built from configs, no
downloads)."""
import copy

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

import torchquant  # noqa: E402
from torchquant import QuantSpec, lm  # noqa: E402
from torchquant.lm import models  # noqa: E402
from torchquant.nn import QuantizedLinear  # noqa: E402

VOCAB = 96
POSITIONS = 48
FAMILIES = ("llama", "qwen2", "mistral", "gpt2", "opt")
SPEC = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=32)


def build(family: str, seed: int = 0):
    """A 2-layer, hidden-64 model of ``family``, seeded, in eval mode."""
    torch.manual_seed(seed)
    if family in ("llama", "qwen2", "mistral"):
        config_class, model_class = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                                     "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
                                     "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM)}[family]
        config = config_class(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=POSITIONS,
                              bos_token_id=1, eos_token_id=2)
        model = model_class(config)
    elif family == "gpt2":
        config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=POSITIONS,
                                         bos_token_id=2, eos_token_id=2)
        model = transformers.GPT2LMHeadModel(config)
    elif family == "opt":
        config = transformers.OPTConfig(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=POSITIONS,
                                        word_embed_proj_dim=64, bos_token_id=2, eos_token_id=2, pad_token_id=1)
        model = transformers.OPTForCausalLM(config)
    else:
        raise ValueError(family)
    # Larger weights than the default init (std 0.02) so that the logits are not all alike and
    # quantization changes some greedy choices.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.15)
    return model.eval()


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    return request.param, build(request.param)


def text(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(seed))


def hf_guide_perplexity(model, ids: torch.Tensor, max_length: int, stride: int) -> float:
    """Hugging Face's perplexity guide, written out: labels -100 outside each window's new tokens, the model's
    own shifted loss, weighted by the number of labels it actually scored."""
    ids = ids[None]
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, ids.shape[1], stride):
        end = min(begin + max_length, ids.shape[1])
        trg_len = end - prev_end
        window = ids[:, begin:end]
        labels = window.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(window, labels=labels).loss
        scored = int((labels[:, 1:] != -100).sum())
        nll_sum += float(loss) * scored
        n_tokens += scored
        prev_end = end
        if end == ids.shape[1]:
            break
    return float(torch.exp(torch.tensor(nll_sum / n_tokens, dtype=torch.float64)))


# ---------------------------------------------------------------------------- structure

def test_decoder_blocks_path_and_conv1d():
    for family in ("llama", "qwen2", "mistral"):
        assert lm.decoder_blocks_path(build(family)) == "model.layers"
    assert lm.decoder_blocks_path(build("opt")) == "model.decoder.layers"
    gpt2 = build("gpt2")
    assert lm.decoder_blocks_path(gpt2) == "transformer.h"
    # GPT-2's projections are Conv1D: the passes see no Linear in its blocks until they are converted.
    assert torchquant.ptq.find_blocks(gpt2) is None
    ids = text(20)[None]
    before = gpt2(ids).logits
    replaced = lm.conv1d_to_linear(gpt2)
    assert len(replaced) == 8 and "transformer.h.0.attn.c_attn" in replaced
    assert isinstance(gpt2.transformer.h[0].mlp.c_fc, torch.nn.Linear)
    torch.testing.assert_close(gpt2(ids).logits, before, rtol=1e-5, atol=1e-5)
    assert torchquant.ptq.find_blocks(gpt2)[0] == "transformer.h"
    assert lm.conv1d_to_linear(gpt2) == []
    assert lm.position_limit(gpt2) == POSITIONS


def test_load_causal_lm(tmp_path):
    gpt2 = build("gpt2")
    ids = text(12)[None]
    expected = gpt2(ids).logits
    gpt2.save_pretrained(tmp_path)
    model = lm.load_causal_lm(tmp_path)
    assert not model.training and isinstance(model.transformer.h[0].attn.c_attn, torch.nn.Linear)
    torch.testing.assert_close(model(ids).logits, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="holds no config.json"):
        lm.load_causal_lm(tmp_path / "missing")


# ---------------------------------------------------------------------------- perplexity

def test_perplexity_one_window_is_exp_mean_nll(family_model):
    _, model = family_model
    ids = text(40)
    with torch.no_grad():
        logits = model(ids[None]).logits[0]
    direct = torch.exp(F.cross_entropy(logits[:-1].double(), ids[1:])).item()
    assert lm.perplexity(model, ids, max_length=40) == pytest.approx(direct, rel=1e-5)
    # Default window: the position limit, which holds the whole text.
    assert lm.perplexity(model, ids[None]) == pytest.approx(direct, rel=1e-5)


@pytest.mark.parametrize("max_length,stride,batch_size", [(16, 5, 1), (16, 16, 2), (12, 1, 4), (16, 8, 3)])
def test_perplexity_sliding_window_matches_reference(family_model, max_length, stride, batch_size):
    _, model = family_model
    ids = text(45, seed=2)
    expected = hf_guide_perplexity(model, ids, max_length, stride)
    got = lm.perplexity(model, ids, max_length=max_length, stride=stride, batch_size=batch_size)
    assert got == pytest.approx(expected, rel=1e-5)


def test_perplexity_longer_than_the_position_limit_slides():
    model = build("gpt2")  # learned positions: one window may not exceed them
    ids = text(3 * POSITIONS)
    expected = hf_guide_perplexity(model, ids, POSITIONS, POSITIONS // 2)
    assert lm.perplexity(model, ids) == pytest.approx(expected, rel=1e-5)


def test_perplexity_keeps_the_training_mode():
    model = build("llama").train()
    lm.perplexity(model, text(10), max_length=8, stride=4)
    assert model.training and all(m.training for m in model.modules())


@pytest.mark.parametrize("kwargs,ids,error,match", [
    ({}, torch.zeros(0, dtype=torch.long), ValueError, "input_ids is empty"),
    ({}, torch.tensor([5]), ValueError, "at least 2 tokens"),
    ({}, torch.ones(4), TypeError, "integer token ids"),
    ({}, "hello", TypeError, "input_ids must be a tensor"),
    ({}, torch.ones(2, 4, dtype=torch.long), ValueError, "one sequence"),
    ({}, torch.tensor([3, VOCAB]), ValueError, f"token id {VOCAB}, outside the model's vocabulary"),
    ({}, torch.tensor([3, -1]), ValueError, "token id -1"),
    ({"max_length": 8, "stride": 9}, None, ValueError, "stride=9 must be at most max_length=8"),
    ({"max_length": POSITIONS + 1}, None, ValueError, f"longer than the model's position limit of {POSITIONS}"),
    ({"max_length": 1}, None, ValueError, "max_length must be an integer >= 2"),
    ({"max_length": 8, "stride": 0}, None, ValueError, "stride must be a positive integer"),
    ({"batch_size": 0}, None, ValueError, "batch_size must be a positive integer"),
])
def test_perplexity_errors(kwargs, ids, error, match):
    model = build("opt")
    with pytest.raises(error, match=match):
        lm.perplexity(model, text(20) if ids is None else ids, **kwargs)


def test_perplexity_needs_max_length_without_a_position_limit(monkeypatch):
    model = build("llama")
    # A family whose config names its position limit by none of the known attributes.
    monkeypatch.setattr(models, "POSITION_ATTRIBUTES", ())
    with pytest.raises(ValueError, match="pass max_length"):
        lm.perplexity(model, text(10))
    assert lm.perplexity(model, text(10), max_length=10) > 1
    with pytest.raises(TypeError, match="model must be a Hugging Face causal LM"):
        lm.perplexity(torch.nn.Linear(2, 2), text(10))


# ---------------------------------------------------------------------------- generation

PROMPTS = [text(6, seed=3), text(9, seed=4)]
NEW = 8


def greedy(model, prompt, n):
    out = model.generate(prompt[None], attention_mask=torch.ones(1, prompt.numel(), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, pad_token_id=model.config.eos_token_id)
    new = out[0, prompt.numel():].tolist()
    eos = model.config.eos_token_id
    return new[:new.index(eos) + 1] if eos in new else new


def test_generate_agreement_counts_positions():
    reference = build("llama")
    assert lm.generate_agreement(reference, copy.deepcopy(reference), PROMPTS, NEW) == 1.0
    other = build("llama", seed=5)
    expected_match = total = 0
    for p in PROMPTS:
        a, b = greedy(reference, p, NEW), greedy(other, p, NEW)
        expected_match += sum(x == y for x, y in zip(a, b))
        total += len(a)
    got = lm.generate_agreement(reference, other, PROMPTS, NEW)
    assert got == pytest.approx(expected_match / total)
    assert got < 1.0


def _rtn(model):
    torchquant.ptq.rtn(model, SPEC)


def _nf4(model):
    torchquant.ptq.nf4(model, block_size=32)


def _llm_int8(model):
    torchquant.ptq.llm_int8(model, threshold=6.0)


def _w8a8(model):
    batches = lm.calibration_batches(torch.randint(3, VOCAB, (4, 12)), batch_size=2)
    torchquant.ptq.quantize_w8a8(model, calibration_batches=batches, progress=False)


@pytest.mark.parametrize("convert", [_rtn, _nf4, _llm_int8, _w8a8], ids=["rtn", "nf4", "llm_int8", "w8a8"])
def test_generate_runs_on_converted_models(family_model, convert):
    family, reference = family_model
    model = copy.deepcopy(reference)
    lm.conv1d_to_linear(model)
    convert(model)
    path = lm.decoder_blocks_path(model)
    quantized = [m for m in model.get_submodule(path).modules() if isinstance(m, QuantizedLinear)]
    assert len(quantized) == (8 if family == "gpt2" else 12 if family == "opt" else 14)
    agreement = lm.generate_agreement(reference, model, PROMPTS, NEW)
    assert 0.0 <= agreement <= 1.0
    # The quantized layers are what runs: close to the float model, not equal to it.
    ppl, reference_ppl = (lm.perplexity(m, text(30), max_length=16, stride=8) for m in (model, reference))
    assert ppl != reference_ppl and abs(ppl / reference_ppl - 1) < 0.2


def test_gptq_then_generate():
    reference = build("llama")
    model = copy.deepcopy(reference)
    batches = lm.calibration_batches([text(16, seed=s) for s in range(4)], batch_size=2)
    report = torchquant.ptq.gptq(model, batches, SPEC, blocks=lm.decoder_blocks_path(model), progress=False)
    assert report.num_blocks == 2 and len(report.results) == 14
    torchquant.ptq.to_quantized_modules(model, report)
    assert isinstance(model.model.layers[1].mlp.down_proj, QuantizedLinear)
    assert 0.0 <= lm.generate_agreement(reference, model, PROMPTS, NEW) <= 1.0
    assert lm.decode_tokens_per_second(model, PROMPTS[0], 4, repeats=1) > 0


def test_generation_errors():
    model = build("gpt2")
    with pytest.raises(ValueError, match="longer than the model's position limit"):
        lm.generate_agreement(model, model, [text(POSITIONS - 4)], 5)
    with pytest.raises(ValueError, match="prompt_ids plus new_tokens is 50 tokens"):
        lm.decode_tokens_per_second(model, text(POSITIONS - 2), 4)
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        lm.generate_agreement(model, model, PROMPTS, 0)
    with pytest.raises(ValueError, match="prompts_ids is empty"):
        lm.generate_agreement(model, model, [], 4)
    with pytest.raises(ValueError, match=r"prompts_ids\[1\] holds token id"):
        lm.generate_agreement(model, model, [text(4), torch.tensor([VOCAB + 3])], 4)
    with pytest.raises(ValueError, match="do not share a tokenizer"):
        other = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB + 1, n_embd=32, n_layer=1,
                                                                     n_head=2, n_positions=POSITIONS))
        lm.generate_agreement(model, other, PROMPTS, 4)
    with pytest.raises(ValueError, match="new_tokens must be an integer >= 2"):
        lm.decode_tokens_per_second(model, PROMPTS[0], 1)


def test_calibration_batches():
    batches = lm.calibration_batches(torch.arange(30).view(5, 6) % VOCAB, batch_size=2)
    assert [b["input_ids"].shape[0] for b in batches] == [2, 2, 1]
    assert batches[0]["use_cache"] is False and bool(batches[0]["attention_mask"].all())
    with pytest.raises(ValueError, match="same length"):
        lm.calibration_batches([text(4), text(5)])
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        lm.calibration_batches(torch.zeros(2, 3, dtype=torch.long), batch_size=0)
