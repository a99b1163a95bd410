import pytest
import torch

from lrc_ext import _ext

HAS_CUDA = _ext.cuda_available()


def pytest_collection_modifyitems(config, items):
    # CUDA tests skip cleanly without a GPU or without compiled CUDA kernels.
    skip = pytest.mark.skip(reason="needs a CUDA GPU and lrc_ext built with CUDA kernels")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


# Parametrise a test over devices: the CPU always, CUDA marked (skipped without a GPU).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
