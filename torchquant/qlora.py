"""QLoRA (Dettmers et al. 2023): trainable LoRA adapters over a frozen 4-bit NormalFloat base.

>>> model = torchquant.qlora.prepare(model, rank=8, alpha=16, target_modules=["query", "value"])
>>> ...train: only the adapters (and modules_to_save) have requires_grad...
>>> torchquant.qlora.save_adapters(model, "adapter/")      # PEFT's layout: peft loads it onto the float base
>>> merged = torchquant.qlora.merge(model)                  # a float model, or re-quantized:
>>> merged = torchquant.qlora.merge(model, requantize=lambda m: torchquant.ptq.nf4(m))

Each targeted ``nn.Linear`` becomes a :class:`LoraLinear`: its weight frozen
as an NF4 (or FP4) :class:`~torchquant.nn.QuantizedLinear` (optionally with
double-quantized scales), plus ``y += scaling * B(A(dropout(x)))`` with
``A [rank, in]`` and ``B [out, rank]`` trainable in the compute dtype
(``scaling = alpha / rank``; ``A`` Kaiming-uniform and ``B`` zero at the start,
as LoRA and PEFT initialise them, so the prepared model starts as its base).
The base's input gradient flows through the packed weight with the
run-time kernels (``dX = dY W``); the base gets no gradient and keeps no float
copy. ``quant_type=None`` keeps the base in floating point (plain LoRA).
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from torchquant.lookup_tables import LUT_DTYPES
from torchquant.nn.quantized_linear import QuantizedLinear
from torchquant.ptq.convert import set_submodule
from torchquant.ptq.lookup_table import DEFAULT_BLOCK_SIZE, lookup_table_weight

__all__ = ["LoraLinear", "prepare", "merge", "save_adapters", "load_adapters", "trainable_parameters",
           "ADAPTER_WEIGHTS", "ADAPTER_CONFIG"]

# PEFT's file names, and the prefix of its keys (PeftModel.base_model.model.<path>).
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_PEFT_PREFIX = "base_model.model."
_COMPUTE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class LoraLinear(nn.Module):
    """``base(x) + scaling * lora_B(lora_A(dropout(x)))`` with a frozen base (see the module docstring).

    Args:
        base: the frozen layer: a :class:`~torchquant.nn.QuantizedLinear`
            (QLoRA) or an ``nn.Linear`` (LoRA), ``[out, in]``.
        rank: the adapters' inner width, ``1 <= rank <= min(in, out)``.
        alpha: LoRA's alpha; the update is scaled by ``alpha / rank``.
        dropout: dropout probability on the adapters' input.
        compute_dtype: dtype of the adapters (float32, bfloat16 or float16).
    """

    def __init__(self, base: nn.Module, rank: int, alpha: float = 16.0, dropout: float = 0.0,
                 compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        in_features, out_features = base.in_features, base.out_features
        device = base.packed_weight.device if isinstance(base, QuantizedLinear) else base.weight.device
        self.base = base
        self.rank, self.alpha = rank, float(alpha)
        self.scaling = self.alpha / rank
        self.in_features, self.out_features = in_features, out_features
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(in_features, rank, bias=False, device=device, dtype=compute_dtype)
        self.lora_B = nn.Linear(rank, out_features, bias=False, device=device, dtype=compute_dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        h = self.lora_dropout(x).to(self.lora_A.weight.dtype)
        return y + (self.lora_B(self.lora_A(h)) * self.scaling).to(y.dtype)

    def base_weight(self) -> Tensor:
        """The base's float32 weight ``[out, in]`` (dequantized for a quantized base)."""
        if isinstance(self.base, QuantizedLinear):
            return self.base.dequantized_weight(torch.float32)
        return self.base.weight.detach().float()

    def merged_weight(self) -> Tensor:
        """float32 ``W + scaling * B A``."""
        delta = self.lora_B.weight.detach().float() @ self.lora_A.weight.detach().float()
        return self.base_weight() + self.scaling * delta

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling:g}"


# ---- choosing the layers --------------------------------------------------------------------

def _matches(name: str, target_modules: Union[None, str, Sequence[str]]) -> bool:
    """PEFT's rule: a string is a regular expression matched against the whole name; a list holds names
    matched exactly or as the last dotted components."""
    if target_modules is None:
        return True
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _check_target_modules(target_modules) -> None:
    if target_modules is None or isinstance(target_modules, str):
        return
    if not isinstance(target_modules, (list, tuple, set)) or not all(isinstance(t, str) for t in target_modules):
        raise TypeError(f"target_modules must be None, a regular expression, or a list of module names, got "
                        f"{target_modules!r}")


def _check_settings(rank, alpha, dropout, quant_type, compute_dtype) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha must be a positive finite number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
    if quant_type is not None and quant_type not in LUT_DTYPES:
        raise ValueError(f"quant_type must be one of {LUT_DTYPES} or None (a float base), got {quant_type!r}")
    if compute_dtype not in _COMPUTE_DTYPES:
        raise ValueError(f"compute_dtype must be one of {_COMPUTE_DTYPES}, got {compute_dtype!r}")


def prepare(model: nn.Module, *, rank: int = 8, alpha: float = 16.0, dropout: float = 0.05,
            target_modules: Union[None, str, Sequence[str]] = None, quant_type: Optional[str] = "nf4",
            double_quant: bool = True, block_size: int = DEFAULT_BLOCK_SIZE,
            compute_dtype: torch.dtype = torch.float32, modules_to_save: Sequence[str] = ()) -> nn.Module:
    """Freeze ``model`` and put LoRA adapters on its targeted Linear layers, in place; returns ``model``.

    Args:
        model: a float model.
        rank, alpha, dropout: LoRA's settings (``scaling = alpha / rank``).
        target_modules: the ``nn.Linear`` layers to adapt: a list of names
            (matched exactly or as the last components, e.g. ``["query",
            "value"]``), a regular expression matched against the whole name,
            or None for every ``nn.Linear``. Matching nothing is an error.
        quant_type: ``"nf4"`` / ``"fp4"``: the targeted weights become 4-bit
            lookup-table layers; None keeps them in float (plain LoRA).
        double_quant: store the 4-bit blocks' absmax values in 8 bits.
        block_size: input columns per absmax block (must divide each
            targeted layer's ``in_features``).
        compute_dtype: dtype of the adapters: float32, bfloat16 or float16.
        modules_to_save: names of modules (e.g. a new classification head)
            that stay trainable in full.

    Every other parameter is frozen (``requires_grad=False``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_settings(rank, alpha, dropout, quant_type, compute_dtype)
    _check_target_modules(target_modules)
    modules = dict(model.named_modules())
    for name in modules_to_save:
        if name not in modules:
            raise ValueError(f"modules_to_save: the model has no submodule {name!r}")
    targets = [(name, m) for name, m in modules.items()
               if type(m) is nn.Linear and name and _matches(name, target_modules)
               and not any(name == s or name.startswith(s + ".") for s in modules_to_save)]
    if not targets:
        linear = [name for name, m in modules.items() if type(m) is nn.Linear][:8]
        raise ValueError(f"target_modules={target_modules!r} matches no nn.Linear layer of the model; its Linear "
                         f"layers include {linear}")
    for name, linear in targets:
        if rank > min(linear.in_features, linear.out_features):
            raise ValueError(f"rank={rank} is larger than layer {name!r} ([{linear.out_features}, "
                             f"{linear.in_features}]) allows: at most min(in_features, out_features) = "
                             f"{min(linear.in_features, linear.out_features)}")
    # Every weight is converted before anything changes: a failure leaves the model as it was.
    bases = {name: _frozen_base(name, linear, quant_type, double_quant, block_size) for name, linear in targets}
    for p in model.parameters():
        p.requires_grad_(False)
    for name, base in bases.items():
        set_submodule(model, name, LoraLinear(base, rank, alpha, dropout, compute_dtype))
    for name in modules_to_save:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)
    model._torchquant_lora = {"rank": rank, "alpha": float(alpha), "dropout": float(dropout),
                              "target_modules": sorted(bases), "quant_type": quant_type,
                              "double_quant": bool(double_quant), "block_size": block_size}
    return model


def _frozen_base(name: str, linear: nn.Linear, quant_type: Optional[str], double_quant: bool,
                 block_size: int) -> nn.Module:
    if quant_type is None:
        return linear
    weight = lookup_table_weight(linear.weight, quant_type, block_size, double_quant, f"layer {name!r}")
    return QuantizedLinear(weight, None if linear.bias is None else linear.bias.detach())


def lora_layers(model: nn.Module) -> Dict[str, LoraLinear]:
    """The :class:`LoraLinear` layers of ``model`` by name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def _require_lora(model: nn.Module, caller: str) -> Dict[str, LoraLinear]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}: model must be an nn.Module, got {type(model).__name__}")
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{caller}: the model has no LoRA layers; call torchquant.qlora.prepare(model, ...) first")
    return layers


def trainable_parameters(model: nn.Module) -> int:
    """How many parameter values have ``requires_grad``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ---- merging -------------------------------------------------------------------------------

@torch.no_grad()
def merge(model: nn.Module, requantize: Optional[Callable[[nn.Module], object]] = None) -> nn.Module:
    """Fold each adapter into its base, in place: every :class:`LoraLinear` becomes an ``nn.Linear``
    holding ``W + scaling * B A`` in float32 (``W`` dequantized from a 4-bit base).

    ``requantize(model)``, when given, then quantizes the merged float model
    with any torchquant method (e.g. ``lambda m: torchquant.ptq.nf4(m)`` or
    a GPTQ call with calibration data). Returns ``model``.
    """
    layers = _require_lora(model, "merge")
    for name, layer in layers.items():
        bias = layer.base.bias
        merged = nn.Linear(layer.in_features, layer.out_features, bias=bias is not None,
                           device=layer.lora_A.weight.device)
        merged.weight.copy_(layer.merged_weight())
        if bias is not None:
            merged.bias.copy_(bias.detach().float())
        set_submodule(model, name, merged)
    model.__dict__.pop("_torchquant_lora", None)
    if requantize is not None:
        requantize(model)
    return model


# ---- PEFT's adapter files ----------------------------------------------------------------------

def save_adapters(model: nn.Module, directory: Union[str, Path],
                  base_model_name_or_path: Optional[str] = None) -> Path:
    """Write the adapters as PEFT does: ``adapter_model.safetensors`` and ``adapter_config.json``.

    ``peft.PeftModel.from_pretrained(float_base, directory)`` then loads them
    onto the float model the adapters were trained over. Returns the directory.
    """
    from safetensors.torch import save_file
    layers = _require_lora(model, "save_adapters")
    settings = _settings(model, layers)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, layer in layers.items():
        tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight.detach().contiguous().cpu()
        tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight.detach().contiguous().cpu()
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": None, "r": settings["rank"], "lora_alpha": settings["alpha"],
        "lora_dropout": settings["dropout"], "target_modules": sorted(layers), "bias": "none",
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
        "use_dora": False, "modules_to_save": None, "base_model_name_or_path": base_model_name_or_path,
        # torchquant's own record of the base it was trained over (PEFT ignores unknown keys it does not read).
    }
    (directory / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def _settings(model: nn.Module, layers: Dict[str, LoraLinear]) -> dict:
    first = next(iter(layers.values()))
    ranks = {layer.rank for layer in layers.values()}
    alphas = {layer.alpha for layer in layers.values()}
    if len(ranks) > 1 or len(alphas) > 1:
        raise ValueError(f"save_adapters: PEFT's config holds one rank and one alpha; the layers have ranks "
                         f"{sorted(ranks)} and alphas {sorted(alphas)}")
    dropout = first.lora_dropout.p if isinstance(first.lora_dropout, nn.Dropout) else 0.0
    return {"rank": first.rank, "alpha": first.alpha, "dropout": dropout}


@torch.no_grad()
def load_adapters(model: nn.Module, directory: Union[str, Path]) -> nn.Module:
    """Load adapters saved by :func:`save_adapters` (or PEFT) into a prepared ``model``, in place.

    The config's rank and alpha must be the model's and the files must hold
    exactly the model's adapters with their shapes; anything else raises
    ``ValueError`` naming the key, and nothing is loaded.
    """
    from safetensors.torch import load_file
    layers = _require_lora(model, "load_adapters")
    directory = Path(directory)
    weights, config_path = directory / ADAPTER_WEIGHTS, directory / ADAPTER_CONFIG
    for path in (weights, config_path):
        if not path.is_file():
            raise FileNotFoundError(f"load_adapters: {path} does not exist (a directory written by save_adapters "
                                    f"or PEFT's save_pretrained holds {ADAPTER_WEIGHTS} and {ADAPTER_CONFIG})")
    try:
        config = json.loads(config_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"load_adapters: {config_path} is not valid JSON: {error}") from None
    if config.get("peft_type") != "LORA":
        raise ValueError(f"load_adapters: {config_path} describes a {config.get('peft_type')!r} adapter, not LORA")
    settings = _settings(model, layers)
    if config.get("r") != settings["rank"] or float(config.get("lora_alpha", -1)) != settings["alpha"]:
        raise ValueError(f"load_adapters: the adapters have r={config.get('r')}, lora_alpha={config.get('lora_alpha')}"
                         f"; the model's LoRA layers have rank={settings['rank']}, alpha={settings['alpha']:g}")
    tensors = load_file(str(weights))
    expected: Dict[str, nn.Parameter] = {}
    for name, layer in layers.items():
        expected[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight
        expected[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"load_adapters: the adapters do not fit the model: missing {missing[:4]}"
                         f"{' ...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
                         f"{' ...' if len(unexpected) > 4 else ''}")
    for key, param in expected.items():
        if tuple(tensors[key].shape) != tuple(param.shape):
            raise ValueError(f"load_adapters: {key} has shape {list(tensors[key].shape)}, the model's is "
                             f"{list(param.shape)}")
        if not bool(torch.isfinite(tensors[key]).all()):
            raise ValueError(f"load_adapters: {key} holds NaN or Inf values")
    for key, param in expected.items():
        param.copy_(tensors[key].to(param.dtype))
    return model
