"""Quantized checkpoints in safetensors: integer codes, grids and a JSON description."""
from __future__ import annotations

import json
import os
from typing import Dict, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from torchquant.nn import (AWQLinear, GPTQLinear, InputScaledW8A8Linear, QuantizedConv1d, QuantizedConv2d,
                           QuantizedEmbedding, QuantizedLinear, QuantizedModule, W8A8Linear)
from torchquant.nn.qat import sibling_name

__all__ = ["save_quantized", "load_quantized"]

_METADATA_KEY = "torchquant.layers"
_FORMAT_KEY = "torchquant.format"
_FORMAT = "torchquant-qat/1"
# The "kind" a layer's description names -> the class that rebuilds it.
QUANTIZED_MODULES = {cls.__name__: cls for cls in (QuantizedLinear, GPTQLinear, AWQLinear, W8A8Linear,
                                                    InputScaledW8A8Linear, QuantizedConv1d, QuantizedConv2d,
                                                    QuantizedEmbedding)}


def save_quantized(model: nn.Module, path: Union[str, os.PathLike]) -> None:
    """Save a converted model: every tensor of its state dict plus, in the
    file's metadata, how to rebuild each quantized layer."""
    layers = {name: m.quant_metadata() for name, m in model.named_modules() if isinstance(m, QuantizedModule)}
    if not layers:
        raise ValueError("save_quantized: the model has no quantized layers; call torchquant.convert(model) first")
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, os.fspath(path), metadata={_METADATA_KEY: json.dumps(layers), _FORMAT_KEY: _FORMAT})


def load_quantized(model: nn.Module, path: Union[str, os.PathLike]) -> nn.Module:
    """Load a checkpoint written by :func:`save_quantized` into ``model``, in place.

    ``model`` is the float architecture (freshly built, or a QAT /
    converted one): each layer the checkpoint quantized is replaced by its
    quantized module, then every tensor is loaded strictly.
    """
    with safe_open(os.fspath(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get(_FORMAT_KEY) != _FORMAT:
            raise ValueError(f"load_quantized: {path} is not a torchquant quantized checkpoint "
                             f"(format {meta.get(_FORMAT_KEY)!r}, expected {_FORMAT!r})")
        tensors: Dict[str, torch.Tensor] = {k: f.get_tensor(k) for k in f.keys()}
    layers = json.loads(meta[_METADATA_KEY])
    # A checkpoint of another architecture would otherwise fail deep inside get_submodule.
    names = {name for name, _ in model.named_modules()}
    missing = [name for name in layers if name not in names]
    if missing:
        raise ValueError(f"load_quantized: {path} quantizes layers the model does not have: {missing}")
    for name, layer_meta in layers.items():
        cls = QUANTIZED_MODULES[layer_meta["kind"]]
        prefix = name + "."
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        _set_submodule(model, name, cls.from_metadata(layer_meta, own))
        if layer_meta.get("folded_bn"):
            # The BatchNorm folded into this conv has no state left in the checkpoint.
            _set_submodule(model, sibling_name(name, layer_meta["folded_bn"]), nn.Identity())
    model.load_state_dict(tensors, strict=True)
    return model.eval()


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
