"""clone_linear (fused) against clone_linear_reference, on CPU and (marked) CUDA.

Tolerances
- fp64 (CPU): the fused op and an fp64 mirror of the reference (`exact`) agree to 1e-10
  relative. The reference itself casts the difference to fp32 before the mean
  (`(y - tgt).float()`), so against it the MSE and the gradients that carry the clone
  term agree to fp32 precision only: rtol 1e-5 (fp32 unit roundoff 6e-8, times the
  few-hundred-term sums in these shapes, with headroom).
- fp32 (CPU and CUDA): both paths run the same GEMMs on fp32 data (TF32 off, torch's
  default for matmul); the error is fp32 accumulation over <= 1300 terms: rtol 1e-4 of
  the tensor's norm.
- bf16 (CPU and CUDA): compared in the norm, relative to an fp64 evaluation on the same
  bf16-rounded inputs. bf16 keeps 8 significant bits (unit roundoff u = 2^-9 = 2e-3);
  every output goes through at most three roundings to bf16 (W_S, the GEMM output, the
  saved difference / merged gradient), with fp32 accumulation inside, so its relative
  norm error is below ~3u = 6e-3; we assert 1.5e-2, and also that it is within 1.5x (+1e-3)
  of the eager reference run in bf16 on the same inputs (no worse than the oracle).
"""
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

from conftest import DEVICES
from lrc_ext.ops.clone_linear import clone_linear, clone_linear_reference

ROOT = Path(__file__).resolve().parents[1]

# (lead dims of x, d_T, d_S, teacher's other width): awkward on purpose.
SHAPES = [
    ((1,), 9, 5, 7),          # N = 1
    ((37,), 64, 24, 40),
    ((3, 11), 29, 13, 17),    # 3-D x, nothing a multiple of anything
    ((5,), 1280, 1200, 17),   # d_S = 1200 (LRC-1.7B)
    ((2, 1, 33), 48, 31, 130),
]
CASES = [("in", True), ("in", False), ("out", False)]  # (side, bias); no bias on the output side


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 tolerances assume true fp32 GEMMs on CUDA, whatever another test left set."""
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


def make(side, lead, d_t, d_s, other, dtype, device, bias=False, target=True, scale=1.0):
    """Teacher weight, projection, bias, student input and teacher target of one clone linear.

    side="in":  weight (other, d_T), x (..., d_S), target (..., other)
    side="out": weight (d_T, other), x (..., other), target (..., d_T)
    """
    g = torch.Generator().manual_seed(zlib.crc32(repr((side, lead, d_t, d_s, other)).encode()))

    def r(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * s).to(dtype).to(device)
    if side == "in":
        w, x, t = r(other, d_t, s=d_t ** -0.5), r(*lead, d_s), r(*lead, other)
    else:
        w, x, t = r(d_t, other, s=other ** -0.5), r(*lead, other), r(*lead, d_t)
    p = r(d_t, d_s, s=d_s ** -0.5 * scale)
    b = r(w.shape[0]) if bias else None
    return x, w, p, b, (t if target else None)


def exact(x, w, p, b, t, side):
    """The reference's math, all in fp64 (no fp32 cast of the difference)."""
    x, w, p = x.double(), w.double(), p.double()
    b = b.double() if b is not None else None
    ws = w @ p if side == "in" else p.t() @ w
    y = torch.nn.functional.linear(x, ws, b)
    if t is None:
        return y, None
    tg = t.double() if side == "in" else t.double() @ p
    return y, ((y - tg) ** 2).mean()


def run(fn, x, w, p, b, t, side, grad_all=False, dtype=None):
    """Forward + backward of loss = sum(y * c) + 3 * mse; returns outputs and gradients."""
    leaves = [x, p] + ([w, t, b] if grad_all else [])
    leaves = [v for v in leaves if v is not None]
    args = {}
    for name, v in zip("xwpbt", (x, w, p, b, t)):
        args[name] = None if v is None else v.detach().to(dtype or v.dtype).requires_grad_(
            any(v is l for l in leaves))
    y, mse = fn(args["x"], args["w"], args["p"], args["b"], args["t"], side)
    c = torch.linspace(-1, 1, y.shape[-1], dtype=torch.float64, device=y.device) if y.dim() else 1.0
    loss = (y.double() * c).sum() + (3.0 * mse.double() if mse is not None else 0.0)
    loss.backward()
    out = {"y": y.detach(), "mse": None if mse is None else mse.detach()}
    for name in "xwpbt":
        v = args[name]
        out["g" + name] = None if v is None or not v.requires_grad else v.grad
    return out


def relerr(a, e):
    a, e = a.double().cpu(), e.double().cpu()
    return ((a - e).norm() / e.norm().clamp_min(1e-300)).item()


def assert_same_keys(a, b):
    for k in a:
        assert (a[k] is None) == (b[k] is None), k


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("side, bias", CASES)
@pytest.mark.parametrize("target", [True, False])
def test_fp64_matches_reference(shape, side, bias, target):
    x, w, p, b, t = make(side, *shape, torch.float64, "cpu", bias=bias, target=target)
    ours = run(clone_linear, x, w, p, b, t, side, grad_all=True)
    ref = run(clone_linear_reference, x, w, p, b, t, side, grad_all=True)
    ex = run(exact, x, w, p, b, t, side, grad_all=True)
    assert_same_keys(ours, ref)
    assert ours["y"].shape == (*shape[0], w.shape[0] if side == "in" else p.shape[1])
    assert ours["y"].dtype == torch.float64
    if target:
        assert ours["mse"].shape == () and ours["mse"].dtype == torch.float64
    else:
        assert ours["mse"] is None
    for k, v in ours.items():
        if v is None:
            continue
        torch.testing.assert_close(v, ex[k], rtol=1e-10, atol=1e-12, msg=lambda m: f"{k} vs exact: {m}")
        torch.testing.assert_close(v, ref[k].to(v.dtype), rtol=1e-5, atol=1e-7, msg=lambda m: f"{k} vs reference: {m}")


# ----------------------------------------------------------------------------- per-row weights

def weights(lead, kind, device):
    """Row weights of x's leading shape: 0/1 (first row and every third dropped), general
    non-negative, or all zero."""
    n = 1
    for v in lead:
        n *= v
    if kind == "mask":
        w = torch.ones(n, dtype=torch.float64)
        w[::3] = 0.0
        if n > 1:
            w[-1] = 1.0  # at least one kept row
    elif kind == "general":
        w = torch.linspace(0.0, 2.5, n, dtype=torch.float64) ** 2
        w[-1] = 0.75
    else:
        w = torch.zeros(n, dtype=torch.float64)
    return w.reshape(lead).to(torch.float32).to(device)


def exact_weighted(rw):
    """fp64, from the definition: sum_r w_r sum_c (y - t')^2 / (sum_r w_r * cols), 0 if sum(w) = 0."""
    def fn(x, w, p, b, t, side):
        y, _ = exact(x, w, p, b, None, side)
        tg = t.double() if side == "in" else t.double() @ p.double()
        d2 = ((y - tg) ** 2).sum(-1)
        wr = rw.double().to(d2.device)
        den = wr.sum() * y.shape[-1]
        return y, (wr * d2).sum() / (den if den > 0 else 1.0)
    return fn


def weighted(fn, rw):
    return lambda x, w, p, b, t, side: fn(x, w, p, b, t, side, row_weight=rw)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("side, bias", CASES)
@pytest.mark.parametrize("kind", ["mask", "general", "zero"])
def test_row_weight_fp64_matches_reference(shape, side, bias, kind):
    x, w, p, b, t = make(side, *shape, torch.float64, "cpu", bias=bias)
    rw = weights(shape[0], kind, "cpu")
    ours = run(weighted(clone_linear, rw), x, w, p, b, t, side, grad_all=True)
    ref = run(weighted(clone_linear_reference, rw), x, w, p, b, t, side, grad_all=True)
    ex = run(exact_weighted(rw), x, w, p, b, t, side, grad_all=True)
    for k, v in ours.items():
        if v is None:
            continue
        torch.testing.assert_close(v, ex[k], rtol=1e-10, atol=1e-12, msg=lambda m: f"{k} vs exact: {m}")
        torch.testing.assert_close(v, ref[k].to(v.dtype), rtol=1e-5, atol=1e-7, msg=lambda m: f"{k} vs reference: {m}")
    if kind == "zero":
        assert ours["mse"].item() == 0.0
    # all-ones weights: no weights at all (to rounding: 1/cols then / N, vs 1/(N cols))
    ones = run(weighted(clone_linear, torch.ones_like(rw)), x, w, p, b, t, side, grad_all=True)
    plain = run(clone_linear, x, w, p, b, t, side, grad_all=True)
    for k, v in plain.items():
        if v is not None:
            torch.testing.assert_close(v, ones[k], rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("side, bias", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_row_weight_fp32_bf16(device, side, bias, dtype):
    for shape in SHAPES:
        x, w, p, b, t = make(side, *shape, dtype, device, bias=bias)
        rw = weights(shape[0], "mask", device)
        ours = run(weighted(clone_linear, rw), x, w, p, b, t, side, grad_all=dtype == torch.float32)
        ex = run(exact_weighted(rw), x, w, p, b, t, side, grad_all=dtype == torch.float32)
        for k, v in ours.items():
            if v is not None:
                assert relerr(v, ex[k]) < (1e-4 if dtype == torch.float32 else 1.5e-2), (shape, k, relerr(v, ex[k]))


@pytest.mark.parametrize("side", ["in", "out"])
def test_row_weight_gradcheck_and_opcheck(side):
    x, w, p, b, t = make(side, (2, 3), 5, 4, 6, torch.float64, "cpu")
    rw = weights((2, 3), "general", "cpu")
    leaves = [v.requires_grad_() for v in (x, w, p, t)]
    assert torch.autograd.gradcheck(lambda x, w, p, t: clone_linear(x, w, p, None, t, side, row_weight=rw), leaves)
    x, w, p, b, t = make(side, (6,), 8, 5, 7, torch.float32, "cpu")
    p.requires_grad_()
    torch.library.opcheck(torch.ops.lrc_ext.clone_linear.default,
                          (x, w, p, None, t, side == "out", side == "out", weights((6,), "mask", "cpu")))


def test_row_weight_bad_input():
    x, w, p, b, t = make("in", (6,), 8, 5, 7, torch.float32, "cpu")
    rw = torch.ones(6)
    for kw, match in ((dict(row_weight=rw[:-1], target=t), "argument 'row_weight' must have shape \\(6,\\)"),
                      (dict(row_weight=rw), "needs a target"),
                      (dict(row_weight=[1.0] * 6, target=t), "argument 'row_weight' must be a torch.Tensor")):
        with pytest.raises((ValueError, TypeError), match=match):
            clone_linear(x, w, p, **kw)
    with pytest.raises(ValueError, match="argument 'row_weight' has dtype float64"):
        torch.ops.lrc_ext.clone_linear(x, w, p, None, t, False, False, rw.double())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("side, bias", CASES)
def test_fp32_matches_reference(device, side, bias, cpu_gemm):
    for shape in SHAPES:
        x, w, p, b, t = make(side, *shape, torch.float32, device, bias=bias)
        ours = run(clone_linear, x, w, p, b, t, side, grad_all=True)
        ex = run(exact, x, w, p, b, t, side, grad_all=True)
        for k, v in ours.items():
            if v is not None:
                assert v.dtype == torch.float32, k
                assert relerr(v, ex[k]) < 1e-4, (shape, k, relerr(v, ex[k]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("side, bias", CASES)
def test_bf16_matches_reference(device, side, bias):
    for shape in SHAPES:
        x, w, p, b, t = make(side, *shape, torch.bfloat16, device, bias=bias)
        ours = run(clone_linear, x, w, p, b, t, side)
        ref = run(clone_linear_reference, x, w, p, b, t, side)
        ex = run(exact, x, w, p, b, t, side)
        assert ours["y"].dtype == torch.bfloat16 and ours["mse"].dtype == torch.float32
        assert ours["gx"].dtype == torch.bfloat16 and ours["gp"].dtype == torch.bfloat16
        for k, v in ours.items():
            if v is None:
                continue
            e_ours, e_ref = relerr(v, ex[k]), relerr(ref[k], ex[k])
            assert e_ours < 1.5e-2, (shape, k, e_ours)
            assert e_ours <= 1.5 * e_ref + 1e-3, (shape, k, e_ours, e_ref)


@pytest.mark.parametrize("side, bias", CASES)
def test_gradcheck_fp64(side, bias):
    x, w, p, b, t = make(side, (2, 3), 5, 4, 6, torch.float64, "cpu", bias=bias)
    leaves = [v.requires_grad_() for v in (x, w, p, b, t) if v is not None]
    if b is None:
        assert torch.autograd.gradcheck(lambda x, w, p, t: clone_linear(x, w, p, None, t, side), leaves)
    else:
        assert torch.autograd.gradcheck(lambda x, w, p, b, t: clone_linear(x, w, p, b, t, side), leaves)
    # Only the MSE, and only y (one of the two incoming gradients is None).
    assert torch.autograd.gradcheck(lambda x, p: clone_linear(x, w.detach(), p, None, t.detach(), side)[1],
                                    (x, p))
    assert torch.autograd.gradcheck(lambda x, p: clone_linear(x, w.detach(), p, None, t.detach(), side)[0],
                                    (x, p))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("side, bias", CASES)
def test_opcheck(device, side, bias):
    x, w, p, b, t = make(side, (6,), 8, 5, 7, torch.float32, device, bias=bias)
    p.requires_grad_()
    op = torch.ops.lrc_ext.clone_linear.default
    torch.library.opcheck(op, (x, w, p, b, t, side == "out", side == "out"))
    torch.library.opcheck(op, (x, w, p, b, None, side == "out", False))
    with torch.no_grad():
        y, mse, w_s, d, g_t = op(x, w, p, b, t, side == "out", side == "out")
    gy = torch.randn_like(y)
    gm = torch.tensor(0.7, device=device)
    bwd = torch.ops.lrc_ext.clone_linear_backward.default
    torch.library.opcheck(bwd, (gy, gm, x, w, p.detach(), w_s, d, g_t, side == "out", [True, True, True, bias, True]))
    torch.library.opcheck(bwd, (None, gm, x, w, p.detach(), w_s, d, g_t, side == "out", [True, False, True, False, False]),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("side", ["in", "out"])
def test_compile_fullgraph(device, side):
    """No graph break (fullgraph=True), same values and gradients as eager."""
    x, w, p, b, t = make(side, (3, 5), 12, 7, 9, torch.float32, device, bias=(side == "in"))

    def f(x, w, p, b, t):
        y, mse = clone_linear(torch.relu(x), w, p, b, t, side)
        return y.square().mean() + 0.5 * mse
    eager = run(lambda *a: (f(*a[:5]), None), x, w, p, b, t, side)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="inductor" if side == "out" else "aot_eager")
    got = run(lambda *a: (compiled(*a[:5]), None), x, w, p, b, t, side)
    for k, v in got.items():
        if v is not None:
            torch.testing.assert_close(v, eager[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("side, bias", CASES)
def test_autocast_cpu_bf16(side, bias):
    """Under autocast the fp32 inputs are cast to bf16 (as for a matmul): bf16 y, fp32 MSE,
    fp32 gradients for fp32 leaves, equal to calling the op on bf16 copies."""
    x, w, p, b, t = make(side, (4, 9), 16, 10, 12, torch.float32, "cpu", bias=bias)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = run(clone_linear, x, w, p, b, t, side)
        ref = run(clone_linear_reference, x, w, p, b, t, side)
    assert ours["y"].dtype == ref["y"].dtype == torch.bfloat16
    assert ours["mse"].dtype == ref["mse"].dtype == torch.float32
    assert ours["gx"].dtype == ours["gp"].dtype == torch.float32
    cast = [v.bfloat16() if v is not None else None for v in (x, w, p, b, t)]
    manual = run(clone_linear, *cast, side)
    for k, v in ours.items():
        if v is not None:
            assert torch.equal(v.to(manual[k].dtype), manual[k]), k
            assert relerr(v, ref[k]) < 1.5e-2, (k, relerr(v, ref[k]))
    # Compiled under autocast: same graph, no break.
    torch._dynamo.reset()
    f = torch.compile(clone_linear, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(f, x, w, p, b, t, side)
    for k, v in got.items():
        if v is not None:
            assert torch.equal(v, ours[k]), k


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device, cpu_gemm):
    side = "out"
    x, w, p, _, t = make(side, (6, 4), 10, 7, 9, torch.float32, device)
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)        # (6, 4, 9), non-contiguous
    tt = torch.cat([t, torch.zeros_like(t)], -1)[..., :10]     # same values, strided rows
    wt = w.t().contiguous().t()
    assert not xt.is_contiguous() and not tt.is_contiguous() and not wt.is_contiguous()
    a = run(clone_linear, xt, wt, p, None, tt, side)
    e = run(clone_linear, x, w, p, None, t, side)
    for k, v in a.items():
        if v is not None:
            torch.testing.assert_close(v, e[k], rtol=1e-5, atol=1e-6)
    side = "in"
    x, w, p, b, t = make(side, (5,), 8, 6, 11, torch.float32, device, bias=True)
    t2 = torch.cat([t, t], -1)[:, 3:14]
    t2.copy_(t)
    a = run(clone_linear, x, w, p, b, t2, side)
    e = run(clone_linear, x, w, p, b, t, side)
    for k, v in a.items():
        if v is not None:
            torch.testing.assert_close(v, e[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic_and_retain_graph(device):
    x, w, p, b, t = make("out", (300,), 96, 40, 70, torch.float32, device)
    p.requires_grad_()
    y, mse = clone_linear(x, w, p, None, t, "out")
    for _ in range(3):
        assert torch.equal(clone_linear(x, w, p, None, t, "out")[1], mse)
    loss = y.sum() + mse
    g1, = torch.autograd.grad(loss, p, retain_graph=True)
    g2, = torch.autograd.grad(loss, p)   # the saved difference was not modified by the first backward
    assert torch.equal(g1, g2)


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    x, w, p, b, t = make("in", (0,), 8, 5, 7, torch.float32, device, bias=True)
    y, mse = clone_linear(x, w, p, b, t, "in")
    assert y.shape == (0, 7) and torch.isnan(mse)


@pytest.mark.parametrize("shape", SHAPES[1:4])
@pytest.mark.parametrize("side, bias", CASES)
@pytest.mark.parametrize("fn", [clone_linear, clone_linear_reference], ids=["fused", "reference"])
def test_recompute_ws_fp64(shape, side, bias, fn):
    """recompute_ws (FSDP2: W_S not kept from forward to backward) gives the same outputs and
    every gradient as keeping W_S: to the last bit for the fused op (the backward forms the
    same product of the same saved tensors), to fp64 rounding for the checkpointed reference."""
    x, w, p, b, t = make(side, *shape, torch.float64, "cpu", bias=bias)
    kept = run(fn, x, w, p, b, t, side, grad_all=True)
    again = run(lambda *a: fn(*a, recompute_ws=True), x, w, p, b, t, side, grad_all=True)
    assert_same_keys(kept, again)
    for k, v in kept.items():
        if v is None:
            continue
        if fn is clone_linear:
            assert torch.equal(v, again[k]), k
        else:
            torch.testing.assert_close(again[k], v, rtol=1e-12, atol=1e-14, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("side", ["in", "out"])
def test_recompute_ws_gradcheck(side):
    x, w, p, b, t = make(side, (2, 3), 5, 4, 6, torch.float64, "cpu")
    leaves = [v.requires_grad_() for v in (x, w, p, t)]
    assert torch.autograd.gradcheck(lambda x, w, p, t: clone_linear(x, w, p, None, t, side, recompute_ws=True),
                                    leaves)


@pytest.mark.parametrize("fn", [clone_linear, clone_linear_reference], ids=["fused", "reference"])
@pytest.mark.parametrize("side", ["in", "out"])
def test_recompute_ws_keeps_no_ws(fn, side):
    """With recompute_ws nothing of W_S's shape is saved for the backward; without it, W_S is."""
    x, w, p, b, t = make(side, (16,), 48, 24, 40, torch.float32, "cpu")
    p.requires_grad_()
    x.requires_grad_()  # grad_x = g @ W_S: what W_S is kept for
    ws_shape = (w.shape[0], p.shape[1]) if side == "in" else (p.shape[1], w.shape[1])

    def saved_shapes(**kw):
        shapes = []

        def pack(v):
            shapes.append(tuple(v.shape))
            return v
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda v: v):
            fn(x, w, p, None, t, side, **kw)
        return shapes

    def has_ws(shapes):  # W_S or its transpose (F.linear saves the view it multiplies)
        return ws_shape in shapes or ws_shape[::-1] in shapes
    assert has_ws(saved_shapes())
    assert not has_ws(saved_shapes(recompute_ws=True))


@pytest.mark.parametrize("side", ["in", "out"])
def test_saves_one_activation_buffer(side):
    """Backward keeps one (N, out) buffer (the difference d, in the input dtype): neither
    y_S nor the teacher's target, unlike the reference, which keeps an fp32 (N, out) and,
    on the output side, the (N, d_T) target too."""
    n = 64
    x, w, p, b, t = make(side, (n,), 48, 24, 40, torch.bfloat16, "cpu")
    out = w.shape[0] if side == "in" else p.shape[1]
    p.requires_grad_()
    x.requires_grad_()

    def saved(fn):
        packed = []

        def pack(v):
            packed.append(v)
            return v
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda v: v):
            fn(x, w, p, None, t, side)
        seen, acts = set(), []
        for v in packed:
            key = (v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), v.dtype)
            if key in seen or v.data_ptr() in (x.data_ptr(), w.data_ptr(), p.data_ptr()):
                continue  # x, weight, proj: held by the caller anyway
            seen.add(key)
            if v.dim() == 2 and v.shape[0] == n:
                acts.append(v)
        return acts
    ours = saved(clone_linear)
    assert [tuple(v.shape) for v in ours] == [(n, out)]
    assert ours[0].dtype == torch.bfloat16
    assert all(v.data_ptr() != t.data_ptr() for v in ours)
    ref = saved(clone_linear_reference)
    assert sum(v.numel() * v.element_size() for v in ref) >= 2 * ours[0].numel() * ours[0].element_size()


BAD = [
    (lambda a: clone_linear(a["x"], a["w"], a["p"], side="up"), "argument 'side' must be 'in' or 'out'"),
    (lambda a: clone_linear(a["x"][:, :-1], a["w"], a["p"]), "argument 'x' must have last dimension 5"),
    (lambda a: clone_linear(a["x"], a["w"], a["p"][:-1]), "argument 'proj' must have weight.shape\\[1\\] = 8 rows"),
    (lambda a: clone_linear(a["x"], a["w"], a["p"], side="out"), "argument 'proj' must have weight.shape\\[0\\] = 7"),
    (lambda a: clone_linear(a["x"], a["w"], a["p"], target=a["t"][:, :-1]), "argument 'target' must have shape \\(6, 7\\)"),
    (lambda a: clone_linear(a["x"], a["w"], a["p"], target=a["t"][:-1]), "argument 'target' must have shape"),
    (lambda a: clone_linear(a["x"], a["w"], a["p"], bias=a["b"][:-1]), "argument 'bias' must have shape \\(7,\\)"),
    (lambda a: clone_linear(a["x"], a["w"], a["p"], bias=a["b"].view(1, -1)), "argument 'bias' must be 1-D"),
    (lambda a: clone_linear(a["x"], a["w"], a["p"], bias=a["b"], side="out"), "argument 'bias' is only supported"),
    (lambda a: clone_linear(a["x"], a["w"].double(), a["p"]), "argument 'weight' has dtype float64 but 'x' has float32"),
    (lambda a: clone_linear(a["x"], a["w"], a["p"].bfloat16()), "argument 'proj' has dtype bfloat16"),
    (lambda a: clone_linear(a["x"], a["w"], a["p"], target=a["t"].half()), "argument 'target' has dtype float16"),
    (lambda a: clone_linear(a["x"].int(), a["w"].int(), a["p"].int()), "argument 'x' has dtype int32"),
    (lambda a: clone_linear(a["x"], a["w"][0], a["p"]), "argument 'weight' must be 2-D"),
    (lambda a: clone_linear(a["x"][0, 0], a["w"], a["p"]), "argument 'x' must have at least 1 dimension"),
    (lambda a: clone_linear(a["x"], [[1.0]], a["p"]), "argument 'weight' must be a torch.Tensor"),
    (lambda a: torch.ops.lrc_ext.clone_linear(a["x"][None], a["w"], a["p"], None, None, False, False),
     "argument 'x' must be 2-D"),
]


@pytest.mark.parametrize("bad, match", BAD)
def test_bad_input(bad, match):
    x, w, p, b, t = make("in", (6,), 8, 5, 7, torch.float32, "cpu", bias=True)
    with pytest.raises((ValueError, TypeError), match=match):
        bad(dict(x=x, w=w, p=p, b=b, t=t))


@pytest.mark.cuda
def test_mixed_devices_error():
    x, w, p, b, t = make("in", (6,), 8, 5, 7, torch.float32, "cpu", bias=True)
    with pytest.raises(ValueError, match="argument 'proj' is on cuda:0, expected cpu"):
        clone_linear(x, w, p.cuda(), b, t)
    with pytest.raises(ValueError, match="argument 'target' is on cpu, expected cuda:0"):
        clone_linear(x.cuda(), w.cuda(), p.cuda(), b.cuda(), t)


@pytest.mark.cuda
def test_cuda_rejects_fp64():
    x, w, p, b, t = make("in", (6,), 8, 5, 7, torch.float64, "cuda")
    with pytest.raises(ValueError, match="argument 'x' has dtype float64"):
        clone_linear(x, w, p, b, t)


def test_bench_quick_runs(tmp_path):
    """CI smoke of bench/bench_clone_linear.py (--no-compile keeps it a few seconds; the
    compiled variant is covered by test_compile_fullgraph)."""
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_clone_linear.py"), "--quick", "--device", "cpu",
                        "--no-compile", "--json", str(out)], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "ours" in r.stdout and out.exists()
