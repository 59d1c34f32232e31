"""What the op wrappers of every family share: the op namespace and argument checks."""
from __future__ import annotations

import torch
from torch import Tensor

_OPS = torch.ops.torchquant
_FLOAT_INPUTS = (torch.float32, torch.float16, torch.bfloat16)

def _check_int(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        expected = "an int or None" if allow_none else "an int"
        raise TypeError(f"{name} must be {expected}, got {value!r}")


def _check_tensor(op: str, name: str, value) -> None:
    if not isinstance(value, Tensor):
        raise TypeError(f"{op}: {name} must be a Tensor, got {type(value).__name__}")


