"""W_S formed once an optimiser step (lrc_ext/step_weights.py) against the per-micro-batch
path: the same gradients, fp64, at accumulation 1, 2 and 4 (the two paths differ only in
the order of sums, so 1e-10 relative is what fp64 leaves)."""
from __future__ import annotations

import pytest
import torch

from _tiny import VOCAB, tiny_teacher
from lrc_ext.model import LowRankClone
import importlib

cl = importlib.import_module("lrc_ext.ops.clone_linear")
dh = importlib.import_module("lrc_ext.ops.distill_head")
from lrc_ext.step_weights import StepWeights


def _model(family, tie, fused, **kw):
    torch.manual_seed(0)
    teacher = tiny_teacher(family, tie=tie, dtype=torch.float64)
    model = LowRankClone(teacher, 40, fused=fused, alpha=0.3, **kw)
    if kw.get("clone_norm") == "target":
        model.measure_clone_scales_(torch.randint(0, VOCAB, (3, 9), generator=torch.Generator().manual_seed(7)))
    return model


def _batches(accum, labels=False):
    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(accum):
        ids = torch.randint(0, VOCAB, (2, 9), generator=g)
        mask = torch.ones_like(ids)
        if i % 2:
            mask[0, :3] = 0  # left padding in every other micro-batch
        lab = None
        if labels:  # a prompt without labels: its positions count in the KL, not in the CE
            lab = ids.clone()
            lab[:, :4] = -100
        out.append((ids, mask, lab))
    return out


def _grads(model, batches, step_weights: bool):
    model.zero_grad(set_to_none=True)
    sw = StepWeights(model) if step_weights else None
    losses = []
    for ids, mask, lab in batches:
        out = model(ids, attention_mask=mask, labels=lab)
        (out.loss / len(batches)).backward()
        losses.append(out.loss.detach())
    if sw is not None:
        sw.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, losses


@pytest.mark.parametrize("accum", [1, 2, 4])
@pytest.mark.parametrize("family,tie,fused,labels,kw", [
    ("llama", True, None, False, {}), ("qwen2", False, None, False, {}), ("llama", True, False, False, {}),
    # the loss options: KL over unlabelled positions, clone_norm target, clone_exclude (row weights)
    ("llama", True, None, True, {"clone_norm": "target", "clone_exclude": "first,outliers"}),
    ("qwen2", False, False, True, {"clone_exclude": "first"}),
    # Gemma-3 (scaled, tied embedding), Phi-3 (fused teacher linears read as row slices)
    ("gemma3_text", True, None, True, {"clone_exclude": "first"}), ("phi3", False, None, False, {}),
])
def test_step_weights_same_gradients(accum, family, tie, fused, labels, kw):
    model = _model(family, tie, fused, **kw)
    batches = _batches(accum, labels)
    ref, ref_losses = _grads(model, batches, step_weights=False)
    got, losses = _grads(model, batches, step_weights=True)
    assert set(got) == set(ref) and len(ref) == sum(p.requires_grad for p in model.parameters())
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-10, atol=1e-12, msg=n)
    torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses), rtol=1e-12, atol=0)
    # the step is over: the ops form their own W_S again
    assert all(getattr(m, "step_ws", None) is None for m in model.modules()) and model.step_head is None


@pytest.mark.parametrize("fused", [None, False])
def test_step_weights_buffers_reused_and_zeroed(fused):
    """Two steps in a row give the per-micro-batch gradients each time (the buffers are zeroed at
    each step's start and reused, not reallocated); the ops fill the buffers, not the leaves."""
    model = _model("llama", True, fused)
    batches = _batches(2)
    ref, _ = _grads(model, batches, step_weights=False)
    ptrs = None
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        sw = StepWeights(model)
        for ids, mask, lab in batches:
            (model(ids, attention_mask=mask, labels=lab).loss / 2).backward()
        q = model.layers[0].q
        assert q.step_ws.grad is None and model.step_head.grad is None  # all in the buffers, either path
        sw.backward()
        now = [q.step_ws_grad.data_ptr(), model.step_head_grad.data_ptr()]
        assert ptrs is None or now == ptrs
        ptrs = now
        for n, p in model.named_parameters():
            if n in ref:
                torch.testing.assert_close(p.grad, ref[n], rtol=1e-10, atol=1e-12, msg=n)


def test_step_weights_unused_weight_keeps_no_gradient():
    """A W_S no op read this step: its P gets no gradient (None, as autograd leaves an unused
    parameter), not a zero one from its untouched buffer."""
    model = _model("llama", True, None)
    ids, mask, _ = _batches(1)[0]
    sw = StepWeights(model)
    q = model.layers[0].q
    q.__dict__["step_ws"] = None  # this linear forms its own W_S: the step's goes unused
    model(ids, attention_mask=mask).loss.backward()
    grad_before = q.proj.grad.clone()
    sw.backward()
    torch.testing.assert_close(q.proj.grad, grad_before, rtol=0, atol=0)  # nothing added for the unused W_S
    assert model.layers[1].q.proj.grad is not None


def test_step_weights_cleared_on_error():
    model = _model("llama", True, None)
    sw = StepWeights(model)
    sw.close()
    assert model.layers[0].q.step_ws is None and model.step_emb is None


def _ws_case(side, seed, d_t, d_s, out_t, n):
    """fp64 (W_T, P, W_S leaf, x, target) for one clone linear on ``side``."""
    torch.manual_seed(seed)
    w = torch.randn(out_t, d_t, dtype=torch.float64)
    shape = (d_t, d_s) if side == "in" else (out_t, d_s)
    p = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    w_s = (w @ p if side == "in" else p.t() @ w).detach().requires_grad_()
    x = torch.randn(n, w_s.shape[1], dtype=torch.float64, requires_grad=True)
    tgt = torch.randn(n, out_t, dtype=torch.float64)
    return w, p, w_s, x, tgt


@pytest.mark.parametrize("side", ["in", "out"])
def test_clone_linear_ws_matches_reference(side):
    w, p, w_s, x, tgt = _ws_case(side, 2, 12, 5, 7, 6)
    b = torch.randn(w.shape[0], dtype=torch.float64) if side == "in" else None
    def exact(x_, w_, b_, t_, p_, side_):  # the reference in fp64 throughout (it returns an fp32 MSE)
        y = torch.nn.functional.linear(x_, w_, b_)
        d = y - (t_ @ p_ if side_ == "out" else t_)
        return y, (d * d).mean()

    y_ref, mse_ref = cl.clone_linear_ws_reference(x, w_s, b, tgt, p, side)
    torch.testing.assert_close(mse_ref.double(), exact(x, w_s, b, tgt, p, side)[1], rtol=1e-6, atol=0)
    grads = []
    for f in (cl.clone_linear_ws, exact):
        y, mse = f(x, w_s, b, tgt, p, side)
        (y.square().sum() + 3 * mse).backward()
        grads.append([t.grad.clone() for t in (x, w_s, p)] if side == "out" else [t.grad.clone() for t in (x, w_s)])
        for t in (x, w_s, p):
            t.grad = None
    for a, r in zip(*grads):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)
    torch.autograd.gradcheck(lambda x_, w_: cl.clone_linear_ws(x_, w_, b, tgt, p.detach(), side)[1], (x, w_s))


@pytest.mark.parametrize("side", ["in", "out"])
def test_clone_linear_ws_row_weight(side):
    """row_weight (clone_exclude's 0/1 rows, or any non-negative weights): the weighted MSE of
    the reference, and its gradients, from plain fp64 torch."""
    n = 7
    w, p, w_s, x, tgt = _ws_case(side, 6, 10, 4, 6, n)
    rw = torch.tensor([0.0, 1, 1, 0, 2.5, 1, 0.5])

    def exact(x_, w_, t_, p_):
        y = x_ @ w_.t()
        d = y - (t_ @ p_ if side == "out" else t_)
        r = rw.double()
        return y, (r[:, None] * d * d).sum() / (r.sum() * d.shape[1])

    y_ref, mse_ref = cl.clone_linear_ws_reference(x, w_s, None, tgt, p, side, row_weight=rw)
    torch.testing.assert_close(mse_ref.double(), exact(x, w_s, tgt, p)[1], rtol=1e-6, atol=0)
    grads = []
    for f in (lambda *a: cl.clone_linear_ws(*a[:2], None, *a[2:], side, row_weight=rw), exact):
        y, mse = f(x, w_s, tgt, p)
        (y.square().sum() + 3 * mse).backward()
        grads.append([t.grad.clone() for t in (x, w_s, p) if t.grad is not None])
        for t in (x, w_s, p):
            t.grad = None
    assert len(grads[0]) == len(grads[1]) == (3 if side == "out" else 2)
    for a, r in zip(*grads):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)
    # every row excluded: the mean over no rows is 0, as in clone_linear
    _, mse0 = cl.clone_linear_ws(x, w_s, None, tgt, p, side, row_weight=torch.zeros(n))
    assert float(mse0) == 0.0
    with pytest.raises(ValueError, match="row_weight"):
        cl.clone_linear_ws(x, w_s, None, tgt, p, side, row_weight=rw[:3])
    with pytest.raises(ValueError, match="needs a target"):
        cl.clone_linear_ws(x, w_s, row_weight=rw)


@pytest.mark.parametrize("side", ["in", "out"])
@pytest.mark.parametrize("fused", [True, False])
def test_clone_linear_ws_grad_acc(side, fused):
    """grad_acc: grad_W_S is added into the buffer (whatever it held), w_s gets none; every
    other gradient as without it. fp64, the fused op and the reference alike."""
    w, p, w_s, x, tgt = _ws_case(side, 7, 11, 5, 7, 13)
    f = cl.clone_linear_ws if fused else cl.clone_linear_ws_reference
    res = []
    for acc in (None, torch.randn(w_s.shape, dtype=torch.float64)):
        start = acc.clone() if acc is not None else None
        y, mse = f(x, w_s, None, tgt, p, side, grad_acc=acc)
        (y.square().sum() + 3 * mse).backward()
        gw = w_s.grad if acc is None else acc - start
        if acc is not None:
            assert w_s.grad is None
        res.append([gw.clone(), x.grad.clone()] + ([p.grad.clone()] if side == "out" else []))
        x.grad = w_s.grad = p.grad = None
    for a, r in zip(*res):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)


def test_clone_linear_ws_grad_acc_bf16_into_fp32():
    """bf16 inputs beside an fp32 buffer (autocast over fp32 masters): the buffer gets the bf16
    product, as autograd would have added it to an fp32 leaf."""
    torch.manual_seed(8)
    x = torch.randn(9, 6, dtype=torch.bfloat16, requires_grad=True)
    w_s = torch.randn(5, 6, dtype=torch.bfloat16, requires_grad=True)
    acc = torch.zeros(5, 6)
    y, _ = cl.clone_linear_ws(x, w_s, grad_acc=acc)
    y.sum().backward()
    torch.testing.assert_close(acc, (torch.ones(9, 5, dtype=torch.bfloat16).t() @ x.detach()).float(), rtol=0, atol=0)
    with pytest.raises(ValueError, match="grad_acc"):
        cl.clone_linear_ws(x, w_s, grad_acc=torch.zeros(6, 5))
    with pytest.raises(ValueError, match="grad_acc"):
        cl.clone_linear_ws(x, w_s, grad_acc=torch.zeros(5, 6, dtype=torch.int64))


def test_clone_linear_ws_bad_input():
    x, w = torch.randn(3, 4), torch.randn(5, 6)
    with pytest.raises(ValueError, match="last dimension 6"):
        cl.clone_linear_ws(x, w)
    with pytest.raises(ValueError, match="proj"):
        cl.clone_linear_ws(torch.randn(3, 6), w, target=torch.randn(3, 8), side="out")


def _head_case(seed, n, d_t, d_s, v, ignored):
    """fp64 (h_s, h_t, W_head_T, W_head_S, labels) for the head ops, the labels at `ignored` ignored."""
    torch.manual_seed(seed)
    h_s = torch.randn(n, d_s, dtype=torch.float64, requires_grad=True)
    h_t, w_t = torch.randn(n, d_t, dtype=torch.float64), torch.randn(v, d_t, dtype=torch.float64)
    w_s = torch.randn(v, d_s, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, v, (n,))
    labels[ignored] = -100
    return h_s, h_t, w_t, w_s, labels


@pytest.mark.parametrize("up", [(1.0, 1.0), (0.7, 1.9), (1.0, None), (None, 0.5)])
def test_distill_head_ws_matches_reference(up):
    h_s, h_t, w_t, w_s, labels = _head_case(3, 9, 8, 4, 30, ignored=2)
    res = []
    for f in (dh.distill_head_ws, dh.distill_head_ws_reference):
        lm, kl = f(h_s, h_t, w_t, w_s, labels, tau=2.0, batch_size=3)
        # None: that term is not in the loss (its upstream gradient never materialised)
        sum(u * t for u, t in zip(up, (lm, kl)) if u is not None).backward()
        res.append((lm.detach(), kl.detach(), h_s.grad.clone(), w_s.grad.clone()))
        h_s.grad = w_s.grad = None
    for a, r in zip(*res):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="w_head_s"):
        dh.distill_head_ws(h_s, h_t, w_t, w_s[:, :3], labels)


@pytest.mark.parametrize("up", [(1.0, 1.0), (0.7, 1.9), (None, 0.5), (0.25, None)])
@pytest.mark.parametrize("fused", [True, False])
def test_distill_head_ws_grad_acc(up, fused):
    """grad_acc: the upstream-scaled grad W_head_S is added into the buffer, w_head_s gets none."""
    h_s, h_t, w_t, w_s, labels = _head_case(9, 8, 6, 3, 23, ignored=5)
    v, d_s = w_s.shape
    f = dh.distill_head_ws if fused else dh.distill_head_ws_reference
    res = []
    for acc in (None, torch.randn(v, d_s, dtype=torch.float64)):
        start = acc.clone() if acc is not None else None
        lm, kl = f(h_s, h_t, w_t, w_s, labels, tau=2.0, batch_size=2, grad_acc=acc)
        sum(u * t for u, t in zip(up, (lm, kl)) if u is not None).backward()
        if acc is not None:
            assert w_s.grad is None
        res.append((w_s.grad.clone() if acc is None else acc - start, h_s.grad.clone()))
        h_s.grad = w_s.grad = None
    for a, r in zip(*res):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="grad_acc"):
        dh.distill_head_ws(h_s, h_t, w_t, w_s, labels, grad_acc=torch.zeros(v, d_s + 1, dtype=torch.float64))


def test_distill_head_ws_known_count_is_the_count():
    # unlabelled rows: in the KL, not in the CE; n_valid counts the labelled ones
    h_s, h_t, w_t, w_s, labels = _head_case(4, 7, 6, 4, 11, ignored=[1, 4])
    res = []
    for n_valid in (None, 5):
        lm, kl = dh.distill_head_ws(h_s, h_t, w_t, w_s, labels, tau=3.0, n_valid=n_valid)
        (lm + 2 * kl).backward()
        res.append((lm.detach(), kl.detach(), h_s.grad.clone(), w_s.grad.clone()))
        h_s.grad = w_s.grad = None
    for a, r in zip(*res):
        torch.testing.assert_close(a, r, rtol=0, atol=0)


@pytest.mark.parametrize("side", ["in", "out"])
def test_ws_ops_opcheck(side):
    torch.manual_seed(5)
    x, w_s = torch.randn(6, 5, requires_grad=True), torch.randn(4, 5, requires_grad=True)
    tgt = torch.randn(6, 7 if side == "out" else 4)
    p = torch.randn(7, 4, requires_grad=True) if side == "out" else None
    torch.library.opcheck(torch.ops.lrc_ext.clone_linear_ws.default, (x, w_s, None, tgt, p, side == "out", side == "out"))
    # the backward with a buffer: it mutates grad_acc (declared) and nothing else
    y, _, d, g_t = torch.ops.lrc_ext.clone_linear_ws(x, w_s, None, tgt, p, side == "out", side == "out")
    needs = [True, True, False, False, side == "out"]
    torch.library.opcheck(torch.ops.lrc_ext.clone_linear_ws_backward.default,
                          (torch.randn_like(y), torch.tensor(0.7), x.detach(), w_s.detach(),
                           p.detach() if p is not None else None, d.detach(), g_t.detach(), side == "out", needs,
                           torch.randn(w_s.shape)))
    h_s, h_t, w_t = torch.randn(5, 3, requires_grad=True), torch.randn(5, 4), torch.randn(9, 4)
    w_h = torch.randn(9, 3, requires_grad=True)
    labels = torch.randint(0, 9, (5,))
    torch.library.opcheck(torch.ops.lrc_ext.distill_head_ws.default,
                          (h_s, h_t, w_t, w_h, labels, 2.0, 1.0, 1.0, "batchmean", None, False, 0, True, True, -1))
