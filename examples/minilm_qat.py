"""The QAT row of the real-model table: W4 g128 weights trained briefly, then converted.

Every Linear of all-MiniLM-L6-v2's encoder blocks becomes a QAT layer
(``torchquant.prepare_qat``) with 4-bit asymmetric weights in groups of 128
input columns and learnable LSQ+ grids initialised from min/max; activations
stay float (weight-only, as the post-training W4 rows). The model is then
distilled towards the fp32 model for a few steps on the calibration
sentences (loss: 1 - cosine between the two models' sentence embeddings), and
``torchquant.convert`` turns it into the same packed run-time layers the
post-training methods produce.

    python examples/minilm_qat.py      # this row alone, against fp32 and RTN
"""
from __future__ import annotations

import sys
from typing import Callable, Dict, List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import torchquant
from torchquant import LayerQuant, QuantConfig, QuantSpec

from minilm import cosine_table, demo_inputs, markdown_table, mean_pool

EPOCHS = 2
LEARNING_RATE = 2e-5

Method = Callable[[nn.Module], None]


def w4_qat_config(group_size: int = 128) -> QuantConfig:
    """Weight-only 4-bit asymmetric groups with learnable grids on every Linear but the pooler's."""
    spec = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=group_size, learnable=True)
    return QuantConfig(by_type={nn.Linear: LayerQuant(weight=spec)}, exclude=["pooler*"])


def _embeddings(model: nn.Module, batch: Dict[str, Tensor]) -> Tensor:
    hidden = model(**batch).last_hidden_state
    return F.normalize(mean_pool(hidden, batch["attention_mask"]), dim=1)


def distill(qat_model: nn.Module, teacher: nn.Module, batches: Sequence[Dict[str, Tensor]],
            epochs: int = EPOCHS, lr: float = LEARNING_RATE) -> List[float]:
    """Train ``qat_model`` to reproduce ``teacher``'s embeddings; returns the loss of every step."""
    with torch.no_grad():
        targets = [_embeddings(teacher, b) for b in batches]
    params = [p for p in qat_model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    qat_model.train()
    losses = []
    for _ in range(epochs):
        for batch, target in zip(batches, targets):
            loss = (1 - (_embeddings(qat_model, batch) * target).sum(dim=1)).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return losses


def qat_w4(batches: Sequence[Dict[str, Tensor]], keep: dict = None) -> Method:
    """prepare_qat, a short distillation from the fp32 model, convert; the model then holds packed layers.

    ``keep``: a dict that receives the step ``losses``.
    """
    def apply(model: nn.Module) -> None:
        teacher = model
        qat_model = torchquant.prepare_qat(model, w4_qat_config()).requires_grad_(True)
        # Only the weights and their grids train; the teacher's copy (``model``) stays frozen.
        for name, p in qat_model.named_parameters():
            p.requires_grad_("encoder.layer" in name)
        with torch.enable_grad():
            losses = distill(qat_model, teacher.eval(), batches)
        converted = torchquant.convert(qat_model.eval())
        # The table's contract: quantize ``model`` itself, so its children become the converted ones.
        for name, child in list(converted.named_children()):
            setattr(model, name, child)
        model.eval().requires_grad_(False)
        if keep is not None:
            keep["losses"] = losses
    return apply


def main() -> int:
    model, tokenizer, _, heldout, batches = demo_inputs(__doc__.split("\n")[0])
    keep = {}
    rows = cosine_table({"QAT W4 g128": qat_w4(batches, keep)}, model, tokenizer, heldout)
    print(markdown_table(rows))
    losses = keep["losses"]
    print(f"\ndistillation loss (1 - cos): first step {losses[0]:.4f}, last step {losses[-1]:.4f}, "
          f"{len(losses)} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
