"""Checkpoint layouts of quantized Linear weights: save / load adapters onto one run-time weight.

Every quantized Linear layer computes from a
:class:`~torchquant.quantized_weight.QuantizedWeight`; its ``state_dict``
keeps the layout of the ecosystem it came from:

* :class:`TorchquantLayout`: torchquant's own (``save_quantized``);
* :class:`GPTQLayout`: AutoGPTQ / GPTQModel's ``qweight`` / ``qzeros`` /
  ``scales`` / ``g_idx``;
* :class:`AWQLayout`: AutoAWQ's GEMM layout;
* :class:`W8A8Layout`: SmoothQuant's int8 codes per channel;
* :class:`RuntimeLayout`: the run-time tensors as they are (any weight,
  lookup-table codes included).
"""
from typing import Any, Dict

from torchquant.layouts.awq import AWQLayout
from torchquant.layouts.base import CheckpointLayout
from torchquant.layouts.gptq import GPTQLayout
from torchquant.layouts.native import TorchquantLayout
from torchquant.layouts.runtime import RuntimeLayout
from torchquant.layouts.w8a8 import W8A8Layout
from torchquant.spec import QuantSpec

__all__ = ["AWQLayout", "CheckpointLayout", "GPTQLayout", "RuntimeLayout", "TorchquantLayout", "W8A8Layout", "layout_from_config"]


def layout_from_config(config: Dict[str, Any]) -> CheckpointLayout:
    """The layout :meth:`CheckpointLayout.config` described."""
    settings = dict(config)
    name = settings.pop("name", None)
    if name == TorchquantLayout.name:
        return TorchquantLayout(QuantSpec(**settings["spec"]), settings.get("act_order", False))
    if name == GPTQLayout.name:
        return GPTQLayout(**settings)
    if name == AWQLayout.name:
        return AWQLayout(**settings)
    if name == W8A8Layout.name:
        return W8A8Layout()
    if name == RuntimeLayout.name:
        return RuntimeLayout(**settings)
    known = [cls.name for cls in (TorchquantLayout, GPTQLayout, AWQLayout, W8A8Layout, RuntimeLayout)]
    raise ValueError(f"unknown checkpoint layout {name!r}; known layouts: {known}")
