"""clone_linear: student linear formed from a frozen teacher weight and a trainable
projection, plus the activation-clone MSE (docs/DESIGN.md, "The method" and "clone_linear").

    side="in"  (q, k, v, gate, up): W_S = W_T @ P      y = x @ W_S.T (+ bias)   target: y_T
    side="out" (o, down):           W_S = P.T @ W_T    y = x @ W_S.T            target: y_T @ P

x: (..., in_S); weight W_T: (out_T, in_T); proj P: (d_T, d_S); bias: (out_T,) or None.
Returns (y, mse) with mse the 0-dim fp32 mean of (y - target')^2, or (y, None) when no
target is given. ``row_weight`` (optional, fp32, one non-negative weight per row of x) makes
it the weighted mean sum_r w_r sum_c (y - target')^2 / (sum_r w_r * out_S) (0 when every
weight is 0): with 0/1 weights, the mean over the kept rows. The epilogue kernel then writes
d = w_r (y - t), so the backward below is unchanged but for grad_mse scaled by N / sum(w).

``clone_linear`` is the fused op (kernels: csrc/clone_linear.{cpp,cu}); how it runs:

forward   W_S = W_T @ P (or P.T @ W_T), once, kept for the backward (recompute_ws=True: not
          kept, formed again in the backward from the saved W_T and P - one more GEMM for
          not holding W_S between the two, which FSDP2 wants: there W_T is gathered again
          for the backward anyway, and a kept W_S would leave every layer's student weights
          unsharded from its forward to its backward);
          y = x @ W_S.T (+ bias)                                   [cuBLAS / CPU BLAS]
          t = target (in) or target @ P (out, a temporary)
          one pass of our epilogue kernel: d = y - t, written over t's temporary on the
          output side, and sum(d^2)/numel with a fixed reduction order
          (out side, when P needs a gradient) G_t = target.T @ d, (d_T, d_S): the part of
          grad P that flows through the target y_T @ P, so y_T itself is not kept.
          Saved for backward: x, W_T, P (all held by the caller anyway), W_S (unless
          recomputed), d, G_t:
          ONE (N, out) buffer, d, in the input dtype; not y_S, not y_T.
backward  one pass of our merge kernel: g = grad_y + (2 grad_mse / numel) d
          (grad_mse read on the device: no host sync); then
          grad_x = g @ W_S;  grad_W_S = g.T @ x;
          grad_P = W_T.T @ grad_W_S (in) or W_T @ grad_W_S.T - (2 grad_mse / numel) G_t (out).
          Gradients for the target, W_T and bias are produced too when (and only when) they
          require grad; a frozen teacher costs nothing.

Validation: ``clone_linear`` checks what only it sees (Python types, before dispatch; ``side``;
x's and target's leading dimensions); the op checks the 2-D tensor contract its kernels rely
on, once per call, for every caller (``clone_linear``, compiled graphs, direct torch.ops calls).

On sm_90 (H100/H200), bf16 / fp16 forwards can take CUTLASS kernels with this epilogue in
the GEMM instead (opt-in, LRC_CUTLASS=1; which call takes which path: ops/_cutlass.py).

Dtypes: fp32, bf16, fp16 (and fp64 on the CPU), all inputs the same dtype; under
torch.autocast the floating inputs (fp64 excepted) are cast to the autocast dtype first,
as autocast does for a matmul. The MSE is fp32 (fp64 for fp64 inputs, so that gradcheck
sees full precision; the reference returns fp32 there).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from .. import _ext
from . import _cpu_gemm, _cutlass, _grad_acc

_OP = "clone_linear"
SIDES = ("in", "out")


def _linear_reference(x: Tensor, weight: Tensor, proj: Tensor, bias: Tensor | None, side_out: bool) -> Tensor:
    w_s = proj.t() @ weight if side_out else weight @ proj
    return torch.nn.functional.linear(x, w_s, None if side_out else bias)


def clone_linear_reference(x: Tensor, weight: Tensor, proj: Tensor, bias: Tensor | None = None,
                           target: Tensor | None = None, side: str = "in", row_weight: Tensor | None = None,
                           recompute_ws: bool = False):
    """Plain PyTorch: the oracle every fused path is tested against. recompute_ws: the linear
    runs under activation checkpointing, so autograd keeps no W_S (and recomputes y too)."""
    side_out = side_is_out(side)
    if recompute_ws and torch.is_grad_enabled():
        y = torch.utils.checkpoint.checkpoint(_linear_reference, x, weight, proj, bias, side_out, use_reentrant=False)
    else:
        y = _linear_reference(x, weight, proj, bias, side_out)
    if target is None:
        return y, None
    tgt = target @ proj if side_out else target
    # (d*d).mean() keeps only the difference alive for backward, not both y and target.
    d = (y - tgt).float()
    if row_weight is None:
        return y, (d * d).mean()
    w = row_weight.to(d.dtype)
    wsum = w.sum()
    return y, (w[..., None] * d * d).sum() / (torch.where(wsum > 0, wsum, 1) * d.shape[-1])


# ----------------------------------------------------------------------------- checks

def _err(msg: str) -> ValueError:
    return ValueError(f"lrc_ext.{_OP}: {msg}")


def _dt(t: Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def side_is_out(side: str, who: str = f"lrc_ext.{_OP}") -> bool:
    """The one check of ``side``: True for "out", False for "in"."""
    if side not in SIDES:
        raise ValueError(f"{who}: argument 'side' must be 'in' or 'out', got {side!r}")
    return side == "out"


def _check_row_weight_shape(row_weight, x, target) -> None:
    """row_weight (public functions): with a target, one weight per row of x's leading dimensions."""
    if row_weight is None:
        return
    if target is None:
        raise _err("argument 'row_weight' weighs the clone MSE's rows: it needs a target")
    if tuple(row_weight.shape) != tuple(x.shape[:-1]):
        raise _err(f"argument 'row_weight' must have shape {tuple(x.shape[:-1])} (x's leading dimensions: "
                   f"one weight per row), got {tuple(row_weight.shape)}")


def _check_call(x, weight, proj, bias, target, row_weight=None) -> None:
    """What the op cannot check for ``clone_linear``: Python types (before dispatch, so the
    message is ours) and the leading dimensions it flattens."""
    _ext.check_tensors(_OP, ("bias", "target", "row_weight"), x=x, weight=weight, proj=proj, bias=bias,
                       target=target, row_weight=row_weight)
    _check_row_weight_shape(row_weight, x, target)
    if x.dim() < 1:
        raise _err(f"argument 'x' must have at least 1 dimension, got a 0-dim tensor")
    if target is not None and (target.dim() < 1 or target.shape[:-1] != x.shape[:-1]):
        width = weight.shape[0] if weight.dim() == 2 else "out_T"
        raise _err(f"argument 'target' must have shape {(*x.shape[:-1], width)} (x's leading dimensions and the "
                   f"teacher's output width), got {tuple(target.shape)}")


def _check_same(name: str, t: Tensor, x: Tensor, ndim: int):
    _ext.check(_OP, name, t, ndim=ndim)
    if t.dtype != x.dtype:
        raise _err(f"argument '{name}' has dtype {_dt(t)} but 'x' has {_dt(x)}: all inputs must share one dtype "
                   f"(cast them, or run under torch.autocast, which casts them)")
    _ext.check(_OP, name, t, device=x.device)


def _validate(x, weight, proj, bias, target, side_out: bool):
    """The op's tensor contract (x and target 2-D): shapes, dtypes, devices. Raises a
    ValueError naming the op and the argument."""
    if bias is not None and side_out:
        raise _err("argument 'bias' is only supported on the input side (side='in'); an output-side teacher "
                   "bias has no direct student counterpart")
    _ext.check(_OP, "x", x, ndim=2)
    _ext.check(_OP, "x", x, dtypes=_ext.dtypes_for(x))
    _check_same("weight", weight, x, 2)
    _check_same("proj", proj, x, 2)
    out_t, in_t = weight.shape
    d_t, d_s = proj.shape
    if not side_out:
        if d_t != in_t:
            raise _err(f"argument 'proj' must have weight.shape[1] = {in_t} rows on the input side "
                       f"(W_S = weight @ proj), got shape {tuple(proj.shape)} with weight {tuple(weight.shape)}")
        in_s = d_s
    else:
        if d_t != out_t:
            raise _err(f"argument 'proj' must have weight.shape[0] = {out_t} rows on the output side "
                       f"(W_S = proj.T @ weight), got shape {tuple(proj.shape)} with weight {tuple(weight.shape)}")
        in_s = in_t
    if x.shape[-1] != in_s:
        raise _err(f"argument 'x' must have last dimension {in_s} (the student's input width for "
                   f"side={'out' if side_out else 'in'!r}: {'weight.shape[1]' if side_out else 'proj.shape[1]'}), "
                   f"got shape {tuple(x.shape)}")
    if bias is not None:
        _check_same("bias", bias, x, 1)
        if bias.shape[0] != out_t:
            raise _err(f"argument 'bias' must have shape ({out_t},), got {tuple(bias.shape)}")
    if target is not None:
        _check_same("target", target, x, 2)
        want = (x.shape[0], out_t)
        if tuple(target.shape) != want:
            raise _err(f"argument 'target' must have shape {want} (x's rows and the teacher's output width "
                       f"{out_t}{', compared as target @ proj' if side_out else ''}), got {tuple(target.shape)}")


def _check_row_weight(w, x, target):
    """row_weight: None, or (N,) fp32 on x's device, with a target."""
    if w is None:
        return
    if target is None:
        raise _err("argument 'row_weight' weighs the clone MSE's rows: it needs a target")
    _ext.check(_OP, "row_weight", w, ndim=1, dtypes=(torch.float32,), device=x.device)
    if w.shape[0] != x.shape[0]:
        raise _err(f"argument 'row_weight' must have shape ({x.shape[0]},) (one weight per row of x), "
                   f"got {tuple(w.shape)}")


def _rows_ok(t: Tensor) -> bool:
    """2-D with unit column stride and non-overlapping rows: what our kernels take."""
    return (t.size(1) <= 1 or t.stride(1) == 1) and (t.size(0) <= 1 or t.stride(0) >= t.size(1))


# ----------------------------------------------------------------------------- kernels

def _epilogue(y: Tensor, t: Tensor, d: Tensor, w: Tensor | None = None) -> Tensor:
    """d = y - t (d may be t), returns mean(d^2) as a 0-dim tensor. With row weights w (fp32,
    contiguous): d = w_r (y - t), returns sum_r w_r sum_c (y - t)^2 / (sum(w) * cols), 0 if sum(w) is 0."""
    rows, cols = y.shape
    inv_numel = 1.0 / (rows * cols) if rows * cols else float("nan")
    if w is not None:
        inv_numel = 1.0 / cols if cols else float("nan")
    w_ptr = w.data_ptr() if w is not None else 0
    if y.device.type == "cpu":
        c = _ext.lib(_OP)
        s = c.clone_linear_epilogue_cpu(y.data_ptr(), _ext.row_stride(y), t.data_ptr(), _ext.row_stride(t),
                                        d.data_ptr(), _ext.row_stride(d), w_ptr, rows, cols,
                                        _ext.DTYPE_CODES[y.dtype], inv_numel)
        mse = torch.tensor(s, dtype=_ext.acc_dtype(y.dtype))
        return mse if w is None else mse / _wsum(w, mse.dtype)
    c = _ext.require_cuda(_OP)
    with torch.cuda.device(y.device):
        mse = torch.empty((), dtype=torch.float32, device=y.device)
        ws = torch.empty(c.clone_linear_epilogue_cuda_workspace(rows, cols), dtype=torch.float32, device=y.device)
        c.clone_linear_epilogue_cuda(y.data_ptr(), _ext.row_stride(y), t.data_ptr(), _ext.row_stride(t),
                                     d.data_ptr(), _ext.row_stride(d), w_ptr, rows, cols, _ext.DTYPE_CODES[y.dtype],
                                     inv_numel, mse.data_ptr(), ws.data_ptr(), _ext.stream(y))
    return mse if w is None else mse / _wsum(w, mse.dtype)


def _wsum(w: Tensor, dtype) -> Tensor:
    """sum(w) as the divisor of a weighted MSE (on the device: no host sync); 1 when it is 0."""
    s = w.sum(dtype=dtype)
    return torch.where(s > 0, s, torch.ones_like(s))


def _merge(grad_y: Tensor | None, d: Tensor, grad_mse: Tensor, k: float) -> Tensor:
    """g = grad_y + grad_mse * k * d in one pass (grad_y None: g = grad_mse * k * d)."""
    rows, cols = d.shape
    g = torch.empty((rows, cols), dtype=d.dtype, device=d.device)
    gy_ptr, gy_ld = (grad_y.data_ptr(), _ext.row_stride(grad_y)) if grad_y is not None else (0, 0)
    if d.device.type == "cpu":
        _ext.lib(_OP).clone_linear_merge_cpu(gy_ptr, gy_ld, d.data_ptr(), _ext.row_stride(d), g.data_ptr(), cols,
                                             rows, cols, _ext.DTYPE_CODES[d.dtype], float(grad_mse) * k)
        return g
    c = _ext.require_cuda(_OP)
    gm = grad_mse.to(torch.float32).contiguous()
    with torch.cuda.device(d.device):
        c.clone_linear_merge_cuda(gy_ptr, gy_ld, d.data_ptr(), _ext.row_stride(d), g.data_ptr(), cols, rows, cols,
                                  _ext.DTYPE_CODES[d.dtype], gm.data_ptr(), float(k), _ext.stream(d))
    return g


def _mm_acc(a: Tensor, b: Tensor, acc: torch.dtype) -> Tensor:
    """a @ b accumulated and returned in `acc` (fp32 for half inputs; the input dtype otherwise)."""
    if a.dtype == acc:
        return torch.mm(a, b)
    if a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=acc)  # cuBLAS: half inputs, fp32 output
        except (RuntimeError, TypeError):
            pass
    return torch.mm(a.to(acc), b.to(acc))


def _no_autocast(t: Tensor):
    dev = t.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        return torch.autocast(dev, enabled=False)
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- forward op

@torch.library.custom_op("lrc_ext::clone_linear", mutates_args=())
def _clone_linear_op(x: Tensor, weight: Tensor, proj: Tensor, bias: Optional[Tensor], target: Optional[Tensor],
                     side_out: bool, target_proj_grad: bool,
                     row_weight: Optional[Tensor] = None,
                     recompute_ws: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """x 2-D (N, in_S), target 2-D or None, row_weight (N,) fp32 or None. Returns (y, mse, W_S,
    d, G_t); d and G_t are empty when not computed (no target; G_t only on the output side
    with target_proj_grad). recompute_ws: the backward forms W_S again (it is not saved)."""
    _validate(x, weight, proj, bias, target, side_out)
    _check_row_weight(row_weight, x, target)
    with _no_autocast(x):
        w_s = proj.t() @ weight if side_out else weight @ proj
        # None: the cuBLAS path below (also for row weights, which the CUTLASS epilogue does not take)
        fused = None if row_weight is not None else _cutlass.forward(x, w_s, bias, target, proj, side_out)
        if fused is not None:
            y, d, mse = fused
            g_t = _mm_acc(target.t(), d, _ext.acc_dtype(x.dtype)) if side_out and target_proj_grad else x.new_empty(0)
            return y, mse, w_s, d, g_t
        y = _cpu_gemm.linear(x, w_s, bias)
        empty = x.new_empty(0)
        if target is None:
            return y, x.new_zeros((), dtype=_ext.acc_dtype(x.dtype)), w_s, empty, empty.clone()
        if side_out:
            d = t = _cpu_gemm.linear(target, proj.t())  # our temporary: d overwrites it
        else:
            t = target if _rows_ok(target) else target.contiguous()
            d = torch.empty_like(y)
        mse = _epilogue(y, t, d, row_weight.contiguous() if row_weight is not None else None)
        # G_t in fp32 (fp64 for fp64): it nearly cancels W_T @ grad_W_S.T in grad_P
        g_t = _mm_acc(target.t(), d, _ext.acc_dtype(x.dtype)) if side_out and target_proj_grad else empty.clone()
    return y, mse, w_s, d, g_t


@_clone_linear_op.register_fake
def _(x, weight, proj, bias, target, side_out, target_proj_grad, row_weight=None, recompute_ws=False):
    out_s = proj.shape[1] if side_out else weight.shape[0]
    in_s = weight.shape[1] if side_out else proj.shape[1]
    y = x.new_empty((x.shape[0], out_s))
    w_s = x.new_empty((out_s, in_s))
    mse = x.new_empty((), dtype=_ext.acc_dtype(x.dtype))
    d = x.new_empty((x.shape[0], out_s)) if target is not None else x.new_empty(0)
    g_t = (x.new_empty(tuple(proj.shape), dtype=_ext.acc_dtype(x.dtype))
           if (target is not None and side_out and target_proj_grad) else x.new_empty(0))
    return y, mse, w_s, d, g_t


def _setup(ctx, inputs, output):
    x, weight, proj, bias, target, side_out, target_proj_grad, row_weight, recompute_ws = inputs
    y, mse, w_s, d, g_t = output
    if recompute_ws:
        w_s = None  # formed again in the backward
    # Weighted rows: d already holds w_r (y - t); the backward's k = 2 / (N out) becomes
    # 2 / (sum(w) out) by scaling grad_mse with N / sum(w).
    mse_scale = (x.shape[0] / _wsum(row_weight, mse.dtype) if row_weight is not None and target is not None
                 else None)
    ctx.save_for_backward(x, weight, proj, w_s, d, g_t, mse_scale)
    # W_S, d and G_t are outputs only to be saved: never zero-fill (N, out) gradients for them.
    ctx.set_materialize_grads(False)
    ctx.side_out = side_out
    ctx.has_target = target is not None
    ctx.target_shape = tuple(target.shape) if target is not None else None


def _backward(ctx, grad_y, grad_mse, _g_ws, _g_d, _g_gt):
    x, weight, proj, w_s, d, g_t, mse_scale = ctx.saved_tensors
    if w_s is None:  # recompute_ws: the same product of the same saved tensors as the forward's
        with _no_autocast(x):
            w_s = proj.t() @ weight if ctx.side_out else weight @ proj
    needs = list(ctx.needs_input_grad[:5])
    if not ctx.has_target:
        needs[4] = False
        grad_mse = None
    if grad_mse is not None and mse_scale is not None:
        grad_mse = grad_mse * mse_scale
    if ctx.side_out and ctx.has_target and needs[2] and grad_mse is not None and g_t.numel() == 0:
        raise RuntimeError(f"lrc_ext.{_OP}: proj needs a gradient but the forward ran with target_proj_grad=False; "
                           f"call lrc_ext.ops.clone_linear(), which sets it")
    grads = torch.ops.lrc_ext.clone_linear_backward(grad_y, grad_mse, x, weight, proj, w_s, d, g_t, ctx.side_out,
                                                    needs)
    return tuple(g if need else None for g, need in zip(grads, needs)) + (None, None, None, None)


_clone_linear_op.register_autograd(_backward, setup_context=_setup)


# ----------------------------------------------------------------------------- backward op

@torch.library.custom_op("lrc_ext::clone_linear_backward", mutates_args=())
def _clone_linear_backward_op(grad_y: Optional[Tensor], grad_mse: Optional[Tensor], x: Tensor, weight: Tensor,
                              proj: Tensor, w_s: Tensor, d: Tensor, g_t: Tensor, side_out: bool,
                              needs: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (x, weight, proj, bias, target); empty tensors for those not in needs."""
    need_x, need_w, need_p, need_b, need_t = needs
    empty = x.new_empty(0)
    n, out_s = x.shape[0], w_s.shape[0]
    numel = n * out_s
    use_mse = grad_mse is not None and d.numel() > 0
    k = 2.0 / numel if numel else 0.0
    with _no_autocast(x):
        if grad_y is not None and not _rows_ok(grad_y):
            grad_y = grad_y.contiguous()  # e.g. the expanded gradient of y.sum()
        if use_mse:  # one pass feeding both GEMMs; why it is not folded into them: ops/_cutlass.py
            g = _merge(grad_y, d, grad_mse, k)
        elif grad_y is not None:
            g = grad_y
        else:
            g = x.new_zeros((n, out_s))
        gx = _cpu_gemm.linear(g, w_s.t()) if need_x else empty
        gws = torch.mm(g.t(), x) if (need_w or need_p) else None
        if need_p:
            if side_out:
                # W_T @ grad_W_S.T and the G_t term nearly cancel: both in fp32, one cast at the end
                acc = _ext.acc_dtype(x.dtype)
                gp = _mm_acc(weight, gws.t(), acc)
                if use_mse:
                    gp.addcmul_(g_t.to(acc), grad_mse.to(acc), value=-k)
                gp = gp.to(proj.dtype)
            else:
                gp = torch.mm(weight.t(), gws)
        else:
            gp = empty.clone()
        if need_w:
            gw = torch.mm(gws, proj.t()) if not side_out else torch.mm(proj, gws)
        else:
            gw = empty.clone()
        gb = g.sum(0) if need_b else empty.clone()
        if need_t:
            if use_mse:
                s = grad_mse.to(_ext.acc_dtype(d.dtype)) * (-k)
                gt = (_cpu_gemm.linear(d, proj) if side_out else d) * s
                gt = gt.to(d.dtype)
            else:
                gt = x.new_zeros((n, proj.shape[0] if side_out else out_s))
        else:
            gt = empty.clone()
    return gx, gw, gp, gb, gt


@_clone_linear_backward_op.register_fake
def _(grad_y, grad_mse, x, weight, proj, w_s, d, g_t, side_out, needs):
    need_x, need_w, need_p, need_b, need_t = needs
    n, out_s = x.shape[0], w_s.shape[0]

    def maybe(need, shape):
        return x.new_empty(shape) if need else x.new_empty(0)
    return (maybe(need_x, tuple(x.shape)), maybe(need_w, tuple(weight.shape)), maybe(need_p, tuple(proj.shape)),
            maybe(need_b, (out_s,)), maybe(need_t, (n, proj.shape[0] if side_out else out_s)))


# ----------------------------------------------------------------------------- public API

def _autocast(x: Tensor, *ts):
    """Cast as torch.autocast casts a matmul's inputs: floating, not fp64, on x's device type."""
    dev = x.device.type
    if dev not in ("cpu", "cuda") or not torch.is_autocast_enabled(dev):
        return (x, *ts)
    dt = torch.get_autocast_dtype(dev)

    def cast(t):
        if t is None or not t.is_floating_point() or t.dtype == torch.float64 or t.device.type != dev:
            return t
        return t.to(dt)
    return tuple(cast(t) for t in (x, *ts))


def clone_linear(x: Tensor, weight: Tensor, proj: Tensor, bias: Tensor | None = None,
                 target: Tensor | None = None, side: str = "in", row_weight: Tensor | None = None,
                 recompute_ws: bool = False):
    """Fused clone linear; same contract as :func:`clone_linear_reference`.

    Returns ``(y, mse)``: y of shape (..., out_S) in the input dtype, mse the 0-dim mean of
    (y - target')^2 (fp32; fp64 for fp64 inputs), or ``(y, None)`` without a target.
    x may be N-D (leading dimensions flattened) and non-contiguous; target has x's leading
    dimensions. Gradients flow to x, proj, and to target / weight / bias when they require
    grad (the teacher is normally frozen: then none is computed for it). ``row_weight``
    (x's leading dimensions, non-negative; cast to fp32, never differentiated): the MSE's
    weighted mean over rows, e.g. 0/1 to count the kept rows only (see the module docstring).
    ``recompute_ws``: do not keep W_S for the backward, which forms it again (same result,
    one more GEMM; FusedCloneLinear sets it under FSDP2).
    """
    _check_call(x, weight, proj, bias, target, row_weight)
    side_out = side_is_out(side)
    x, weight, proj, bias, target = _autocast(x, weight, proj, bias, target)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    t2 = target.reshape(-1, target.shape[-1]) if target is not None else None
    w2 = row_weight.detach().reshape(-1).to(torch.float32) if row_weight is not None else None
    target_proj_grad = bool(side_out and target is not None and proj.requires_grad and torch.is_grad_enabled())
    y, mse, _w_s, _d, _g_t = torch.ops.lrc_ext.clone_linear(x2, weight, proj, bias, t2, side_out, target_proj_grad,
                                                            w2, bool(recompute_ws))
    y = y.view(*lead, y.shape[-1])
    return y, (mse if target is not None else None)


# ----------------------------------------------------------------------------- given W_S
# The same op with W_S given (formed once an optimiser step by the caller, lrc_ext/step_weights.py):
# no formation in the forward, and grad_W_S instead of grad_P in the backward. On the output
# side P still enters through the target y_T @ P; its gradient there (-(2 grad_mse / numel) G_t)
# is returned for P.

def clone_linear_ws_reference(x: Tensor, w_s: Tensor, bias: Tensor | None = None, target: Tensor | None = None,
                              proj: Tensor | None = None, side: str = "in", row_weight: Tensor | None = None,
                              grad_acc: Tensor | None = None):
    """Plain PyTorch, W_S given (out_S, in_S); proj only for the output side's target @ P;
    row_weight as in :func:`clone_linear_reference`; grad_acc: grad_W_S is added into it
    (ops/_grad_acc.py)."""
    side_out = side_is_out(side)
    y = torch.nn.functional.linear(x, _grad_acc.into(w_s, grad_acc), bias)
    if target is None:
        return y, None
    d = (y - (target @ proj if side_out else target)).float()
    if row_weight is None:
        return y, (d * d).mean()
    w = row_weight.to(d.dtype)
    wsum = w.sum()
    return y, (w[..., None] * d * d).sum() / (torch.where(wsum > 0, wsum, 1) * d.shape[-1])


def _validate_ws(x, w_s, bias, target, proj, side_out: bool):
    _ext.check(_OP, "x", x, ndim=2)
    _ext.check(_OP, "x", x, dtypes=_ext.dtypes_for(x))
    _check_same("w_s", w_s, x, 2)
    if x.shape[1] != w_s.shape[1]:
        raise _err(f"argument 'x' must have last dimension {w_s.shape[1]} (w_s.shape[1]), got {tuple(x.shape)}")
    if bias is not None:
        _check_same("bias", bias, x, 1)
        if bias.shape[0] != w_s.shape[0]:
            raise _err(f"argument 'bias' must have shape ({w_s.shape[0]},), got {tuple(bias.shape)}")
    if target is None:
        return
    _check_same("target", target, x, 2)
    if side_out:
        if proj is None:
            raise _err("argument 'proj' is needed on the output side with a target (compared as target @ proj)")
        _check_same("proj", proj, x, 2)
        if proj.shape[1] != w_s.shape[0] or target.shape != (x.shape[0], proj.shape[0]):
            raise _err(f"arguments 'target' {tuple(target.shape)} and 'proj' {tuple(proj.shape)} do not fit x "
                       f"{tuple(x.shape)} and w_s {tuple(w_s.shape)} (target @ proj must be (N, out_S))")
    elif target.shape != (x.shape[0], w_s.shape[0]):
        raise _err(f"argument 'target' must have shape {(x.shape[0], w_s.shape[0])}, got {tuple(target.shape)}")


@torch.library.custom_op("lrc_ext::clone_linear_ws", mutates_args=())
def _clone_linear_ws_op(x: Tensor, w_s: Tensor, bias: Optional[Tensor], target: Optional[Tensor],
                        proj: Optional[Tensor], side_out: bool, target_proj_grad: bool,
                        row_weight: Optional[Tensor] = None,
                        grad_acc: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(y, mse, d, G_t) as the clone_linear op, W_S given. Always the cuBLAS GEMM + epilogue
    kernel: the CUTLASS sm90 path fuses the W_S formation it would skip here, so it is not
    taken (a W_S-given CUTLASS variant is not written). grad_acc: read by the backward only."""
    _validate_ws(x, w_s, bias, target, proj, side_out)
    _check_row_weight(row_weight, x, target)
    _grad_acc.check(_OP, grad_acc, w_s, "w_s")
    with _no_autocast(x):
        y = _cpu_gemm.linear(x, w_s, bias)
        empty = x.new_empty(0)
        if target is None:
            return y, x.new_zeros((), dtype=_ext.acc_dtype(x.dtype)), empty, empty.clone()
        if side_out:
            d = t = _cpu_gemm.linear(target, proj.t())
        else:
            t = target if _rows_ok(target) else target.contiguous()
            d = torch.empty_like(y)
        mse = _epilogue(y, t, d, row_weight.contiguous() if row_weight is not None else None)
        # G_t in fp32 (fp64 for fp64): it nearly cancels W_T @ grad_W_S.T in grad_P
        g_t = _mm_acc(target.t(), d, _ext.acc_dtype(x.dtype)) if side_out and target_proj_grad else empty.clone()
    return y, mse, d, g_t


@_clone_linear_ws_op.register_fake
def _(x, w_s, bias, target, proj, side_out, target_proj_grad, row_weight=None, grad_acc=None):
    y = x.new_empty((x.shape[0], w_s.shape[0]))
    mse = x.new_empty((), dtype=_ext.acc_dtype(x.dtype))
    d = x.new_empty(tuple(y.shape)) if target is not None else x.new_empty(0)
    g_t = (x.new_empty(tuple(proj.shape), dtype=_ext.acc_dtype(x.dtype))
           if (target is not None and side_out and target_proj_grad) else x.new_empty(0))
    return y, mse, d, g_t


def _setup_ws(ctx, inputs, output):
    x, w_s, bias, target, proj, side_out, _, row_weight, grad_acc = inputs
    _, mse, d, g_t = output
    # weighted rows: grad_mse scaled by N / sum(w), as in _setup
    mse_scale = (x.shape[0] / _wsum(row_weight, mse.dtype) if row_weight is not None and target is not None
                 else None)
    ctx.save_for_backward(x, w_s, proj, d, g_t, mse_scale)
    ctx.set_materialize_grads(False)
    ctx.side_out, ctx.has_target = side_out, target is not None
    # not saved: the backward writes into it, which would trip the saved-tensor version check
    ctx.grad_acc = grad_acc


def _backward_ws(ctx, grad_y, grad_mse, _g_d, _g_gt):
    x, w_s, proj, d, g_t, mse_scale = ctx.saved_tensors
    needs = list(ctx.needs_input_grad[:5])  # x, w_s, bias, target, proj
    if not ctx.has_target:
        grad_mse, needs[3], needs[4] = None, False, False
    if grad_mse is not None and mse_scale is not None:
        grad_mse = grad_mse * mse_scale
    if ctx.side_out and needs[4] and grad_mse is not None and g_t.numel() == 0:
        raise RuntimeError(f"lrc_ext.{_OP}: proj needs a gradient but the forward ran with target_proj_grad=False; "
                           f"call lrc_ext.ops.clone_linear_ws(), which sets it")
    acc = ctx.grad_acc if needs[1] else None
    grads = torch.ops.lrc_ext.clone_linear_ws_backward(grad_y, grad_mse, x, w_s, proj, d, g_t, ctx.side_out, needs,
                                                       acc)
    if acc is not None:
        needs[1] = False  # grad_W_S went into grad_acc
    return tuple(g if need else None for g, need in zip(grads, needs)) + (None, None, None, None)


@torch.library.custom_op("lrc_ext::clone_linear_ws_backward", mutates_args=("grad_acc",))
def _clone_linear_ws_backward_op(grad_y: Optional[Tensor], grad_mse: Optional[Tensor], x: Tensor, w_s: Tensor,
                                 proj: Optional[Tensor], d: Tensor, g_t: Tensor, side_out: bool,
                                 needs: list[bool], grad_acc: Optional[Tensor] = None
                                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients (x, w_s, bias, target, proj); empty tensors for those not in needs. grad_acc
    given: grad_W_S is added into it (its slot in the result is then empty)."""
    need_x, need_w, need_b, need_t, need_p = needs
    use_mse = grad_mse is not None and d.numel() > 0
    n, out_s = x.shape[0], w_s.shape[0]
    k = 2.0 / (n * out_s) if n * out_s else 0.0
    empty = x.new_empty(0)
    with _no_autocast(x):
        if grad_y is not None and not _rows_ok(grad_y):
            grad_y = grad_y.contiguous()
        g = _merge(grad_y, d, grad_mse, k) if use_mse else (grad_y if grad_y is not None else x.new_zeros(n, out_s))
        gx = _cpu_gemm.linear(g, w_s.t()) if need_x else empty
        gw = empty.clone()
        if need_w and grad_acc is not None:
            _grad_acc.addmm_(grad_acc, g.t(), x)
        elif need_w:
            gw = torch.mm(g.t(), x)
        gb = g.sum(0) if need_b else empty.clone()
        gt, gp = empty.clone(), empty.clone()
        s = grad_mse.to(_ext.acc_dtype(d.dtype)) * (-k) if use_mse else None
        if need_t:
            gt = (((_cpu_gemm.linear(d, proj) if side_out else d) * s).to(d.dtype) if use_mse
                  else x.new_zeros((n, proj.shape[0] if side_out else out_s)))
        if need_p:
            gp = (g_t * s).to(proj.dtype) if (use_mse and side_out) else torch.zeros_like(proj)
    return gx, gw, gb, gt, gp


@_clone_linear_ws_backward_op.register_fake
def _(grad_y, grad_mse, x, w_s, proj, d, g_t, side_out, needs, grad_acc=None):
    need_x, need_w, need_b, need_t, need_p = needs
    n, out_s = x.shape[0], w_s.shape[0]

    def maybe(need, shape):
        return x.new_empty(shape) if need else x.new_empty(0)
    return (maybe(need_x, tuple(x.shape)), maybe(need_w and grad_acc is None, tuple(w_s.shape)),
            maybe(need_b, (out_s,)),
            maybe(need_t, (n, proj.shape[0] if side_out else out_s)),
            maybe(need_p, tuple(proj.shape) if proj is not None else (0,)))


_clone_linear_ws_op.register_autograd(_backward_ws, setup_context=_setup_ws)


def clone_linear_ws(x: Tensor, w_s: Tensor, bias: Tensor | None = None, target: Tensor | None = None,
                    proj: Tensor | None = None, side: str = "in", row_weight: Tensor | None = None,
                    grad_acc: Tensor | None = None):
    """Fused clone linear with W_S given; same contract as :func:`clone_linear_ws_reference`.
    Gradients flow to x and w_s (and to bias / target when they require grad); on the output
    side to proj through the target's ``target @ proj`` only. ``row_weight`` as in
    :func:`clone_linear`. ``grad_acc`` (w_s's shape, floating): grad_W_S is added into it in
    place and w_s gets none (ops/_grad_acc.py); never cast by autocast."""
    _ext.check_tensors(_OP, ("bias", "target", "proj", "row_weight", "grad_acc"), x=x, w_s=w_s, bias=bias,
                       target=target, proj=proj, row_weight=row_weight, grad_acc=grad_acc)
    side_out = side_is_out(side)
    _check_row_weight_shape(row_weight, x, target)
    if target is not None and (target.dim() < 1 or target.shape[:-1] != x.shape[:-1]):
        raise _err(f"argument 'target' must have x's leading dimensions {tuple(x.shape[:-1])}, "
                   f"got {tuple(target.shape)}")
    x, w_s, bias, target, proj = _autocast(x, w_s, bias, target, proj)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    t2 = target.reshape(-1, target.shape[-1]) if target is not None else None
    tpg = bool(side_out and target is not None and proj is not None and proj.requires_grad
               and torch.is_grad_enabled())
    w2 = row_weight.detach().reshape(-1).to(torch.float32) if row_weight is not None else None
    y, mse, _d, _g_t = torch.ops.lrc_ext.clone_linear_ws(x2, w_s, bias, t2, proj if side_out else None, side_out, tpg,
                                                         w2, grad_acc)
    return y.view(*lead, y.shape[-1]), (mse if target is not None else None)
