"""Where torch's CUDA runs but lrc_ext's kernels cannot (a driver older than the build's CUDA,
a GPU older than sm_80), the fused ops fall back to the reference on CUDA tensors with one
warning. The driver / runtime check is mocked: this runs on the CPU."""
from __future__ import annotations

import importlib
import types
import warnings

import pytest
import torch

from lrc_ext import _ext, modules

cl = importlib.import_module("lrc_ext.ops.clone_linear")


class _FakeC:
    with_cuda = True

    def __init__(self, devices, driver):
        self.devices, self.driver = devices, driver

    def build_info(self):
        return {"cuda_version": "13.0"}

    def cuda_device_count(self):
        return self.devices

    def cuda_driver_version(self):
        return self.driver


@pytest.fixture
def fake_gpu(monkeypatch):
    def make(devices=0, driver=12040, capability=(9, 0)):
        monkeypatch.setattr(_ext, "_C", _FakeC(devices, driver))
        monkeypatch.setattr(_ext, "_CUDA_STATE", None)
        monkeypatch.setattr(modules, "_FALLBACK", [None])
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=0: capability)
    return make


def test_old_driver_falls_back_with_one_warning(fake_gpu):
    fake_gpu(devices=0, driver=12040)
    with pytest.warns(RuntimeWarning, match=r"driver supports CUDA 12\.4, older than the CUDA 13\.0 runtime") as rec:
        op = modules.resolve_op("clone_linear", None)
        op2 = modules.resolve_op("clone_linear", None)
    assert len([w for w in rec if "lrc_ext" in str(w.message)]) == 1  # once, not per call
    calls = []
    op = modules.resolve_op("clone_linear", None)
    assert op.func is modules._by_device and op.args == (cl.clone_linear, cl.clone_linear_reference)
    # CUDA tensors take the reference, CPU ones the fused op
    fake = types.SimpleNamespace(is_cuda=True)
    modules._by_device(lambda *a: calls.append("fused"), lambda *a: calls.append("ref"), fake)
    modules._by_device(lambda *a: calls.append("fused"), lambda *a: calls.append("ref"), torch.zeros(1))
    assert calls == ["ref", "fused"] and op2.func is modules._by_device
    with pytest.raises(RuntimeError, match="cannot run here"):
        _ext.require_cuda("clone_linear")
    assert modules.resolve_op("clone_linear", False) is cl.clone_linear_reference


def test_old_gpu_falls_back(fake_gpu):
    fake_gpu(devices=1, capability=(7, 0))
    with pytest.warns(RuntimeWarning, match=r"compute capability 7\.0 is below 8\.0"):
        assert not _ext.cuda_kernels_ok()[0]


def test_supported_gpu_uses_the_kernels(fake_gpu):
    fake_gpu(devices=1, capability=(10, 0))  # newer than sm_90: the embedded PTX is JIT-compiled
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _ext.cuda_kernels_ok() == (True, "")
        assert modules.resolve_op("clone_linear", None) is cl.clone_linear
