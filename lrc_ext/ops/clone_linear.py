"""clone_linear: student linear formed from a frozen teacher weight and a trainable
projection, plus the activation-clone MSE (LRC_SPEC "Losses").

    side="in"  (q, k, v, gate, up): W_S = W_T @ P      y = x @ W_S.T (+ bias)   target: y_T
    side="out" (o, down):           W_S = P.T @ W_T    y = x @ W_S.T            target: y_T @ P

x: (..., in_S); weight W_T: (out_T, in_T); proj P: (d_T, d_S); bias: (out_T,) or None.
Returns (y, mse) with mse the 0-dim fp32 mean of (y - target')^2, or (y, None) when no
target is given.
"""
from __future__ import annotations

import torch
from torch import Tensor


def clone_linear_reference(x: Tensor, weight: Tensor, proj: Tensor, bias: Tensor | None = None,
                           target: Tensor | None = None, side: str = "in"):
    """Plain PyTorch: the oracle every fused path is tested against."""
    if side == "in":
        w_s = weight @ proj
    elif side == "out":
        w_s = proj.t() @ weight
    else:
        raise ValueError(f"clone_linear: side must be 'in' or 'out', got {side!r}")
    y = torch.nn.functional.linear(x, w_s, bias if side == "in" else None)
    if target is None:
        return y, None
    tgt = target if side == "in" else target @ proj
    # (d*d).mean() keeps only the difference alive for backward, not both y and target.
    d = (y - tgt).float()
    return y, (d * d).mean()
