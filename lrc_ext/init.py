"""Data-aware initialisation of a LowRankClone: the student starts inside the teacher's principal
subspace (``LowRankClone(..., init="pca", calibration=input_ids)``).

The math (shapes as in docs/DESIGN.md, "The pca init"; rows are tokens):

* **One residual basis.** The student's residual stream is shared by every layer (the embedding,
  every o and down projection write into it), so it gets one orthonormal basis ``U`` (d_T x d_S):
  the student should carry ``x_S = x_T @ U``. ``U`` spans the top-d_S eigenvectors of the pooled,
  uncentred second moment of the teacher's residual stream over the calibration tokens, taken at
  every point a norm reads it (each layer's two norm inputs and the final norm's input).
  ``basis="normalized"`` (default) pools the RMS-normalised stream ``x / rms(x)`` (every token and
  every point weighs the same, the massive-activation tokens do not take over); ``"raw"`` pools
  ``x`` itself; ``"read"`` pools what the norms hand on, ``g * x / rms(x)`` with the norm weight g.
  ``P_emb = P_o = P_down = U`` then write ``x_T @ U`` exactly.
* **Rotation inside the span.** Any ``U @ R`` (R orthogonal) spans the same subspace. We pick R so
  that ``U.T @ diag(g_final) @ U`` is diagonal: then the teacher's final norm weight is a diagonal
  in the student's coordinates and the student's final norm can carry it. With a tied head
  (``P_head = P_emb = U``) this is what makes d_S = d_T exact; below that it is the best a diagonal
  can do.
* **Input side.** The teacher's linear reads ``a_T = g * x_T / rms_T``. With ``x_S = x_T @ U`` the
  student reads ``a_S = s * x_S / rms_S``; ``P = diag(g) @ U`` gives ``a_S @ P.T = a_T`` when
  ``s = sqrt(d_T/d_S * |x_T @ U|^2/|x_T|^2)`` (rms over d_S instead of d_T, and the captured
  energy). ``s`` is one scalar per norm, the least-squares fit over the calibration tokens; it goes
  into the student's norm weight.
* **Refit** (``refit=True``, default): the student is run on the calibration tokens in lockstep with
  the teacher, layer by layer, and every projection is refitted by ridge regression on the student's
  *actual* inputs (so each layer also corrects the errors of the layers below it):
  input side ``P.T = argmin |a_S @ P.T - a_T|^2`` (for any teacher weight W this also minimises
  ``|a_S @ (W @ P).T - a_T @ W.T|``: one fit serves q, k and v, another gate and up); output side
  ``P = argmin |(att_S @ W_o.T) @ P - o_T @ U|^2`` (down alike); untied head
  ``P_head.T = argmin |h_S @ P_head.T - h_T|^2``; tied head: the final norm weight by least squares
  on the logits (through ``W_head.T @ W_head``). The ridge pulls towards the analytic values above,
  with strength ``ridge * trace(X.T X) / width``.

With d_S = d_T every step is exact, so the student reproduces the teacher's logits (to rounding).
"""
from __future__ import annotations

import functools
import inspect
import sys
import time

import torch
from torch import Tensor

from . import model as _model
from .families import KINDS

INITS = ("normal", "pca")
BASES = ("normalized", "raw", "read")


# ---- calibration input ----------------------------------------------------------------------
def as_batch(calibration, attention_mask=None):
    """(input_ids (B, S) int64, attention_mask (B, S) int64 or None) from a (B, S) or (S,) tensor,
    a list of them (right-padded into one batch), or a dict with input_ids / attention_mask."""
    if isinstance(calibration, dict):
        if attention_mask is None:
            attention_mask = calibration.get("attention_mask")
        calibration = calibration.get("input_ids")
    if calibration is None:
        raise ValueError("calibration: init='pca' needs calibration token ids (a (batch, seq) tensor of "
                         "input_ids, or a list of them)")

    def ids2d(name, t):
        if not torch.is_tensor(t) or t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool \
                or t.dim() not in (1, 2) or t.numel() == 0:
            raise ValueError(f"{name}: expected a non-empty 1-D or 2-D integer tensor of token ids, got "
                             f"{getattr(t, 'dtype', type(t).__name__)} of shape {tuple(getattr(t, 'shape', ()))}")
        return t.reshape(-1, t.shape[-1]).long()

    if torch.is_tensor(calibration):
        ids = ids2d("calibration", calibration)
        if attention_mask is None:
            return ids, None
        if not torch.is_tensor(attention_mask) or attention_mask.numel() != ids.numel():
            raise ValueError(f"calibration_attention_mask: expected the shape of calibration {tuple(ids.shape)}, "
                             f"got {tuple(getattr(attention_mask, 'shape', ()))}")
        return ids, attention_mask.reshape(ids.shape).long()
    if not isinstance(calibration, (list, tuple)) or not calibration:
        raise ValueError(f"calibration: expected a tensor of token ids or a non-empty list of them, "
                         f"got {type(calibration).__name__}")
    parts = [ids2d(f"calibration[{i}]", t) for i, t in enumerate(calibration)]
    masks = attention_mask if attention_mask is not None else [None] * len(parts)
    if not isinstance(masks, (list, tuple)) or len(masks) != len(parts):
        raise ValueError("calibration_attention_mask: with a list of calibration tensors, give a list of "
                         "masks of the same length (or None)")
    width = max(p.shape[1] for p in parts)
    rows, mrows = [], []
    for i, (p, m) in enumerate(zip(parts, masks)):
        m = torch.ones_like(p) if m is None else m.reshape(p.shape).long()
        pad = width - p.shape[1]
        rows.append(torch.nn.functional.pad(p.cpu(), (0, pad)))
        mrows.append(torch.nn.functional.pad(m.cpu(), (0, pad)))
    ids, mask = torch.cat(rows), torch.cat(mrows)
    return ids, (None if bool(mask.all()) else mask)


def teacher_samples(teacher, tokenizer, n_tokens: int, seq_len: int, seed: int = 0, progress: bool = True,
                    batch: int | None = None, piece: int = 128) -> Tensor:
    """``n_tokens`` tokens sampled from the teacher itself (temperature 1, no truncation), as
    ceil(n_tokens / seq_len) rows of ``seq_len``: samples of min(piece, seq_len) tokens, each from
    the tokenizer's BOS (or EOS), packed end to end as the trainer packs documents.

    Why: calibration tokens from one narrow corpus fit the basis and the refit to that corpus; the
    teacher's own samples cover what it knows in general, so a student calibrated on both keeps
    more of it out of domain (measured: bench/results/default_job.md). Short samples because one
    forward per position costs about the same for 8 rows as for 128 on a CPU: 4,096 tokens as
    32 x 128 take 127 forwards, as 2 x 2048 they would take 2047. A plain KV-cache loop with its
    own generator: the same arguments give the same tokens, whatever the global RNG holds."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise ValueError("calibration_generated: the tokenizer has neither a BOS nor an EOS token to start from")
    rows = -(-n_tokens // seq_len)
    length = min(piece, seq_len)
    n_samples = -(-rows * seq_len // length)
    batch = batch or max(1, 16384 // length)  # rows a forward: a small KV cache
    device = next(teacher.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    # the KV cache's keyword: `cache` in recent transformers, `past_key_values` before
    kw = "cache" if "cache" in inspect.signature(teacher.forward).parameters else "past_key_values"
    bar = _bar(n_samples * (length - 1), "pca init: sampling the teacher", progress, unit="tok")
    out = []
    try:
        for i in range(0, n_samples, batch):
            ids = torch.full((min(batch, n_samples - i), length), start, dtype=torch.long, device=device)
            past = None
            for t in range(length - 1):
                with torch.no_grad():
                    o = teacher(input_ids=ids[:, t:t + 1], use_cache=True, **{kw: past})
                past = getattr(o, kw)
                p = torch.softmax(o.logits[:, -1].float(), -1)
                # exponential race: argmax p / E, E ~ Exp(1), draws from p (cheaper than multinomial)
                e = torch.empty_like(p).exponential_(generator=gen)
                ids[:, t + 1] = (p / e).argmax(-1)
                bar.update(ids.shape[0])
            out.append(ids)
    finally:
        bar.close()
    return torch.cat(out).reshape(-1)[: rows * seq_len].reshape(rows, seq_len)


def count_tokens(ids: Tensor, mask: Tensor | None) -> int:
    return int(ids.numel() if mask is None else int(mask.sum()))


# ---- small linear algebra ------------------------------------------------------------------
def _ct(model) -> torch.dtype:
    """The dtype of the init's large products (the solves are always float64): float64 for a float32
    or float64 teacher (the init is then exact to its rounding at full width), float32 for a bf16 or
    fp16 one, whose activations carry 8-11 mantissa bits: float64 there only costs time (2-3x on
    a CPU) and changes nothing the teacher can tell apart."""
    wide = next(model.teacher.parameters()).dtype in (torch.float32, torch.float64)
    return torch.float64 if wide else torch.float32


def _exact(fn):
    """Runs ``fn`` with autocast off on its tensors' device. Applied where the walk (under the run's
    autocast) hands over to the fits: the hooks' fits and the head's; the helpers they call
    inherit it. Under autocast their fp32 products would drop to bf16."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        dev = next((a.device.type for a in args if isinstance(a, Tensor)), "cpu")
        with torch.autocast(dev, enabled=False):
            return fn(*args, **kwargs)
    return wrapped


def _ridge(X: Tensor, Y: Tensor, P0: Tensor, ridge: float) -> Tensor:
    """argmin_P |X @ P - Y|^2 + lam |P - P0|^2, lam = ridge * trace(X.T X) / X.shape[1]: the
    products in X's dtype, the solve in float64."""
    G = (X.T @ X).double()
    lam = ridge * float(G.diagonal().mean()) if ridge > 0 else 0.0
    lam = lam if lam > 0 else 1e-12
    A = G + lam * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
    return torch.linalg.solve(A, (X.T @ Y.to(X.dtype)).double() + lam * P0)


def _scalar(Z: Tensor, Y: Tensor) -> float:
    """argmin_s |s Z - Y|^2."""
    zz = float((Z * Z).sum())
    return float((Z * Y).sum()) / zz if zz > 0 else 1.0


def _rms_normalize(x: Tensor, eps: float) -> Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


# ---- the init -------------------------------------------------------------------------------
@torch.no_grad()
def residual_basis(model, ids: Tensor, mask: Tensor | None, basis: str = "normalized", progress: bool = True):
    """Pooled uncentred second moment of the teacher's residual stream over the calibration tokens
    (float64, d_T x d_T) and its eigen-decomposition (eigenvalues descending, eigenvectors)."""
    if basis not in BASES:
        raise ValueError(f"basis must be one of {BASES}, got {basis!r}")
    base = model.teacher.model
    walk = _model.LayerWalk(model, ids, mask)
    d_t = model.teacher.config.hidden_size
    G = torch.zeros(d_t, d_t, dtype=torch.float64, device=ids.device)

    ct = _ct(model)

    @_exact
    def add(x, norm):
        x = walk.pick(x).to(ct)
        if basis != "raw":
            x = _rms_normalize(x, 0.0)
        if basis == "read":
            x = x * lay.gain(norm).to(ct)
        G.add_((x.T @ x).double())

    hooks, lay = [], model.layout
    for tl in base.layers:
        for n in (lay.attn_norm, lay.mlp_norm):  # the norms that read the stream
            norm = getattr(tl, n)
            hooks.append(norm.register_forward_pre_hook(lambda m, a, norm=norm: add(a[0], norm)))
    bar = _bar(len(base.layers), "pca init: teacher stream", progress)
    try:
        x_t = walk.e_t
        for tl in base.layers:
            x_t = walk.teacher_layer(tl, x_t)
            bar.update(1)
        add(x_t, base.norm)
    finally:
        for h in hooks:
            h.remove()
        bar.close()
    evals, evecs = torch.linalg.eigh(G)
    return evals.flip(0), evecs.flip(1)


def _bar(total, desc, progress, unit="layer"):
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not progress, leave=False,
                dynamic_ncols=True, mininterval=0.5)


@torch.no_grad()
def pca_init_(model, calibration, attention_mask=None, *, basis: str = "normalized", refit: bool = True,
              ridge: float = 1e-2, correct: bool = False, progress: bool = True, eigen=None) -> dict:
    """Set every projection and student norm of ``model`` (a LowRankClone) from calibration tokens.

    Returns a report: tokens, seconds, the energy fraction the basis captures, the options.
    ``eigen``: a precomputed ``residual_basis`` result for the same tokens and basis (benchmarks)."""
    t0 = time.perf_counter()
    if basis not in BASES:
        raise ValueError(f"init_options: basis must be one of {BASES}, got {basis!r}")
    if not (isinstance(ridge, (int, float)) and ridge >= 0):
        raise ValueError(f"init_options: ridge must be a number >= 0, got {ridge!r}")
    lay = model.layout
    if correct and (lay.attn_post or lay.mlp_post):
        raise ValueError("init_options: correct=True does not apply to a teacher with post-block norms "
                         f"({model.teacher.config.model_type})")
    ids, mask = as_batch(calibration, attention_mask)
    ids, mask, _ = model._check_inputs(ids, mask, None)
    d_s = model.student_hidden_size
    n_tok = count_tokens(ids, mask)
    if n_tok < d_s:
        raise ValueError(f"calibration: {n_tok} tokens are too few for init='pca' at student_hidden_size={d_s}: "
                         f"the principal subspace needs at least as many tokens as the width (a few thousand "
                         f"recommended)")
    evals, evecs = eigen if eigen is not None else residual_basis(model, ids, mask, basis, progress)
    energy = float(evals[:d_s].clamp(min=0).sum() / evals.clamp(min=0).sum().clamp(min=1e-300))
    U = evecs[:, :d_s].to(dtype=torch.float64, device=ids.device)
    g_f = lay.gain(model.teacher.model.norm).double()
    lam, R = torch.linalg.eigh(U.T @ (g_f[:, None] * U))  # rotate inside the span: diag(g_f) is diagonal
    U = U @ R
    _set(model.p_emb, U)

    walk = _model.LayerWalk(model, ids, mask)
    fit = _LayerFits(U, walk.pick, ridge, refit, correct, lay, _ct(model))
    bar = _bar(len(model.layers), f"pca init: {'refit' if refit else 'set'} layers", progress)
    try:
        x_t = walk.e_t
        x_s = walk.pick(x_t) @ model.p_emb
        for sl, tl in zip(model.layers, model.teacher.model.layers):
            hooks = fit.hooks(sl, tl, x_s)
            try:  # the forward's own lockstep layer, no clone targets: the hooks fit as it runs
                x_s, x_t = walk.step(sl, tl, x_s, x_t, (), {})
            finally:
                for h in hooks:
                    h.remove()
            fit.cap.clear()
            bar.update(1)
        _fit_head(model, U, lam, g_f, x_s, walk.pick(x_t), ridge, refit)
    finally:
        bar.close()
    out = {"init": "pca", "tokens": n_tok, "sequences": int(ids.shape[0]), "seconds": time.perf_counter() - t0,
           "energy_fraction": energy, "basis": basis, "refit": bool(refit), "ridge": float(ridge),
           "tied_head": model.p_head is None}
    if refit:
        out["fit_rel_err_in"] = float(sum(fit.rel["in"]) / max(1, len(fit.rel["in"])))
        out["fit_rel_err_out"] = float(sum(fit.rel["out"]) / max(1, len(fit.rel["out"])))
    return out


def _set(p, v):
    p.copy_(v.to(p.dtype))


def _set_gain(lay, norm, gain):
    """A student norm's weight, in its family's convention, from a plain gain."""
    _set(norm.weight, lay.weight_for_gain(gain))


class _LayerFits:
    """One layer's fits, run from forward hooks while the walk steps that layer: the teacher's
    hooks capture what its linears read and write (``cap``), then the student's set each
    projection and norm from its actual input just before the student uses it."""

    def __init__(self, U: Tensor, pick, ridge: float, refit: bool, correct: bool, lay, ct: torch.dtype):
        self.U, self.pick, self.ridge, self.refit, self.correct = U, pick, ridge, refit, correct
        self.ct, self.Uc = ct, U.to(ct)  # captures and products in ct; U and the solves in float64
        self.lay = lay
        self.cap: dict = {}
        self.rel = {"in": [], "out": []}  # relative residuals of the refits

    @_exact
    def norm_scale(self, snorm, tnorm, x_s, target):
        # student norm weight s (scalar): s * rms-normalised x_S @ U.T * g  ~  a_T
        z = _rms_normalize(x_s.to(self.ct), self.lay.eps(snorm)) @ self.Uc.T * self.lay.gain(tnorm).to(self.ct)
        _set_gain(self.lay, snorm, torch.full((self.U.shape[1],), _scalar(z, target), dtype=torch.float64,
                                              device=z.device))

    @_exact
    def post_gain(self, snorm, tnorm, y_s, target):
        """A post-block norm (Gemma-3): per-coordinate least squares of the student's normalised
        block output against the teacher's norm output in the student basis, pulled towards
        diag(U.T diag(g) U). Exact at full width, where U is a signed permutation (the rotation
        that diagonalises the final norm)."""
        U = self.U
        z = _rms_normalize(y_s.double(), self.lay.eps(snorm))
        g0 = ((U * self.lay.gain(tnorm).double()[:, None]) * U).sum(0)
        zz, zy = (z * z).sum(0), (z * (target.double() @ U)).sum(0)
        lam = max(self.ridge * float(zz.mean()), 1e-12)
        _set_gain(self.lay, snorm, (zy + lam * g0) / (zz + lam))

    @_exact
    def fit_in(self, sl, kinds, tnorm, a_s, a_t):
        P0T = self.U.T * self.lay.gain(tnorm).double()  # (diag(g) @ U).T
        a_s = a_s.to(self.ct)
        PT = _ridge(a_s, a_t, P0T, self.ridge) if self.refit else P0T
        for k in kinds:
            _set(getattr(sl, k).proj, PT.T)
        if self.refit:
            self.rel["in"].append(_rel_err(a_s @ PT.to(self.ct), a_t))

    @_exact
    def fit_out(self, lin, inp, target, x_now, x_t_now):
        U, Uc, ct = self.U, self.Uc, self.ct
        X = inp.to(ct) @ lin.teacher.weight.detach().to(ct).T  # (N, d_T): the teacher's W on the student input
        Y = target @ Uc
        if self.correct:  # also pull the stream back towards x_T @ U: target (x_T + o_T) @ U - x_S
            Y = Y + (x_t_now @ Uc - x_now.to(ct))
        P = _ridge(X, Y, U, self.ridge) if self.refit else U
        _set(lin.proj, P)
        if self.refit:
            self.rel["out"].append(_rel_err(X @ P.to(ct), Y))

    def hooks(self, sl, tl, x_s) -> list:
        """Registers this layer's hooks (teacher layer tl, student layer sl with input x_s)."""
        cap, pick, lay = self.cap, self.pick, self.lay
        cap["x_s"] = x_s
        attn_norm, mlp_norm = getattr(tl, lay.attn_norm), getattr(tl, lay.mlp_norm)

        def keep(name, output=False):  # teacher: record a linear's (or norm's) input, or its output
            if output:
                return lambda m, a, o: cap.__setitem__(name, pick(o).to(self.ct))
            return lambda m, a: cap.__setitem__(name, pick(a[0]).to(self.ct))
        mod = lambda kind: tl.get_submodule(lay.linears[kind][0])  # noqa: E731 (a fused one reads the same input)
        hs = [mod("q").register_forward_pre_hook(keep("a_t")),
              mod("gate").register_forward_pre_hook(keep("b_t")),
              attn_norm.register_forward_pre_hook(keep("x_t")),
              mlp_norm.register_forward_pre_hook(keep("x_t_mid")),
              mod("o").register_forward_hook(keep("o_t", True)),
              mod("down").register_forward_hook(keep("dn_t", True))]
        for post in (lay.attn_post, lay.mlp_post):
            if post:
                hs.append(getattr(tl, post).register_forward_hook(keep(post, True)))
                hs.append(getattr(sl, post).register_forward_pre_hook(
                    lambda m, a, post=post: self.post_gain(m, getattr(tl, post), a[0], cap[post])))
        done = set()

        def pre(kind):  # student: fit the projection from its actual input
            def hook(m, args):
                a = args[0]
                if kind in ("q", "k", "v") and "qkv" not in done:
                    done.add("qkv")
                    self.fit_in(sl, ("q", "k", "v"), attn_norm, a, cap["a_t"])
                elif kind in ("gate", "up") and "gu" not in done:
                    done.add("gu")
                    self.fit_in(sl, ("gate", "up"), mlp_norm, a, cap["b_t"])
                elif kind == "o":
                    self.fit_out(m, a, cap["o_t"], cap["x_s"], cap["x_t"])
                elif kind == "down":
                    self.fit_out(m, a, cap["dn_t"], cap["x_mid"], cap["x_t_mid"])
            return hook

        def mid(m, a):  # a pre-hook's return value would replace the norm's input: none
            cap["x_mid"] = a[0]
            self.norm_scale(m, mlp_norm, a[0], cap["b_t"])
        hs += [getattr(sl, k).register_forward_pre_hook(pre(k)) for k in KINDS]
        hs.append(getattr(sl, lay.attn_norm).register_forward_pre_hook(
            lambda m, a: self.norm_scale(m, attn_norm, a[0], cap["a_t"])))
        hs.append(getattr(sl, lay.mlp_norm).register_forward_pre_hook(mid))
        return hs


@_exact
def _fit_head(model, U, lam, g_f, x_s, h_t_in, ridge, refit):
    """The final norm and the head from the last layer's outputs (x_s the student's, h_t_in the
    teacher's valid rows before its final norm)."""
    t, d_s, lay = model.teacher, U.shape[1], model.layout
    f64 = dict(dtype=torch.float64, device=U.device)
    h_t = t.model.norm(h_t_in).double()
    n_s = _rms_normalize(x_s.double(), lay.eps(model.norm))
    if model.p_head is None:  # tied: P_head = P_emb = U; the final norm weight by least squares on logits
        W = t.get_output_embeddings().weight.detach().float()
        CU = (W.T @ W).double() @ U  # (d_T, d_S) = W.T W U
        Gs = (n_s.T @ n_s) * (U.T @ CU)
        b = ((h_t @ CU) * n_s).sum(0)
        s0 = lam.to(**f64) * _scalar(n_s * lam.to(**f64) @ U.T, h_t)
        lam_r = max(ridge * float(Gs.diagonal().mean()), 1e-12)
        _set_gain(lay, model.norm, torch.linalg.solve(Gs + lam_r * torch.eye(d_s, **f64), b + lam_r * s0))
    else:
        s = _scalar(n_s @ U.T * g_f, h_t)
        _set_gain(lay, model.norm, torch.full((d_s,), s, **f64))
        P0T = U.T * g_f
        _set(model.p_head, (_ridge(n_s * s, h_t, P0T, ridge) if refit else P0T).T)


def _rel_err(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-300))


def identity_(model):
    """P = I everywhere and the teacher's norms copied: at d_S = d_T the student is then the
    teacher exactly (the oracle the tests and the quality benchmark's sanity check use)."""
    t = model.teacher
    with torch.no_grad():
        for p in model.trainable_parameters():
            if p.dim() == 2:
                p.copy_(torch.eye(*p.shape, dtype=p.dtype, device=p.device))
        for sl, tl in zip(model.layers, t.model.layers):
            for n in model.layout.norms:
                getattr(sl, n).weight.copy_(getattr(tl, n).weight)
        model.norm.weight.copy_(t.model.norm.weight)
