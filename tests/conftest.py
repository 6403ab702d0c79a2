"""Test set-up: without CUDA, run the Triton kernels in the interpreter on CPU tensors.

``TRITON_INTERPRET`` must be set before ``triton`` is first imported, hence here, at collection start.
"""

import os

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture
def device() -> str:
    """``cuda`` when available (kernels compiled for real), else ``cpu`` (interpreter / fallback)."""
    return DEVICE
