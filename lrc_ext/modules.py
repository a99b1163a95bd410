"""FusedCloneLinear: a student linear cloned from a frozen teacher nn.Linear (docs/DESIGN.md,
"The method"), and the one switch that picks fused or reference ops."""
from __future__ import annotations

import functools
import importlib

import torch
from torch import nn

from . import _ext
from .ops.clone_linear import side_is_out


def resolve_op(name: str, fused: bool | None, variant: str = ""):
    """``lrc_ext.ops.<name>.<name><variant>`` (the fused op) or its ``<name><variant>_reference``
    (variant "_ws": the op that takes W_S formed by lrc_ext/step_weights.py).

    fused=False: always the reference. fused=True/None: the fused op when that module defines it,
    else the reference, so the same model code runs before and after the kernels land.
    """
    mod = _MODULES.get(name)
    if mod is None:  # import once: a dict lookup afterwards keeps torch.compile graphs whole
        mod = _MODULES[name] = importlib.import_module(f"lrc_ext.ops.{name}")
    # Attributes are read on every call, so a wrapped or patched op (profilers, tests) is seen.
    ref = getattr(mod, f"{name}{variant}_reference")
    if fused is False:
        return ref
    op = getattr(mod, name + variant, None) or ref
    if op is not ref and _cuda_fallback():
        return functools.partial(_by_device, op, ref)  # kernels unusable on this GPU: reference there
    return op


def _cuda_fallback() -> bool:
    """A GPU torch can use on which our kernels cannot run (checked once: lrc_ext/_ext.py)."""
    if _FALLBACK[0] is None:
        _FALLBACK[0] = torch.cuda.is_available() and not _ext.cuda_kernels_ok()[0]
    return _FALLBACK[0]


_FALLBACK: list = [None]


def _by_device(fused, ref, x, *args, **kw):
    """The fused op on CPU tensors, the reference on CUDA ones (cuda_kernels_ok said no)."""
    return (ref if x.is_cuda else fused)(x, *args, **kw)


_MODULES: dict = {}


def student_placement(teacher_weight: torch.Tensor, dtype: torch.dtype | None = None):
    """(dtype, device) of a trainable tensor made beside ``teacher_weight``: ``dtype`` or the
    teacher's, on the teacher's device, except that a teacher on the meta device (whose
    weights are loaded after sharding, lrc_ext/distributed.py) gets real CPU trainables."""
    w = teacher_weight
    return dtype or w.dtype, (torch.device("cpu") if w.is_meta else w.device)


class FusedCloneLinear(nn.Module):
    """Student linear with weight ``W_T @ P`` (side="in") or ``P.T @ W_T`` (side="out").

    Only ``proj`` (d_T, d_S), N(0, init_std), is a parameter, in ``dtype`` (default: the teacher
    weight's; a trainer keeps fp32 masters beside a bf16 teacher). The teacher nn.Linear is held by
    reference, not registered, so its weight is neither copied nor listed twice in
    parameters()/state_dict(); move the teacher yourself when using this module on its own.
    ``forward(x)`` returns y; ``forward(x, target)`` returns (y, mse) with mse the mean of
    (y - target)^2 (target in the teacher's width for side="out": compared as target @ P);
    ``row_weight`` makes it the weighted mean over rows (see lrc_ext/ops/clone_linear.py).
    """

    def __init__(self, teacher_linear: nn.Linear, student_features: int, side: str = "in",
                 fused: bool | None = None, init_std: float = 0.02, dtype: torch.dtype | None = None):
        super().__init__()
        side_is_out(side, "FusedCloneLinear")
        if not isinstance(teacher_linear, nn.Linear):
            raise TypeError(f"FusedCloneLinear: teacher_linear must be an nn.Linear, "
                            f"got {type(teacher_linear).__name__}")
        if side == "out" and teacher_linear.bias is not None:
            raise ValueError("FusedCloneLinear: an output-side teacher linear with a bias is not supported")
        w = teacher_linear.weight
        d_t = w.shape[1] if side == "in" else w.shape[0]
        if not 0 < int(student_features) <= d_t:
            raise ValueError(f"FusedCloneLinear: student_features must be in [1, {d_t}], got {student_features}")
        self.__dict__["teacher"] = teacher_linear  # plain attribute: bypasses Module registration
        self.side, self.fused = side, fused
        self.__dict__["step_ws"] = None  # W_S of the optimiser step (lrc_ext/step_weights.py), if any
        # True: W_S is not kept from forward to backward but formed again there (set under FSDP2)
        self.recompute_ws = False
        dtype, device = student_placement(w, dtype)
        self.proj = nn.Parameter(torch.empty(d_t, int(student_features), dtype=dtype, device=device))
        nn.init.normal_(self.proj, 0.0, init_std)

    @property
    def in_features(self) -> int:
        return self.proj.shape[1] if self.side == "in" else self.teacher.in_features

    @property
    def out_features(self) -> int:
        return self.teacher.out_features if self.side == "in" else self.proj.shape[1]

    def student_weight(self) -> torch.Tensor:
        """The materialised W_S (out_S, in_S), for export (in the projection's dtype)."""
        w = self.teacher.weight.detach().to(self.proj.dtype)
        return w @ self.proj if self.side == "in" else self.proj.t() @ w

    def student_bias(self):
        b = self.teacher.bias if self.side == "in" else None
        return None if b is None else b.detach()

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None, fused: bool | None = None,
                row_weight: torch.Tensor | None = None):
        fused = self.fused if fused is None else fused
        extra = {} if row_weight is None else {"row_weight": row_weight}  # the MSE's row weights, if any
        w_s = self.__dict__.get("step_ws")
        if w_s is not None:  # formed once this optimiser step; P enters only through the target
            y, mse = resolve_op("clone_linear", fused, "_ws")(x, w_s, self.student_bias(), target, self.proj,
                                                              self.side, grad_acc=self.__dict__.get("step_ws_grad"),
                                                              **extra)
            return y if target is None else (y, mse)
        op = resolve_op("clone_linear", fused)
        if self.recompute_ws:
            extra["recompute_ws"] = True
        # detach: the teacher stays frozen even if the caller left requires_grad on its weights
        y, mse = op(x, self.teacher.weight.detach(), self.proj, self.student_bias(), target, self.side, **extra)
        return y if target is None else (y, mse)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, side={self.side!r}"
