"""Models saved in the AWQ GEMM checkpoint layout (AutoAWQ's ``WQLinear_GEMM``): save_awq / load_awq.

Each quantized Linear layer is an :class:`~torchquant.nn.AWQLinear`, whose
state dict is the layout's ``qweight`` / ``qzeros`` / ``scales`` (/ ``bias``);
the layout itself, its bit order and :func:`pack_awq` / :func:`unpack_awq`
live in :mod:`torchquant.layouts.awq`.

A saved model is a folder with ``model.safetensors`` (every parameter and
buffer; float layers as they are) and AutoAWQ's ``quant_config.json``::

    {"quant_method": "awq", "zero_point": true, "q_group_size": 128,
     "w_bit": 4, "version": "gemm", "modules_to_not_convert": null}

The file's metadata carries the same settings under ``"quantization_config"``
in the spelling transformers puts in ``config.json`` (``"bits"``,
``"group_size"``). ``zero_point`` is false for symmetric grids, whose stored
zero-points are all 8. ``modules_to_not_convert`` lists the Linear layers
left in float (readers skip every layer whose name contains an entry).
"""
from __future__ import annotations

import json
from typing import Any, Dict, List, Optional

from torch import Tensor, nn

from torchquant.layouts.awq import AWQ_ORDER, AWQ_REVERSE_ORDER, BITS, PACK, check_bits, pack_awq, unpack_awq
from torchquant.nn.awq_linear import AWQLinear
from torchquant.ptq.convert import check_layer_tensors, check_load_target, place_like, set_submodule
from torchquant.ptq.safetensors_io import (WEIGHTS_FILE, PathLike, load_state, read_checkpoint, state_tensors,
                                           write_folder)

__all__ = ["AWQ_ORDER", "AWQ_REVERSE_ORDER", "BITS", "PACK", "CONFIG_FILE", "WEIGHTS_FILE", "check_bits",
           "pack_awq", "unpack_awq", "save_awq", "load_awq", "read_awq_config"]

CONFIG_FILE = "quant_config.json"
_METADATA_KEY = "quantization_config"
_CONFIG_KEYS = ("quant_method", "zero_point", "q_group_size", "group_size", "w_bit", "bits", "version",
                "modules_to_not_convert")


# ---- saving -------------------------------------------------------------------------------

def save_awq(model: nn.Module, path: PathLike, config: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Save ``model``, whose quantized layers are :class:`AWQLinear`, as an AWQ GEMM checkpoint folder.

    Every tensor of the state dict goes into ``model.safetensors`` (float
    layers as they are); the settings, taken from the layers, go into
    ``quant_config.json`` and the file's metadata. AWQ has one setting for
    the whole model, so every AWQLinear must share ``bits``, ``group_size``
    and ``symmetric``.

    ``config`` may restate those settings with AutoAWQ's keys
    (``zero_point``, ``q_group_size`` / ``group_size``, ``w_bit`` / ``bits``,
    ``version`` = "gemm", ``quant_method`` = "awq"), which must then agree
    with the layers, and may give ``modules_to_not_convert``; by default that
    lists the ``nn.Linear`` layers left in float (None if there are none).
    Returns the config written to ``quant_config.json``.
    """
    cfg = dict(config or {})
    unknown = sorted(set(cfg) - set(_CONFIG_KEYS))
    if unknown:
        raise ValueError(f"save_awq: config has unknown keys {unknown}; allowed: {list(_CONFIG_KEYS)}")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, AWQLinear)}
    if not layers:
        raise ValueError("save_awq: the model has no AWQLinear layers to save")
    if "" in layers:
        raise ValueError("save_awq: the model itself is an AWQLinear; save a module that contains it")
    settings = _shared_settings(layers)
    _check_restated(cfg, settings)
    float_linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear) and name]
    skip = cfg.get("modules_to_not_convert", float_linears or None)
    _check_skip_list(skip, layers, float_linears)

    written = {"quant_method": "awq", "zero_point": not settings["symmetric"],
               "q_group_size": settings["group_size"], "w_bit": settings["bits"], "version": "gemm",
               "modules_to_not_convert": skip}
    transformers_spelling = {"quant_method": "awq", "zero_point": written["zero_point"],
                             "group_size": settings["group_size"], "bits": settings["bits"], "version": "gemm",
                             "modules_to_not_convert": skip}
    write_folder(path, state_tensors(model), _METADATA_KEY, json.dumps(transformers_spelling), CONFIG_FILE,
                 json.dumps(written, indent=2))
    return written


def _shared_settings(layers: Dict[str, AWQLinear]) -> Dict[str, Any]:
    settings = None
    for name, m in layers.items():
        mine = {"bits": m.bits, "group_size": m.group_size, "symmetric": m.symmetric}
        if settings is None:
            first, settings = name, mine
        elif mine != settings:
            raise ValueError(f"save_awq: AWQ checkpoints have one setting for all layers, but {name!r} has {mine} "
                             f"and {first!r} has {settings}")
    return settings


def _check_restated(cfg: Dict[str, Any], settings: Dict[str, Any]) -> None:
    expected = {"quant_method": "awq", "zero_point": not settings["symmetric"], "q_group_size": settings["group_size"],
                "group_size": settings["group_size"], "w_bit": settings["bits"], "bits": settings["bits"]}
    for key, value in expected.items():
        if key in cfg and cfg[key] != value:
            raise ValueError(f"save_awq: config[{key!r}] = {cfg[key]!r} but the model's AWQLinear layers have "
                             f"{value!r}")
    if "version" in cfg and str(cfg["version"]).lower() != "gemm":
        raise ValueError(f"save_awq: config['version'] = {cfg['version']!r}; only the 'gemm' layout is written")


def _check_skip_list(skip, layers: Dict[str, AWQLinear], float_linears: List[str]) -> None:
    """Readers skip every layer whose name contains an entry: none may hit a quantized layer."""
    if skip is None:
        skip = []
    if not isinstance(skip, list) or not all(isinstance(s, str) and s for s in skip):
        raise ValueError(f"save_awq: modules_to_not_convert must be None or a list of non-empty names, got {skip!r}")
    for name in layers:
        hit = [s for s in skip if s in name]
        if hit:
            raise ValueError(f"save_awq: modules_to_not_convert entries {hit} match the quantized layer {name!r} "
                             f"(readers skip every layer whose name contains an entry)")
    missed = [name for name in float_linears if not any(s in name for s in skip)]
    if missed:
        raise ValueError(f"save_awq: the float Linear layers {missed} are not in modules_to_not_convert; readers "
                         f"would expect them quantized")


# ---- loading ------------------------------------------------------------------------------

def load_awq(model: nn.Module, path: PathLike) -> nn.Module:
    """Load an AWQ GEMM checkpoint (folder or ``.safetensors`` file) into the float ``model``, in place.

    Each ``nn.Linear`` the checkpoint quantized (``<name>.qweight`` present)
    is replaced by an :class:`AWQLinear` on the same device; then every tensor
    is loaded, layers not quantized staying float. Tensors of weights tied to
    a loaded one may be absent. Returns ``model`` in eval mode.
    """
    tensors, config = read_checkpoint(path, CONFIG_FILE, _METADATA_KEY, "load_awq", "AWQ config")
    settings = read_awq_config(config, path)
    if "qweight" in tensors:
        raise ValueError(f"load_awq: {path} holds an unprefixed 'qweight'; the model root cannot be replaced")
    names = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    if not names:
        raise ValueError(f"load_awq: {path} has no '<layer>.qweight' tensors; it is not an AWQ checkpoint")
    modules = dict(model.named_modules())
    for name in names:
        layer = _load_layer(name, modules.get(name), tensors, settings, path)
        set_submodule(model, name, layer)
    load_state(model, tensors, path, "load_awq")
    return model.eval()


def read_awq_config(config: Dict[str, Any], path: PathLike = "") -> Dict[str, Any]:
    """``bits``, ``group_size``, ``symmetric`` and ``skip`` from an AWQ config in either spelling."""
    where = f"the AWQ config of {path}" if path else "the AWQ config"
    method = str(config.get("quant_method", "awq")).lower()
    if method != "awq":
        raise ValueError(f"{where} has quant_method {config.get('quant_method')!r}; only 'awq' is read here")
    version = str(config.get("version", "gemm")).lower()
    if version != "gemm":
        raise ValueError(f"{where} has version {config.get('version')!r}; only the 'gemm' layout is read "
                         f"(GEMV and Marlin pack differently)")
    bits = config.get("w_bit", config.get("bits"))
    if bits is None:
        raise ValueError(f"{where} has neither 'w_bit' nor 'bits'")
    check_bits(bits)
    group_size = config.get("q_group_size", config.get("group_size"))
    if isinstance(group_size, bool) or not isinstance(group_size, int) or (group_size != -1 and group_size <= 0):
        raise ValueError(f"{where} has group size {group_size!r}; expected a positive integer or -1")
    zero_point = config.get("zero_point", True)
    if not isinstance(zero_point, bool):
        raise ValueError(f"{where} has zero_point = {zero_point!r}; expected true or false")
    skip = config.get("modules_to_not_convert") or []
    return {"bits": bits, "group_size": group_size, "symmetric": not zero_point, "skip": list(skip)}


def _load_layer(name: str, module: Optional[nn.Module], tensors: Dict[str, Tensor], settings: Dict[str, Any],
                path: PathLike) -> AWQLinear:
    check_load_target(name, module, AWQLinear, path, "load_awq")
    skipped = [s for s in settings["skip"] if s in name]
    if skipped:
        raise ValueError(f"load_awq: {path} holds {name}.qweight but its config leaves {name!r} in float "
                         f"(modules_to_not_convert {skipped})")
    check_layer_tensors(tensors, name, ("qzeros", "scales"), path, "load_awq")
    layer = AWQLinear.from_packed(tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"], tensors[f"{name}.scales"],
                                  tensors.get(f"{name}.bias"), settings["group_size"], settings["bits"],
                                  settings["symmetric"], name=name)
    if (layer.in_features, layer.out_features) != (module.in_features, module.out_features):
        raise ValueError(f"load_awq: {name} in {path} is {layer.in_features} -> {layer.out_features} features but "
                         f"the model's layer is {module.in_features} -> {module.out_features}")
    return place_like(layer, module, name, path, "load_awq")
