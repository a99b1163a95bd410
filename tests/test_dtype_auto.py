"""--dtype auto: bf16 autocast on CPUs with native bf16 matmul, fp32 elsewhere (the CPU's
flags are mocked both ways), and the plan line's reason."""
from __future__ import annotations

import torch

from lrc_ext import config, train


def _resolve(monkeypatch, flags, dtype="auto"):
    monkeypatch.setattr(train, "cpu_flags", lambda: set(flags))
    cfg = config.TrainConfig(device="cpu", dtype=dtype)
    return train.resolve_device(cfg)


def test_auto_bf16_where_the_cpu_has_it(monkeypatch):
    for flags, name in ((["avx2", "avx512_bf16"], "avx512_bf16"), (["amx_bf16", "sse"], "amx_bf16")):
        device, dtype, amp, why = _resolve(monkeypatch, flags)
        assert device.type == "cpu" and dtype == "bfloat16" and name in why
        with amp:
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_auto_fp32_without_native_bf16(monkeypatch):
    device, dtype, amp, why = _resolve(monkeypatch, ["avx2", "avx512f"])
    assert dtype == "float32" and "no native bf16" in why
    with amp:
        assert not torch.is_autocast_enabled("cpu")


def test_explicit_dtype_wins(monkeypatch):
    assert _resolve(monkeypatch, ["avx512_bf16"], "float32")[1] == "float32"
    assert _resolve(monkeypatch, [], "bfloat16")[1] == "bfloat16"


def test_cpu_flags_reads_proc_cpuinfo(tmp_path, monkeypatch):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nflags\t\t: fpu avx512_bf16 sse\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: real_open(f if p == "/proc/cpuinfo" else p, *a, **k))
    assert train.cpu_flags() == {"fpu", "avx512_bf16", "sse"}
