"""distill_head: teacher + student LM heads with KL and CE (docs/DESIGN.md, "The method" and "distill_head").

h_s: (N, d_S) student final hidden (after the student's final norm);
h_t: (N, d_T) teacher final hidden (after the teacher's final norm);
w_head_t: (V, d_T) teacher head weight; p_head: (d_T, d_S), W_head_S = w_head_t @ p_head;
labels: (N,) next-token ids, already shifted, -100 = no label (no CE there; the KL still counts).

lm = lm_weight * mean CE over the labelled tokens (label != -100)
kl = kl_weight * sum_{all N tokens, vocab} p_T (log p_T - log p_S),  p = softmax(z / tau)
     divided by batch_size ("batchmean", the authors' reduction over (B, S, V)) or by N
     ("token"); times tau^2 when tau_squared. Distillation does not depend on labels: every
     row passed is a position of the logits (the caller passes the non-padded ones).
Both are 0-dim fp32 (fp64 for fp64 inputs); no labelled token gives lm = 0, N = 0 gives 0 (no NaN).

Two implementations with one signature:

- ``distill_head_reference``: plain PyTorch with full N x V logits, the oracle.
- ``distill_head``: the fused op ``lrc_ext::distill_head``. W_head_S is formed once; the
  tokens are taken in chunks (size from N, V and free memory, or ``chunk_size``); per
  chunk the student and teacher logits come from two GEMMs into two reused (chunk, V)
  buffers in the input dtype, then one kernel over the rows (csrc/distill_head.*: C++ on
  CPU, CUDA on GPU; fp32 accumulation, max-shifted softmaxes) computes CE, KL and the
  gradient g with respect to the student logits, written in place over the student
  buffer; then the gradients leave g by GEMMs (see BACKWARD_GEMMS): either grad h_s =
  g @ W_head_S and grad W_head_S += g.T @ h_s, with grad P_head = w_head_t.T @ grad W_head_S
  at the end ("student"), or X = g @ w_head_t, grad h_s = X @ P_head, grad P_head +=
  X.T @ h_s ("teacher", the default for bf16 / fp16 when d_T <= 2 d_S: same FLOPs as the
  two student GEMMs, no V x d_S accumulator). Gradients are computed in the forward and
  only scaled in the backward, so nothing of size N x V outlives a chunk. The rows are
  ordered labelled first; the unlabelled ones run with the CE off (KL only), or are dropped
  before the GEMMs when there is no KL.

Gradient bookkeeping. The forward computes the gradient of ``lm + kl``. The backward is
exact for any pair of upstream gradients (g_lm, g_kl): when they are equal (the usual
``loss = lm + kl + ...``) it scales the saved gradient; otherwise it recomputes the
gradient of ``lm`` alone (student GEMMs only, no teacher) and returns
``g_kl * grad(lm + kl) + (g_lm - g_kl) * grad(lm)``. With lm_weight == 0 or
kl_weight == 0 only one term exists and the backward always just scales. Deciding between
the two needs the upstream values on the host: on CUDA that is one synchronisation in the
backward (and one in the forward, for the label check and the count of valid tokens).
No gradient flows to h_t or w_head_t (the teacher is frozen).

Validation: ``distill_head`` checks its Python arguments (tensor types before dispatch, the
scalars it converts: ``check_options``); the op checks the tensors its kernel reads through
raw pointers, once per call, whoever calls it.
"""
from __future__ import annotations

import contextlib
import math
import os

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _ext
from . import _cpu_gemm, _grad_acc

_OP = "distill_head"
IGNORE_INDEX = -100
_REDUCTIONS = ("batchmean", "token")

# Bytes for the chunk's logits buffers (student + teacher) when chunk_size is not given.
# CPU: a fixed budget. CUDA: CUDA_CHUNK_BYTES (env LRC_DISTILL_HEAD_CHUNK_MB overrides it),
# at most a quarter of the free memory.
CPU_CHUNK_BYTES = 64 << 20
CUDA_CHUNK_BYTES = 1 << 30

# What the last call of the fused op planned (for tests and benchmarks): rows (valid
# tokens), vocab, chunk_rows, n_chunks, buffer_bytes (the logits buffers), teacher (whether
# the teacher's logits were computed), backward_gemms ("student", "teacher" or "none").
last_plan: dict = {}


def distill_head_reference(h_s: Tensor, h_t: Tensor, w_head_t: Tensor, p_head: Tensor, labels: Tensor, *,
                           tau: float = 40.0, lm_weight: float = 1.0, kl_weight: float = 1.0,
                           kl_reduction: str = "batchmean", batch_size: int | None = None,
                           tau_squared: bool = False, w_head_s: Tensor | None = None):
    """Plain PyTorch with full N x V logits: the oracle for the fused op. ``w_head_s``: W_head_S
    given (then ``p_head`` is not read)."""
    check_options(tau=tau, lm_weight=lm_weight, kl_weight=kl_weight, kl_reduction=kl_reduction,
                  batch_size=batch_size)
    acc = _ext.acc_dtype(h_s.dtype)
    n_valid = (labels != IGNORE_INDEX).sum()
    z_s = (h_s @ (w_head_t @ p_head if w_head_s is None else w_head_s).t()).to(acc)
    z_t = (h_t @ w_head_t.t()).to(acc)
    ce = F.cross_entropy(z_s, labels, ignore_index=IGNORE_INDEX, reduction="sum") / n_valid.clamp(min=1)
    logp_s = F.log_softmax(z_s / tau, dim=-1)
    logp_t = F.log_softmax(z_t / tau, dim=-1)
    kl_sum = F.kl_div(logp_s, logp_t, log_target=True, reduction="none").sum()  # every row, labelled or not
    if kl_reduction == "batchmean":
        kl = kl_sum / (batch_size if batch_size is not None else 1)
    else:
        kl = kl_sum / max(h_s.shape[0], 1)
    if tau_squared:
        kl = kl * tau * tau
    return lm_weight * ce, kl_weight * kl


# ----------------------------------------------------------------------------- checks

def _err(msg: str) -> ValueError:
    return ValueError(f"lrc_ext.{_OP}: {msg}")


def _positive_int(name: str, v):
    if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
        raise _err(f"argument '{name}' must be a positive int or None, got {v!r}")


def check_options(*, tau: float = 1.0, lm_weight: float = 1.0, kl_weight: float = 1.0,
                  kl_reduction: str = "batchmean", batch_size: int | None = None, chunk_size: int | None = None):
    """The one check of the head's scalar options (also run by LowRankClone's constructor)."""
    if not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau <= 0:
        raise _err(f"argument 'tau' must be a positive finite number, got {tau!r}")
    for name, w in (("lm_weight", lm_weight), ("kl_weight", kl_weight)):
        if not isinstance(w, (int, float)) or not math.isfinite(w):
            raise _err(f"argument '{name}' must be a finite number, got {w!r}")
    if kl_reduction not in _REDUCTIONS:
        raise _err(f"argument 'kl_reduction' must be 'batchmean' or 'token', got {kl_reduction!r}")
    _positive_int("batch_size", batch_size)
    _positive_int("chunk_size", chunk_size)


def _check_tensors(h_s, h_t, w_head_t, p_head, labels):
    """The op's tensor contract: ranks, one dtype the kernel takes, one device, the shapes."""
    _ext.check(_OP, "h_s", h_s, ndim=2)
    _ext.check(_OP, "h_s", h_s, dtypes=_ext.dtypes_for(h_s))
    dev = h_s.device
    _ext.check(_OP, "h_t", h_t, ndim=2, dtypes=(h_s.dtype,), device=dev)
    _ext.check(_OP, "w_head_t", w_head_t, ndim=2, dtypes=(h_s.dtype,), device=dev)
    _ext.check(_OP, "p_head", p_head, ndim=2, dtypes=(h_s.dtype,), device=dev)
    _ext.check(_OP, "labels", labels, ndim=1, dtypes=(torch.int64,), device=dev)
    n, d_s = h_s.shape
    v, d_t = w_head_t.shape
    if tuple(p_head.shape) != (d_t, d_s):
        raise _err(f"argument 'p_head' must have shape (d_T, d_S) = ({d_t}, {d_s}) "
                   f"from w_head_t {tuple(w_head_t.shape)} and h_s {tuple(h_s.shape)}, got {tuple(p_head.shape)}")
    if tuple(h_t.shape) != (n, d_t):
        raise _err(f"argument 'h_t' must have shape (N, d_T) = ({n}, {d_t}), got {tuple(h_t.shape)}")
    if labels.shape[0] != n:
        raise _err(f"argument 'labels' must have shape (N,) = ({n},), got {tuple(labels.shape)}")
    if v < 1:
        raise _err(f"argument 'w_head_t' has an empty vocabulary (shape {tuple(w_head_t.shape)})")


def _label_stats(labels: Tensor, vocab: int) -> int:
    """Number of non-ignored labels; raises when one is outside [0, V). One host sync."""
    if labels.numel() == 0:
        return 0
    valid = labels != IGNORE_INDEX
    stats = torch.stack([valid.sum(), torch.where(valid, labels, 0).min(), torch.where(valid, labels, -1).max()])
    n_valid, lo, hi = stats.tolist()
    if lo < 0 or hi >= vocab:
        bad = lo if lo < 0 else hi
        raise ValueError(f"lrc_ext.{_OP}: argument 'labels' holds {bad}, outside [0, {vocab}) (V = w_head_t.shape[0]) "
                         f"and not the ignore index {IGNORE_INDEX}")
    return int(n_valid)


# ----------------------------------------------------------------------------- planning

def plan_chunk(rows: int, vocab: int, dtype: torch.dtype, device: torch.device, teacher: bool = True,
               chunk_size: int | None = None) -> int:
    """Rows per chunk: chunk_size when given, else what the logits buffers' budget allows
    (see CPU_CHUNK_BYTES / CUDA_CHUNK_BYTES), balanced so the chunks are of equal size."""
    if rows <= 0:
        return 0
    if chunk_size:
        return min(int(chunk_size), rows)
    per_row = vocab * dtype.itemsize * (2 if teacher else 1)
    device = torch.device(device)
    if device.type == "cuda":
        env = os.environ.get("LRC_DISTILL_HEAD_CHUNK_MB")
        budget = int(float(env) * (1 << 20)) if env else CUDA_CHUNK_BYTES
        # what torch's allocator has not handed out, from its host-side counters (no device call)
        free = torch.cuda.get_device_properties(device).total_memory - torch.cuda.memory_allocated(device)
        budget = min(budget, max(free, 0) // 4)
    else:
        budget = CPU_CHUNK_BYTES
    max_rows = max(1, budget // per_row)
    n_chunks = -(-rows // max_rows)
    per = -(-rows // n_chunks)
    per = min(max_rows, -(-per // 8) * 8) if per > 8 else per
    return max(1, min(per, rows))


# ----------------------------------------------------------------------------- GEMM helpers

_OUT_DTYPE_OK: dict = {}


def _cuda_out_dtype_ok(device: torch.device, dtype: torch.dtype, kind: str) -> bool:
    """Whether, here, half inputs can be multiplied into fp32 by cuBLAS directly:
    kind "addmm": torch.addmm(acc, a, b, out_dtype=float32, out=acc) accumulates in place;
    kind "mm": torch.mm(a, b, out_dtype=float32). Probed once per device and dtype."""
    key = (device.index, dtype, kind)
    if key not in _OUT_DTYPE_OK:
        ok = False
        try:
            a = torch.randn(7, 5, device=device).to(dtype)
            b = torch.randn(7, 3, device=device).to(dtype)
            c = torch.randn(5, 3, device=device)
            if kind == "addmm":
                ref = c + 0.5 * (a.float().t() @ b.float())
                torch.addmm(c, a.t(), b, beta=1.0, alpha=0.5, out_dtype=torch.float32, out=c)
            else:
                ref = a.float().t() @ b.float()
                c = torch.mm(a.t(), b, out_dtype=torch.float32)
            ok = c.dtype == torch.float32 and bool(torch.allclose(c, ref, rtol=1e-3, atol=1e-3))
        except (RuntimeError, TypeError):
            ok = False
        _OUT_DTYPE_OK[key] = ok
    return _OUT_DTYPE_OK[key]


def _gemm(out: Tensor, a: Tensor, b: Tensor, alpha: float, accumulate: bool):
    """out (fp32/fp64) = [out +] alpha * (a @ b), a and b in the input dtype: products
    accumulated in fp32 and written in fp32 (no rounding to the input dtype on the way)."""
    beta = 1.0 if accumulate else 0.0
    if not out.is_cuda:
        _gemm_cpu(out, a, b, alpha, beta)
    elif a.dtype == out.dtype:
        out.addmm_(a, b, beta=beta, alpha=alpha)
    elif _cuda_out_dtype_ok(out.device, a.dtype, "addmm"):
        torch.addmm(out, a, b, beta=beta, alpha=alpha, out_dtype=out.dtype, out=out)
    else:
        # older torch: fp32 product through a temporary (or, lacking that too, a half one)
        tmp = torch.mm(a, b, out_dtype=out.dtype) if _cuda_out_dtype_ok(out.device, a.dtype, "mm") else torch.mm(a, b)
        if accumulate:
            out.add_(tmp, alpha=alpha)
        else:
            out.copy_(tmp)
            if alpha != 1.0:
                out.mul_(alpha)


# CPU GEMMs with a long inner dimension K (the vocabulary, for grad h_s and X = g @ W_T):
# - a few rows (M < CPU_SMALL_M, e.g. the unlabelled rows' KL-only chunk): CPU BLAS may add
#   the K terms of such a GEMM in sequence (measured with torch's MKL on an AVX-512 machine,
#   K = 151,936: 1e-4 relative for M < 6, 4e-7 for M = 6), so they run as fp32 GEMMs over
#   blocks of CPU_SMALL_M_BLOCK terms whose results are summed in fp64 (2e-7 there), with no
#   copy of the operands;
# - half inputs (no fp32-output half GEMM on CPU): fp32 copies of the operands, made a block
#   at a time (at most CPU_CAST_BLOCK_BYTES), so that a V x d_T head is never copied whole.
CPU_SMALL_M, CPU_LONG_K, CPU_SMALL_M_BLOCK = 8, 4096, 512
CPU_CAST_BLOCK_BYTES = 16 << 20


def _gemm_cpu(out: Tensor, a: Tensor, b: Tensor, alpha: float, beta: float):
    """out = beta * out + alpha * (a @ b), see above."""
    m, k = a.shape
    small = m < CPU_SMALL_M and k > CPU_LONG_K and out.dtype == torch.float32
    cast = a.dtype != out.dtype or b.dtype != out.dtype
    if not (small or cast):
        out.addmm_(a, b, beta=beta, alpha=alpha)
        return
    if k == 0:
        if beta == 0.0:
            out.zero_()
        return
    per = max(1, CPU_CAST_BLOCK_BYTES // (out.element_size() * (m + b.shape[1]))) if cast else k
    acc = torch.zeros(m, b.shape[1], dtype=torch.float64) if small else None
    if small:
        per = min(per, CPU_SMALL_M_BLOCK)
    for k0 in range(0, k, per):
        k1 = min(k, k0 + per)
        a_k, b_k = a[:, k0:k1].to(out.dtype), b[k0:k1].to(out.dtype)
        if small:
            acc += torch.mm(a_k, b_k)
        else:
            out.addmm_(a_k, b_k, beta=beta if k0 == 0 else 1.0, alpha=alpha)
    if small:
        acc.mul_(alpha)
        if beta == 0.0:
            out.copy_(acc)
        else:
            out.add_(acc.to(out.dtype))


# ----------------------------------------------------------------------------- the computation

# How the gradients leave the logits gradient g (chunk x V), per chunk:
#   "student": grad h_s = g @ W_S, grad W_S += g.T @ h_s (a V x d_S fp32 accumulator), and
#              grad P = W_T.T @ grad W_S at the end: 4 N V d_S + 2 V d_T d_S FLOPs;
#   "teacher": X = g @ W_T (chunk x d_T), grad h_s = X @ P, grad P += X.T @ h_s:
#              2 N V d_T + 4 N d_T d_S FLOPs, and no V x d_S accumulator (nor its traffic).
# "auto": for bf16 / fp16 inputs the one with fewer FLOPs ("teacher" whenever d_T <= 2 d_S
# and P_head is trained; LRC: d_T = 2 d_S); "student" for fp32 / fp64 (see _backward_gemms).
# Env LRC_DISTILL_HEAD_BWD overrides BACKWARD_GEMMS.
BACKWARD_GEMMS = "auto"
# "teacher" mode's small GEMMs (X @ P, X.T @ h_s): True: on tensor cores in the input dtype,
# X split as hi + lo; False: in fp32 (fp64 for fp64). None: True on CUDA, False on CPU.
SPLIT_SMALL_GEMMS: bool | None = None


def _backward_gemms(n: int, vocab: int, d_t: int, d_s: int, need_h: bool, need_p: bool, dtype) -> str:
    mode = os.environ.get("LRC_DISTILL_HEAD_BWD") or BACKWARD_GEMMS
    if mode not in ("auto", "student", "teacher"):
        raise ValueError(f"lrc_ext.{_OP}: backward GEMMs must be 'auto', 'student' or 'teacher', got {mode!r}")
    if mode != "auto":
        return mode
    if dtype not in (torch.bfloat16, torch.float16):
        # "teacher" takes grad P through a sum over V (X = g @ W_T): in fp32 that is as
        # accurate as the reference's grad h_s (1e-4 at V = 150k), not as its grad P (1e-5).
        return "student"
    student = 2 * n * vocab * d_s * (int(need_h) + int(need_p)) + (2 * vocab * d_t * d_s if need_p else 0)
    teacher = 2 * n * vocab * d_t + 2 * n * d_t * d_s * (int(need_h) + int(need_p))
    return "teacher" if teacher <= student else "student"


def _launch_rows(zs: Tensor, zt: Tensor | None, labels: Tensor, inv_tau: float, lm_coef: float, kl_coef: float,
                 ce: Tensor | None, kl: Tensor | None, write: bool):
    rows, vocab = zs.shape
    args = (zs.data_ptr(), vocab, zt.data_ptr() if zt is not None else 0, vocab, _ext.DTYPE_CODES[zs.dtype],
            labels.data_ptr(), rows, vocab, inv_tau, lm_coef, kl_coef, IGNORE_INDEX,
            ce.data_ptr() if ce is not None else 0, kl.data_ptr() if kl is not None else 0, write)
    if zs.device.type == "cpu":
        _ext.lib(_OP).distill_head_rows_cpu(*args, torch.get_num_threads())
    else:
        _ext.require_cuda(_OP).distill_head_rows_cuda(*args, _ext.stream(zs))


def _compute(h_s: Tensor, h_t: Tensor | None, w_head_t: Tensor, p_head: Tensor, labels: Tensor, tau: float,
             lm_weight: float, kl_weight: float, kl_reduction: str, batch_size: int | None, tau_squared: bool,
             chunk_size: int, need_h: bool, need_p: bool, record: bool = True, w_s: Tensor | None = None,
             n_valid: int = -1):
    """(lm, kl, grad_h_s, grad_p_head) with the gradients of lm + kl (fp32; fp64 for fp64).
    w_s given (W_head_S formed by the caller; p_head is then that w_s): grad W_head_S in place
    of grad P_head, by the "student" GEMMs. n_valid >= 0: the caller's count of non-ignored
    labels, all of them in range (no check, no host sync)."""
    acc = _ext.acc_dtype(h_s.dtype)
    n, d_s = h_s.shape
    vocab, d_t = w_head_t.shape
    dev = h_s.device
    if n_valid < 0:
        n_valid = _label_stats(labels, vocab)  # host sync: the count sizes the chunks
    do_ce, do_kl = lm_weight != 0.0, kl_weight != 0.0 and h_t is not None
    n_rows = n if do_kl else n_valid  # rows taking part: the KL counts every row, the CE the labelled ones
    need_grad = need_h or need_p
    zero = torch.zeros((), dtype=acc, device=dev)
    g_h = torch.zeros((n, d_s) if need_h else (0,), dtype=acc, device=dev)
    # w_s given: grad W_head_S is written by the first chunk's GEMM (no V x d_S zero fill)
    g_p = (torch.empty if w_s is not None and need_p else torch.zeros)(tuple(p_head.shape) if need_p else (0,),
                                                                     dtype=acc, device=dev)
    if record:
        last_plan.clear()
        last_plan.update(rows=n_rows, labelled=n_valid, vocab=vocab, chunk_rows=0, n_chunks=0, buffer_bytes=0,
                         teacher=do_kl)
    do_ce = do_ce and n_valid > 0
    if n_rows == 0 or not (do_ce or do_kl):
        return zero, zero.clone(), g_h, g_p.zero_()
    idx, hs, lab, ht = _order_rows(h_s, h_t if do_kl else None, labels, n_valid, n_rows)

    denom = float(n_rows) if kl_reduction == "token" else float(batch_size if batch_size is not None else 1)
    kl_scale = kl_weight / denom * (tau * tau if tau_squared else 1.0)
    lm_coef = lm_weight / n_valid if do_ce else 0.0
    kl_coef = kl_scale / tau if do_kl else 0.0
    prescale = _fp16_prescale(h_s.dtype, lm_coef, kl_coef) if need_grad else 1.0

    rows = plan_chunk(n_rows, vocab, h_s.dtype, dev, do_kl, chunk_size or None)
    ws_given = w_s is not None
    w_s = w_head_t @ p_head if w_s is None else w_s  # (V, d_S), once
    # the logits: GEMMs into two reused buffers, or oneDNN's own fresh products (ops/_cpu_gemm.py)
    fresh = _cpu_gemm.takes(hs[:rows], w_s)
    zs_buf = None if fresh else torch.empty(rows, vocab, dtype=h_s.dtype, device=dev)
    zt_buf = None if fresh or not do_kl else torch.empty(rows, vocab, dtype=h_s.dtype, device=dev)
    ce_rows = torch.empty(n_valid, dtype=acc, device=dev) if do_ce else None
    kl_rows = torch.empty(n_rows, dtype=acc, device=dev) if do_kl else None
    gh_v = g_h if (need_h and idx is None) else (torch.empty(n_rows, d_s, dtype=acc, device=dev) if need_h else None)
    mode = _backward_gemms(n_rows, vocab, d_t, d_s, need_h, need_p, h_s.dtype) if need_grad else "none"
    mode = "student" if (ws_given and need_grad) else mode
    grads = _HeadGrads(mode, gh_v, g_p, w_head_t, p_head, need_h, need_p, 1.0 / prescale, rows, ws_given)
    # segments: the labelled rows (CE and KL), then the unlabelled ones (KL only, CE off)
    segs = [(a, b, ce) for a, b, ce in ((0, n_valid, do_ce), (n_valid, n_rows, False)) if b > a]
    if record:
        last_plan.update(chunk_rows=rows, n_chunks=sum(-(-(b - a) // rows) for a, b, _ in segs), backward_gemms=mode,
                         buffer_bytes=rows * vocab * h_s.dtype.itemsize * (2 if do_kl else 1))
    with torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext():
        for a, b, ce in segs:
            for r0 in range(a, b, rows):
                r1 = min(b, r0 + rows)
                zs = _logits(hs[r0:r1], w_s, zs_buf)
                zt = _logits(ht[r0:r1], w_head_t, zt_buf) if do_kl else None
                _launch_rows(zs, zt, lab[r0:r1], 1.0 / tau, lm_coef * prescale if ce else 0.0, kl_coef * prescale,
                             ce_rows[r0:r1] if ce else None, kl_rows[r0:r1] if do_kl else None, need_grad)
                grads.add(zs, hs[r0:r1], w_s, r0, r1)  # zs now holds the logits gradient g
    del zs_buf, zt_buf, w_s
    if need_h and idx is not None:
        g_h.index_copy_(0, idx, gh_v)
    grads.finish()
    lm = ce_rows.sum() * (lm_weight / n_valid) if do_ce else zero
    kl = kl_rows.sum() * kl_scale if do_kl else zero.clone()
    return lm, kl, g_h, g_p


def _logits(h: Tensor, w: Tensor, buf: Tensor | None) -> Tensor:
    """h @ w.T into the first rows of buf; buf None: a fresh product (oneDNN's)."""
    if buf is None:
        return _cpu_gemm.linear(h, w)
    return torch.mm(h, w.t(), out=buf[:h.shape[0]])


def _order_rows(h_s: Tensor, h_t: Tensor | None, labels: Tensor, n_valid: int, n_rows: int):
    """(idx, hs, lab, ht): the rows taking part, labelled first (idx None: all rows, in order).
    Unlabelled rows (KL only) get label 0, which the kernel does not read with the CE off."""
    n = h_s.shape[0]
    if n_valid == n:
        return None, h_s, labels.contiguous(), h_t
    lab_rows = labels != IGNORE_INDEX
    idx = lab_rows.nonzero().squeeze(1)
    if n_rows > n_valid:  # the KL's unlabelled rows after the labelled ones
        idx = torch.cat([idx, (~lab_rows).nonzero().squeeze(1)])
    lab = labels.index_select(0, idx)
    lab[n_valid:] = 0
    return idx, h_s.index_select(0, idx), lab, (h_t.index_select(0, idx) if h_t is not None else None)


def _fp16_prescale(dtype: torch.dtype, lm_coef: float, kl_coef: float) -> float:
    """fp16 gradient buffers get a power-of-two prescale (undone in fp32 by the GEMMs' alpha)
    that brings the larger coefficient to [1, 2), so that small gradients (lm_weight / N, tiny
    probabilities) do not flush to 0. 1 for every other dtype."""
    if dtype != torch.float16:
        return 1.0
    return 2.0 ** (-math.floor(math.log2(max(abs(lm_coef), abs(kl_coef)))))


class _HeadGrads:
    """The GEMMs that take grad h_s and grad P_head out of each chunk's logits gradient g, in
    the mode _backward_gemms chose (see BACKWARD_GEMMS). g_h: the valid rows' grad h_s (or
    None); g_p: grad P_head, both fp32 (fp64 for fp64); alpha undoes the fp16 prescale."""

    def __init__(self, mode: str, g_h: Tensor | None, g_p: Tensor, w_head_t: Tensor, p_head: Tensor,
                 need_h: bool, need_p: bool, alpha: float, rows: int, ws_given: bool = False):
        self.mode, self.g_h, self.g_p, self.w_head_t = mode, g_h, g_p, w_head_t
        self.ws_given = ws_given  # g_p is then grad W_head_S itself: no finish
        self.need_h, self.need_p, self.alpha = need_h, need_p, alpha
        acc, dev = g_p.dtype, g_p.device
        vocab, d_t = w_head_t.shape
        self.g_w = None
        self.g_w_fresh = True  # nothing written into g_w yet: the first chunk's GEMM overwrites it
        if need_p and mode == "student":
            self.g_w = g_p if ws_given else torch.empty(vocab, p_head.shape[1], dtype=acc, device=dev)
        if mode == "teacher":
            self.x_buf = torch.empty(rows, d_t, dtype=acc, device=dev)
            split = SPLIT_SMALL_GEMMS if SPLIT_SMALL_GEMMS is not None else dev.type == "cuda"
            self.small = w_head_t.dtype if split else acc  # dtype of the small GEMMs' operands
            self.p_small = p_head.to(self.small)

    def add(self, g: Tensor, hs: Tensor, w_s: Tensor, r0: int, r1: int):
        alpha = self.alpha
        if self.mode == "student":
            # grad h_s = g @ W_S; grad W_S += g.T @ h_s (fp32 accumulator, V x d_S)
            if self.need_h:
                _gemm(self.g_h[r0:r1], g, w_s, alpha, accumulate=False)
            if self.need_p:
                _gemm(self.g_w, g.t(), hs, alpha, accumulate=not self.g_w_fresh)
                self.g_w_fresh = False
        elif self.mode == "teacher":
            # X = g @ W_T (m x d_T, fp32) once; grad h_s = X @ P; grad P += X.T @ h_s. X keeps
            # the fp16 prescale until the small GEMMs. On GPUs those run on tensor cores with
            # X split as hi + lo in the input dtype (X to ~16 bits, twice the small FLOPs).
            x = self.x_buf[:r1 - r0]
            _gemm(x, g, self.w_head_t, 1.0, accumulate=False)
            h_c = hs.to(self.small)
            for j, xs in enumerate(_split(x, self.small)):
                if self.need_h:
                    _gemm(self.g_h[r0:r1], xs, self.p_small, alpha, accumulate=j > 0)
                if self.need_p:
                    _gemm(self.g_p, xs.t(), h_c, alpha, accumulate=True)

    def finish(self):
        """"student" mode: grad P_head = W_T.T @ grad W_S, once."""
        if self.g_w is None or self.ws_given:
            return
        w, g_p = self.w_head_t, self.g_p
        if w.dtype == g_p.dtype:
            torch.mm(w.t(), self.g_w, out=g_p)
        elif g_p.device.type == "cpu":
            _gemm_cpu(g_p, w.t(), self.g_w, 1.0, 0.0)
        else:
            _gemm(g_p, w.t(), self.g_w.to(w.dtype), 1.0, accumulate=False)


def _split(x: Tensor, dtype: torch.dtype) -> list:
    """x as one tensor of `dtype` (same dtype: x itself), or as hi + lo in a half dtype."""
    if x.dtype == dtype:
        return [x]
    hi = x.to(dtype)
    return [hi, (x - hi.to(x.dtype)).to(dtype)]


# ----------------------------------------------------------------------------- custom ops

@torch.library.custom_op("lrc_ext::distill_head", mutates_args=())
def _distill_head(h_s: Tensor, h_t: Tensor, w_head_t: Tensor, p_head: Tensor, labels: Tensor, tau: float,
                  lm_weight: float, kl_weight: float, kl_reduction: str, batch_size: int | None, tau_squared: bool,
                  chunk_size: int, need_grad_h: bool, need_grad_p: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(lm, kl, grad_h, grad_p): the losses and the gradients of lm + kl w.r.t. h_s and
    p_head (fp32, fp64 for fp64; empty when not asked for). chunk_size 0 = automatic."""
    _check_tensors(h_s, h_t, w_head_t, p_head, labels)
    return _compute(h_s, h_t, w_head_t, p_head, labels, tau, lm_weight, kl_weight, kl_reduction, batch_size,
                    tau_squared, chunk_size, need_grad_h, need_grad_p)


@_distill_head.register_fake
def _(h_s, h_t, w_head_t, p_head, labels, tau, lm_weight, kl_weight, kl_reduction, batch_size, tau_squared,
      chunk_size, need_grad_h, need_grad_p):
    acc = _ext.acc_dtype(h_s.dtype)
    return (h_s.new_empty((), dtype=acc), h_s.new_empty((), dtype=acc),
            h_s.new_empty(tuple(h_s.shape) if need_grad_h else (0,), dtype=acc),
            p_head.new_empty(tuple(p_head.shape) if need_grad_p else (0,), dtype=acc))


def _same_upstream(a: Tensor, b: Tensor) -> bool:
    """The two upstream gradients are one tensor (``loss = lm + kl + ...`` hands the same one to
    both): equal without reading them, so no host sync; otherwise torch.equal decides."""
    if a is b:
        return True
    try:
        return (a.data_ptr() == b.data_ptr() and a.dtype == b.dtype and a.shape == b.shape
                and a.stride() == b.stride() and a.storage_offset() == b.storage_offset())
    except RuntimeError:  # fake tensors (tracing) have no storage: let the op decide
        return False


@torch.library.custom_op("lrc_ext::distill_head_backward", mutates_args=())
def _distill_head_backward(grad_lm: Tensor, grad_kl: Tensor, g_h: Tensor, g_p: Tensor, h_s: Tensor, w_head_t: Tensor,
                           p_head: Tensor, labels: Tensor, lm_weight: float, chunk_size: int, need_grad_h: bool,
                           need_grad_p: bool) -> tuple[Tensor, Tensor]:
    """Gradients w.r.t. (h_s, p_head) for upstream (grad_lm, grad_kl), given g_h, g_p, the
    gradients of lm + kl saved by the forward. Equal upstreams: a scaling. Otherwise the
    gradient of lm alone is recomputed (no teacher needed) and the two are combined."""
    a = grad_lm.to(g_h.dtype)
    b = grad_kl.to(g_h.dtype)
    if _same_upstream(grad_lm, grad_kl) or torch.equal(a, b):
        gh, gp = a * g_h, a * g_p
    else:
        _, _, lh, lp = _compute(h_s, None, w_head_t, p_head, labels, 1.0, lm_weight, 0.0, "token", None, False,
                                chunk_size, need_grad_h, need_grad_p, record=False)
        gh, gp = b * g_h + (a - b) * lh, b * g_p + (a - b) * lp
    return (gh.to(h_s.dtype) if need_grad_h else h_s.new_empty(0),
            gp.to(p_head.dtype) if need_grad_p else p_head.new_empty(0))


@_distill_head_backward.register_fake
def _(grad_lm, grad_kl, g_h, g_p, h_s, w_head_t, p_head, labels, lm_weight, chunk_size, need_grad_h, need_grad_p):
    return (h_s.new_empty(tuple(h_s.shape) if need_grad_h else (0,)),
            p_head.new_empty(tuple(p_head.shape) if need_grad_p else (0,)))


def _setup(ctx, inputs, output):
    (h_s, h_t, w_head_t, p_head, labels, tau, lm_weight, kl_weight, kl_reduction, batch_size, tau_squared,
     chunk_size, need_h, need_p) = inputs
    _, _, g_h, g_p = output
    ctx.both = lm_weight != 0.0 and kl_weight != 0.0
    ctx.lm_only = kl_weight == 0.0
    ctx.lm_weight, ctx.chunk_size, ctx.need_h, ctx.need_p = lm_weight, chunk_size, need_h, need_p
    ctx.h_dtype, ctx.p_dtype = h_s.dtype, p_head.dtype
    if ctx.both:
        ctx.save_for_backward(g_h, g_p, h_s, w_head_t, p_head, labels)
    else:
        ctx.save_for_backward(g_h, g_p)


def _scaled(g: Tensor, up: Tensor, dtype: torch.dtype) -> Tensor:
    """up * g in `dtype` (out of place: the saved g serves every backward through the graph)."""
    return (up * g).to(dtype)


def _backward(ctx, grad_lm, grad_kl, _grad_gh, _grad_gp):
    if ctx.both:
        g_h, g_p, h_s, w_head_t, p_head, labels = ctx.saved_tensors
        gh, gp = torch.ops.lrc_ext.distill_head_backward(grad_lm, grad_kl, g_h, g_p, h_s, w_head_t, p_head, labels,
                                                         ctx.lm_weight, ctx.chunk_size, ctx.need_h, ctx.need_p)
    else:
        g_h, g_p = ctx.saved_tensors
        up = (grad_lm if ctx.lm_only else grad_kl).to(g_h.dtype)
        gh, gp = _scaled(g_h, up, ctx.h_dtype), _scaled(g_p, up, ctx.p_dtype)
    return (gh if ctx.need_h else None, None, None, gp if ctx.need_p else None,
            None, None, None, None, None, None, None, None, None, None)


_distill_head.register_autograd(_backward, setup_context=_setup)


def distill_head(h_s: Tensor, h_t: Tensor, w_head_t: Tensor, p_head: Tensor, labels: Tensor, *,
                 tau: float = 40.0, lm_weight: float = 1.0, kl_weight: float = 1.0,
                 kl_reduction: str = "batchmean", batch_size: int | None = None, tau_squared: bool = False,
                 chunk_size: int | None = None):
    """Fused LM-head distillation loss: ``(lm, kl)`` as ``distill_head_reference`` computes
    them, without ever holding N x V logits (see the module docstring).

    Inputs: h_s (N, d_S), h_t (N, d_T), w_head_t (V, d_T), p_head (d_T, d_S), one dtype
    (fp32, bf16, fp16; fp64 on CPU), any strides; labels (N,) int64, -100 = no CE at that
    row (its KL still counts: the KL is over all N rows).
    Differentiable w.r.t. h_s and p_head. ``chunk_size``: tokens per chunk (default: from
    N, V and free memory). lm_weight == 0 skips the CE; kl_weight == 0 skips the teacher
    GEMM (h_t is then not read).
    """
    _ext.check_tensors(_OP, h_s=h_s, h_t=h_t, w_head_t=w_head_t, p_head=p_head, labels=labels)
    check_options(tau=tau, lm_weight=lm_weight, kl_weight=kl_weight, kl_reduction=kl_reduction,
                  batch_size=batch_size, chunk_size=chunk_size)
    grad_on = torch.is_grad_enabled()
    need_h = grad_on and h_s.requires_grad
    need_p = grad_on and p_head.requires_grad
    lm, kl, _, _ = torch.ops.lrc_ext.distill_head(h_s, h_t, w_head_t, p_head, labels, float(tau), float(lm_weight),
                                                  float(kl_weight), kl_reduction, batch_size, bool(tau_squared),
                                                  int(chunk_size or 0), need_h, need_p)
    return lm, kl


# ----------------------------------------------------------------------------- given W_head_S
# W_head_S formed once an optimiser step by the caller (lrc_ext/step_weights.py): the op takes
# it instead of P_head and returns grad W_head_S (the "student" GEMMs: g.T @ h_s accumulated in
# fp32); the caller forms grad P_head = W_head_T.T @ grad W_head_S once, at the step's end.

def distill_head_ws_reference(h_s: Tensor, h_t: Tensor, w_head_t: Tensor, w_head_s: Tensor, labels: Tensor,
                              n_valid: int | None = None, grad_acc: Tensor | None = None, **kw):
    """Plain PyTorch, W_head_S given: :func:`distill_head_reference` on it (n_valid unused;
    grad_acc: grad W_head_S is added into it, ops/_grad_acc.py)."""
    return distill_head_reference(h_s, h_t, w_head_t, None, labels, w_head_s=_grad_acc.into(w_head_s, grad_acc), **kw)


@torch.library.custom_op("lrc_ext::distill_head_ws", mutates_args=())
def _distill_head_ws(h_s: Tensor, h_t: Tensor, w_head_t: Tensor, w_head_s: Tensor, labels: Tensor, tau: float,
                     lm_weight: float, kl_weight: float, kl_reduction: str, batch_size: int | None,
                     tau_squared: bool, chunk_size: int, need_grad_h: bool, need_grad_w: bool, n_valid: int,
                     grad_acc: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(lm, kl, grad_h, grad_w_head_s) of lm + kl, as lrc_ext::distill_head with W_head_S given.
    grad_acc: read by the backward only, which adds the upstream-scaled grad W_head_S into it."""
    _check_ws(h_s, h_t, w_head_t, w_head_s, labels)
    _grad_acc.check(_OP, grad_acc, w_head_s, "w_head_s")
    return _compute(h_s, h_t, w_head_t, w_head_s, labels, tau, lm_weight, kl_weight, kl_reduction, batch_size,
                    tau_squared, chunk_size, need_grad_h, need_grad_w, w_s=w_head_s, n_valid=n_valid)


def _check_ws(h_s, h_t, w_head_t, w_head_s, labels):
    # the shared checks first, a P_head of the right shape standing in (never read)
    d_t, d_s = (w_head_t.shape[-1] if w_head_t.dim() == 2 else 0), (h_s.shape[-1] if h_s.dim() == 2 else 0)
    _check_tensors(h_s, h_t, w_head_t, h_s.new_empty(()).expand(d_t, d_s), labels)
    _ext.check(_OP, "w_head_s", w_head_s, ndim=2, dtypes=(h_s.dtype,), device=h_s.device)
    if tuple(w_head_s.shape) != (w_head_t.shape[0], d_s):
        raise _err(f"argument 'w_head_s' must have shape (V, d_S) = {(w_head_t.shape[0], d_s)}, "
                   f"got {tuple(w_head_s.shape)}")


@_distill_head_ws.register_fake
def _(h_s, h_t, w_head_t, w_head_s, labels, tau, lm_weight, kl_weight, kl_reduction, batch_size, tau_squared,
      chunk_size, need_grad_h, need_grad_w, n_valid, grad_acc=None):
    acc = _ext.acc_dtype(h_s.dtype)
    return (h_s.new_empty((), dtype=acc), h_s.new_empty((), dtype=acc),
            h_s.new_empty(tuple(h_s.shape) if need_grad_h else (0,), dtype=acc),
            w_head_s.new_empty(tuple(w_head_s.shape) if need_grad_w else (0,), dtype=acc))


def _setup_ws(ctx, inputs, output):
    (h_s, h_t, w_head_t, w_head_s, labels, tau, lm_weight, kl_weight, kl_reduction, batch_size, tau_squared,
     chunk_size, need_h, need_w, n_valid, grad_acc) = inputs
    _, _, g_h, g_w = output
    ctx.n_valid = n_valid
    ctx.grad_acc = grad_acc  # not saved: the backward writes into it (no version check)
    ctx.both, ctx.lm_only = lm_weight != 0.0 and kl_weight != 0.0, kl_weight == 0.0
    ctx.lm_weight, ctx.chunk_size, ctx.need_h, ctx.need_w = lm_weight, chunk_size, need_h, need_w
    ctx.h_dtype, ctx.w_dtype = h_s.dtype, w_head_s.dtype
    ctx.save_for_backward(g_h, g_w, *((h_s, w_head_t, w_head_s, labels) if ctx.both else ()))
    # g_h, g_w are outputs only to be saved: no V x d_S zero gradient filled for g_w each call
    ctx.set_materialize_grads(False)


def _backward_ws(ctx, grad_lm, grad_kl, _grad_gh, _grad_gw):
    g_h, g_w = ctx.saved_tensors[:2]
    if grad_lm is None or grad_kl is None:  # a loss term the caller did not use: upstream 0
        grad_lm = torch.zeros_like(grad_kl) if grad_lm is None else grad_lm
        grad_kl = torch.zeros_like(grad_lm) if grad_kl is None else grad_kl
    acc = ctx.grad_acc if ctx.need_w else None
    if not ctx.both or _same_upstream(grad_lm, grad_kl):  # (the usual loss = lm + kl + ...): a scaling
        up = (grad_kl if not ctx.both and not ctx.lm_only else grad_lm).to(g_h.dtype)
        gh = _scaled(g_h, up, ctx.h_dtype)
        if acc is not None:  # acc += up * g_w in one pass: no V x d_S temporary
            acc.addcmul_(g_w, up.to(acc.dtype))
            gw = None
        else:
            gw = _scaled(g_w, up, ctx.w_dtype)
    else:
        h_s, w_head_t, w_head_s, labels = ctx.saved_tensors[2:]
        gh, gw = torch.ops.lrc_ext.distill_head_ws_backward(grad_lm, grad_kl, g_h, g_w, h_s, w_head_t, w_head_s, labels,
                                                            ctx.lm_weight, ctx.chunk_size, ctx.need_h, ctx.need_w,
                                                            ctx.n_valid)
        if acc is not None:
            acc.add_(gw)
            gw = None
    return (gh if ctx.need_h else None, None, None, gw if ctx.need_w else None,
            None, None, None, None, None, None, None, None, None, None, None, None)


@torch.library.custom_op("lrc_ext::distill_head_ws_backward", mutates_args=())
def _distill_head_ws_backward(grad_lm: Tensor, grad_kl: Tensor, g_h: Tensor, g_w: Tensor, h_s: Tensor,
                              w_head_t: Tensor, w_head_s: Tensor, labels: Tensor, lm_weight: float, chunk_size: int,
                              need_grad_h: bool, need_grad_w: bool, n_valid: int) -> tuple[Tensor, Tensor]:
    """As lrc_ext::distill_head_backward, W_head_S given: exact for any upstream pair,
    g_kl * grad(lm + kl) + (g_lm - g_kl) * grad(lm)."""
    a, b = grad_lm.to(g_h.dtype), grad_kl.to(g_h.dtype)
    if torch.equal(a, b):
        gh, gw = a * g_h, a * g_w
    else:
        _, _, lh, lw = _compute(h_s, None, w_head_t, w_head_s, labels, 1.0, lm_weight, 0.0, "token", None, False,
                                chunk_size, need_grad_h, need_grad_w, record=False, w_s=w_head_s, n_valid=n_valid)
        gh, gw = b * g_h + (a - b) * lh, b * g_w + (a - b) * lw
    return (gh.to(h_s.dtype) if need_grad_h else h_s.new_empty(0),
            gw.to(w_head_s.dtype) if need_grad_w else w_head_s.new_empty(0))


@_distill_head_ws_backward.register_fake
def _(grad_lm, grad_kl, g_h, g_w, h_s, w_head_t, w_head_s, labels, lm_weight, chunk_size, need_grad_h, need_grad_w,
      n_valid):
    return (h_s.new_empty(tuple(h_s.shape) if need_grad_h else (0,)),
            w_head_s.new_empty(tuple(w_head_s.shape) if need_grad_w else (0,)))


_distill_head_ws.register_autograd(_backward_ws, setup_context=_setup_ws)


def distill_head_ws(h_s: Tensor, h_t: Tensor, w_head_t: Tensor, w_head_s: Tensor, labels: Tensor, *,
                    tau: float = 40.0, lm_weight: float = 1.0, kl_weight: float = 1.0,
                    kl_reduction: str = "batchmean", batch_size: int | None = None, tau_squared: bool = False,
                    chunk_size: int | None = None, n_valid: int | None = None, grad_acc: Tensor | None = None):
    """:func:`distill_head` with W_head_S (V, d_S) given instead of P_head: differentiable
    w.r.t. h_s and w_head_s. The KL runs over every row, the CE over the labelled ones.
    ``n_valid``: the number of labelled rows (labels not -100, not all rows), when the caller
    knows it and has checked their range (then no count and no host sync). ``grad_acc``
    (w_head_s's shape, floating): grad W_head_S is added into it in place and w_head_s gets
    none (ops/_grad_acc.py)."""
    _ext.check_tensors(_OP, ("grad_acc",), h_s=h_s, h_t=h_t, w_head_t=w_head_t, w_head_s=w_head_s, labels=labels,
                       grad_acc=grad_acc)
    check_options(tau=tau, lm_weight=lm_weight, kl_weight=kl_weight, kl_reduction=kl_reduction,
                  batch_size=batch_size, chunk_size=chunk_size)
    grad_on = torch.is_grad_enabled()
    lm, kl, _, _ = torch.ops.lrc_ext.distill_head_ws(h_s, h_t, w_head_t, w_head_s, labels, float(tau),
                                                     float(lm_weight), float(kl_weight), kl_reduction, batch_size,
                                                     bool(tau_squared), int(chunk_size or 0),
                                                     grad_on and h_s.requires_grad, grad_on and w_head_s.requires_grad,
                                                     -1 if n_valid is None else int(n_valid), grad_acc)
    return lm, kl
