import pytest
import torch

import torchquant  # noqa: F401  (registers torch.ops.torchquant)


def _cuda_skip_reason():
    if not torch.cuda.is_available():
        return "CUDA is not available"
    if not torch._C._dispatch_has_kernel_for_dispatch_key("torchquant::fake_quantize", "CUDA"):
        return "torchquant was built without CUDA kernels"
    return None


def pytest_collection_modifyitems(config, items):
    """Skips every test marked ``cuda`` (directly or through the device fixture) without a usable GPU."""
    reason = _cuda_skip_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


# Session-scoped so that hypothesis tests may use it too.
@pytest.fixture(scope="session", params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request) -> str:
    return request.param
