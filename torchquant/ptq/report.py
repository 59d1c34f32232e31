"""What a post-training pass did, layer by layer, and the integer weights it produced.

Every pass (GPTQ, AWQ, SmoothQuant) returns a :class:`PTQReport`: one
:class:`LayerReport` per ``nn.Linear`` of the model, quantized or not, with
the reason when not, so a layer never drops out of the picture silently.
Passes that produce integer weights also keep, per quantized layer, a
:class:`LayerResult` (codes and grids) from which a checkpoint is written.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from torchquant.spec import QuantSpec

__all__ = [
    "LayerReport", "LayerResult", "PTQReport",
    "QUANTIZED", "RTN_FALLBACK", "NO_CALIBRATION_TOKENS", "EXCLUDED", "OUTSIDE_BLOCKS",
]

# Statuses. Those of quantized layers start with "quantized", of untouched ones with "skipped" or "excluded".
QUANTIZED = "quantized"
RTN_FALLBACK = "quantized: round-to-nearest fallback"
NO_CALIBRATION_TOKENS = "skipped: no calibration tokens"
EXCLUDED = "excluded"
OUTSIDE_BLOCKS = "skipped: outside the blocks"


@dataclass
class LayerReport:
    """One layer's outcome.

    Attributes:
        name: the layer's name in the model (``model.get_submodule(name)``).
        shape: its weight's shape, ``(out_features, in_features)``.
        status: one of the module's status strings (``QUANTIZED``, ...).
        samples: input rows (tokens) the layer saw during calibration; real
            tokens only when the batches carried a token mask (padding is
            not counted).
        loss: the pass's reconstruction loss of the layer, when it has one
            (GPTQ: mean over calibration rows of ``||(W - Ŵ) x||²``).
        seconds: time spent transforming the layer (not the forwards).
        details: pass-specific values, shown as extra table columns
            (GPTQ: ``damp``, the diagonal damping finally used).
    """

    name: str
    shape: Tuple[int, ...]
    status: str
    samples: int = 0
    loss: Optional[float] = None
    seconds: float = 0.0
    details: Dict[str, Any] = field(default_factory=dict)

    @property
    def quantized(self) -> bool:
        return self.status.startswith(QUANTIZED)


@dataclass
class LayerResult:
    """The integer form of one quantized ``[out, in]`` weight as a pass produced it, kept on CPU.

    (What a layer computes from is a :class:`torchquant.quantized_weight.QuantizedWeight`, packed for the
    kernels; :func:`torchquant.ptq.to_quantized_modules` and the layout converters build one from this.)

    ``dequantized = (codes - zero_points[:, g_idx]) * scales[:, g_idx]``,
    column by column. Codes are held unsigned (``code - quant_min``, the GPTQ
    checkpoint convention) in one byte each, so the results of a whole model
    take about a quarter of its float32 size (plus the grids);
    :attr:`codes` gives them back as int32 in ``[quant_min, quant_max]``.

    Attributes:
        unsigned_codes: uint8 ``[out, in]``, in the original column order.
        scales, zero_points: float32 ``[out, n_groups]``; zero-points are
            integers in the code domain (0 for symmetric grids).
        g_idx: int32 ``[in]``, the group of each input column (not monotone
            after act-order without static groups).
        spec: the weight's :class:`~torchquant.spec.QuantSpec`.
        act_order: columns were quantized by decreasing Hessian diagonal
            (a checkpoint's ``desc_act``).
        static_groups: group grids were fixed before reordering.
    """

    unsigned_codes: Tensor
    scales: Tensor
    zero_points: Tensor
    g_idx: Tensor
    spec: QuantSpec
    act_order: bool = False
    static_groups: bool = False

    @property
    def quant_min(self) -> int:
        return self.spec.quant_min

    @property
    def quant_max(self) -> int:
        return self.spec.quant_max

    @property
    def bits(self) -> int:
        return self.spec.bits

    @property
    def group_size(self) -> Optional[int]:
        return self.spec.group_size

    @property
    def codes(self) -> Tensor:
        """int32 codes in ``[quant_min, quant_max]`` (a new tensor)."""
        return self.unsigned_codes.to(torch.int32) + self.quant_min

    @property
    def unsigned_zero_points(self) -> Tensor:
        """``zero_points - quant_min``: the zeros a GPTQ checkpoint stores (8 for symmetric 4-bit)."""
        return self.zero_points - self.quant_min

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        idx = self.g_idx.long()
        return ((self.codes.float() - self.zero_points[:, idx]) * self.scales[:, idx]).to(dtype)

    @classmethod
    def from_codes(cls, codes: Tensor, scales: Tensor, zero_points: Tensor, g_idx: Tensor, spec: QuantSpec,
                   act_order: bool = False, static_groups: bool = False) -> "LayerResult":
        """From int32 codes in the op convention; everything is copied to CPU."""
        if spec.bits > 8:
            raise ValueError(f"LayerResult holds codes of up to 8 bits, got spec.bits={spec.bits}")
        unsigned = (codes.detach().to("cpu", torch.int32) - spec.quant_min).to(torch.uint8)
        return cls(unsigned, scales.detach().to("cpu", torch.float32), zero_points.detach().to("cpu", torch.float32),
                   g_idx.detach().to("cpu", torch.int32), spec, act_order, static_groups)


@dataclass
class PTQReport:
    """Per-layer outcome of a post-training pass over a model.

    Attributes:
        method: the pass (``"GPTQ"``, ...).
        layers: one entry per ``nn.Linear`` of the model, in module order.
        blocks: the attribute path of the block list the pass walked, or
            ``None`` when the whole model was calibrated as one block.
        num_blocks: how many blocks were walked.
        seconds: wall time of the whole pass.
        results: integer weights of the quantized layers, by layer name
            (empty for passes that only rescale float weights).
    """

    method: str
    layers: List[LayerReport]
    blocks: Optional[str] = None
    num_blocks: int = 1
    seconds: float = 0.0
    results: Dict[str, LayerResult] = field(default_factory=dict)

    def __getitem__(self, name: str) -> LayerReport:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise KeyError(f"{self.method} report: no layer named {name!r}")

    def __iter__(self) -> Iterator[LayerReport]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def quantized(self) -> List[LayerReport]:
        return [layer for layer in self.layers if layer.quantized]

    @property
    def skipped(self) -> List[LayerReport]:
        return [layer for layer in self.layers if not layer.quantized]

    def _where(self) -> str:
        return f"{self.num_blocks} blocks of {self.blocks!r}" if self.blocks is not None else "the whole model"

    def _skipped_counts(self) -> str:
        """``"; 2 excluded, 1 skipped: ..."`` for the layers left alone, by status (empty when none were)."""
        counts: Dict[str, int] = {}
        for layer in self.skipped:
            counts[layer.status] = counts.get(layer.status, 0) + 1
        return "; " + ", ".join(f"{n} {status}" for status, n in counts.items()) if counts else ""

    def summary(self) -> str:
        return (f"{self.method}: {len(self.quantized)} of {len(self.layers)} Linear layers quantized over "
                f"{self._where()} in {self.seconds:.1f} s" + self._skipped_counts())

    def to_rows(self) -> List[Dict[str, Any]]:
        """One dict per layer: name, shape, status, samples, loss, seconds, then the pass's details."""
        return [{"name": r.name, "shape": r.shape, "status": r.status, "samples": r.samples, "loss": r.loss,
                 "seconds": r.seconds, **r.details} for r in self.layers]

    def as_table(self) -> str:
        """The rows as a Markdown table."""
        rows = self.to_rows()
        columns = ["name", "shape", "samples", "loss"]
        for row in rows:
            columns += [k for k in row if k not in columns and k not in ("seconds", "status")]
        columns += ["seconds", "status"]
        cells = [[_format(c, row.get(c)) for c in columns] for row in rows]
        widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
        numeric = {i for i, c in enumerate(columns) if c not in ("name", "status", "shape")}

        def line(values: List[str]) -> str:
            return "| " + " | ".join(v.rjust(w) if i in numeric else v.ljust(w)
                                     for i, (v, w) in enumerate(zip(values, widths))) + " |"

        rule = "|" + "|".join("-" * (w + 1) + ":" if i in numeric else "-" * (w + 2)
                              for i, w in enumerate(widths)) + "|"
        return "\n".join([line(columns), rule] + [line(r) for r in cells])

    def __str__(self) -> str:
        return self.summary() + "\n" + self.as_table()


def _format(column: str, value: Any) -> str:
    if value is None:
        return "-"
    if column == "shape":
        return "x".join(str(d) for d in value)
    if column == "seconds":
        return f"{value:.3f}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
