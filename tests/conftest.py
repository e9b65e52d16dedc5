"""Shared test set-up: which (backend, device) pairs run here, and the GPU marker.

Without a CUDA device the Triton kernels run under TRITON_INTERPRET=1, which must be set before
triton.jit wraps them, so it is set here, before fastforget is imported.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastforget.ops import backends  # noqa: E402

# float32 references stay float32 on the GPU: cuDNN's convolutions default to TF32, which the
# fastforget kernels (and the tolerances) do not use. The old flag: torch refuses mixing the two APIs.
torch.backends.cudnn.allow_tf32 = False


def backend_params():
    """pytest params of every backend with the device it runs on; CUDA ones marked gpu."""
    params = []
    for device in ("cpu", "cuda"):
        for name in backends.BACKENDS:
            if backends.device_reasons(name, torch.device(device)):
                continue
            marks = [pytest.mark.gpu] if device == "cuda" else []
            params.append(pytest.param(name, device, id=f"{name}-{device}", marks=marks))
    return params


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
