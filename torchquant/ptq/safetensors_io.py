"""Checkpoint folders of safetensors files with a JSON quantization config, as GPTQ and AWQ tools write them.

A folder holds ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``) and a JSON config file; the config may
instead be ``config.json``'s ``"quantization_config"`` entry or a JSON string
in the safetensors metadata. The layouts differ only in the tensors and the
config's keys, which :mod:`torchquant.ptq.checkpoint` and
:mod:`torchquant.ptq.awq_format` handle; errors name their caller
(``load_gptq``, ``load_awq``).
"""
from __future__ import annotations

import glob
import json
import os
from typing import Any, Dict, List, Optional, Tuple, Union

from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

__all__ = ["WEIGHTS_FILE", "PathLike", "state_tensors", "write_folder", "read_checkpoint", "load_state"]

WEIGHTS_FILE = "model.safetensors"

PathLike = Union[str, os.PathLike]


# ---- saving -------------------------------------------------------------------------------

def state_tensors(model: nn.Module) -> Dict[str, Tensor]:
    """The state dict ready for safetensors: contiguous, and tied tensors given their own copy."""
    tensors, seen = {}, set()
    for key, t in model.state_dict().items():
        t = t.detach()
        ptr = (t.device, t.untyped_storage().data_ptr()) if t.numel() else None
        if ptr in seen:
            t = t.clone()
        elif ptr is not None:
            seen.add(ptr)
        tensors[key] = t.contiguous()
    return tensors


def write_folder(path: PathLike, tensors: Dict[str, Tensor], metadata_key: str, metadata_text: str,
                 config_file: str, config_text: str) -> None:
    """``tensors`` into ``path/model.safetensors`` (config under ``metadata_key``) and ``path/config_file``."""
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, WEIGHTS_FILE), metadata={"format": "pt", metadata_key: metadata_text})
    with open(os.path.join(path, config_file), "w", encoding="utf-8") as f:
        f.write(config_text + "\n")


# ---- loading ------------------------------------------------------------------------------

def read_checkpoint(path: PathLike, config_file: str, metadata_key: str, caller: str,
                    config_name: str) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    """All tensors of a folder or file, and its config: ``config_file``, else config.json's entry, else the metadata."""
    path = os.fspath(path)
    if os.path.isdir(path):
        files, folder = _weight_files(path, caller), path
    elif os.path.isfile(path):
        files, folder = [path], os.path.dirname(path)
    else:
        raise FileNotFoundError(f"{caller}: no checkpoint at {path}")
    tensors: Dict[str, Tensor] = {}
    embedded = None
    for file in files:
        with safe_open(file, framework="pt") as f:
            embedded = embedded or (f.metadata() or {}).get(metadata_key)
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    config = _read_json(os.path.join(folder, config_file))
    if config is None:
        config = (_read_json(os.path.join(folder, "config.json")) or {}).get("quantization_config")
    if config is None and embedded is not None:
        config = json.loads(embedded)
    if config is None:
        raise FileNotFoundError(f"{caller}: found no {config_name} for {path} ({config_file}, config.json's "
                                f"'quantization_config' or the safetensors metadata)")
    return tensors, config


def _weight_files(folder: str, caller: str) -> List[str]:
    single = os.path.join(folder, WEIGHTS_FILE)
    if os.path.isfile(single):
        return [single]
    index = _read_json(single + ".index.json")
    if index is not None:
        return [os.path.join(folder, f) for f in sorted(set(index["weight_map"].values()))]
    found = sorted(glob.glob(os.path.join(glob.escape(folder), "*.safetensors")))
    if len(found) != 1:
        raise FileNotFoundError(f"{caller}: {folder} has no {WEIGHTS_FILE} (nor its .index.json) and {len(found)} "
                                f"other .safetensors files; pass the file to load")
    return found


def _read_json(file: str) -> Optional[Dict[str, Any]]:
    if not os.path.isfile(file):
        return None
    with open(file, encoding="utf-8") as f:
        return json.load(f)


def load_state(model: nn.Module, tensors: Dict[str, Tensor], path: PathLike, caller: str) -> None:
    """Load every tensor (non-strict), refusing extra ones and missing ones not tied to a loaded tensor."""
    result = model.load_state_dict(tensors, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"{caller}: {path} holds tensors the model does not have: {sorted(result.unexpected_keys)}")
    if result.missing_keys:
        # A weight tied to one that was loaded (shared storage) is loaded already.
        state = model.state_dict(keep_vars=True)
        loaded = {state[k].untyped_storage().data_ptr() for k in tensors if k in state and state[k].numel()}
        missing = [k for k in result.missing_keys if state[k].untyped_storage().data_ptr() not in loaded]
        if missing:
            raise ValueError(f"{caller}: {path} lacks tensors the model needs: {sorted(missing)}")
