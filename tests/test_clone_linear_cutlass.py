"""clone_linear's CUTLASS sm90 path: which call takes it (CPU, capability mocked), the
compiled entry points' argument checks (CPU, when built), and (marked cuda, H100/H200) the
kernels against the fp64 evaluation of the reference, every gradient, and determinism.

Tolerances (CUDA): as the bf16 test in test_clone_linear.py, for bf16 and fp16 alike: the
relative norm error against the fp64 evaluation (`exact`) on the same rounded inputs is
below 1.5e-2 and within 1.5x (+1e-3) of the eager reference's error in the same dtype.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from lrc_ext import _ext
from lrc_ext.ops import _cutlass
from lrc_ext.ops.clone_linear import clone_linear, clone_linear_reference
from test_clone_linear import exact, make, relerr, run

# (lead dims of x, d_T, d_S, teacher's other width); every width a multiple of 8 so the
# fused GEMM is eligible, the token count a multiple of no tile.
SHAPES = [
    ((3, 67), 1536, 1200, 1024),  # N = 201, d_S = 1200, out = 1024
    ((301,), 256, 1200, 1000),    # n = 1000 / 1200: not multiples of the 128-wide tile
    ((1,), 64, 40, 72),           # one row
]
CASES = [("in", True), ("in", False), ("out", False)]
DTYPES = [torch.bfloat16, torch.float16]
DTYPE_IDS = ["bfloat16", "float16"]  # so that -k bfloat16 selects (tools/gpu_suite.sh sanitize)


def _ops(side, dtype, device="cpu", m=64, n=128, k=64, bias=False):
    """(x, w_s, bias, target, proj) as the op hands them to _cutlass.choose."""
    e = lambda *s: torch.zeros(*s, dtype=dtype, device=device)  # noqa: E731
    if side == "out":
        return e(m, 24), e(n, 24), None, e(m, k), e(k, n)
    return e(m, k), e(n, k), (e(n) if bias else None), e(m, n), e(40, k)


@pytest.fixture
def sm90(monkeypatch):
    """Pretend: built with the kernels, tensors on an sm_90 GPU, opted in."""
    monkeypatch.setattr(_cutlass, "built", lambda: True)
    monkeypatch.setattr(_cutlass, "_is_cuda", lambda t: True)
    monkeypatch.setattr(_cutlass, "_capability", lambda dev: (9, 0))
    monkeypatch.setenv(_cutlass.ENV, "1")


@pytest.mark.parametrize("side, bias", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_choose_takes_cutlass_when_eligible(sm90, side, bias, dtype):
    assert _cutlass.choose(*_ops(side, dtype, bias=bias), side == "out") == "cutlass"


@pytest.mark.parametrize("side", ["in", "out"])
def test_choose_falls_back(sm90, monkeypatch, side):
    so = side == "out"
    x, w, b, t, p = _ops(side, torch.bfloat16)
    assert _cutlass.choose(x, w, b, None, p, so) == "cublas"                      # no target: plain linear
    assert _cutlass.choose(*_ops(side, torch.float32), so) == "cublas"            # fp32
    assert _cutlass.choose(*_ops(side, torch.bfloat16, m=0), so) == "cublas"      # empty
    assert _cutlass.choose(*_ops(side, torch.bfloat16, n=100), so) == "cublas"    # n % 8
    assert _cutlass.choose(*_ops(side, torch.bfloat16, k=60), so) == "cublas"     # k % 8
    # A row stride that is not a multiple of 16 bytes, and a start that is not 16-byte aligned.
    tt = torch.zeros(t.shape[0], t.shape[1] + 3, dtype=t.dtype)[:, : t.shape[1]]
    assert _cutlass.choose(x, w, b, tt, p, so) == "cublas"
    t_off = torch.zeros(t.numel() + 1, dtype=t.dtype)[1:].view(t.shape)
    assert _cutlass.choose(x, w, b, t_off, p, so) == "cublas"
    assert _cutlass.choose(x, w, b, t.t().contiguous().t(), p, so) == "cublas"   # column-major
    monkeypatch.setattr(_cutlass, "_capability", lambda dev: (8, 0))
    assert _cutlass.choose(x, w, b, t, p, so) == "cublas"                         # sm_80
    monkeypatch.setattr(_cutlass, "_capability", lambda dev: (10, 0))
    assert _cutlass.choose(x, w, b, t, p, so) == "cublas"                         # not sm_90
    monkeypatch.setattr(_cutlass, "_capability", lambda dev: (9, 0))
    monkeypatch.delenv(_cutlass.ENV)
    assert _cutlass.choose(x, w, b, t, p, so) == "cublas"                         # not opted in
    monkeypatch.setenv(_cutlass.ENV, "1")
    monkeypatch.setattr(_cutlass, "built", lambda: False)
    assert _cutlass.choose(x, w, b, t, p, so) == "cublas"                         # not built


def test_forced_overrides_the_env(sm90, monkeypatch):
    args = _ops("in", torch.bfloat16)
    with _cutlass.forced(False):
        assert _cutlass.choose(*args, False) == "cublas"
    assert _cutlass.choose(*args, False) == "cutlass"
    monkeypatch.delenv(_cutlass.ENV)
    with _cutlass.forced(True):
        assert _cutlass.choose(*args, False) == "cutlass"
        assert _cutlass.choose(*_ops("in", torch.float32), False) == "cublas"  # eligibility still applies
    assert _cutlass.choose(*args, False) == "cublas"


def test_choose_misaligned_bias(sm90):
    x, w, _, t, p = _ops("in", torch.bfloat16)
    b = torch.zeros(w.shape[0] + 1, dtype=w.dtype)[1:]
    assert _cutlass.choose(x, w, b, t, p, False) == "cublas"


def test_cpu_tensors_take_the_cpu_path(monkeypatch):
    monkeypatch.setenv(_cutlass.ENV, "1")
    assert _cutlass.choose(*_ops("in", torch.bfloat16), False) == "cublas"
    x, w, p, b, t = make("in", (5,), 16, 8, 24, torch.bfloat16, "cpu")
    y, mse = clone_linear(x, w, p, b, t, "in")
    y_r, mse_r = clone_linear_reference(x, w, p, b, t, "in")
    assert relerr(y, y_r) < 1e-2 and abs(mse.item() - mse_r.item()) <= 1e-2 * mse_r.item()


def test_status_and_info(monkeypatch):
    monkeypatch.delenv(_cutlass.ENV, raising=False)
    s = _cutlass.status()
    r = subprocess.run([sys.executable, "-m", "lrc_ext.info", "--json"], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["cutlass_kernels"] == _cutlass.built() and info["cutlass_path"] == s
    if _cutlass.built():
        assert "opt-in" in s and _cutlass.ENV in s
        monkeypatch.setenv(_cutlass.ENV, "1")
        assert _cutlass.status().startswith("on for sm_90")
    else:
        assert s.startswith("not in this build")
    if os.environ.get("CI") and info["cuda_kernels"] and "sm_90a" in info["cuda_archs"]:
        # CI builds with nvcc and the nvidia-cutlass build requirement: the kernels must be in.
        assert info["cutlass_kernels"], "a CUDA build for sm_90a without the CUTLASS kernels"


needs_build = pytest.mark.skipif(not _cutlass.built(), reason="lrc_ext built without the CUTLASS sm90 kernels")


@needs_build
def test_compiled_checks_without_gpu():
    c = _ext._C
    bf16 = _ext.DTYPE_CODES[torch.bfloat16]
    ws = c.clone_linear_sm90_workspace(False, 201, 1000, 1200, bf16)
    assert ws >= 256 * 8 * 4  # one fp32 per (row, 128-wide N-tile), rows padded to 128
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        c.clone_linear_sm90_workspace(False, 8, 8, 8, _ext.DTYPE_CODES[torch.float32])
    with pytest.raises(ValueError, match="multiples of 8"):
        c.clone_linear_sm90_workspace(True, 8, 12, 8, bf16)
    with pytest.raises(ValueError, match="16-byte aligned"):  # misaligned x: refused before any CUDA call
        c.clone_linear_sm90_in(0x1002, 64, 0x2000, 64, 0, 0x3000, 64, 0x4000, 64, 0x5000, 64, 8, 64, 64, bf16, 1.0,
                               0x6000, 0x7000, ws, 0)


# ----------------------------------------------------------------------------- CUDA (sm_90)

@pytest.fixture
def on_sm90(monkeypatch):
    if not _cutlass.built():
        pytest.skip("lrc_ext built without the CUTLASS sm90 kernels")
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the CUTLASS kernels need an sm_90 GPU (H100/H200)")
    monkeypatch.setenv(_cutlass.ENV, "1")
    taken = []
    real = _cutlass.forward

    def spy(*a):
        r = real(*a)
        taken.append(r is not None)
        return r
    monkeypatch.setattr(_cutlass, "forward", spy)
    return taken


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("side, bias", CASES)
def test_cuda_matches_reference(on_sm90, dtype, side, bias):
    for shape in SHAPES:
        x, w, p, b, t = make(side, *shape, dtype, "cuda", bias=bias)
        on_sm90.clear()
        ours = run(clone_linear, x, w, p, b, t, side, grad_all=True)
        assert on_sm90 == [True], (shape, "the CUTLASS path was not taken")
        ref = run(clone_linear_reference, x, w, p, b, t, side, grad_all=True)
        ex = run(exact, x, w, p, b, t, side, grad_all=True)
        assert ours["y"].dtype == dtype and ours["mse"].dtype == torch.float32
        for k, v in ours.items():
            if v is None:
                continue
            assert ref[k] is not None, k
            e_ours, e_ref = relerr(v, ex[k]), relerr(ref[k], ex[k])
            assert e_ours < 1.5e-2, (shape, k, e_ours)
            assert e_ours <= 1.5 * e_ref + 1e-3, (shape, k, e_ours, e_ref)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("side, bias", CASES)
def test_cuda_deterministic(on_sm90, dtype, side, bias):
    x, w, p, b, t = make(side, *SHAPES[0], dtype, "cuda", bias=bias)
    a = run(clone_linear, x, w, p, b, t, side, grad_all=True)
    c = run(clone_linear, x, w, p, b, t, side, grad_all=True)
    assert on_sm90 == [True, True]
    for k, v in a.items():
        if v is not None:
            assert torch.equal(v, c[k]), k


@pytest.mark.cuda
def test_cuda_ineligible_falls_back(on_sm90):
    # d_S = 30: the inner width is no multiple of 8, so the cuBLAS path runs, with the same answer.
    x, w, p, b, t = make("in", (5,), 64, 30, 20, torch.bfloat16, "cuda")
    ours = run(clone_linear, x, w, p, b, t, "in")
    assert on_sm90 == [False]
    ex = run(exact, x, w, p, b, t, "in")
    assert relerr(ours["y"], ex["y"]) < 1.5e-2


@pytest.mark.cuda
def test_cuda_compiled_check_names_the_problem(on_sm90):
    x = torch.zeros(8, 64, dtype=torch.bfloat16, device="cuda")
    ws = torch.empty(_ext._C.clone_linear_sm90_workspace(False, 8, 64, 64, 2), dtype=torch.uint8, device="cuda")
    mse = torch.empty((), device="cuda")
    with pytest.raises(ValueError, match="workspace"):
        _ext._C.clone_linear_sm90_in(x.data_ptr(), 64, x.data_ptr(), 64, 0, x.data_ptr(), 64, x.data_ptr(), 64,
                                     x.data_ptr(), 64, 8, 64, 64, 2, 1.0, mse.data_ptr(), ws.data_ptr(), 16,
                                     _ext.stream(x))
