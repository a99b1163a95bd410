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


@pytest.fixture(params=["mkl", "onednn"])
def cpu_gemm(request, monkeypatch):
    """fp32 CPU GEMMs on each backend of lrc_ext.ops._cpu_gemm; "onednn" sends every product
    of the linear form there (no size threshold), so tiny shapes exercise that path too."""
    from lrc_ext.ops import _cpu_gemm
    if request.param == "onednn":
        if not _cpu_gemm.onednn_available():
            pytest.skip("this torch has no oneDNN linear op")
        monkeypatch.setattr(_cpu_gemm, "MIN_MACS", 0)
    monkeypatch.setattr(_cpu_gemm, "_backend", request.param)
    _cpu_gemm._resolved.cache_clear()
    yield request.param
    _cpu_gemm._resolved.cache_clear()  # the fixture's monkeypatch restores _backend next
