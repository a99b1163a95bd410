"""distill_head (fused, chunked LM-head KL + CE) against distill_head_reference.

Oracle: distill_head_reference, the plain PyTorch expression with full N x V logits,
evaluated in fp64 on the same (already rounded) inputs. Tolerances:

- fp64 (CPU): both sides are exact to ~1e-15; we allow 1e-9 relative.
- fp32, bf16, fp16: both implementations round the logits to the input dtype and run
  their GEMMs in it (for bf16, 8 bits of mantissa: ~|z| * 2^-9 per logit), so both are
  off the fp64 oracle by about the same amount, and that amount grows with V (the
  gradient of h_s is a sum over V of cancelling terms: 2e-4 relative in fp32 at
  V = 151936, for the reference too). We require ours to be within twice the error of
  the reference run in the same dtype, or within a floor: 2e-5 (fp32) / 1e-3 (bf16,
  fp16) for the losses, 2e-5 / 5e-3 for the gradients (relative to their largest entry).
  The fused kernel accumulates in fp32 in a fixed order (CPU: blocks of 1024 in 8 lanes,
  then double; CUDA: per-thread vectors, then a block tree); its KL, a small difference
  of O(1) terms at tau = 40, is finished in double.
- Directly-checked fp32 cases (zero weights, large logits; small V) use 1e-4 (1e-3 for
  the KL at tau = 1 with logits of std 300).
"""
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lrc_ext.ops import distill_head, distill_head_reference

# The module (lrc_ext.ops.distill_head is the function once the package is imported).
dh = importlib.import_module("lrc_ext.ops.distill_head")

from conftest import DEVICES

ROOT = Path(__file__).resolve().parents[1]
VOCABS = [1000, 49152, 128256, 151936]


def make(n, d_s, d_t, vocab, dtype=torch.float64, device="cpu", ignored=(), seed=0):
    """Inputs rounded to dtype; logits of both models have a standard deviation of ~3."""
    g = torch.Generator().manual_seed(seed)
    h_s = torch.randn(n, d_s, generator=g, dtype=torch.float64)
    h_t = torch.randn(n, d_t, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, d_t, generator=g, dtype=torch.float64) * (3.0 / d_t ** 0.5)
    p = torch.randn(d_t, d_s, generator=g, dtype=torch.float64) / d_s ** 0.5
    labels = torch.randint(0, vocab, (n,), generator=g)
    for i in ignored:
        labels[i] = -100
    cast = lambda x: x.to(dtype).to(device)  # noqa: E731
    return cast(h_s), cast(h_t), cast(w), cast(p), labels.to(device)


def run(fn, h_s, h_t, w, p, labels, up=(1.0, 1.0), **kw):
    """(lm, kl, grad h_s, grad p_head) of up[0] * lm + up[1] * kl."""
    h_s = h_s.detach().clone().requires_grad_(True)
    p = p.detach().clone().requires_grad_(True)
    lm, kl = fn(h_s, h_t, w, p, labels, **kw)
    (up[0] * lm + up[1] * kl).backward()
    return lm.detach(), kl.detach(), h_s.grad, p.grad


def oracle(h_s, h_t, w, p, labels, up=(1.0, 1.0), **kw):
    kw.pop("chunk_size", None)
    cpu64 = lambda x: x.detach().cpu().double()  # noqa: E731
    return run(distill_head_reference, cpu64(h_s), cpu64(h_t), cpu64(w), cpu64(p), labels.cpu(), up, **kw)


def rel_err(a, ref):
    """max |a - ref| / max |ref| (0 when both are 0)."""
    a, ref = a.detach().cpu().double(), ref.detach().cpu().double()
    scale = ref.abs().max().item()
    diff = (a - ref).abs().max().item()
    return diff / scale if scale > 0 else diff


def assert_matches(got, ref, loss_rtol, grad_rtol, what=""):
    names = ("lm", "kl", "grad_h_s", "grad_p_head")
    for name, g, r, tol in zip(names, got, ref, (loss_rtol[0], loss_rtol[1], grad_rtol, grad_rtol)):
        assert torch.isfinite(g).all(), f"{what} {name} not finite"
        e = rel_err(g, r)
        assert e <= tol, (f"{what} {name}: relative error {e:.3g} > {tol:.3g} "
                          f"(got {g.flatten()[:3]}, ref {r.flatten()[:3]})")


# ----------------------------------------------------------------------------- fp64 oracle, all vocabularies

CASES = [
    # (n, chunk_size, ignored rows, kwargs, upstream grads)
    (1, None, (), dict(), (1.0, 1.0)),
    (5, 2, (3,), dict(batch_size=2), (0.7, 1.3)),
    (5, 3, (0,), dict(kl_reduction="token", tau_squared=True, tau=1.0), (1.0, 1.0)),
    (4, None, (), dict(kl_reduction="token", tau=40.0, lm_weight=0.3, kl_weight=2.0), (-0.5, 2.0)),
]


@pytest.fixture(params=["student", "teacher"])
def bwd_mode(request, monkeypatch):
    """Both ways of taking the gradients out of the logits gradient (see BACKWARD_GEMMS)."""
    monkeypatch.setattr(dh, "BACKWARD_GEMMS", request.param)
    return request.param


@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_fp64_matches_reference(vocab, case, bwd_mode):
    n, chunk, ignored, kw, up = CASES[case]
    x = make(n, 8, 16, vocab, ignored=ignored, seed=case)
    got = run(distill_head, *x, up=up, chunk_size=chunk, **kw)
    ref = oracle(*x, up=up, **kw)
    assert got[0].dtype == torch.float64 and got[1].dtype == torch.float64
    assert got[2].dtype == torch.float64 and got[3].dtype == torch.float64
    assert_matches(got, ref, (1e-9, 1e-9), 1e-9, f"V={vocab} case={case}")
    assert dh.last_plan["backward_gemms"] == bwd_mode


# Floors of the comparison with the reference run in the same dtype (see the docstring).
FLOORS = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (1e-3, 5e-3), torch.float16: (1e-3, 5e-3)}


def check_within_reference_error(device, dtype, vocab, n, up, kw, seed=2, d=(32, 48)):
    """Ours vs the fp64 oracle is no worse than twice the same-dtype reference's own error
    (or a floor). The reference's gradient of h_s is a sum over V of cancelling terms, so
    its fp32 error grows with V (2e-4 at V = 151936): a fixed bound would be wrong either
    for V = 1000 or for V = 151936. The "teacher" backward also takes grad P through a sum
    over V (X = g @ W_T): there grad P may be as far off as the reference's grad h_s."""
    x = make(n, d[0], d[1], vocab, dtype, device, ignored=(1,) if n > 2 else (), seed=seed)
    got = run(distill_head, *x, up=up, **kw)
    mode = dh.last_plan["backward_gemms"]
    assert got[0].dtype == torch.float32 and got[2].dtype == dtype and got[3].dtype == dtype
    ref64 = oracle(*x, up=up, **kw)
    kw_ref = {k: v for k, v in kw.items() if k != "chunk_size"}
    ref_same = run(distill_head_reference, *[t.cpu() for t in x], up=up, **kw_ref)
    e_refs = [rel_err(r, r64) for r, r64 in zip(ref_same, ref64)]
    for i, name in enumerate(("lm", "kl", "grad_h_s", "grad_p_head")):
        floor = FLOORS[dtype][0 if i < 2 else 1]
        e_ours, e_ref = rel_err(got[i], ref64[i]), e_refs[i]
        bound = max(2 * e_ref, floor)
        if i == 3 and mode == "teacher":
            # grad P = (g @ W_T).T @ h_s: a sum over V, like the reference's grad h_s = g @ W_S
            bound = max(bound, 2 * e_refs[2])
        assert torch.isfinite(got[i]).all()
        assert e_ours <= bound, f"{dtype} V={vocab} {name} ({mode}): {e_ours:.3g} vs reference {e_ref:.3g}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("vocab", VOCABS)
def test_fp32_within_reference_error(device, vocab, cpu_gemm):  # "auto" takes the "student" backward for fp32
    check_within_reference_error(device, torch.float32, vocab, 6, (1.0, 1.0),
                                 dict(tau=40.0, batch_size=3, chunk_size=4), seed=1, d=(16, 24))
    check_within_reference_error(device, torch.float32, vocab, 6, (1.5, 0.25),
                                 dict(tau=1.0, kl_reduction="token", tau_squared=True), seed=1, d=(16, 24))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [1000, 49152])
@pytest.mark.parametrize("bwd", ["student", "teacher", "teacher-split"])
def test_half_cpu_within_reference_error(dtype, vocab, bwd, monkeypatch):
    # teacher-split: the small GEMMs of the "teacher" backward in the input dtype with X as
    # hi + lo (what runs on GPUs), here on the CPU.
    monkeypatch.setattr(dh, "BACKWARD_GEMMS", bwd.split("-")[0])
    monkeypatch.setattr(dh, "SPLIT_SMALL_GEMMS", bwd.endswith("split"))
    check_within_reference_error("cpu", dtype, vocab, 5, (0.7, 1.3), dict(tau=40.0, batch_size=2, chunk_size=2))


@pytest.mark.cuda
@pytest.mark.parametrize("vocab", [1000, 1001] + VOCABS[1:])
@pytest.mark.parametrize("n", [1, 37])
def test_bf16_cuda_within_reference_error(vocab, n, bwd_mode):
    # 1001: not a multiple of the 16-byte vector width (scalar path of the kernel).
    check_within_reference_error("cuda", torch.bfloat16, vocab, n, (1.0, 1.0), dict(tau=40.0, batch_size=4))
    check_within_reference_error("cuda", torch.bfloat16, vocab, n, (0.5, 2.0),
                                 dict(tau=1.0, kl_reduction="token", tau_squared=True, chunk_size=16), seed=3)


@pytest.mark.cuda
def test_fp16_cuda_within_reference_error():
    check_within_reference_error("cuda", torch.float16, 49152, 37, (0.7, 1.3),
                                 dict(tau=40.0, batch_size=2, chunk_size=16))


# ----------------------------------------------------------------------------- edge cases

def plain(h_s, h_t, w, p, labels, up=(1.0, 1.0), tau=40.0, kl_reduction="batchmean", batch_size=None,
          tau_squared=False):
    """Independent fp64 oracle from the definitions on full logits: CE over the labelled rows
    (label != -100), KL(p_T || p_S) at tau over EVERY row; autograd for the gradients."""
    h_s = h_s.detach().cpu().double().requires_grad_(True)
    p = p.detach().cpu().double().requires_grad_(True)
    w, h_t, labels = w.detach().cpu().double(), h_t.detach().cpu().double(), labels.cpu()
    z_s, z_t = h_s @ (w @ p).t(), h_t @ w.t()
    lab = labels != -100
    ls = z_s - z_s.logsumexp(-1, keepdim=True)
    ce = -ls[lab].gather(1, labels[lab][:, None]).sum() / max(int(lab.sum()), 1)
    lps, lpt = torch.log_softmax(z_s / tau, -1), torch.log_softmax(z_t / tau, -1)
    kl = (lpt.exp() * (lpt - lps)).sum()
    kl = kl / (h_s.shape[0] if kl_reduction == "token" else (batch_size or 1)) * (tau * tau if tau_squared else 1.0)
    (up[0] * ce + up[1] * kl).backward()
    return ce.detach(), kl.detach(), h_s.grad, p.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("unlabelled", [(), (0,), (1, 3, 4, 6), tuple(range(7))], ids=["none", "first", "some", "all"])
@pytest.mark.parametrize("kw", [dict(batch_size=3), dict(kl_reduction="token", tau=2.0, tau_squared=True)],
                         ids=["batchmean", "token"])
def test_kl_over_every_row_ce_over_labelled(device, unlabelled, kw, bwd_mode):
    # chunk_size 3: chunks straddle the labelled / unlabelled boundary
    dtype = torch.float64 if device == "cpu" else torch.float32
    x = make(7, 8, 16, 1000, dtype, device, ignored=unlabelled, seed=5)
    want = plain(*x, up=(0.7, 1.3), **kw)
    tol = 1e-9 if dtype == torch.float64 else 1e-4
    assert_matches(run(distill_head, *x, up=(0.7, 1.3), chunk_size=3, **kw), want, (tol, tol), tol, "fused")
    assert_matches(oracle(*x, up=(0.7, 1.3), **kw), want, (1e-9, 1e-9), 1e-9, "reference")
    assert dh.last_plan["rows"] == 7 and dh.last_plan["labelled"] == 7 - len(unlabelled)
    if len(unlabelled) == 7:  # no label at all: the CE is 0 (no NaN), the KL is still there
        lm, kl, _, _ = run(distill_head, *x, **kw)
        assert lm.item() == 0.0 and kl.item() > 0.0


@pytest.mark.parametrize("device", DEVICES)
def test_unlabelled_rows_without_kl_count_in_nothing(device):
    dtype = torch.float64 if device == "cpu" else torch.float32
    x = make(4, 8, 16, 1000, dtype, device, ignored=range(4))
    lm, kl, gh, gp = run(distill_head, *x, up=(0.3, 0.9), kl_weight=0.0)
    assert lm.item() == 0.0 and kl.item() == 0.0
    assert torch.count_nonzero(gh) == 0 and torch.count_nonzero(gp) == 0
    assert dh.last_plan["rows"] == 0


@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device):
    dtype = torch.float64 if device == "cpu" else torch.float32
    x = make(0, 8, 16, 100, dtype, device)
    lm, kl, gh, gp = run(distill_head, *x)
    assert lm.item() == 0.0 and kl.item() == 0.0 and gh.shape == (0, 8) and torch.count_nonzero(gp) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_zero_weights_skip_work(device):
    dtype = torch.float64 if device == "cpu" else torch.float32
    tol = 1e-9 if device == "cpu" else 1e-4
    h_s, h_t, w, p, labels = make(5, 8, 16, 1000, dtype, device, ignored=(2,))
    # kl_weight = 0: the teacher is not read at all (NaNs in h_t change nothing).
    nan_t = torch.full_like(h_t, float("nan"))
    got = run(distill_head, h_s, nan_t, w, p, labels, up=(0.6, 5.0), kl_weight=0.0, chunk_size=2)
    assert got[1].item() == 0.0 and dh.last_plan["teacher"] is False
    ref = oracle(h_s, h_t, w, p, labels, up=(0.6, 5.0), kl_weight=0.0)
    assert_matches(got, ref, (tol, tol), tol, "kl_weight=0")
    # lm_weight = 0: lm is exactly 0 and the gradient is the KL's alone.
    got = run(distill_head, h_s, h_t, w, p, labels, up=(5.0, 0.6), lm_weight=0.0, batch_size=2)
    assert got[0].item() == 0.0
    ref = oracle(h_s, h_t, w, p, labels, up=(5.0, 0.6), lm_weight=0.0, batch_size=2)
    assert_matches(got, ref, (tol, 2e-4 if device != "cpu" else tol), tol, "lm_weight=0")
    # Both zero: zeros, no work.
    lm, kl, gh, gp = run(distill_head, h_s, h_t, w, p, labels, lm_weight=0.0, kl_weight=0.0)
    assert lm.item() == kl.item() == 0.0 and torch.count_nonzero(gh) == 0 and torch.count_nonzero(gp) == 0


@pytest.mark.parametrize("device", DEVICES)
def test_large_logits_stable(device):
    """Logits of std ~300: max-shifted softmaxes stay finite at tau = 1 and tau = 40."""
    dtype = torch.float64 if device == "cpu" else torch.float32
    h_s, h_t, w, p, labels = make(3, 8, 16, 1000, dtype, device)
    w = w * 100
    for tau in (1.0, 40.0):
        got = run(distill_head, h_s, h_t, w, p, labels, tau=tau, batch_size=1)
        ref = oracle(h_s, h_t, w, p, labels, tau=tau, batch_size=1)
        tol = 1e-9 if device == "cpu" else 1e-4
        assert_matches(got, ref, (tol, 10 * tol), tol, f"tau={tau}")


@pytest.mark.parametrize("device", DEVICES)
def test_chunking_changes_nothing_but_rounding(device, cpu_gemm):
    x = make(11, 16, 24, 1000, torch.float32, device, ignored=(5,))
    base = run(distill_head, *x, up=(0.7, 1.3), chunk_size=11)
    for chunk in (1, 3, 4, None):
        got = run(distill_head, *x, up=(0.7, 1.3), chunk_size=chunk)
        # The kernel's per-row values do not depend on the chunk; the logits GEMMs may round
        # differently for another number of rows.
        torch.testing.assert_close(got[0], base[0], rtol=1e-6, atol=0)
        torch.testing.assert_close(got[1], base[1], rtol=1e-5, atol=0)
        for i in (2, 3):  # gradients: to 1e-5 of their largest entry
            torch.testing.assert_close(got[i], base[i], rtol=1e-5, atol=1e-5 * base[i].abs().max().item())
    again = run(distill_head, *x, up=(0.7, 1.3), chunk_size=11)
    for a, b in zip(again, base):
        if device == "cpu":
            assert torch.equal(a, b), "not deterministic"
        else:  # the row kernel is; cuBLAS may pick another algorithm between calls
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * b.abs().max().item())


def test_no_grad_and_partial_requires_grad():
    h_s, h_t, w, p, labels = make(4, 8, 16, 500, ignored=(1,))
    with torch.no_grad():
        lm, kl = distill_head(h_s, h_t, w, p, labels)
    ref = oracle(h_s, h_t, w, p, labels)
    torch.testing.assert_close(lm, ref[0], rtol=1e-9, atol=0)
    torch.testing.assert_close(kl, ref[1], rtol=1e-9, atol=0)
    # Only p_head trainable (h_s a leaf without grad), and a tied use of p_head elsewhere.
    p2 = p.clone().requires_grad_(True)
    lm, kl = distill_head(h_s, h_t, w, p2, labels)
    (lm + kl + 3.0 * p2.sum()).backward()
    torch.testing.assert_close(p2.grad, ref[3] + 3.0, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- autograd / torch.library

@pytest.mark.parametrize("kw", [dict(tau=2.0), dict(tau=40.0, kl_reduction="token", tau_squared=True),
                                dict(tau=3.0, lm_weight=0.0), dict(kl_weight=0.0, batch_size=2)])
def test_gradcheck(kw, bwd_mode):
    h_s, h_t, w, p, labels = make(4, 3, 5, 7, ignored=(2,))
    h_s.requires_grad_(True)
    p.requires_grad_(True)
    f = lambda a, b: distill_head(a, h_t, w, b, labels, chunk_size=2, **kw)  # noqa: E731
    assert torch.autograd.gradcheck(f, (h_s, p))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    dtype = torch.float64 if device == "cpu" else torch.float32
    h_s, h_t, w, p, labels = make(5, 4, 6, 50, dtype, device, ignored=(1,))
    h_s.requires_grad_(True)
    p.requires_grad_(True)
    op = torch.ops.lrc_ext.distill_head.default
    torch.library.opcheck(op, (h_s, h_t, w, p, labels, 2.0, 1.0, 0.5, "batchmean", 2, False, 2, True, True))
    torch.library.opcheck(op, (h_s, h_t, w, p, labels, 40.0, 1.0, 1.0, "token", None, True, 0, True, False))
    torch.library.opcheck(op, (h_s.detach(), h_t, w, p.detach(), labels, 40.0, 0.0, 1.0, "token", None, False, 0,
                               False, False))
    g_h = torch.randn(5, 4, dtype=dtype, device=device)
    g_p = torch.randn(6, 4, dtype=dtype, device=device)
    one = torch.ones((), dtype=dtype, device=device)
    bwd = torch.ops.lrc_ext.distill_head_backward.default
    torch.library.opcheck(bwd, (one, one * 0.5, g_h, g_p, h_s.detach(), w, p.detach(), labels, 1.0, 0, True, True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph(device, backend):
    dtype = torch.float64 if device == "cpu" else torch.float32
    h_s, h_t, w, p, labels = make(6, 8, 12, 300, dtype, device, ignored=(0,))

    def loss(a, b):
        lm, kl = distill_head(a, h_t, w, b, labels, tau=4.0, chunk_size=4)
        return lm + 2.0 * kl  # unequal upstream grads through a compiled graph

    torch._dynamo.reset()
    compiled = torch.compile(loss, fullgraph=True, backend=backend)
    got = run(lambda a, _t, _w, b, _l: (compiled(a, b), torch.zeros((), device=device)), h_s, h_t, w, p, labels)
    ref = run(lambda a, _t, _w, b, _l: (loss(a, b), torch.zeros((), device=device)), h_s, h_t, w, p, labels)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r)


@pytest.mark.parametrize("device", DEVICES)
def test_same_loss_as_liger_if_installed(device):
    """What the benchmark compares with: Liger's fused linear JSD loss with beta = 0 is
    CE + KL(p_T || p_S) / n_valid, i.e. our lm + kl with kl_reduction="token"."""
    lk = pytest.importorskip("liger_kernel.chunked_loss")
    dtype = torch.float64 if device == "cpu" else torch.float32
    h_s, h_t, w, p, labels = make(40, 16, 24, 300, dtype, device, ignored=(3, 7))
    m = lk.LigerFusedLinearJSDLoss(weight_hard_loss=1.0, weight_soft_loss=1.0, beta=0.0, ignore_index=-100,
                                   temperature=40.0, compiled=False, chunk_size=16)
    theirs = run(lambda a, t, w_, b, y: (m(a, w_ @ b, t, w_, y), torch.zeros((), device=device)),
                 h_s, h_t, w, p, labels)
    ours = run(lambda *x: (sum(distill_head(*x, tau=40.0, kl_reduction="token")), torch.zeros((), device=device)),
               h_s, h_t, w, p, labels)
    tol = 1e-5 if device == "cpu" else 1e-4  # Liger takes its CE's log-softmax in fp32
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.to(b.dtype), b, rtol=tol, atol=tol * b.abs().max().item())


# ----------------------------------------------------------------------------- errors

def _bad_cases():
    h_s, h_t, w, p, labels = make(4, 8, 16, 100, torch.float32)
    ok = dict(h_s=h_s, h_t=h_t, w_head_t=w, p_head=p, labels=labels)

    def call(**over):
        kw = dict(ok)
        kw.update(over)
        args = [kw.pop(k) for k in ("h_s", "h_t", "w_head_t", "p_head", "labels")]
        return lambda: distill_head(*args, **kw)

    bad_lab = labels.clone()
    bad_lab[2] = 100
    neg_lab = labels.clone()
    neg_lab[0] = -5
    return [
        (call(h_s=h_s[None]), "argument 'h_s' must be 2-D"),
        (call(h_t=h_t.double()), "argument 'h_t' has dtype float64"),
        (call(h_s=h_s.int(), h_t=h_t.int(), w_head_t=w.int(), p_head=p.int()), "argument 'h_s' has dtype int32"),
        (call(p_head=p[:, :-1]), "argument 'p_head' must have shape"),
        (call(h_t=h_t[:3]), "argument 'h_t' must have shape"),
        (call(labels=labels[:3]), "argument 'labels' must have shape"),
        (call(labels=labels.int()), "argument 'labels' has dtype int32"),
        (call(labels=bad_lab), r"'labels' holds 100, outside \[0, 100\)"),
        (call(labels=neg_lab), r"'labels' holds -5, outside \[0, 100\)"),
        (call(tau=0.0), "argument 'tau' must be a positive finite number"),
        (call(tau=float("inf")), "argument 'tau' must be a positive finite number"),
        (call(lm_weight=float("nan")), "argument 'lm_weight' must be a finite number"),
        (call(kl_reduction="mean"), "kl_reduction' must be 'batchmean' or 'token'"),
        (call(batch_size=0), "argument 'batch_size' must be a positive int"),
        (call(chunk_size=0), "argument 'chunk_size' must be a positive int"),
        (call(h_s=[[1.0]]), "must be a torch.Tensor"),
    ]


@pytest.mark.parametrize("i", range(16))
def test_bad_input(i):
    fn, match = _bad_cases()[i]
    with pytest.raises((ValueError, TypeError), match=match):
        fn()


def test_reference_rejects_bad_reduction():
    with pytest.raises(ValueError, match="kl_reduction"):
        distill_head_reference(*make(2, 4, 4, 10), kl_reduction="sum")


@pytest.mark.cuda
def test_cuda_errors():
    h_s, h_t, w, p, labels = make(4, 8, 16, 100, torch.float32, "cuda")
    with pytest.raises(ValueError, match="expected cuda"):
        distill_head(h_s, h_t.cpu(), w, p, labels)
    with pytest.raises(ValueError, match="argument 'h_s' has dtype float64"):
        distill_head(h_s.double(), h_t.double(), w.double(), p.double(), labels)
    bad = labels.clone()
    bad[1] = 100
    with pytest.raises(ValueError, match="outside"):
        distill_head(h_s, h_t, w, p, bad)


# ----------------------------------------------------------------------------- memory

def test_plan_stays_far_below_n_by_v(monkeypatch):
    n, vocab = 1000, 1000
    monkeypatch.setattr(dh, "CPU_CHUNK_BYTES", 1 << 18)  # 256 KiB for both buffers
    x = make(n, 8, 16, vocab, torch.float32)
    run(distill_head, *x)
    plan = dict(dh.last_plan)
    assert plan["buffer_bytes"] <= 1 << 18
    assert plan["chunk_rows"] * plan["n_chunks"] >= n and plan["n_chunks"] == -(-n // plan["chunk_rows"])
    assert plan["buffer_bytes"] <= n * vocab * 4 / 8
    assert dh.plan_chunk(n, vocab, torch.float32, torch.device("cpu"), chunk_size=7) == 7
    assert dh.plan_chunk(n, vocab, torch.float32, torch.device("cpu"), chunk_size=10 ** 6) == n


_RSS_SCRIPT = r"""
import importlib, resource, time, torch
torch.manual_seed(0)
dh = importlib.import_module("lrc_ext.ops.distill_head")
dh.CPU_CHUNK_BYTES = 8 << 20
n, ds, dt, v = 2048, 32, 64, 16000
h_s = torch.randn(n, ds, requires_grad=True); h_t = torch.randn(n, dt)
w = torch.randn(v, dt) * 0.2; p = (torch.randn(dt, ds) * 0.1).requires_grad_(); y = torch.randint(0, v, (n,))
def peak(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
# Warm up code paths (BLAS, OpenMP pools) on a small vocabulary: this is not what we measure.
for f in (dh.distill_head, dh.distill_head_reference):
    lm, kl = f(h_s[:64], h_t[:64], w[:500], p, y[:64] % 500); (lm + kl).backward()
base = peak(); t0 = time.perf_counter()
lm, kl = dh.distill_head(h_s, h_t, w, p, y); (lm + kl).backward()
ours = peak() - base; t1 = time.perf_counter()
base2 = peak()
lm2, kl2 = dh.distill_head_reference(h_s, h_t, w, p, y); (lm2 + kl2).backward()
ref = peak() - base2; t2 = time.perf_counter()
print(ours, ref, n * v * 4, abs(lm.item() - lm2.item()) / lm2.item(), t1 - t0, t2 - t1)
"""


def test_peak_memory_cpu():
    """Peak RSS of fused vs reference (fresh process): far below one N x V fp32 tensor."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    ours, ref, nv4, lm_err, _t_ours, _t_ref = map(float, out.stdout.split())
    assert lm_err < 1e-5
    assert ours < nv4 / 4, f"fused peak {ours / 2**20:.0f} MiB vs one N x V fp32 tensor {nv4 / 2**20:.0f} MiB"
    assert ref > nv4, "the reference should hold at least one N x V tensor (sanity check of the measurement)"


@pytest.mark.cuda
def test_peak_memory_cuda(monkeypatch):
    n, vocab = 8192, 128256
    h_s, h_t, w, p, labels = make(n, 256, 512, vocab, torch.bfloat16, "cuda")
    nv4 = n * vocab * 4  # one N x V fp32 tensor: 4.2 GB

    def peak(fn):
        a, b = h_s.clone().requires_grad_(), p.clone().requires_grad_()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        lm, kl = fn(a, h_t, w, b, labels)
        (lm + kl).backward()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base

    ours = peak(distill_head)  # default budget: 1 GiB of logits buffers
    assert dh.last_plan["buffer_bytes"] <= dh.CUDA_CHUNK_BYTES
    assert ours < nv4 / 2, f"fused peak {ours / 2**20:.0f} MiB, one N x V fp32 {nv4 / 2**20:.0f} MiB"
    monkeypatch.setenv("LRC_DISTILL_HEAD_CHUNK_MB", "128")
    small = peak(distill_head)
    assert dh.last_plan["buffer_bytes"] <= 128 << 20
    assert small < nv4 / 12, f"fused peak with 128 MiB of buffers: {small / 2**20:.0f} MiB"
    ref = peak(distill_head_reference)
    assert ref > 5 * ours, f"reference {ref / 2**20:.0f} MiB vs fused {ours / 2**20:.0f} MiB"


# ----------------------------------------------------------------------------- benchmark smoke test

def test_bench_quick(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_distill_head.py"), "--quick", "--json", str(out)],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    data = json.loads(out.read_text())
    rows = {row["impl"]: row for row in data["rows"]}
    assert rows["fused"]["status"] == "ok" and rows["eager"]["status"] == "ok"
    assert rows["fused"]["loss_rel_diff_vs_eager"] < 1e-5
    assert rows["fused"]["peak_bytes"] < rows["eager"]["peak_bytes"]


@pytest.mark.parametrize("m", [1, 3, 7, 9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("accumulate", [False, True])
def test_cpu_gemm_long_k(m, dtype, accumulate, monkeypatch):
    """The head's CPU GEMMs over the vocabulary: a few-row chunk is as accurate as a full one
    (fp32 out; a cancelling logits gradient, as g is), and half inputs are cast a block at a
    time (blocks forced small here) with the same result as one fp32 GEMM."""
    monkeypatch.setattr(dh, "CPU_CAST_BLOCK_BYTES", 1 << 16)
    g0 = torch.Generator().manual_seed(m)
    k, n = 50_000, 24
    p = torch.softmax(torch.randn(m, k, generator=g0) / 40, 1)
    a = (p - torch.softmax(torch.randn(m, k, generator=g0) / 40, 1)).to(dtype)
    b = (torch.randn(k, n, generator=g0) * 0.02).to(dtype)
    out0 = torch.randn(m, n, generator=g0) * 1e-6
    out = out0.clone()
    dh._gemm(out, a, b, 0.5, accumulate=accumulate)
    exact = (out0.double() if accumulate else 0.0) + 0.5 * (a.double() @ b.double())
    bound = 1e-6 if m < dh.CPU_SMALL_M else 1e-5  # fp64-accumulated / BLAS fp32 of >= 8 rows
    assert rel_err(out, exact) < bound, (m, dtype, rel_err(out, exact))
