"""Student weights formed once an optimiser step, not once a micro-batch (docs/DESIGN.md,
"Step weights").

    sw = StepWeights(model)       # at the step's start: every W_S = formation(W_T, P), graph kept
    ... micro-batches ...         # each clone linear / the head reads a detached leaf copy of its W_S
                                  # and adds grad_W_S into that W_S's buffer, in place
    sw.backward(reduce)           # at the step's end: grad_P from the accumulated grad_W_S, once

The buffers (``grad_acc`` of the ops, lrc_ext/ops/_grad_acc.py; in P's dtype) are kept on the
modules from one step to the next and zeroed at each step's start: a micro-batch allocates no
gradient of W_S's size and autograd runs no accumulation pass over one (what it did when the
leaves took their gradients themselves). The price: one fp32 copy of the student's weights held
between steps as well. Ops that take no buffer (a caller's own) still reach the leaf's .grad,
which backward() adds.

Formed: every FusedCloneLinear's W_S (W_T @ P or P.T @ W_T) and the head's W_head_S
(W_head_T @ P_head). With a tied head (P_head is P_emb and the teacher ties its embedding to
its head) W_head_S is also the student's embedding E_S, so the lookup E_S[ids] replaces
E_T[ids] @ P_emb; an untied embedding keeps the per-token product, which costs less than
forming E_S (2 N d_T d_S a micro-batch against 2 V d_T d_S). What does not go through W_S (the
output side's target y_T @ P, the norms) gets its gradient in each micro-batch's backward as
before. ``reduce``: a callable on the list of leaf gradients (DDP: the all-reduce, once a
step) before they are backpropagated.

Not used under FSDP2 (a layer's W_T is whole only while its group is gathered) nor outside
training steps (evaluation, the pca init, API calls): then the ops form W_S themselves.
"""
from __future__ import annotations

import torch

from .modules import FusedCloneLinear


def _form(w_t: torch.Tensor, p: torch.Tensor, side_in: bool) -> torch.Tensor:
    """W_T @ P (side in) or P.T @ W_T in the teacher's dtype (a bf16 teacher beside fp32 masters:
    P is cast, never the frozen W_T, as autocast does per micro-batch), held in P's dtype so that
    grad_W_S accumulates over the micro-batches in fp32."""
    p_ = p.to(w_t.dtype) if w_t.dtype in (torch.bfloat16, torch.float16) else p
    w_s = w_t @ p_ if side_in else p_.t() @ w_t
    return w_s.to(p.dtype)


def _add(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    """a + b, dense, with b possibly sparse (an embedding lookup's rows)."""
    if a is None:
        return b.to_dense() if b.is_sparse else b
    if a.is_sparse:
        a, b = b.to_dense() if b.is_sparse else b, a
    return a.add_(b)


class StepWeights:
    """The W_S of one optimiser step for ``model`` (a LowRankClone); see the module docstring."""

    def __init__(self, model):
        self.model = model
        self.pairs: list = []  # (W_S with its graph to P, the leaf the micro-batches read, its buffer, version)
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False), \
                torch.enable_grad():  # master dtype, whatever context the caller is in
            for m in model.modules():
                if isinstance(m, FusedCloneLinear):
                    w_t = m.teacher.weight.detach()
                    m.__dict__["step_ws"] = self._leaf(_form(w_t, m.proj, m.side == "in"), m, "step_ws_grad")
            w_head = _form(model.teacher.get_output_embeddings().weight.detach(), model.head_proj, True)
            model.__dict__["step_head"] = self._leaf(w_head, model, "step_head_grad")
            emb = model.teacher.get_input_embeddings().weight
            tied = model.head_proj is model.p_emb and emb is model.teacher.get_output_embeddings().weight
            # its own leaf of the same W_S: the lookup's gradient stays sparse until backward()
            model.__dict__["step_emb"] = self._leaf(w_head) if tied else None

    def _leaf(self, w: torch.Tensor, owner=None, buf_name: str = "") -> torch.Tensor:
        """A detached copy of ``w`` for the micro-batches; with an owner, its zeroed gradient
        buffer ``owner.<buf_name>`` (reused from the last step when it still fits)."""
        leaf = w.detach().requires_grad_(w.requires_grad)
        buf = None
        if owner is not None and not w.requires_grad:
            owner.__dict__[buf_name] = None  # a frozen P: nothing to accumulate
        elif owner is not None:
            buf = owner.__dict__.get(buf_name)
            if buf is None or buf.shape != w.shape or buf.dtype != w.dtype or buf.device != w.device:
                buf = owner.__dict__[buf_name] = torch.zeros_like(w, memory_format=torch.contiguous_format)
            else:
                buf.zero_()
        # the version counter tells backward() whether any op wrote into the buffer this step
        self.pairs.append((w, leaf, buf, buf._version if buf is not None else 0))
        return leaf

    def backward(self, reduce=None):
        """grad_P (into P.grad) from the leaves' accumulated gradients, once; then clear."""
        try:
            by_w: dict = {}  # one gradient a formed W_S (a tied head's E_S has two leaves)
            for w, leaf, buf, version in self.pairs:
                if not w.requires_grad:
                    continue
                # an untouched buffer: no op used this W_S (its P keeps no gradient, as autograd leaves it)
                for part in (buf if buf is not None and buf._version != version else None, leaf.grad):
                    if part is not None:
                        by_w[id(w)] = (w, _add(by_w.get(id(w), (w, None))[1], part))
            outs = list(by_w.values())
            grads = [g for _, g in outs]
            if reduce is not None:
                reduce(grads)
            if outs:
                torch.autograd.backward([w for w, _ in outs], grads)
        finally:
            self.close()

    def close(self):
        """Drop the step's W_S: the ops form their own again."""
        for m in self.model.modules():
            if isinstance(m, FusedCloneLinear):
                m.__dict__["step_ws"] = None
        self.model.__dict__["step_head"] = self.model.__dict__["step_emb"] = None
        self.pairs = []
