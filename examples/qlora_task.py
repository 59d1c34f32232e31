"""The fine-tuning task of ``qlora_demo.py``: which Python Language Reference topic a sentence comes from.

Data: the topics that ``help()`` shows, as the standard library ships them
(``pydoc_data.topics.topics``, a dict topic -> text), split into prose
sentences with :func:`minilm.split_sentences`. Some topics contain others
(e.g. "specialnames" holds "customization"), so a sentence found in two
topics has no single right answer and is dropped from all of them. The
``N_TOPICS`` topics with the most remaining sentences are the classes; each
topic's sentences are split 80/20 into train and test by a seeded shuffle,
so every class is held out in the same proportion.

Model: the MiniLM encoder (``minilm.load_minilm``), mean pooling over the
real tokens as the sentence-transformers pipeline does, and a new linear
head over the pooled 384-dim vector.
"""
from __future__ import annotations

import random
from typing import Dict, Iterator, List, NamedTuple, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minilm import load_minilm, mean_pool, split_sentences, tokenize

N_TOPICS = 12
MIN_WORDS = 5
TEST_FRACTION = 0.2
# Nearly every sentence fits in 64 tokens; the 256 of the embedding pipeline would only cost time.
MAX_SEQ_LENGTH = 64
# Batches per length bucket: sorting 8 batches' worth of sentences by length cuts the padding to a fraction,
# with little loss of randomness.
LENGTH_BUCKET = 8


class Dataset(NamedTuple):
    topics: List[str]                  # class names, index = label
    train: List[Tuple[str, int]]
    test: List[Tuple[str, int]]


def topic_dataset(n_topics: int = N_TOPICS, seed: int = 0) -> Dataset:
    """The labelled sentences of the ``n_topics`` largest reference topics, split train/test per topic."""
    from pydoc_data.topics import topics

    # Case-insensitive keys: the model is uncased, so "The x" and "the x" are the same input.
    per_topic: Dict[str, Dict[str, str]] = {
        name: {s.lower(): s for s in split_sentences(text, min_words=MIN_WORDS)} for name, text in topics.items()}
    owners: Dict[str, int] = {}
    for sentences in per_topic.values():
        for key in sentences:
            owners[key] = owners.get(key, 0) + 1
    unique = {name: sorted(s for key, s in sentences.items() if owners[key] == 1)
              for name, sentences in per_topic.items()}
    # Largest first; ties by name so that the choice never depends on dict order.
    chosen = sorted(unique, key=lambda name: (-len(unique[name]), name))[:n_topics]
    rng = random.Random(seed)
    train, test = [], []
    for label, name in enumerate(chosen):
        sentences = unique[name][:]
        rng.shuffle(sentences)
        n_test = max(1, round(TEST_FRACTION * len(sentences)))
        test += [(s, label) for s in sentences[:n_test]]
        train += [(s, label) for s in sentences[n_test:]]
    return Dataset(chosen, train, test)


class TopicClassifier(nn.Module):
    """MiniLM encoder -> mean pooling over real tokens -> linear head with one logit per topic."""

    def __init__(self, encoder: nn.Module, n_classes: int):
        super().__init__()
        self.bert = encoder
        # The [CLS] pooler is not part of the sentence-embedding pipeline (mean pooling is): drop it, so
        # that it is neither adapted nor counted.
        self.bert.pooler = None
        self.classifier = nn.Linear(encoder.config.hidden_size, n_classes)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor) -> Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask,
                           token_type_ids=token_type_ids).last_hidden_state
        return self.classifier(mean_pool(hidden, attention_mask))


def load_classifier(n_classes: int, seed: int = 0):
    """``(model, tokenizer)``: the pretrained fp32 encoder with a freshly initialised head (seeded), all
    parameters frozen; each setup decides what to train."""
    encoder, tokenizer = load_minilm()
    # from_pretrained maps the safetensors file into memory, and the pages a layer has read stay resident
    # (and in the RSS) as long as any tensor still views the mapping, even after that layer is quantized and
    # dropped. Private copies release the mapping, so that each setup's memory is what it really keeps.
    with torch.no_grad():
        for tensor in list(encoder.parameters()) + list(encoder.buffers()):
            tensor.data = tensor.data.clone()
    tokenizer.model_max_length = MAX_SEQ_LENGTH
    torch.manual_seed(seed)
    model = TopicClassifier(encoder, n_classes).requires_grad_(False)
    return model, tokenizer


def train_batches(tokenizer, train: Sequence[Tuple[str, int]], epochs: int, batch_size: int,
                  seed: int = 0) -> Iterator[Tuple[Dict[str, Tensor], Tensor]]:
    """``epochs`` seeded passes over ``train`` as ``(inputs, labels)`` batches, tokenized on the fly.

    Each pass shuffles the sentences, sorts each run of ``LENGTH_BUCKET`` batches' worth by token count and
    cuts it into batches, then shuffles the batches: a batch holds sentences of similar length, so little
    compute goes to padding (each batch is padded to its own longest), and batches still come in random
    order. Every step has ``batch_size`` sentences: the few beyond the last full batch sit out the pass
    (others in each pass, as the shuffle changes).
    """
    lengths = [len(ids) for ids in tokenizer([s for s, _ in train], truncation=True)["input_ids"]]
    rng = random.Random(seed)
    order = list(range(len(train)))
    kept = len(train) // batch_size * batch_size
    for _ in range(epochs):
        rng.shuffle(order)
        batches = []
        for start in range(0, kept, LENGTH_BUCKET * batch_size):
            bucket = sorted(order[start:min(kept, start + LENGTH_BUCKET * batch_size)], key=lambda i: lengths[i])
            batches += [bucket[i:i + batch_size] for i in range(0, len(bucket), batch_size)]
        rng.shuffle(batches)
        for batch in batches:
            yield (tokenize(tokenizer, [train[i][0] for i in batch]),
                   torch.tensor([train[i][1] for i in batch]))


def optimizer_for(model: nn.Module, lr: float, total_steps: int, warmup_steps: int):
    """AdamW over the trainable parameters, with a linear warm-up then a linear decay to zero."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def train_step(model: nn.Module, optimizer, scheduler, inputs: Dict[str, Tensor], labels: Tensor) -> float:
    """One optimizer step on one batch (the model must be in training mode); returns the loss."""
    loss = F.cross_entropy(model(**inputs), labels)
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()


@torch.inference_mode()
def accuracy(model: nn.Module, tokenizer, data: Sequence[Tuple[str, int]], batch_size: int = 64) -> float:
    """Fraction of ``data`` whose arg-max logit is its label (the model is put in eval mode)."""
    model.eval()
    correct = 0
    for start in range(0, len(data), batch_size):
        items = data[start:start + batch_size]
        logits = model(**tokenize(tokenizer, [s for s, _ in items]))
        correct += int((logits.argmax(dim=1) == torch.tensor([y for _, y in items])).sum())
    return correct / len(data)


def tensor_bytes(tensors) -> int:
    """Storage of ``tensors``, each counted once even if it appears twice (tied weights)."""
    seen, total = set(), 0
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def model_bytes(model: nn.Module) -> int:
    return tensor_bytes(list(model.parameters()) + list(model.buffers()))


def total_steps(n_train: int, batch_size: int, epochs: int) -> int:
    """Optimizer steps of :func:`train_batches` (short last batches dropped)."""
    return n_train // batch_size * epochs

