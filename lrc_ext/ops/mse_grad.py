"""mse_grad: sum((a - b)^2) in one pass, optionally writing scale * (a - b).

The clone loss's building block: the squared error and its gradient term come out of
the same read of a and b. Kernels: csrc/mse_grad.{cpp,cu}.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _ext

_OP = "mse_grad"
_DTYPES_CPU = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_DTYPES_CUDA = (torch.float32, torch.float16, torch.bfloat16)


def _check(a: Tensor, b: Tensor, grad: Tensor | None):
    _ext.check(_OP, "a", a, ndim=2)
    dtypes = _DTYPES_CUDA if a.device.type == "cuda" else _DTYPES_CPU
    _ext.check(_OP, "a", a, dtypes=dtypes)
    _ext.check(_OP, "b", b, ndim=2, dtypes=(a.dtype,), device=a.device)
    if b.shape != a.shape:
        raise ValueError(f"lrc_ext.{_OP}: 'a' and 'b' must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    _ext.check_rows(_OP, "a", a)
    _ext.check_rows(_OP, "b", b)
    if grad is not None:
        _ext.check(_OP, "grad", grad, ndim=2, dtypes=(a.dtype, torch.float32), device=a.device)
        if grad.shape != a.shape:
            raise ValueError(f"lrc_ext.{_OP}: 'grad' must have shape {tuple(a.shape)}, got {tuple(grad.shape)}")
        _ext.check_rows(_OP, "grad", grad)


def _launch(a: Tensor, b: Tensor, scale: float, grad: Tensor | None) -> Tensor:
    out_dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    rows, cols = a.shape
    g_ptr = grad.data_ptr() if grad is not None else 0
    g_ld = _ext.row_stride(grad) if grad is not None else 0
    g_dt = _ext.DTYPE_CODES[grad.dtype] if grad is not None else 0
    if a.device.type == "cpu":
        c = _ext.lib(_OP)
        s = c.mse_grad_cpu(a.data_ptr(), _ext.row_stride(a), b.data_ptr(), _ext.row_stride(b), rows, cols,
                           _ext.DTYPE_CODES[a.dtype], g_ptr, g_ld, g_dt, float(scale))
        return torch.tensor(s, dtype=out_dtype)
    c = _ext.require_cuda(_OP)
    with torch.cuda.device(a.device):
        out = torch.empty((), dtype=torch.float32, device=a.device)
        ws = torch.empty(c.mse_grad_cuda_workspace(rows, cols), dtype=torch.float32, device=a.device)
        c.mse_grad_cuda(a.data_ptr(), _ext.row_stride(a), b.data_ptr(), _ext.row_stride(b), rows, cols,
                        _ext.DTYPE_CODES[a.dtype], g_ptr, g_ld, g_dt, float(scale), out.data_ptr(), ws.data_ptr(),
                        _ext.stream(a))
    return out


@torch.library.custom_op("lrc_ext::mse_grad", mutates_args=())
def _mse_grad(a: Tensor, b: Tensor, scale: float, want_grad: bool) -> tuple[Tensor, Tensor]:
    _check(a, b, None)
    grad = torch.empty(a.shape, dtype=a.dtype, device=a.device) if want_grad else a.new_empty(0)
    return _launch(a, b, scale, grad if want_grad else None), grad


@_mse_grad.register_fake
def _(a, b, scale, want_grad):
    s = a.new_empty((), dtype=torch.float64 if a.dtype == torch.float64 else torch.float32)
    return s, (torch.empty_like(a, memory_format=torch.contiguous_format) if want_grad else a.new_empty(0))


def _setup(ctx, inputs, output):
    a, b, scale, want_grad = inputs
    ctx.save_for_backward(a, b)
    ctx.scale, ctx.want_grad = scale, want_grad


def _backward(ctx, g_sum, g_grad):
    a, b = ctx.saved_tensors
    d = a.to(g_sum.dtype) - b.to(g_sum.dtype)
    da = 2.0 * g_sum * d
    if ctx.want_grad and g_grad is not None and g_grad.numel():
        da = da + ctx.scale * g_grad.to(da.dtype)
    return da.to(a.dtype), (-da).to(b.dtype), None, None


_mse_grad.register_autograd(_backward, setup_context=_setup)


@torch.library.custom_op("lrc_ext::mse_grad_out", mutates_args=("grad",))
def _mse_grad_out(a: Tensor, b: Tensor, scale: float, grad: Tensor) -> Tensor:
    _check(a, b, grad)
    return _launch(a, b, scale, grad)


@_mse_grad_out.register_fake
def _(a, b, scale, grad):
    return a.new_empty((), dtype=torch.float64 if a.dtype == torch.float64 else torch.float32)


def mse_grad(a: Tensor, b: Tensor, scale: float | None = None, out: Tensor | None = None):
    """Sum of squared differences of two same-shape 2-D tensors, in one pass.

    Returns ``sum((a - b)**2)`` as a 0-dim fp32 tensor (fp64 for fp64 inputs), reduced in
    an order fixed by the shape, so repeated calls give identical bits. With ``scale``,
    also returns ``scale * (a - b)``: written into ``out`` (a's dtype or fp32, same shape,
    rows may be strided) when given, else into a new tensor. ``a``/``b``: fp32, fp16 or
    bf16 (fp64 on CPU), unit column stride, rows may be strided. The sum is
    differentiable (d/da = 2 (a - b)); the ``out`` form is not.
    """
    _check(a, b, out)  # before dispatch, so bad input gets our message, not the dispatcher's
    if out is not None:
        if scale is None:
            raise ValueError(f"lrc_ext.{_OP}: 'out' was given without 'scale'")
        return torch.ops.lrc_ext.mse_grad_out(a, b, float(scale), out), out
    s, g = torch.ops.lrc_ext.mse_grad(a, b, float(scale if scale is not None else 0.0), scale is not None)
    return (s, g) if scale is not None else s
