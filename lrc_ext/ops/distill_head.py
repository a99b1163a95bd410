"""distill_head: teacher + student LM heads with KL and CE (LRC_SPEC "Losses").

h_s: (N, d_S) student final hidden (after the student's final norm);
h_t: (N, d_T) teacher final hidden (after the teacher's final norm);
w_head_t: (V, d_T) teacher head weight; p_head: (d_T, d_S), W_head_S = w_head_t @ p_head;
labels: (N,) next-token ids, already shifted, -100 = ignored (counts in no term).

lm = lm_weight * mean CE over non-ignored tokens
kl = kl_weight * sum_{non-ignored tokens, vocab} p_T (log p_T - log p_S),  p = softmax(z / tau)
     divided by batch_size ("batchmean", the authors' reduction over (B, S, V)) or by the
     number of non-ignored tokens ("token"); times tau^2 when tau_squared.
Both are 0-dim fp32; an all-ignored batch gives 0 (no NaN).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def distill_head_reference(h_s: Tensor, h_t: Tensor, w_head_t: Tensor, p_head: Tensor, labels: Tensor, *,
                           tau: float = 40.0, lm_weight: float = 1.0, kl_weight: float = 1.0,
                           kl_reduction: str = "batchmean", batch_size: int | None = None,
                           tau_squared: bool = False):
    """Plain PyTorch with full N x V logits: the oracle for the fused op."""
    if kl_reduction not in ("batchmean", "token"):
        raise ValueError(f"distill_head: kl_reduction must be 'batchmean' or 'token', got {kl_reduction!r}")
    valid = labels != -100
    n_valid = valid.sum()
    z_s = (h_s @ (w_head_t @ p_head).t()).float()
    z_t = (h_t @ w_head_t.t()).float()
    ce = F.cross_entropy(z_s, labels, ignore_index=-100, reduction="sum") / n_valid.clamp(min=1)
    logp_s = F.log_softmax(z_s / tau, dim=-1)
    logp_t = F.log_softmax(z_t / tau, dim=-1)
    kl_tok = F.kl_div(logp_s, logp_t, log_target=True, reduction="none").sum(-1)
    kl_sum = (kl_tok * valid).sum()
    if kl_reduction == "batchmean":
        kl = kl_sum / (batch_size if batch_size is not None else 1)
    else:
        kl = kl_sum / n_valid.clamp(min=1)
    if tau_squared:
        kl = kl * tau * tau
    return lm_weight * ce, kl_weight * kl
