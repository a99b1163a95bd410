"""Access to the compiled module lrc_ext._C and the checks every op shares.

The compiled module takes raw pointers; everything that knows about torch tensors
(validation, allocation, streams) lives here and in lrc_ext/ops/.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
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


def available() -> bool:
    return _C is not None


def cuda_available() -> bool:
    """True when the CUDA kernels were compiled in and a GPU is visible to torch."""
    return _C is not None and bool(_C.with_cuda) and torch.cuda.is_available()


def lib(op: str):
    if _C is None:
        raise RuntimeError(f"lrc_ext.{op}: the compiled extension lrc_ext._C is not available "
                           f"({_IMPORT_ERROR}); reinstall with `pip install .`")
    return _C


def require_cuda(op: str):
    c = lib(op)
    if not c.with_cuda:
        raise RuntimeError(f"lrc_ext.{op}: got CUDA tensors, but this lrc_ext was built without CUDA kernels "
                           f"(no nvcc at build time). Rebuild on a machine with nvcc (LRC_CUDA=ON pip install .) "
                           f"or move the inputs to the CPU.")
    return c


def check(op: str, name: str, t, *, ndim: int | None = None, dtypes=None, device: torch.device | None = None):
    """Raise a ValueError naming the op and argument when t is not what the op takes."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"lrc_ext.{op}: argument '{name}' must be a torch.Tensor, got {type(t).__name__}")
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


def check_rows(op: str, name: str, t: torch.Tensor):
    """2-D with unit column stride (rows may be strided)."""
    if t.size(1) > 1 and t.stride(1) != 1:
        raise ValueError(f"lrc_ext.{op}: argument '{name}' must have unit stride along its last dimension, "
                         f"got strides {tuple(t.stride())}; call .contiguous() first")
    if t.size(0) > 1 and t.stride(0) < t.size(1):
        raise ValueError(f"lrc_ext.{op}: argument '{name}' has overlapping rows (strides {tuple(t.stride())})")


def row_stride(t: torch.Tensor) -> int:
    return t.stride(0) if t.size(0) > 1 else t.size(1)


def stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream
