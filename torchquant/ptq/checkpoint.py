"""GPTQ checkpoints as the GPTQ ecosystem writes them (AutoGPTQ, GPTQModel; read by vLLM, exllama, transformers).

A checkpoint is a folder with

* ``model.safetensors``: for every quantized layer ``<name>.qweight``,
  ``<name>.qzeros``, ``<name>.scales``, ``<name>.g_idx`` and ``<name>.bias``
  (layout in :mod:`torchquant.layouts.gptq`), plus every other parameter
  and buffer of the model as it is; the quantize config is embedded in the
  file's metadata under ``"quantize_config"``;
* ``quantize_config.json``: ``bits``, ``group_size`` (-1: none), ``desc_act``,
  ``static_groups``, ``sym``, ``checkpoint_format``, ``quant_method``
  ("gptq"), and ``damp_percent`` / ``true_sequential`` when given.

``checkpoint_format`` says how ``qzeros`` is stored: "gptq" (v1, what
AutoGPTQ writes and most readers expect) stores ``zero - 1`` in each field;
"gptq_v2" (GPTQModel) stores the true zero-point. v1 cannot hold a
zero-point of 0 for the readers that add the 1 back without wrapping, so
saving such a layer as v1 is refused; reading v1 adds 1 modulo 2^bits, as
GPTQModel does.

Layers that differ from the top-level settings and layers left in float are
described with GPTQModel's ``dynamic`` rules, which vLLM and SGLang read: a
``"+:^<name>$": {"bits": ..., ...}`` entry overrides settings for one
layer; a ``"-:^<name>$": {}`` entry marks a Linear layer that was not
quantized (for example one that saw no calibration data), whose float
weight is saved as is. The first matching rule wins.

From a GPTQ run to a checkpoint, in one call or two::

    report = torchquant.ptq.gptq(model, batches, spec)
    save_gptq(model, "out", report=report)      # converts model in place, then saves
    # or: to_gptq_modules(model, report); save_gptq(model, "out")
    fresh = load_gptq(make_float_model(), "out")  # computes exactly what model now computes

:func:`to_gptq_modules` replaces each quantized ``nn.Linear`` by a
:class:`GPTQLinear` built from the report's codes. The format stores scales
(and biases) in float16, so the converted model is not bit for bit the float
model ``gptq()`` left: each weight element moves by ``|code - zero| *
|scale - fp16(scale)|``, at most ``2^-11 * |code - zero| * scale`` for scales
in float16's normal range (above 6.1e-5; below it, at most ``|code - zero| *
2^-25``), and each bias by its float16 rounding. The checkpoint holds the
converted model exactly: :func:`load_gptq` reproduces its outputs bit for bit.
"""
from __future__ import annotations

import json
import re
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from torchquant.nn.gptq_linear import GPTQLinear
from torchquant.layouts.gptq_words import SUPPORTED_BITS, pack_int32, unpack_int32
from torchquant.ptq.convert import (check_holds_codes, check_layer_tensors, check_load_target, check_weight_is_result,
                                    place_like, report_layers, set_submodule)
from torchquant.ptq.report import LayerResult, PTQReport
from torchquant.ptq.safetensors_io import (WEIGHTS_FILE, PathLike, load_state, read_checkpoint, state_tensors,
                                           write_folder)

__all__ = ["save_gptq", "load_gptq", "to_gptq_modules", "GPTQFormatWarning", "qzeros_to_v1", "qzeros_from_v1",
           "CONFIG_FILE", "WEIGHTS_FILE"]

CONFIG_FILE = "quantize_config.json"
_METADATA_KEY = "quantize_config"
_FORMATS = ("gptq", "gptq_v2")
# Settings a "+:" dynamic rule may override, with the GPTQLinear attribute each one is.
_LAYER_SETTINGS = {"bits": "bits", "group_size": "group_size", "sym": "symmetric", "desc_act": "desc_act"}
_SAVE_KEYS = ("bits", "group_size", "desc_act", "static_groups", "sym", "checkpoint_format", "damp_percent",
              "true_sequential", "quant_method", "meta")


# ---- zero-point conventions ---------------------------------------------------------------

def qzeros_to_v1(qzeros: Tensor, bits: int, name: str = "") -> Tensor:
    """Packed true zero-points (v2) to the v1 convention (each field holds zero - 1)."""
    zero_u = unpack_int32(qzeros, bits, dim=1)
    empty = int((zero_u == 0).sum())
    if empty:
        raise ValueError(f"checkpoint_format 'gptq' (v1) stores zero-point - 1 and cannot hold a zero-point of 0 "
                         f"(layer {name!r}: {empty} group(s) have unsigned zero-point 0; readers that add 1 back "
                         f"without wrapping would read {1 << bits}). Save with checkpoint_format='gptq_v2'")
    return pack_int32(zero_u - 1, bits, dim=1)


def qzeros_from_v1(qzeros: Tensor, bits: int) -> Tensor:
    """Packed v1 zero-points (zero - 1 per field) to true zero-points, adding 1 modulo 2^bits per field.

    Adding per field, not to the packed word, keeps a carry out of one field
    from changing the next (3-bit fields also straddle words).
    """
    zero_u = (unpack_int32(qzeros, bits, dim=1) + 1) & ((1 << bits) - 1)
    return pack_int32(zero_u, bits, dim=1)


# ---- from a post-training pass to GPTQLinear layers ----------------------------------------

class GPTQFormatWarning(UserWarning):
    """Quantized layers the GPTQ checkpoint layout cannot hold were left as float ``nn.Linear`` layers."""


def to_gptq_modules(model: nn.Module, report: PTQReport) -> nn.Module:
    """Replace each quantized ``nn.Linear`` of ``model`` by the :class:`GPTQLinear` of its codes, in place.

    Args:
        model: the model the pass quantized (its quantized layers hold the
            dequantized weights the report's codes give; this is checked).
        report: the pass's report (``torchquant.ptq.gptq(...)``); every
            layer of ``report.results`` is converted, on its weight's device,
            with the layer's bias.

    Layers the GPTQ layout cannot hold (``in_features`` or ``out_features``
    not a multiple of 32, widths other than 2, 3, 4 or 8 bits, scales or
    bias out of float16 range) stay ``nn.Linear`` with their quantized float
    weights, and one :class:`GPTQFormatWarning` lists them with the reason;
    :func:`save_gptq` writes them as float layers. Layers that already are
    the ``GPTQLinear`` of their codes are left as they are, so converting
    twice is harmless.

    Every layer is checked and built before any is replaced: on an error the
    model is unchanged. The converted layers compute with float16 scales and
    bias (the format's dtype), so the converted model can differ from the
    float one by that rounding (bound in the module docstring).

    Returns ``model``.
    """
    layers = report_layers(model, report, "to_gptq_modules", "torchquant.ptq.gptq(...)")
    todo: List[Tuple[str, nn.Linear, LayerResult]] = []
    kept: Dict[str, str] = {}
    for name, module, q in layers:
        if isinstance(module, GPTQLinear):
            got = module.unpack()
            check_holds_codes((got.codes, got.zero_points, got.scales, got.g_idx), q,
                              f"to_gptq_modules: {name!r} is already a GPTQLinear")
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(f"to_gptq_modules: the report quantized {name!r}, a {type(module).__name__} in the "
                             "model; only nn.Linear layers become GPTQLinear")
        if isinstance(getattr(module, "input_scale", None), Tensor):
            # Dropping the online division would silently change the layer's output.
            raise ValueError(f"to_gptq_modules: {name!r} divides its input by input_scale at run time (AWQ or "
                             "SmoothQuant scaling with no layer before it to fold into), which the GPTQ format "
                             "cannot store; exclude such layers from the scaling pass, or keep the model in "
                             "torchquant's own layout (torchquant.ptq.to_quantized_modules)")
        if tuple(module.weight.shape) != tuple(q.unsigned_codes.shape):
            raise ValueError(f"to_gptq_modules: {name!r} has weight shape {list(module.weight.shape)} but the "
                             f"report's codes are {list(q.unsigned_codes.shape)}")
        check_weight_is_result(module.weight, q, f"to_gptq_modules: the weight of {name!r}")
        reason = _unsupported_shape(module, q)
        if reason is None:
            todo.append((name, module, q))
        else:
            kept[name] = reason
    built = {}
    for name, module, q in todo:
        try:
            built[name] = _gptq_layer(module, q)
        except ValueError as error:  # what float16 cannot hold (scales, bias)
            kept[name] = str(error)
    for name, layer in built.items():
        set_submodule(model, name, layer)
    if kept:
        warnings.warn(f"to_gptq_modules: {len(kept)} quantized layer(s) stay float nn.Linear layers holding their "
                      "quantized weights, as the GPTQ format cannot hold them: "
                      + "; ".join(f"{name} ({why})" for name, why in kept.items()), GPTQFormatWarning, stacklevel=2)
    return model


def _unsupported_shape(module: nn.Linear, q: LayerResult) -> Optional[str]:
    if q.bits not in SUPPORTED_BITS:
        return f"{q.bits}-bit codes; the format packs {', '.join(map(str, SUPPORTED_BITS))} bits"
    bad = [f"{attr}={getattr(module, attr)}" for attr in ("in_features", "out_features") if getattr(module, attr) % 32]
    if bad:
        return f"{' and '.join(bad)} not a multiple of 32"
    return None


def _group_size(q: LayerResult) -> Optional[int]:
    return q.spec.group_size if q.spec.granularity == "group" else None


def _gptq_layer(module: nn.Linear, q: LayerResult) -> GPTQLinear:
    device = module.weight.device
    bias = None if module.bias is None else module.bias.detach()
    return GPTQLinear.from_codes(q.codes.to(device), q.scales.to(device), q.zero_points.to(device),
                                 q.g_idx.to(device), bias, q.bits, _group_size(q), q.quant_min, q.spec.symmetric,
                                 desc_act=q.act_order, static_groups=q.static_groups)


# ---- saving -------------------------------------------------------------------------------

def save_gptq(model: nn.Module, path: PathLike, quantize_config: Optional[Dict[str, Any]] = None, *,
              report: Optional[PTQReport] = None) -> Dict[str, Any]:
    """Write ``model`` (with :class:`GPTQLinear` layers) as a GPTQ checkpoint folder ``path``.

    ``quantize_config`` may give ``bits``, ``group_size``, ``sym``,
    ``desc_act``, ``static_groups`` (the top-level settings; by default those
    of the report's spec, else of the first quantized layer),
    ``checkpoint_format`` ("gptq", the default, or "gptq_v2"),
    ``damp_percent``, ``true_sequential`` (by default the report's
    ``percdamp`` and ``sequential``) and ``meta`` (a dict of anything else
    worth recording). Layers whose settings differ from the top level get a
    ``"+:"`` dynamic rule; float ``nn.Linear`` layers get a ``"-:"`` rule.
    Returns the config written.

    With ``report`` (of the pass that quantized ``model``), the model is
    first converted in place by :func:`to_gptq_modules`; afterwards it
    computes exactly what :func:`load_gptq` of the checkpoint computes.
    """
    cfg = dict(quantize_config or {})
    unknown = sorted(set(cfg) - set(_SAVE_KEYS))
    if unknown:
        raise ValueError(f"quantize_config has unknown keys {unknown}; allowed: {list(_SAVE_KEYS)} "
                         f"(put anything else under 'meta')")
    if report is not None:
        to_gptq_modules(model, report)
        cfg = {**_report_settings(report), **cfg}
    layers = {name: m for name, m in model.named_modules() if isinstance(m, GPTQLinear)}
    if not layers:
        raise ValueError("save_gptq: the model has no GPTQLinear layers to save")
    if "" in layers:
        raise ValueError("save_gptq: the model itself is a GPTQLinear; save a module that contains it")
    config = _top_level_config(cfg, next(iter(layers.values())))
    dynamic: Dict[str, Dict[str, Any]] = {}
    for name, m in layers.items():
        diff = {key: getattr(m, attr) for key, attr in _LAYER_SETTINGS.items() if getattr(m, attr) != config[key]}
        if diff:
            dynamic[f"+:^{re.escape(name)}$"] = diff
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name:
            dynamic[f"-:^{re.escape(name)}$"] = {}
    if dynamic:
        config["dynamic"] = dynamic
    config["lm_head"] = any(name.rpartition(".")[2] == "lm_head" for name in layers)

    tensors = state_tensors(model)  # each GPTQLinear's in the GPTQ layout, true zero-points (v2)
    if config["checkpoint_format"] == "gptq":
        for name, m in layers.items():
            tensors[f"{name}.qzeros"] = qzeros_to_v1(tensors[f"{name}.qzeros"], m.bits, name)

    text = json.dumps(config, indent=2)
    write_folder(path, tensors, _METADATA_KEY, text, CONFIG_FILE, text)
    return config


def _report_settings(report: PTQReport) -> Dict[str, Any]:
    """The checkpoint's top-level settings as the GPTQ run that made ``report`` used them."""
    spec, config = getattr(report, "spec", None), getattr(report, "config", None)
    if spec is None or config is None:  # not a GPTQ report: the first layer's settings
        return {}
    return {"bits": spec.bits, "group_size": spec.group_size if spec.granularity == "group" else -1,
            "sym": spec.symmetric, "desc_act": config.act_order, "static_groups": config.static_groups,
            "damp_percent": config.percdamp, "true_sequential": config.sequential}


def _top_level_config(cfg: Dict[str, Any], first: GPTQLinear) -> Dict[str, Any]:
    from torchquant import __version__  # on use: torchquant may still be importing this module
    group_size = cfg.get("group_size", first.group_size)
    config = {
        "bits": cfg.get("bits", first.bits),
        "group_size": -1 if group_size is None else group_size,
        "desc_act": cfg.get("desc_act", first.desc_act),
        "static_groups": cfg.get("static_groups", first.static_groups),
        "sym": cfg.get("sym", first.symmetric),
        "quant_method": cfg.get("quant_method", "gptq"),
        "checkpoint_format": cfg.get("checkpoint_format", "gptq"),
        "pack_dtype": "int32",
    }
    if config["bits"] not in SUPPORTED_BITS or isinstance(config["bits"], bool):
        raise ValueError(f"quantize_config['bits'] must be one of {SUPPORTED_BITS}, got {config['bits']!r}")
    gs = config["group_size"]
    if isinstance(gs, bool) or not isinstance(gs, int) or (gs != -1 and gs <= 0):
        raise ValueError(f"quantize_config['group_size'] must be a positive integer or -1, got {gs!r}")
    for key in ("desc_act", "static_groups", "sym", "true_sequential"):
        value = cfg.get(key, config.get(key, False))
        if not isinstance(value, bool):
            raise ValueError(f"quantize_config[{key!r}] must be a bool, got {value!r}")
    if config["quant_method"] != "gptq":
        raise ValueError(f"quantize_config['quant_method'] must be 'gptq', got {config['quant_method']!r}")
    if config["checkpoint_format"] not in _FORMATS:
        raise ValueError(f"quantize_config['checkpoint_format'] must be one of {_FORMATS}, "
                         f"got {config['checkpoint_format']!r}")
    if "true_sequential" in cfg:
        config["true_sequential"] = cfg["true_sequential"]
    if "damp_percent" in cfg:
        dp = cfg["damp_percent"]
        if isinstance(dp, bool) or not isinstance(dp, (int, float)) or not 0 <= dp <= 1:
            raise ValueError(f"quantize_config['damp_percent'] must be a number in [0, 1], got {dp!r}")
        config["damp_percent"] = dp
    meta = cfg.get("meta", {})
    if not isinstance(meta, dict):
        raise ValueError(f"quantize_config['meta'] must be a dict, got {type(meta).__name__}")
    config["meta"] = {"quantizer": [f"torchquant:{__version__}"], **meta}
    return config


# ---- loading ------------------------------------------------------------------------------

def load_gptq(model: nn.Module, path: PathLike) -> nn.Module:
    """Load a GPTQ checkpoint (folder or ``.safetensors`` file) into the float model ``model``, in place.

    Each ``nn.Linear`` the checkpoint quantized (``<name>.qweight`` present) is
    replaced by a :class:`GPTQLinear` on the same device; then every tensor is
    loaded. v1 zero-points are converted to true zero-points. Tensors of
    weights tied to a loaded one may be absent (tied embeddings). Returns
    ``model`` in eval mode.
    """
    tensors, config = read_checkpoint(path, CONFIG_FILE, _METADATA_KEY, "load_gptq", "quantize config")
    settings = _parse_config(config, path)
    names = sorted({k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")})
    if "qweight" in tensors:
        raise ValueError(f"load_gptq: {path} holds an unprefixed 'qweight'; the model root cannot be replaced")
    if not names:
        raise ValueError(f"load_gptq: {path} has no '<layer>.qweight' tensors; it is not a GPTQ checkpoint")
    modules = dict(model.named_modules())
    for name in names:
        layer = _load_layer(name, modules.get(name), tensors, settings, path)
        # What the layer's state dict reads: true zero-points, and g_idx where the file leaves it out.
        tensors[f"{name}.qzeros"] = layer.checkpoint_tensor("qzeros")
        tensors.setdefault(f"{name}.g_idx", layer.checkpoint_tensor("g_idx"))
        set_submodule(model, name, layer)
    load_state(model, tensors, path, "load_gptq")
    return model.eval()


def _load_layer(name: str, module: Optional[nn.Module], tensors: Dict[str, Tensor], settings: Dict[str, Any],
                path: PathLike) -> GPTQLinear:
    check_load_target(name, module, GPTQLinear, path, "load_gptq")
    excluded, overrides = _dynamic_rule(settings["dynamic"], name)
    if excluded:
        raise ValueError(f"load_gptq: the quantize config excludes {name!r} (a '-:' dynamic rule) but {path} "
                         f"holds {name}.qweight")
    s = {**{k: settings[k] for k in _LAYER_SETTINGS}, **{k: v for k, v in overrides.items() if k in _LAYER_SETTINGS}}
    check_layer_tensors(tensors, name, ("qzeros", "scales"), path, "load_gptq")
    qzeros = tensors[f"{name}.qzeros"]
    if settings["checkpoint_format"] == "gptq":
        _check_int32(qzeros, f"{name}.qzeros")
        qzeros = qzeros_from_v1(qzeros, s["bits"])
    layer = GPTQLinear.from_packed(tensors[f"{name}.qweight"], qzeros, tensors[f"{name}.scales"],
                                   tensors.get(f"{name}.g_idx"), tensors.get(f"{name}.bias"), s["bits"],
                                   s["group_size"], s["sym"], s["desc_act"], settings["static_groups"], name=name)
    if (layer.in_features, layer.out_features) != (module.in_features, module.out_features):
        raise ValueError(f"load_gptq: {name} in {path} is {layer.in_features} -> {layer.out_features} features "
                         f"({s['bits']} bits) but the model's layer is {module.in_features} -> "
                         f"{module.out_features}")
    return place_like(layer, module, name, path, "load_gptq")


def _check_int32(t: Tensor, name: str) -> None:
    if t.dtype != torch.int32 or t.dim() != 2:
        raise ValueError(f"{name} must be a 2-D int32 tensor, got {t.dtype} of shape {list(t.shape)}")


def _dynamic_rule(dynamic: Dict[str, Dict[str, Any]], name: str) -> Tuple[bool, Dict[str, Any]]:
    """(excluded, overrides) for layer ``name``: the first matching rule wins, as in vLLM."""
    for pattern, overrides in dynamic.items():
        if pattern.startswith("-:"):
            if re.match(pattern[2:], name):
                return True, {}
        elif re.match(pattern[2:] if pattern.startswith("+:") else pattern, name):
            return False, dict(overrides or {})
    return False, {}


def _parse_config(config: Dict[str, Any], path: PathLike) -> Dict[str, Any]:
    where = f"the quantize config of {path}"
    method = str(config.get("quant_method", "gptq")).lower()
    if method != "gptq":
        raise ValueError(f"{where} has quant_method {config.get('quant_method')!r}; only 'gptq' is read here")
    if config.get("is_marlin_format"):
        raise ValueError(f"{where} is in Marlin's repacked layout (is_marlin_format), which is not GPTQ's")
    fmt = str(config.get("checkpoint_format") or config.get("format") or "gptq").lower()
    if fmt not in _FORMATS:
        raise ValueError(f"{where} has checkpoint_format {fmt!r}; supported: {_FORMATS}")
    if config.get("pack_dtype", "int32") != "int32":
        raise ValueError(f"{where} packs into {config['pack_dtype']!r}; only int32 words are supported")
    if "bits" not in config:
        raise ValueError(f"{where} has no 'bits'")
    dynamic = config.get("dynamic") or {}
    if not isinstance(dynamic, dict):
        raise ValueError(f"{where} has a 'dynamic' entry that is not a dict of rules")
    flags = {"sym": config.get("sym", True), "desc_act": config.get("desc_act", False),
             "static_groups": config.get("static_groups", False)}
    for key, value in flags.items():
        if not isinstance(value, bool):
            raise ValueError(f"{where} has {key} = {value!r}; expected true or false")
    return {"bits": config["bits"], "group_size": config.get("group_size", -1), **flags,
            "checkpoint_format": fmt, "dynamic": dynamic}
