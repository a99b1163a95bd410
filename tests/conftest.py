import sys
from pathlib import Path

# `python -m pytest` from the repository root puts the source tree first on sys.path;
# unless it holds a built extension, test the installed package instead.
_ROOT = Path(__file__).resolve().parent.parent
if not any((_ROOT / "lrc_ext").glob("_C*.so")):
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT]

import pytest  # noqa: E402
import torch  # noqa: E402

from lrc_ext import _ext  # noqa: E402

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
