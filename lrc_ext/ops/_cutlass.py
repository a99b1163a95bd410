"""clone_linear's CUTLASS sm90 path: the GEMM with the clone MSE in its epilogue.

Kernels: csrc/clone_linear_sm90*.{h,cuh,cu} (design notes in clone_linear_sm90.cuh).

    side="in"   one kernel: y = x @ W_S.T (+ bias), d = y - y_T, the d^2 partials
    side="out"  y = x @ W_S.T by cuBLAS, then one kernel: the target GEMM t = y_T @ P with
                C = y, whose epilogue stores d = y - t and the partials (t is never written)

then a fixed-order sum of the partials gives the MSE (deterministic, fp32). The saved
tensors are the cuBLAS path's (W_S, d, G_t), so the backward is shared.

The backward keeps the merge kernel g = grad_y + s * d: g is the A operand of grad_x = g W_S
and of grad_W_S = g.T x, and an sm90 TMA mainloop feeds operands from global memory to shared
memory to the tensor cores with no register stage in which to add s * d (CUTLASS's only
register-staged A transform is the mixed-dtype one, which reads one tensor, not two);
splitting by linearity (grad_y W_S + s (d W_S)) doubles the GEMM FLOPs to save one
elementwise pass. One merge pass feeding both GEMMs and the bias sum is the cheaper schedule.

Which path a call takes: :func:`choose`. The CUTLASS path is opt-in (``LRC_CUTLASS=1``)
until its CUDA tests and benchmark have run on an H100/H200; sm_80 and other GPUs, fp32,
empty inputs, widths that are not multiples of 8, and tensors whose rows are not 16-byte
aligned always take the cuBLAS path.
"""
from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor

from .. import _ext

ENV = "LRC_CUTLASS"
_OP = "clone_linear"
_DTYPES = (torch.bfloat16, torch.float16)
_forced: bool | None = None  # set by forced(): overrides LRC_CUTLASS


def built() -> bool:
    """True when this build has the CUTLASS sm90 kernels."""
    return _ext.available() and bool(getattr(_ext._C, "with_cutlass", False))


def enabled() -> bool:
    """True when the user opted in (the path is not yet verified on a GPU)."""
    return _forced if _forced is not None else os.environ.get(ENV, "") == "1"


@contextlib.contextmanager
def forced(on: bool):
    """Within the block, eligible calls take (on) or never take (off) the CUTLASS path,
    whatever LRC_CUTLASS says: for benchmarks that time both paths in one process."""
    global _forced
    old, _forced = _forced, bool(on)
    try:
        yield
    finally:
        _forced = old


def status() -> str:
    """One line for `python -m lrc_ext.info`."""
    if not built():
        return "not in this build (needs nvcc with 90a in LRC_CUDA_ARCHS and the nvidia-cutlass headers)"
    if enabled():
        return f"on for sm_90 bf16/fp16 calls ({ENV}=1; not yet verified on an H100/H200)"
    return f"built, opt-in: set {ENV}=1 (not yet verified on an H100/H200)"


def _is_cuda(t: Tensor) -> bool:
    return t.device.type == "cuda"


def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def _tma_ok(t: Tensor) -> bool:
    """2-D, unit column stride, 16-byte-aligned start and row stride (TMA's rules)."""
    if t.dim() != 2 or (t.size(1) > 1 and t.stride(1) != 1):
        return False
    return t.data_ptr() % 16 == 0 and _ext.row_stride(t) % 8 == 0 and _ext.row_stride(t) >= t.size(1)


def choose(x: Tensor, w_s: Tensor, bias: Tensor | None, target: Tensor | None, proj: Tensor,
           side_out: bool) -> str:
    """'cutlass' or 'cublas' for one (validated) call; x 2-D (N, in_S), target 2-D."""
    if target is None or not enabled() or not built():
        return "cublas"
    if not _is_cuda(x) or x.dtype not in _DTYPES or _capability(x.device) != (9, 0):
        return "cublas"
    # (m, n, k) of the fused GEMM and the operands it reads through TMA.
    if side_out:
        (k, n), operands = proj.shape, (target, proj)
    else:
        (n, k), operands = w_s.shape, (x, w_s, target)
    if x.shape[0] == 0 or n % 8 or k % 8 or max(x.shape[0], n, k) >= 2**31:
        return "cublas"
    if not all(_tma_ok(t) for t in operands):
        return "cublas"
    if bias is not None and (not bias.is_contiguous() or bias.data_ptr() % 16):
        return "cublas"
    return "cutlass"


def forward(x: Tensor, w_s: Tensor, bias: Tensor | None, target: Tensor | None, proj: Tensor,
            side_out: bool):
    """(y, d, mse) from the CUTLASS kernels, or None when this call takes the cuBLAS path."""
    if choose(x, w_s, bias, target, proj, side_out) != "cutlass":
        return None
    c = _ext.require_cuda(_OP)
    m, rs, code = x.shape[0], _ext.row_stride, _ext.DTYPE_CODES[x.dtype]
    with torch.cuda.device(x.device):
        if side_out:
            y = torch.mm(x, w_s.t())
            k, n = proj.shape
        else:
            n, k = w_s.shape
            y = x.new_empty((m, n))
        d = torch.empty_like(y)
        mse = torch.empty((), dtype=torch.float32, device=x.device)
        ws = torch.empty(c.clone_linear_sm90_workspace(side_out, m, n, k, code), dtype=torch.uint8, device=x.device)
        tail = (m, n, k, code, 1.0 / (m * n), mse.data_ptr(), ws.data_ptr(), ws.numel(), _ext.stream(x))
        if side_out:
            c.clone_linear_sm90_out(target.data_ptr(), rs(target), proj.data_ptr(), rs(proj), y.data_ptr(), n,
                                    d.data_ptr(), n, *tail)
        else:
            c.clone_linear_sm90_in(x.data_ptr(), rs(x), w_s.data_ptr(), rs(w_s),
                                   bias.data_ptr() if bias is not None else 0, target.data_ptr(), rs(target),
                                   y.data_ptr(), n, d.data_ptr(), n, *tail)
    return y, d, mse
