"""LowRankClone: a student cloned from a frozen stock transformers teacher (docs/DESIGN.md).

Teacher (no_grad, its own decoder layers) and student run layer by layer in lockstep
(``LayerWalk``, shared with the pca init), so only one layer's clone targets are alive at a
time. The student's math lives in one code path; the only calls that change with ``fused``
are ``clone_linear`` and ``distill_head``.

Padding: the student works on the valid (attention_mask == 1) tokens only, packed into rows;
they are scattered back to (B, S, .) just for attention. Padded tokens therefore count in no
loss term and cost nothing in the linears. The KL counts every valid position, the CE those
with a next-token label (not the last position, nor a label of -100).
"""
from __future__ import annotations

import contextlib
import copy
import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from . import families as fam
from . import init as _init
from .families import KINDS
from .ops import _cpu_gemm
from .modules import FusedCloneLinear, resolve_op, student_placement
from .ops.distill_head import check_options as check_head_options


CLONE_NORMS = ("none", "target")
CLONE_EXCLUDES = ("none", "first", "outliers", "first,outliers")
# clone_exclude "outliers": a token whose teacher residual norm at a layer's input exceeds
# OUTLIER_K x the median over the batch's valid tokens leaves that layer's clone terms.
# Measured on SmolLM2-135M at seq 512 (experiments/clone_scale.py, bench/results/clone_scale.md):
# the sink is 37-175x the median from layer 12 on, every other token <= 12x (<= 3x from layer 10).
OUTLIER_K = 8.0


@dataclass
class LRCOutput:
    """loss = lm + kl + alpha * sum(clone.values()); every term a 0-dim fp32 tensor.

    ``clone`` always has the seven kinds (0 for a kind that is switched off). clone_norm
    "none": each kind's MSE summed over layers (the paper's sum). clone_norm "target": each
    kind's sum over layers of MSE / scale[layer, kind], divided by the number of active
    (layer, kind) terms, so that sum(clone.values()) is their average. With clone_exclude the
    MSEs are means over the kept rows. ``logits`` (B, S, V) only with ``return_logits=True``;
    padded positions hold 0.
    """
    loss: Tensor
    lm: Tensor
    kl: Tensor
    clone: dict = field(default_factory=dict)
    logits: Tensor | None = None


class StudentLayer(nn.Module):
    """One student decoder layer's trainable state: seven projections and the family's
    RMSNorms (two; Gemma-3: four)."""

    def __init__(self, t_layer: nn.Module, d_s: int, fused, init_std: float, layout: fam.Layout, dtype=None):
        super().__init__()
        for kind, (_, side) in KINDS.items():
            setattr(self, kind, FusedCloneLinear(layout.teacher_linear(t_layer, kind), d_s, side, fused, init_std,
                                                 dtype=dtype))
        for n in layout.norms:
            setattr(self, n, _student_norm(getattr(t_layer, n), d_s, dtype))

    # True: the pair's activations are not kept for the backward, which runs the pair again
    # (activation checkpointing; LowRankClone.activation_checkpointing sets it)
    checkpointed = False

    def forward(self, step, *args):
        """``step(*args)``: one lockstep layer (the teacher's layer, then this one), run as this
        module's call so that module hooks frame the pair; under FSDP2 they gather and free the
        pair's weights, the teacher layer's included (lrc_ext/distributed.py). Checkpointed, the
        backward runs ``step`` again inside those hooks (the pair gathered for it)."""
        if self.checkpointed and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(step, *args, use_reentrant=False)
        return step(*args)


def _student_norm(t_norm: nn.Module, d_s: int, dtype=None) -> nn.Module:
    # The family's own RMSNorm class, same eps, width d_S, gain 1 (its stock init).
    dtype, device = student_placement(t_norm.weight, dtype)
    return type(t_norm)(d_s, eps=fam.Layout.eps(t_norm)).to(device=device, dtype=dtype)


@contextlib.contextmanager
def _capture(layer: nn.Module, kinds, layout: fam.Layout):
    """Outputs of the teacher layer's linears of `kinds`, recorded by forward hooks (a fused
    linear's output split into its kinds' parts)."""
    got = {}

    def hook(name, held):
        sizes = fam.split_sizes(layer, name) if len(held) > 1 else None

        def record(m, i, o):
            parts = o.split(sizes, -1) if sizes else (o,)
            for k, part in zip(held, parts):
                if k in kinds:
                    got[k] = part
        return record
    hooks = [layer.get_submodule(name).register_forward_hook(hook(name, held))
             for name, held in layout.modules().items() if set(held) & set(kinds)]
    try:
        yield got
    finally:
        for h in hooks:
            h.remove()


class LayerWalk:
    """One batch through teacher and student, one decoder layer at a time.

    Holds what every layer shares: the layout (the student works on the valid rows only, N of
    B * S; ``pick`` gathers them, ``unpick`` scatters them back, padding 0, for attention), the
    teacher's embeddings ``e_t`` (its layer-0 input), causal masks and RoPE by layer type
    (``mask(tl)``, ``cos_sin(tl)``: Gemma-3 and Phi-3 have sliding-window layers). ``pair`` is
    one lockstep layer. Used by ``LowRankClone.forward`` and by the pca init (lrc_ext/init.py).
    """

    def __init__(self, model: "LowRankClone", input_ids: Tensor, attention_mask: Tensor | None):
        self.model = model
        self.layer, self.row_weight = -1, None  # the layer being stepped; its clone rows' 0/1 weights
        self.B, self.S = B, S = input_ids.shape
        if attention_mask is None or bool(attention_mask.all()):
            self.rows, self.pos = None, torch.arange(S, device=input_ids.device).expand(B, S)
        else:
            self.rows = attention_mask.reshape(-1).nonzero().squeeze(1)
            self.pos = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions start at 0
        t = model.teacher
        self.types = [fam.layer_type(t, i) for i in range(len(t.model.layers))]
        with torch.no_grad():
            self.e_t = t.model.embed_tokens(input_ids)
            kinds = sorted(set(self.types))
            self.masks = fam.causal_masks(t, self.e_t, attention_mask, self.pos, kinds)
            self.rope = fam.rope(t, self.e_t, self.pos, kinds)

    def mask(self, tl: nn.Module):
        return self.masks[self.types[tl.self_attn.layer_idx]]

    def cos_sin(self, tl: nn.Module):
        return self.rope[self.types[tl.self_attn.layer_idx]]

    def pick(self, z: Tensor) -> Tensor:
        """(B, S, w) -> the valid rows (N, w)."""
        z = z.reshape(self.B * self.S, z.shape[-1])
        return z if self.rows is None else z.index_select(0, self.rows)

    def unpick(self, z: Tensor) -> Tensor:
        """(N, w) -> (B, S, w), padded rows 0."""
        if self.rows is not None:
            z = z.new_zeros(self.B * self.S, z.shape[-1]).index_copy(0, self.rows, z)
        return z.view(self.B, self.S, -1)

    @torch.no_grad()
    def teacher_layer(self, tl: nn.Module, x_t: Tensor) -> Tensor:
        with _cpu_gemm.teacher_linears(x_t):  # fp32 CPU: its linears on oneDNN where that is faster
            out = tl(x_t, attention_mask=self.mask(tl), position_ids=self.pos, position_embeddings=self.cos_sin(tl))
        return out[0] if isinstance(out, tuple) else out  # transformers < 5 returns a tuple

    def step(self, sl, tl, x_s: Tensor, x_t: Tensor, kinds, clone: dict):
        """``pair``, adding the layer's clone MSEs into ``clone``. Returns (x_s, x_t)."""
        self.layer += 1
        x_s, x_t, mine = self.pair(sl, tl, x_s, x_t, kinds)
        self.model._add_clone(clone, mine, self.layer)
        return x_s, x_t

    def pair(self, sl, tl, x_s: Tensor, x_t: Tensor, kinds):
        """The teacher's layer (no grad, the outputs of its linears of ``kinds`` captured as
        clone targets; skipped when ``kinds`` is None), then the student's. Returns (x_s, x_t,
        the layer's clone MSEs by kind). A function of its arguments only (walk state aside,
        which it sets the same way each time), so that a checkpointed pair can run again."""
        tgt = None
        if kinds is not None:
            self.row_weight = self.model._clone_rows(self, x_t) if kinds else None
            with _capture(tl, kinds, self.model.layout) as tgt:
                x_t = self.teacher_layer(tl, x_t)
        mine = {}
        x_s = self.model._student_layer(self, sl, tl, x_s, tgt, mine)
        return x_s, x_t, mine


class LowRankClone(nn.Module):
    """Low-Rank Clone of a frozen causal-LM teacher (Llama, Qwen2, Qwen3, Mistral, Gemma-3 text,
    Phi-3 / Phi-4-mini) at width d_S.

    Trainable: per layer seven projections (d_T, d_S) and the family's RMSNorms (two; Gemma-3
    four); P_emb, P_head (tied to P_emb when ``tie_head``; default: when the teacher ties its
    embeddings) and the final norm. Family differences: ``fam.Layout`` (lrc_ext/families.py).

    ``init="normal"`` (the paper's): projections N(0, init_std), norms 1. ``init="pca"``: every
    projection and norm set from the teacher's principal subspace over ``calibration`` token ids
    ((B, S) tensor, or a list; optional ``calibration_attention_mask``), see lrc_ext/init.py;
    ``init_options`` passes basis / refit / ridge / progress there. ``self.init_info`` reports it.

    The clone loss beyond the paper (defaults: the paper's raw sum): ``clone_norm="target"``
    divides each (layer, kind) MSE by the mean square of that teacher activation over the
    ``calibration`` tokens (buffer ``clone_scale``, measured once by ``measure_clone_scales_``,
    kept in state_dict), and averages the terms instead of summing them. ``clone_exclude``
    drops rows from the clone MSEs only (never from KL or CE): "first" the position 0 of each
    sequence (the attention sink), "outliers" the tokens whose teacher residual norm at the
    layer's input is over OUTLIER_K x the batch median, or "first,outliers".
    ``param_dtype``: the trainables' dtype (default: the teacher's). The trainer holds the
    teacher in the compute dtype and passes float32 here: fp32 master weights, cast by
    autocast per call, beside a bf16 teacher that is never cast. A teacher on the meta device
    (FSDP loads its shards after wrapping) gets real CPU trainables.
    """

    def __init__(self, teacher: nn.Module, student_hidden_size: int, *, fused: bool | None = None,
                 tau: float = 40.0, alpha: float = 0.5, use_lm: bool = True, use_kl: bool = True,
                 use_clone: bool = True, clone_kinds=tuple(KINDS), tau_squared: bool = False,
                 kl_reduction: str = "batchmean", attn_clone_space: str = "student",
                 tie_head: bool | None = None, init_std: float = 0.02, tokenizer=None,
                 init: str = "normal", calibration=None, calibration_attention_mask=None,
                 init_options: dict | None = None, clone_norm: str = "none", clone_exclude: str = "none",
                 param_dtype: torch.dtype | None = None):
        super().__init__()
        fam.validate_teacher(teacher)
        if init not in _init.INITS:
            raise ValueError(f"init must be one of {list(_init.INITS)}, got {init!r}")
        if init == "pca" and calibration is None:
            raise ValueError("calibration: init='pca' needs calibration token ids (a (batch, seq) tensor of "
                             "input_ids, or a list of them; a few thousand tokens)")
        if clone_norm not in CLONE_NORMS:
            raise ValueError(f"clone_norm must be one of {list(CLONE_NORMS)}, got {clone_norm!r}")
        if clone_exclude not in CLONE_EXCLUDES:
            raise ValueError(f"clone_exclude must be one of {list(CLONE_EXCLUDES)}, got {clone_exclude!r}")
        if init == "normal" and (init_options or (calibration is not None and clone_norm != "target")):
            raise ValueError("calibration / init_options are only used with init='pca' (calibration also "
                             "with clone_norm='target')")
        d_t = teacher.config.hidden_size
        d_s = student_hidden_size
        if isinstance(d_s, bool) or not isinstance(d_s, int) or not 0 < d_s <= d_t:
            raise ValueError(f"student_hidden_size must be an int in [1, {d_t}] (the teacher's "
                             f"hidden_size), got {d_s!r}")
        bad = set(clone_kinds) - set(KINDS)
        if bad:
            raise ValueError(f"clone_kinds: unknown kinds {sorted(bad)}; known: {list(KINDS)}")
        check_head_options(tau=tau, kl_reduction=kl_reduction)  # now, not at the first forward
        if attn_clone_space not in ("student", "teacher"):
            raise ValueError(f"attn_clone_space must be 'student' or 'teacher', got {attn_clone_space!r}")
        if not alpha >= 0:
            raise ValueError(f"alpha must be >= 0, got {alpha!r}")

        teacher.requires_grad_(False)
        teacher.eval()
        self.teacher = teacher
        self.fused, self.tau, self.alpha = fused, float(tau), float(alpha)
        self.use_lm, self.use_kl, self.tau_squared = bool(use_lm), bool(use_kl), bool(tau_squared)
        self.clone_kinds = tuple(k for k in KINDS if use_clone and k in clone_kinds)
        self.kl_reduction, self.attn_clone_space = kl_reduction, attn_clone_space
        self.clone_norm, self.clone_exclude = clone_norm, clone_exclude
        self.tokenizer = tokenizer
        self.check_values = False  # True: check id / mask / label values of accelerator inputs too (host syncs)

        emb, head = teacher.get_input_embeddings().weight, teacher.get_output_embeddings().weight
        teacher_tied = emb is head
        self.tie_head = teacher_tied if tie_head is None else bool(tie_head)
        # Refuse a width that cannot be exported now, not after training.
        self.student_config, stock_shapes = fam.check_width(teacher, d_s, self.tie_head and teacher_tied)

        p_dtype, p_device = student_placement(emb, param_dtype)

        def proj():
            return nn.Parameter(torch.empty(d_t, d_s, dtype=p_dtype, device=p_device).normal_(0.0, init_std))
        self.p_emb = proj()
        self.p_head = None if self.tie_head else proj()
        base = teacher.model
        self.layout = fam.layout(teacher)
        self.layers = nn.ModuleList(StudentLayer(tl, d_s, fused, init_std, self.layout, param_dtype)
                                    for tl in base.layers)
        self.norm = _student_norm(base.norm, d_s, param_dtype)
        self._fam = fam.family_module(teacher)

        ours = {k: shape for k, (shape, _) in self._export_entries().items()}
        if ours != stock_shapes:
            raise RuntimeError(f"LowRankClone: student tensors do not match the stock "
                               f"{teacher.config.model_type} model: "
                               f"{sorted(set(ours.items()) ^ set(stock_shapes.items()))}")
        # init="pca": start inside the teacher's principal subspace (lrc_ext/init.py); report kept
        self.init_info = {"init": "normal", "init_std": float(init_std)}
        self._scales_ready = clone_norm != "target"
        if clone_norm == "target":  # NaN until measured (or loaded from a state dict)
            self.register_buffer("clone_scale", torch.full((len(self.layers), len(KINDS)), float("nan"),
                                                           device=p_device))
            self.register_load_state_dict_post_hook(_scales_loaded)
        if init == "pca":
            self.init_info = _init.pca_init_(self, calibration, calibration_attention_mask, **(init_options or {}))
        if clone_norm == "target" and calibration is not None:
            self.measure_clone_scales_(calibration, calibration_attention_mask)

    # ---- public helpers -------------------------------------------------------------------
    @property
    def activation_checkpointing(self) -> bool:
        """True: each lockstep layer keeps only its inputs for the backward, which runs the layer
        pair (teacher and student) again: the saved activations of one layer instead of all of
        them, for about one more forward of both models a step."""
        return all(sl.checkpointed for sl in self.layers)

    @activation_checkpointing.setter
    def activation_checkpointing(self, on: bool):
        for sl in self.layers:
            sl.checkpointed = bool(on)

    @property
    def head_proj(self) -> nn.Parameter:
        return self.p_emb if self.p_head is None else self.p_head

    @property
    def student_hidden_size(self) -> int:
        return self.p_emb.shape[1]

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher never trains (no dropout)
        return self

    def trainable_parameters(self):
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict:
        """Projections and student norms only (the teacher is not repeated in checkpoints)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("teacher.")}

    def load_trainable_state_dict(self, sd: dict):
        missing, unexpected = self.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.startswith("teacher.")]
        if missing or unexpected:
            raise RuntimeError(f"load_trainable_state_dict: missing {missing}, unexpected {unexpected}")

    # ---- forward --------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None,
                return_logits: bool = False) -> LRCOutput:
        """Losses of a batch. ``labels``: transformers convention (same shape as input_ids,
        shifted here, -100: no CE at that position); None means input_ids. The KL counts every
        non-padded position, the CE the labelled ones; padded tokens count in no term."""
        input_ids, attention_mask, labels = self._check_inputs(input_ids, attention_mask, labels)
        return self._run(input_ids, attention_mask, labels, with_teacher=True, return_logits=return_logits)

    def student_logits(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The student's (B, S, V) logits alone, without running the teacher (padded positions: 0)."""
        input_ids, attention_mask, _ = self._check_inputs(input_ids, attention_mask, None)
        return self._run(input_ids, attention_mask, None, with_teacher=False, return_logits=True).logits

    # ---- the clone loss' options ------------------------------------------------------------
    @torch.no_grad()
    def measure_clone_scales_(self, calibration, attention_mask=None, batch: int = 8) -> Tensor:
        """clone_norm="target": set ``clone_scale[layer, kind]`` to the mean square of the teacher's
        activation of that kind (its own width) over the calibration tokens' rows that the clone
        loss keeps (clone_exclude applies here too). Returns the buffer."""
        if self.clone_norm != "target":
            raise ValueError("measure_clone_scales_: only used with clone_norm='target'")
        ids, mask = _init.as_batch(calibration, attention_mask)
        dev = self.p_emb.device
        sums = torch.zeros(len(self.layers), len(KINDS), dtype=torch.float64, device=dev)
        counts = torch.zeros_like(sums)
        for b0 in range(0, ids.shape[0], batch):
            i = ids[b0:b0 + batch].to(dev)
            m = mask[b0:b0 + batch].to(dev) if mask is not None else None
            walk = LayerWalk(self, i, m)
            x_t = walk.e_t
            for li, tl in enumerate(self.teacher.model.layers):
                w = self._clone_rows(walk, x_t)
                with _capture(tl, KINDS, self.layout) as got:
                    x_t = walk.teacher_layer(tl, x_t)
                for ki, kind in enumerate(KINDS):
                    t = walk.pick(got[kind]).double()
                    w_ = torch.ones(t.shape[0], dtype=t.dtype, device=dev) if w is None else w.double()
                    sums[li, ki] += (w_[:, None] * t * t).sum()
                    counts[li, ki] += w_.sum() * t.shape[1]
        scale = sums / counts.clamp(min=1)
        if not bool(torch.isfinite(scale).all() and (scale > 0).all()):
            raise ValueError("measure_clone_scales_: a teacher activation has no (finite, non-zero) mean square "
                             "over the calibration tokens")
        self.clone_scale.copy_(scale.float())
        self._scales_ready = True
        return self.clone_scale

    def _clone_rows(self, walk: LayerWalk, x_t: Tensor):
        """The clone terms' row weights (N,) fp32 for the layer whose input is x_t (1 kept,
        0 excluded), or None when clone_exclude is "none"."""
        if self.clone_exclude == "none":
            return None
        keep = torch.ones(walk.rows.numel() if walk.rows is not None else walk.B * walk.S, dtype=torch.bool,
                          device=x_t.device)
        if "first" in self.clone_exclude:  # position 0 of each sequence: the attention sink
            keep &= walk.pick(walk.pos.reshape(walk.B, walk.S, 1))[:, 0] != 0
        if "outliers" in self.clone_exclude:
            norm = walk.pick(x_t).float().norm(dim=-1)
            keep &= norm <= OUTLIER_K * norm.median()
        return keep.float()

    def _add_clone(self, clone: dict, mine: dict, layer: int):
        """Add one layer's clone MSEs into ``clone`` (see LRCOutput for the two clone_norms)."""
        if self.clone_norm == "none" or not mine:
            for k, v in mine.items():
                clone[k] = clone[k] + v
            return
        if not self._scales_ready:
            raise RuntimeError("clone_norm='target': the clone scales are not measured; pass calibration= to "
                               "LowRankClone, call measure_clone_scales_(ids), or load a state dict holding them")
        n_terms = len(self.layers) * len(self.clone_kinds)
        for k, v in mine.items():
            clone[k] = clone[k] + v / (self.clone_scale[layer, _KIND_INDEX[k]] * n_terms)

    def _check_inputs(self, input_ids, attention_mask, labels):
        dev, vocab = self.p_emb.device, self.teacher.get_input_embeddings().weight.shape[0]

        def as_ids(name, t):
            if not torch.is_tensor(t) or t.dim() != 2 or t.dtype.is_floating_point or t.dtype.is_complex \
                    or t.dtype == torch.bool or t.numel() == 0:
                raise ValueError(f"{name}: expected a non-empty 2-D integer tensor (batch, seq), got "
                                 f"{getattr(t, 'dtype', type(t).__name__)} of shape {tuple(getattr(t, 'shape', ()))}")
            return t.to(dev)

        # The value checks read the tensors on the host: done for CPU inputs (no device sync),
        # for accelerator inputs only with check_values=True; the trainer's data is checked once
        # where it is read (lrc_ext/data.py check_token_ids).
        values = self.check_values or not input_ids.is_cuda
        input_ids = as_ids("input_ids", input_ids)
        lo, hi = (int(input_ids.min()), int(input_ids.max())) if values else (0, 0)
        if lo < 0 or hi >= vocab:
            raise ValueError(f"input_ids: ids must be in [0, {vocab}) (the teacher's vocabulary), "
                             f"got min {lo}, max {hi}")
        if attention_mask is not None:
            if not torch.is_tensor(attention_mask) or attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask: expected shape {tuple(input_ids.shape)} like input_ids, got "
                                 f"{tuple(getattr(attention_mask, 'shape', ()))}")
            attention_mask = attention_mask.to(dev)
            if values and not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
                raise ValueError("attention_mask: values must be 0 (padding) or 1")
            if values and not bool(attention_mask.any()):
                raise ValueError("attention_mask: every token is padding")
            attention_mask = attention_mask.long()
        if labels is not None:
            labels = as_ids("labels", labels)
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels: expected shape {tuple(input_ids.shape)} like input_ids (shifted "
                                 f"inside), got {tuple(labels.shape)}")
            if values and not bool(((labels == -100) | ((labels >= 0) & (labels < vocab))).all()):
                raise ValueError(f"labels: values must be in [0, {vocab}) or -100 (ignored)")
        return input_ids, attention_mask, labels

    def _run(self, input_ids, attention_mask, labels, with_teacher: bool, return_logits: bool) -> LRCOutput:
        walk = LayerWalk(self, input_ids, attention_mask)
        e_s = self.__dict__.get("step_emb")  # E_S formed this optimiser step (tied head), if any
        if e_s is not None:
            # sparse: the lookup's gradient is its N rows, not a dense V x d_S zeros + scatter a
            # micro-batch (StepWeights adds it to the head's gradient once a step)
            x_s = F.embedding(walk.pick(input_ids[..., None])[:, 0], e_s, sparse=True)
            if self.layout.embed_scaled:  # the teacher's lookup carries its scale (Gemma-3): so must E_S[ids]
                x_s = x_s * fam.embed_scale(self.teacher)
            dev = x_s.device.type
            x_s = x_s.to(torch.get_autocast_dtype(dev)) if torch.is_autocast_enabled(dev) else x_s
        else:
            x_s = walk.pick(walk.e_t) @ self.p_emb  # gather, then project: never E_T @ P_emb
        x_t = walk.e_t
        clone = {k: torch.zeros((), dtype=torch.float32, device=x_s.device) for k in KINDS}
        need_teacher = with_teacher and (self.use_kl or bool(self.clone_kinds))
        # Only the activations go through sl's call (see StudentLayer.forward): module hooks may
        # rebuild its arguments; the layer's clone terms come back as an output.
        pair = functools.partial(walk.pair, kinds=self.clone_kinds if need_teacher else None)
        for i, (sl, tl) in enumerate(zip(self.layers, self.teacher.model.layers)):
            x_s, x_t, mine = sl(pair, sl, tl, x_s, x_t)
            self._add_clone(clone, mine, i)

        zero = torch.zeros((), dtype=torch.float32, device=x_s.device)
        lm = kl = zero
        if with_teacher and (self.use_lm or self.use_kl):
            lm, kl = self._head_losses(walk, input_ids, labels, attention_mask, x_s, x_t if need_teacher else None)
        logits = None
        if return_logits:
            w_head = _matmul(self.teacher.get_output_embeddings().weight.detach(), self.head_proj)
            logits = walk.unpick(F.linear(self.norm(x_s), w_head))
        total = lm + kl + self.alpha * sum(clone.values())
        return LRCOutput(loss=total, lm=lm, kl=kl, clone=clone, logits=logits)

    def _head_losses(self, walk: LayerWalk, input_ids, labels, attention_mask, x_s, x_t):
        """(lm, kl) from the final hidden states; x_t None: CE only, no teacher. Every valid
        position goes to the head: the KL counts them all, the CE those with a label."""
        nxt = walk.pick(_shift_labels(input_ids if labels is None else labels, attention_mask)[..., None])[:, 0]
        h_s = self.norm(x_s)
        h_t = (self.teacher.model.norm(walk.pick(x_t)) if x_t is not None
               else h_s.new_zeros(h_s.shape[0], self.teacher.config.hidden_size))  # lm only: no teacher
        w_t, p = self.teacher.get_output_embeddings().weight.detach(), self.head_proj
        w_s = self.__dict__.get("step_head")  # W_head_S formed this optimiser step, if any
        dev = h_s.device.type  # one dtype for the head op: autocast's, else the student's
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else h_s.dtype
        h_s, h_t, w_t, p = (z.to(dt) for z in (h_s, h_t, w_t, p if w_s is None else w_s))
        extra, op = {}, resolve_op("distill_head", self.fused)
        if w_s is not None:
            op = resolve_op("distill_head", self.fused, "_ws")
            if labels is None and walk.rows is None:  # labelled: all but each row's last, known from the shape
                extra["n_valid"] = walk.B * (walk.S - 1)  # no count, no host sync
            extra["grad_acc"] = self.__dict__.get("step_head_grad")  # grad W_head_S added in place
        return op(
            h_s, h_t, w_t, p, nxt, **extra, tau=self.tau, lm_weight=float(self.use_lm),
            kl_weight=float(self.use_kl), kl_reduction=self.kl_reduction, batch_size=walk.B,
            tau_squared=self.tau_squared)

    def _student_layer(self, walk: LayerWalk, sl: StudentLayer, tl: nn.Module, x: Tensor, tgt, clone: dict):
        """One student decoder layer on the valid rows x (N, d_S), mirroring the family's layer
        ``tl``; ``tgt``: the teacher layer's captured outputs by kind (None: no clone terms)."""
        def lin(kind, inp):
            target = None
            if tgt is not None and kind in tgt and not (kind == "o" and self.attn_clone_space == "teacher"):
                target = walk.pick(tgt[kind])
            y = getattr(sl, kind)(inp, target, fused=self.fused, row_weight=walk.row_weight if target is not None
                                  else None)
            if target is not None:
                y, mse = y
                clone[kind] = clone[kind] + mse if kind in clone else mse
            return y

        B, S, attn, lay = walk.B, walk.S, tl.self_attn, self.layout
        hd = attn.head_dim
        a = getattr(sl, lay.attn_norm)(x)
        q, k, v = (walk.unpick(lin(n, a)).view(B, S, -1, hd) for n in ("q", "k", "v"))
        if hasattr(attn, "q_norm"):  # Qwen3, Gemma-3: per-head norms on head_dim, the teacher's as they are
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        q, k = self._fam.apply_rotary_pos_emb(q, k, *walk.cos_sin(tl))  # Phi-3: partial rotary inside
        att, _ = fam.attention_function(self.teacher)(
            attn, q, k, v, walk.mask(tl), dropout=0.0, scaling=attn.scaling, position_ids=walk.pos,
            sliding_window=fam.sliding_window(self.teacher, attn.layer_idx))
        att = walk.pick(att.reshape(B, S, -1))
        o = lin("o", att)
        if tgt is not None and "o" in tgt and self.attn_clone_space == "teacher":
            # authors' form: MSE(att_S @ W_o.T, o_T) in the teacher's space
            d = F.linear(att, sl.o.teacher.weight.detach()) - walk.pick(tgt["o"])
            d = d.to(torch.promote_types(d.dtype, torch.float32))
            w = walk.row_weight
            mse = (d * d).mean() if w is None else (w[:, None] * d * d).sum() / (w.sum().clamp(min=1) * d.shape[1])
            clone["o"] = clone["o"] + mse if "o" in clone else mse
        x = x + (getattr(sl, lay.attn_post)(o) if lay.attn_post else o)
        b = getattr(sl, lay.mlp_norm)(x)
        m = lin("down", getattr(tl.mlp, lay.act)(lin("gate", b)) * lin("up", b))
        return x + (getattr(sl, lay.mlp_post)(m) if lay.mlp_post else m)

    # ---- export ---------------------------------------------------------------------------
    def _export_entries(self) -> dict:
        """Stock student key -> (shape, thunk making the tensor). Keys are the teacher's own.
        What the stock config cannot say is folded into the weights (fam.export_folds)."""
        t, d_s, lay = self.teacher, self.student_hidden_size, self.layout
        emb, head = t.get_input_embeddings().weight, t.get_output_embeddings().weight
        emb_k, norm_k = fam.export_folds(t, d_s, self.student_config.tie_word_embeddings)
        ents = {
            "model.embed_tokens.weight": ((emb.shape[0], d_s), lambda: _matmul(emb.detach(), self.p_emb) * emb_k),
            "lm_head.weight": ((head.shape[0], d_s), lambda: _matmul(head.detach(), self.head_proj) * (1 / norm_k)),
            "model.norm.weight": ((d_s,), lambda: lay.weight_for_gain(lay.gain(self.norm) * norm_k)),
        }
        for i, (sl, tl) in enumerate(zip(self.layers, t.model.layers)):
            p = f"model.layers.{i}."
            for name, kinds in lay.modules().items():  # a fused linear: its kinds' rows, concatenated
                lins = [getattr(sl, k) for k in kinds]
                shape = (sum(m.out_features for m in lins), lins[0].in_features)
                ents[p + name + ".weight"] = (shape, lambda lins=lins: torch.cat([m.student_weight() for m in lins]))
            for n in lay.norms:
                ents[p + n + ".weight"] = ((d_s,), getattr(sl, n).weight.detach)
            for k, v in tl.state_dict(keep_vars=True).items():  # q/k/v biases, Qwen3 q/k norms: as they are
                ents.setdefault(p + k, (tuple(v.shape), v.detach))
        return ents

    @torch.no_grad()
    def student_state_dict(self) -> dict:
        """Materialised weights of the stock student (keys of the teacher's family)."""
        return {k: make().detach().clone().contiguous() for k, (_, make) in self._export_entries().items()}

    def build_student_model(self, device=None):
        """A stock transformers model (the teacher's family, hidden_size=d_S) with the student's weights."""
        return fam.build_stock_model(self.student_config, self.student_state_dict(), self.p_emb.dtype,
                                     device=device or self.p_emb.device,
                                     attn_implementation=self.teacher.config._attn_implementation)

    def export(self, path, tokenizer=None):
        """Save a standard HF checkpoint (safetensors + config + the teacher's tokenizer if known)
        that ``AutoModelForCausalLM.from_pretrained(path)`` loads without lrc_ext."""
        model = self.build_student_model()
        if getattr(self.teacher, "generation_config", None) is not None:
            model.generation_config = copy.deepcopy(self.teacher.generation_config)
        model.save_pretrained(path, safe_serialization=True)
        tok = tokenizer if tokenizer is not None else self.tokenizer
        if tok is not None:
            tok.save_pretrained(path)
        return path


_KIND_INDEX = {k: i for i, k in enumerate(KINDS)}


def _scales_loaded(module, incompatible):
    # a state dict that held clone_scale makes the scales ready
    if not any(k.endswith("clone_scale") for k in incompatible.missing_keys):
        module._scales_ready = True


def _matmul(w_t: Tensor, p: Tensor) -> Tensor:
    """W_T @ P; outside autocast a teacher held in another dtype than P is cast to P's (export,
    logits: not the training path, where autocast casts P and leaves a bf16 W_T as it is)."""
    if w_t.dtype != p.dtype and not torch.is_autocast_enabled(p.device.type):
        w_t = w_t.to(p.dtype)
    return w_t @ p


def _shift_labels(labels: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Next-token targets (B, S): position t predicts labels[t + 1]; -100 where either end is padding."""
    nxt = torch.full_like(labels, -100)
    nxt[:, :-1] = labels[:, 1:]
    if attention_mask is not None:
        ok = attention_mask.bool()
        ok[:, :-1] &= attention_mask[:, 1:].bool()
        nxt = nxt.masked_fill(~ok, -100)
    return nxt
