"""fp32 CPU GEMMs of the linear form ``a @ b.T`` through the library that runs them faster here
(docs/DESIGN.md, "CPU GEMMs").

torch multiplies fp32 matrices on the CPU with MKL. On AMD CPUs MKL takes a generic code path
(it dispatches its fastest kernels by CPU vendor), while oneDNN, which torch also bundles (its
``mkldnn::_linear_pointwise`` op, what torch.compile's CPU code calls for linears), runs the
same products at full precision 1.1-1.5x faster there (the head's logits gain most; measured on
an AMD EPYC with AVX-512: bench/results/cpu_gemm.md). On Intel CPUs MKL is the fast one. So:

- backend "auto" (the default): oneDNN on AMD CPUs, MKL elsewhere; "mkl" / "onednn" force one
  (``set_backend``, the trainer's ``--cpu-gemm``, env ``LRC_CPU_GEMM``). The choice is a rule
  on the CPU, not a timing, so that a resumed run takes the same path (bit-exact resume).
- Only the linear form (``x @ W.T``: forwards, ``grad_x = g @ W`` with W transposed, the head's
  logits) and only products of at least ``MIN_MACS`` multiply-adds go to oneDNN: smaller ones
  pay more for its call than they gain, and the weight-gradient form (``g.T @ x``, a long inner
  dimension over the tokens) runs slower there than in MKL, so it stays with torch.
- fp32 only (oneDNN has no fp64 GEMM; bf16 / fp16 GEMMs already go to oneDNN inside torch).

``linear`` is what our ops call; ``teacher_linears(x)`` routes the frozen teacher's own
``nn.Linear`` calls (transformers' modules, no grad) the same way for the span of a block.
"""
from __future__ import annotations

import contextlib
import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

BACKENDS = ("auto", "mkl", "onednn")
MIN_MACS = 1 << 25  # below: MKL's call is cheaper (measured crossover ~2^24.5 multiply-adds)
_backend = os.environ.get("LRC_CPU_GEMM", "auto")


def set_backend(name: str) -> None:
    """'auto' (oneDNN on AMD CPUs), 'mkl' (torch's own GEMM) or 'onednn'."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"CPU GEMM backend must be one of {list(BACKENDS)}, got {name!r}")
    _backend = name
    _resolved.cache_clear()


@functools.lru_cache(maxsize=None)
def onednn_available() -> bool:
    """torch was built with oneDNN and has its linear op (a private op: checked, not assumed)."""
    return bool(torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def cpuinfo_field(*keys: str) -> str:
    """The value of the first /proc/cpuinfo line starting with one of keys ('' where none)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith(keys):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


@functools.lru_cache(maxsize=None)
def cpu_vendor() -> str:
    """The CPU's vendor id ('AuthenticAMD', 'GenuineIntel', ...), '' where /proc/cpuinfo has none."""
    return cpuinfo_field("vendor_id")


@functools.lru_cache(maxsize=None)
def _resolved() -> str:
    if _backend not in BACKENDS:
        raise ValueError(f"LRC_CPU_GEMM must be one of {list(BACKENDS)}, got {_backend!r}")
    name = _backend if _backend != "auto" else ("onednn" if cpu_vendor() == "AuthenticAMD" else "mkl")
    return name if name == "mkl" or onednn_available() else "mkl"


def backend() -> str:
    """The backend fp32 CPU linears use in this process: 'mkl' or 'onednn'."""
    return _resolved()


def describe() -> str:
    """The backend in use and why, for a run's plan line."""
    name = _resolved()
    if _backend != "auto":
        how = f"{_backend} asked for (--cpu-gemm / LRC_CPU_GEMM)" + (
            "" if name == _backend else ", but this torch lacks oneDNN's linear op")
    else:
        vendor = cpu_vendor() or "unknown vendor"
        how = f"auto: {vendor} CPU" + (", on which MKL runs a generic path" if name == "onednn" else "")
        if vendor == "AuthenticAMD" and name == "mkl":
            how += ", but this torch lacks oneDNN's linear op"
    return f"fp32 CPU GEMMs on {'oneDNN' if name == 'onednn' else 'MKL'} ({how})"


def _positive_strides(t: Tensor) -> bool:
    return all(s > 0 or n == 1 for s, n in zip(t.stride(), t.shape))


def takes(a: Tensor, b: Tensor, bias: Tensor | None = None) -> bool:
    """Whether ``linear(a, b, bias)`` runs on oneDNN."""
    if a.device.type != "cpu" or a.dtype != torch.float32 or b.dtype != torch.float32 or a.dim() != 2:
        return False
    if b.dim() != 2 or a.shape[1] != b.shape[1]:
        return False
    macs = a.shape[0] * a.shape[1] * b.shape[0]
    if macs == 0 or macs < MIN_MACS:  # oneDNN has no empty product
        return False
    if bias is not None and (bias.dtype != torch.float32 or bias.shape != (b.shape[0],) or not bias.is_contiguous()):
        return False
    if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad or (bias is not None and bias.requires_grad)):
        return False  # the op has no derivative: autograd's callers keep torch's GEMM
    return _positive_strides(a) and _positive_strides(b) and _resolved() == "onednn"


def linear(a: Tensor, b: Tensor, bias: Tensor | None = None) -> Tensor:
    """``a @ b.T (+ bias)``: a (M, K), b (N, K), any positive strides; a fresh (M, N) result."""
    if takes(a, b, bias):
        return torch.ops.mkldnn._linear_pointwise(a, b, bias, "none", [], "")
    return torch.addmm(bias, a, b.t()) if bias is not None else torch.mm(a, b.t())


class _Linears(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and not torch.is_grad_enabled():
            x, w = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if x.dim() >= 2 and w.dim() == 2 and x.shape[-1] == w.shape[1]:
                x2 = x.reshape(-1, x.shape[-1])
                if takes(x2, w, bias):
                    return linear(x2, w, bias).view(*x.shape[:-1], w.shape[0])
        return func(*args, **kwargs)


def teacher_linears(x: Tensor):
    """A context in which no-grad ``F.linear`` calls (the frozen teacher's nn.Linear modules,
    fed x) take ``linear``'s path; a no-op context, with no per-call hook, where that path
    would be torch's anyway (x not fp32 on the CPU, or the backend MKL)."""
    if x.device.type == "cpu" and x.dtype == torch.float32 and backend() == "onednn":
        return _Linears()
    return contextlib.nullcontext()
