"""Access to the compiled module lrc_ext._C and the checks every op shares.

The compiled module takes raw pointers; everything that knows about torch tensors
(validation, allocation, streams) lives here and in lrc_ext/ops/.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import warnings
from pathlib import Path

import torch


def _load():
    try:
        from . import _C  # type: ignore[attr-defined]
        return _C, None
    except ImportError as e:
        err = e
    # Run from a source checkout (e.g. `python -m lrc_ext.train` in the repo root): the
    # tree has no build, so use the compiled module of the installed copy, if any.
    here = Path(__file__).resolve().parent
    for entry in sys.path:
        pkg = Path(entry or ".").resolve() / "lrc_ext"
        if pkg == here or not pkg.is_dir():
            continue
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            so = pkg / f"_C{suffix}"
            if so.exists():
                spec = importlib.util.spec_from_file_location("lrc_ext._C", so)
                mod = importlib.util.module_from_spec(spec)
                spec.loader.exec_module(mod)
                sys.modules["lrc_ext._C"] = mod
                return mod, None
    return None, err


_C, _IMPORT_ERROR = _load()

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float64: 3}  # csrc/common.h

# What the kernels take: fp64 on the CPU only (for gradcheck), fp32 / fp16 / bf16 everywhere.
DTYPES_CPU = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
DTYPES_CUDA = (torch.float32, torch.float16, torch.bfloat16)


def dtypes_for(t: torch.Tensor) -> tuple:
    return DTYPES_CUDA if t.device.type == "cuda" else DTYPES_CPU


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype our kernels accumulate and return losses in: fp64 for fp64 input (so that
    gradcheck sees full precision), fp32 for everything else (docs/DESIGN.md, "Numerics")."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def available() -> bool:
    return _C is not None


def cuda_available() -> bool:
    """True when the CUDA kernels were compiled in, a GPU is visible to torch and the kernels
    can run on it (see cuda_kernels_ok)."""
    return _C is not None and bool(_C.with_cuda) and torch.cuda.is_available() and cuda_kernels_ok()[0]


MIN_CAPABILITY = (8, 0)  # the oldest machine code the build embeds (sm_80); newer GPUs JIT the PTX
_CUDA_STATE: tuple | None = None


def _probe_cuda() -> tuple[bool, str]:
    """(ok, why not) for running our CUDA kernels where torch's CUDA runs."""
    if _C is None or not _C.with_cuda:
        return False, "lrc_ext was built without CUDA kernels"
    if not torch.cuda.is_available():
        return False, "no GPU is visible to torch"
    built = _C.build_info().get("cuda_version", "?")
    if _C.cuda_device_count() == 0:  # the runtime linked into lrc_ext cannot use this driver
        drv = _C.cuda_driver_version() if hasattr(_C, "cuda_driver_version") else 0
        have = f"CUDA {drv // 1000}.{drv % 1000 // 10}" if drv else "an unknown CUDA version"
        return False, (f"the installed NVIDIA driver supports {have}, older than the CUDA {built} runtime "
                       f"lrc_ext's kernels were built with (torch {torch.version.cuda or '?'} runs on it)")
    cc = min(torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count()))
    if cc < MIN_CAPABILITY:
        return False, (f"a GPU of compute capability {cc[0]}.{cc[1]} is below {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]}, "
                       f"the oldest lrc_ext's kernels are built for")
    return True, ""


def cuda_kernels_ok() -> tuple[bool, str]:
    """Whether our CUDA kernels run here, checked once. Where torch's CUDA runs but ours cannot
    (driver older than the build's CUDA, a GPU older than sm_80), the fused ops fall back to the
    pure-PyTorch reference on CUDA tensors, with one warning."""
    global _CUDA_STATE
    if _CUDA_STATE is None:
        _CUDA_STATE = _probe_cuda()
        if not _CUDA_STATE[0] and _C is not None and _C.with_cuda and torch.cuda.is_available():
            warnings.warn(f"lrc_ext: CUDA kernels disabled: {_CUDA_STATE[1]}; the pure-PyTorch reference ops run "
                          f"on CUDA tensors instead (same results, slower). Rebuild lrc_ext against this machine's "
                          f"CUDA (pip install .) to use the kernels.", RuntimeWarning, stacklevel=3)
    return _CUDA_STATE


def lib(op: str):
    if _C is None:
        raise RuntimeError(f"lrc_ext.{op}: the compiled extension lrc_ext._C is not available "
                           f"({_IMPORT_ERROR}); reinstall with `pip install .`")
    return _C


def require_cuda(op: str):
    c = lib(op)
    if c.with_cuda and not cuda_kernels_ok()[0]:
        raise RuntimeError(f"lrc_ext.{op}: the CUDA kernels cannot run here: {cuda_kernels_ok()[1]}; use the "
                           f"reference op (lrc_ext.ops.{op}.{op}_reference) or rebuild lrc_ext (pip install .)")
    if not c.with_cuda:
        raise RuntimeError(f"lrc_ext.{op}: got CUDA tensors, but this lrc_ext was built without CUDA kernels "
                           f"(no nvcc at build time). Rebuild on a machine with nvcc (LRC_CUDA=ON pip install .) "
                           f"or move the inputs to the CPU.")
    return c


def check_tensors(op: str, optional=(), **named):
    """TypeError naming the op and argument for anything that is not a tensor (None is allowed
    for the names in `optional`). Public functions call it before dispatch, so that the message
    is ours, not the dispatcher's."""
    for name, t in named.items():
        if not isinstance(t, torch.Tensor) and not (t is None and name in optional):
            raise TypeError(f"lrc_ext.{op}: argument '{name}' must be a torch.Tensor, got {type(t).__name__}")


def check(op: str, name: str, t, *, ndim: int | None = None, dtypes=None, device: torch.device | None = None):
    """Raise a ValueError naming the op and argument when t is not what the op takes."""
    check_tensors(op, **{name: t})
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"lrc_ext.{op}: argument '{name}' must be {ndim}-D, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"lrc_ext.{op}: argument '{name}' has dtype {str(t.dtype).replace('torch.', '')}, "
                         f"expected one of: {names}")
    if device is not None and t.device != device:
        raise ValueError(f"lrc_ext.{op}: argument '{name}' is on {t.device}, expected {device} "
                         f"(all inputs must be on one device)")
    if t.device.type not in ("cpu", "cuda", "meta"):
        raise ValueError(f"lrc_ext.{op}: argument '{name}' is on {t.device}; only cpu and cuda are supported")


def row_stride(t: torch.Tensor) -> int:
    return t.stride(0) if t.size(0) > 1 else t.size(1)


def stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream
