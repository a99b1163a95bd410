import json
import subprocess
import sys

import torch

import lrc_ext
from lrc_ext import _ext


def test_info_reports_build():
    r = subprocess.run([sys.executable, "-m", "lrc_ext.info", "--json"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["lrc_ext"] == lrc_ext.__version__
    assert info["torch"] == torch.__version__
    assert info["extension"] is True, info.get("extension_error")
    assert info["cuda_kernels"] == bool(_ext._C.with_cuda)
    if info["cuda_kernels"]:
        assert "sm_80" in info["cuda_archs"] and "sm_90a" in info["cuda_archs"]
        assert info["cuda_compiler"].startswith("nvcc")
    else:
        assert info["cuda_archs"] == []
    assert info["gpu_visible"] == torch.cuda.is_available()
    r2 = subprocess.run([sys.executable, "-m", "lrc_ext.info"], capture_output=True, text=True, timeout=120)
    assert r2.returncode == 0 and "cuda_kernels" in r2.stdout


def test_cuda_call_without_gpu_is_clear():
    # The compiled runtime must report zero devices, not crash, on a machine with no GPU.
    n = _ext._C.cuda_device_count()
    assert n >= 0
    if not torch.cuda.is_available():
        assert n == 0
