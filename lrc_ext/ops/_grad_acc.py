"""``grad_acc``: the ops that take a formed weight W_S (the "_ws" variants) can add its gradient
into a buffer of the caller's, in place, instead of returning it to autograd. lrc_ext/step_weights.py
hands each one such a buffer for the optimiser step, so a micro-batch allocates no gradient
tensor of W_S's size and autograd runs no accumulation pass over it: on the CPU the GEMM of
grad_W_S accumulates into the buffer itself (beta = 1).

The buffer: W_S's shape and device, a floating dtype (the master weights', e.g. fp32 beside a
bf16 forward); W_S itself then gets no gradient (its ``.grad`` stays None).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _ext


def check(op: str, grad_acc: Tensor | None, w: Tensor, name: str) -> None:
    """grad_acc: None, or a floating tensor of ``w``'s shape on its device."""
    if grad_acc is None:
        return
    _ext.check(op, "grad_acc", grad_acc, dtypes=(torch.float64, torch.float32, torch.bfloat16, torch.float16),
               device=w.device)
    if tuple(grad_acc.shape) != tuple(w.shape):
        raise ValueError(f"lrc_ext.{op}: argument 'grad_acc' must have {name}'s shape {tuple(w.shape)}, "
                         f"got {tuple(grad_acc.shape)}")


class _Into(torch.autograd.Function):
    """Identity on ``w``; its backward adds the gradient into ``acc`` and passes none on."""

    @staticmethod
    def forward(ctx, w, acc):
        ctx.acc = acc
        return w.view_as(w)

    @staticmethod
    def backward(ctx, g):
        if g is not None:
            ctx.acc.add_(g)
        return None, None


def into(w: Tensor, grad_acc: Tensor | None) -> Tensor:
    """For the references: ``w`` whose gradient goes into ``grad_acc`` (None: ``w`` itself)."""
    if grad_acc is None or not (torch.is_grad_enabled() and w.requires_grad):
        return w
    return _Into.apply(w, grad_acc)


def addmm_(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """acc += a @ b. Same dtypes: one GEMM with beta = 1, no temporary. Half inputs beside an
    fp32 buffer: a temporary product (fp32 from cuBLAS; on the CPU in the inputs' dtype, as the
    gradient autograd would have added), then one add."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if a.is_cuda and acc.dtype == torch.float32:
        try:
            acc.add_(torch.mm(a, b, out_dtype=torch.float32))
            return
        except (RuntimeError, TypeError):  # a torch without fp32-output half GEMMs
            pass
    acc.add_(torch.mm(a, b))
