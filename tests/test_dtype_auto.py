"""--dtype auto: bf16 autocast on CPUs with native bf16 matmul that measures faster than fp32,
fp32 elsewhere (the CPU's flags and the matmul probe are mocked both ways), and the plan line's
reason."""
from __future__ import annotations

import math

import torch

from lrc_ext import config, train


def _resolve(monkeypatch, flags, dtype="auto", speedup=1.6):
    monkeypatch.setattr(train, "cpu_flags", lambda: set(flags))
    monkeypatch.setattr(train, "bf16_matmul_speedup", lambda: speedup)
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


def test_auto_fp32_where_bf16_measures_slow(monkeypatch):
    # the flag is there but torch's bf16 matmul is emulated (a masked VM, a build without the path)
    device, dtype, amp, why = _resolve(monkeypatch, ["avx512_bf16"], speedup=0.01)
    assert dtype == "float32" and "avx512_bf16" in why and "0.01x" in why
    with amp:
        assert not torch.is_autocast_enabled("cpu")


def test_probe_runs_without_flags_only_when_needed(monkeypatch):
    calls = []
    monkeypatch.setattr(train, "cpu_flags", lambda: {"avx2"})
    monkeypatch.setattr(train, "bf16_matmul_speedup", lambda: calls.append(1) or 2.0)
    assert train.auto_dtype(torch.device("cpu"))[0] == "float32" and not calls


def test_bf16_matmul_speedup_measures(monkeypatch):
    """fp32's side runs on the backend the run's fp32 linears take (lrc_ext.ops._cpu_gemm)."""
    from lrc_ext.ops import _cpu_gemm
    calls = []
    real = _cpu_gemm.linear
    monkeypatch.setattr(_cpu_gemm, "linear", lambda a, b: calls.append((a.dtype, a.shape, b.shape)) or real(a, b))
    s = train.bf16_matmul_speedup(m=32, k=64, n=48, reps=1)
    assert math.isfinite(s) and s > 0
    assert calls == [(torch.float32, (32, 64), (48, 64))] * 2  # warm-up and one timed turn


def test_ranks_agree_on_auto_dtype(monkeypatch):
    """bf16 stands only where every rank chose it (all_reduce MIN of the choice)."""
    class Par:
        world = 2
    monkeypatch.setattr(train.dist, "is_initialized", lambda: True)

    def reduce_to(v):
        def all_reduce(t, op):
            assert op == train.dist.ReduceOp.MIN
            t.fill_(v)
        return all_reduce
    cfg = config.TrainConfig(device="cpu", dtype="auto")
    monkeypatch.setattr(train.dist, "all_reduce", reduce_to(0))
    dtype, why = train.agree_dtype(cfg, "bfloat16", "auto: x", Par())
    assert dtype == "float32" and "another rank" in why
    monkeypatch.setattr(train.dist, "all_reduce", reduce_to(1))
    assert train.agree_dtype(cfg, "bfloat16", "auto: x", Par())[0] == "bfloat16"
    cfg = config.TrainConfig(device="cpu", dtype="bfloat16")  # an explicit dtype is never overruled
    monkeypatch.setattr(train.dist, "all_reduce", reduce_to(0))
    assert train.agree_dtype(cfg, "bfloat16", "--dtype", Par())[0] == "bfloat16"


def test_explicit_dtype_wins(monkeypatch):
    assert _resolve(monkeypatch, ["avx512_bf16"], "float32")[1] == "float32"
    assert _resolve(monkeypatch, [], "bfloat16")[1] == "bfloat16"


def test_cpu_flags_reads_proc_cpuinfo(tmp_path, monkeypatch):
    f = tmp_path / "cpuinfo"
    f.write_text("processor\t: 0\nflags\t\t: fpu avx512_bf16 sse\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda p, *a, **k: real_open(f if p == "/proc/cpuinfo" else p, *a, **k))
    assert train.cpu_flags() == {"fpu", "avx512_bf16", "sse"}
