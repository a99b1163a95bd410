"""lrc_ext.ops._cpu_gemm: fp32 linears on oneDNN or MKL, against an fp64 product.

Tolerance: both backends accumulate in fp32 over K <= 1280 terms; 2e-6 of the result's norm
(fp32 unit roundoff 6e-8 times sqrt(K)-ish growth, with headroom), the same bound for both.
"""
import pytest
import torch
import torch.nn.functional as F

from lrc_ext.ops import _cpu_gemm

pytestmark = pytest.mark.skipif(not _cpu_gemm.onednn_available(), reason="this torch has no oneDNN linear op")

# (M, K, N): N = 1, K = 1, d_S = 1200, nothing a multiple of a tile
SHAPES = [(1, 1, 1), (37, 29, 1), (5, 1200, 1280), (300, 1200, 37), (129, 96, 1000)]


# Every fp32 product of the linear form to oneDNN, whatever its size or the CPU's vendor
# (conftest's cpu_gemm fixture).
onednn = pytest.mark.parametrize("cpu_gemm", ["onednn"], indirect=True)


@pytest.fixture
def vendor(monkeypatch):
    """Set the CPU vendor and the backend as the environment would; returns a setter."""
    def set_(name, backend="auto", available=True):
        monkeypatch.setattr(_cpu_gemm, "cpu_vendor", lambda: name)
        monkeypatch.setattr(_cpu_gemm, "onednn_available", lambda: available)
        monkeypatch.setattr(_cpu_gemm, "_backend", backend)
        _cpu_gemm._resolved.cache_clear()
    yield set_
    _cpu_gemm._resolved.cache_clear()


def relerr(a, e):
    return ((a.double() - e).norm() / e.norm().clamp_min(1e-30)).item()


def operands(m, k, n, layout):
    g = torch.Generator().manual_seed(m * 7919 + k * 31 + n)
    a, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    if layout == "transposed":  # both as transposed views of contiguous (K, M) / (K, N) tensors
        a, b = a.t().contiguous().t(), b.t().contiguous().t()
    elif layout == "strided":  # rows with a gap: a slice of a wider tensor
        a = torch.cat([a, torch.zeros(m, 3)], 1)[:, :k]
        b = torch.cat([b, torch.zeros(n, 5)], 1)[:, :k]
    return a, b


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
@pytest.mark.parametrize("bias", [False, True])
@onednn
def test_linear_matches_fp64(cpu_gemm, shape, layout, bias):
    m, k, n = shape
    a, b = operands(m, k, n, layout)
    c = torch.randn(n) if bias else None
    assert _cpu_gemm.takes(a, b, c)  # the oneDNN path, not the fallback
    got = _cpu_gemm.linear(a, b, c)
    exact = a.double() @ b.double().t() + (c.double() if bias else 0)
    assert got.shape == (m, n) and got.dtype == torch.float32
    assert relerr(got, exact) < 2e-6
    assert torch.equal(got, _cpu_gemm.linear(a, b, c))  # deterministic
    ref = torch.addmm(c, a, b.t()) if bias else a @ b.t()  # MKL's, as close as ours
    assert relerr(ref, exact) < 2e-6


@onednn
def test_empty_and_k_zero(cpu_gemm):
    assert _cpu_gemm.linear(torch.randn(0, 8), torch.randn(5, 8)).shape == (0, 5)
    out = _cpu_gemm.linear(torch.randn(4, 0), torch.randn(5, 0), torch.arange(5.0))
    assert torch.equal(out, torch.arange(5.0).expand(4, 5))


@onednn
def test_what_stays_with_torch(cpu_gemm):
    """Only fp32 2-D CPU products with no autograd inputs, positive strides and a plain bias go
    to oneDNN; the rest falls back to torch's GEMM with the same result."""
    a, b = torch.randn(6, 8), torch.randn(5, 8)
    assert _cpu_gemm.takes(a, b)
    rejected = {
        "fp64": (a.double(), b.double(), None),
        "bf16": (a.bfloat16(), b.bfloat16(), None),
        "mixed": (a, b.double(), None),
        "3-D": (a[None], b, None),
        "K mismatch": (a[:, :7], b, None),
        "zero stride": (a[:1].expand(6, 8), b, None),
        "bias shape": (a, b, torch.randn(4)),
        "bias dtype": (a, b, torch.randn(5, dtype=torch.float64)),
        "bias strided": (a, b, torch.randn(10)[::2]),
        "requires grad": (a.clone().requires_grad_(), b, None),
    }
    for what, (x, w, c) in rejected.items():
        assert not _cpu_gemm.takes(x, w, c), what
    for what in ("fp64", "zero stride", "bias strided"):
        x, w, c = rejected[what]
        exp = torch.addmm(c, x, w.t()) if c is not None else x @ w.t()
        torch.testing.assert_close(_cpu_gemm.linear(x, w, c), exp)
    x = a.clone().requires_grad_()
    with torch.no_grad():
        assert _cpu_gemm.takes(x, b)  # no graph to build: oneDNN may take it
    y = _cpu_gemm.linear(x, b)  # with grad: torch's GEMM, differentiable
    y.sum().backward()
    torch.testing.assert_close(x.grad, b.sum(0).expand(6, 8))


def test_size_threshold(vendor):
    vendor("AuthenticAMD")
    k = 64
    small, large = _cpu_gemm.MIN_MACS // (k * k) - 1, _cpu_gemm.MIN_MACS // (k * k)
    b = torch.randn(k, k)
    assert not _cpu_gemm.takes(torch.randn(small, k), b)
    assert _cpu_gemm.takes(torch.randn(large, k), b)


def test_auto_backend_by_vendor(vendor):
    a, b = torch.randn(2048, 128), torch.randn(256, 128)  # above the size threshold
    vendor("AuthenticAMD")
    assert _cpu_gemm.backend() == "onednn" and _cpu_gemm.takes(a, b)
    assert "oneDNN" in _cpu_gemm.describe() and "AuthenticAMD" in _cpu_gemm.describe()
    vendor("GenuineIntel")
    assert _cpu_gemm.backend() == "mkl" and not _cpu_gemm.takes(a, b)
    assert "on MKL" in _cpu_gemm.describe()
    vendor("")  # no /proc/cpuinfo
    assert _cpu_gemm.backend() == "mkl"
    vendor("GenuineIntel", backend="onednn")  # forced
    assert _cpu_gemm.backend() == "onednn" and "onednn asked for" in _cpu_gemm.describe()
    vendor("AuthenticAMD", backend="mkl")
    assert _cpu_gemm.backend() == "mkl" and not _cpu_gemm.takes(a, b)


def test_without_onednn_op_falls_back_to_mkl(vendor):
    for backend in ("auto", "onednn"):
        vendor("AuthenticAMD", backend=backend, available=False)
        assert _cpu_gemm.backend() == "mkl"
        assert "lacks oneDNN's linear op" in _cpu_gemm.describe()
        a, b = torch.randn(2048, 128), torch.randn(256, 128)
        assert not _cpu_gemm.takes(a, b)
        torch.testing.assert_close(_cpu_gemm.linear(a, b), a @ b.t())


def test_bad_backend_names(vendor):
    with pytest.raises(ValueError, match=r"must be one of \['auto', 'mkl', 'onednn'\], got 'blas'"):
        _cpu_gemm.set_backend("blas")
    vendor("AuthenticAMD", backend="MKL")  # as a bad LRC_CPU_GEMM leaves it
    with pytest.raises(ValueError, match="LRC_CPU_GEMM must be one of"):
        _cpu_gemm.backend()


def test_set_backend(monkeypatch):
    monkeypatch.setattr(_cpu_gemm, "_backend", _cpu_gemm._backend)  # restored afterwards
    _cpu_gemm.set_backend("mkl")
    assert _cpu_gemm.backend() == "mkl"
    _cpu_gemm.set_backend("onednn")
    assert _cpu_gemm.backend() == "onednn"
    _cpu_gemm._resolved.cache_clear()


@onednn
def test_teacher_linears_route_no_grad_linears(cpu_gemm, monkeypatch):
    calls = []
    real = _cpu_gemm.linear
    monkeypatch.setattr(_cpu_gemm, "linear", lambda *a: calls.append(a[0].shape) or real(*a))
    lin = torch.nn.Linear(24, 40)
    x = torch.randn(3, 7, 24)
    with torch.no_grad():
        exp = lin(x)
        with _cpu_gemm.teacher_linears(x):
            got = lin(x)
            got_nobias = F.linear(x, lin.weight)
            got_kw = F.linear(x, lin.weight, bias=lin.bias)
    assert calls == [(21, 24)] * 3
    assert got.shape == exp.shape
    torch.testing.assert_close(got, exp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_kw, exp, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_nobias, exp - lin.bias, rtol=1e-5, atol=1e-5)
    calls.clear()
    with _cpu_gemm.teacher_linears(x):  # grad on: autograd's own linear
        y = lin(x)
    y.sum().backward()
    assert calls == [] and lin.weight.grad is not None


def test_teacher_linears_noop_on_mkl(vendor):
    x = torch.randn(2, 3)
    vendor("GenuineIntel")
    assert not isinstance(_cpu_gemm.teacher_linears(x), _cpu_gemm._Linears)
    vendor("AuthenticAMD")
    assert isinstance(_cpu_gemm.teacher_linears(x), _cpu_gemm._Linears)
    # a bf16 teacher (autocast runs) or fp64: no hook on every torch call of the layer
    for other in (x.bfloat16(), x.double()):
        assert not isinstance(_cpu_gemm.teacher_linears(other), _cpu_gemm._Linears)


@onednn
def test_ops_take_onednn(cpu_gemm, monkeypatch):
    """The fused ops' forward and input-gradient products and the head's logits go through
    linear (and so to oneDNN here); their values are checked in the ops' own tests, run
    with the cpu_gemm fixture on both backends."""
    from lrc_ext.ops.clone_linear import clone_linear
    from lrc_ext.ops.distill_head import distill_head
    taken = []
    real = _cpu_gemm.linear
    monkeypatch.setattr(_cpu_gemm, "linear", lambda a, b, c=None: taken.append(_cpu_gemm.takes(a, b, c))
                        or real(a, b, c))
    x = torch.randn(9, 12, requires_grad=True)
    w, p = torch.randn(20, 16), torch.randn(16, 12, requires_grad=True)
    y, mse = clone_linear(x, w, p, target=torch.randn(9, 20), side="in")
    (y.sum() + mse).backward()
    assert taken and all(taken)
    taken.clear()
    h = torch.randn(7, 12, requires_grad=True)
    lm, kl = distill_head(h, torch.randn(7, 16), torch.randn(50, 16), p, torch.randint(0, 50, (7,)))
    (lm + kl).backward()
    assert len(taken) >= 2 and all(taken)  # the student's and the teacher's logits
