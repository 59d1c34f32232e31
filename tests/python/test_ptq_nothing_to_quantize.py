"""A post-training pass that would quantize no layer raises, naming why (no silent '0 of N' report)."""
import pytest
import torch
from torch import nn

import torchquant
from torchquant import QuantSpec

SPEC = QuantSpec(bits=4, symmetric=False, granularity="group", group_size=16)


def batches():
    return [torch.randn(4, 32)]


@pytest.mark.parametrize("model,kwargs", [
    (nn.Sequential(nn.LayerNorm(32), nn.Tanh()), {}),                # no Linear at all
    (nn.Sequential(nn.Linear(32, 32), nn.ReLU()), {"exclude": "0"}),  # every Linear excluded
])
def test_calibrated_passes_raise(model, kwargs):
    with pytest.raises(ValueError, match="nothing to quantize"):
        torchquant.ptq.gptq(model, batches(), SPEC, progress=False, **kwargs)
    with pytest.raises(ValueError, match="nothing to quantize"):
        torchquant.ptq.awq(model, batches(), SPEC, progress=False, **kwargs)


def test_no_calibration_passes_raise():
    for convert in (lambda m: torchquant.ptq.rtn(m, SPEC), torchquant.ptq.nf4, torchquant.ptq.llm_int8):
        with pytest.raises(ValueError, match="no nn.Linear"):
            convert(nn.Sequential(nn.ReLU()))
