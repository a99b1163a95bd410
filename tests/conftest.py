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


@pytest.fixture(scope="session", autouse=True)
def _store_cache(tmp_path_factory):
    """Raw --data is prepared into $LRC_STORE_CACHE: a temporary one for the whole session, so
    neither in-process runs nor trainer subprocesses (their env copies os.environ) write to
    the user's ~/.cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LRC_STORE_CACHE", str(tmp_path_factory.mktemp("store_cache")))
        yield
