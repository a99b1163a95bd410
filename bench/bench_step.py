"""One full LRC training step, end to end: tokens/s, MFU, peak memory, largest micro-batch,
and where the time goes.

    python bench/bench_step.py [--shape lrc1.5b|smollm2|tiny] [--modes eager,compile,fused]
                               [--steps 3] [--warmup 2] [--micro-batch N] [--json PATH]

A step is what lrc_ext's training does with one micro-batch: teacher forward (no_grad,
lockstep with the student), student forward, every loss (7 clone MSEs a layer, KL, CE),
backward, grad-norm clip (1.0) and AdamW (lr 1e-4, betas 0.9/0.999; fused=True on CUDA).
The teacher is a randomly initialised transformers LlamaForCausalLM built directly on the
device in the bench dtype (no checkpoint, no download); inputs are random token ids with
labels = input ids and no padding.

Shapes (--shape):
  lrc1.5b  Llama-3.2-3B-shaped teacher (d_T 3072, 28 layers, 24/8 heads, head_dim 128,
           FFN 8192, V 128256, tied) -> d_S 1536, seq 2048, bf16, micro-batch 4
  smollm2  SmolLM2-135M-shaped teacher (576, 30 layers, 9/3 heads, head_dim 64, FFN 1536,
           V 49152, tied) -> d_S 288, seq 2048, bf16, micro-batch 8
  tiny     (64, 2 layers, 4/2 heads, head_dim 16, FFN 128, V 512) -> 32, seq 64: the CPU
           smoke shape (default without a GPU)

Modes (--modes): eager = LowRankClone(fused=False), the plain-PyTorch reference;
compile = the same under torch.compile (--compile-scope layers: the per-layer student
function and the reference head, through a table of resolved ops that holds the compiled
head; --compile-scope model: torch.compile of the whole LowRankClone); fused =
LowRankClone(fused=True). A mode that fails (compile included) is recorded, not fatal.

Model FLOPs of one step (MFU counts these; elementwise work, norms, softmax and the MSEs
are not counted). N = B*S tokens, N_h = B*(S-1) tokens with a next-token label, L layers,
H/H_kv heads, h head_dim, F FFN, V vocab; per-layer weight sizes
P_T = d_T*(2*H*h + 2*H_kv*h + 3*F), P_S = d_S*(2*H*h + 2*H_kv*h + 3*F):
  teacher forward          2*N*L*P_T + attention fwd
  student fwd + bwd        6*N*L*P_S + 3 * attention fwd
  attention fwd            2*B*S^2*H*h per layer (QK^T and PV, causal: half of 4*B*S^2*H*h)
  weight products          4*d_S*L*P_T   (W_S = W_T@P or P.T@W_T: 2*out*d_T*d_S per linear,
                                          once a step; backward grad_P = 2*out*d_T*d_S again)
  clone targets (o, down)  2 * 4*N*L*d_T*d_S  (y_T @ P forward, and its grad_P)
  embedding                4*N*d_T*d_S   (E_T[ids] @ P_emb and grad_P_emb)
  head                     2*N_h*V*d_T (teacher logits) + 6*N_h*V*d_S (student logits fwd+bwd)
                           + 4*V*d_T*d_S (W_head_S = W_head_T @ P_head and grad_P_head)
This bench's step is one micro-batch through LowRankClone, which forms every W_S itself. The
trainer forms them once an optimiser step (lrc_ext/step_weights.py): with accumulation over k
micro-batches the weight products (4*d_S*L*P_T + 4*V*d_T*d_S) count once per k micro-batches
and a tied head's lookup E_S[ids] replaces the embedding product (step_flops(accum=k,
step_weights=True); bench/bench_accum.py measures the two paths side by side).
MFU = FLOPs / step time / peak, with peak the datasheet dense bf16 figure of the device
(H100 SXM: 989.4 TFLOP/s) and, separately, the bf16 matmul rate measured on the machine
(8192^3 on random data). Tokens/s counts every input token: B*S / step time.

Per-stage breakdown: one extra step under torch.profiler, with every module call of the
model in a named range. Each kernel (CPU: each op's self time) goes to the innermost range:
teacher (its decoder layers, embedding, final norm), student.linear (FusedCloneLinear: the
weight product, student GEMM and clone MSE), student.attention (SDPA in the student's
layer), student.norm, student.other (RoPE, SwiGLU, residuals, gathers, embedding
projection), head (distill_head: logits, KL, CE), optimizer (clip + AdamW). Backward work
goes to the stage whose forward op created the autograd node (matched by sequence number).
"gaps" = step time - kernel time: the GPU idle (launch overhead, host syncs).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import math
import re
import sys
import time
from dataclasses import dataclass

import common

common.setup_path()

import torch  # noqa: E402

MODES = ("eager", "compile", "fused")


@dataclass
class Shape:
    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    d_s: int
    seq: int
    micro_batch: int
    max_micro_batch: int
    tie: bool = True
    rope_theta: float = 500000.0
    alpha: float = 0.5


SHAPES = {
    "lrc1.5b": Shape("lrc1.5b", 3072, 28, 24, 8, 128, 8192, 128256, 1536, 2048, 4, 8, rope_theta=500000.0,
                     alpha=0.2),
    "smollm2": Shape("smollm2", 576, 30, 9, 3, 64, 1536, 49152, 288, 2048, 8, 32, rope_theta=100000.0),
    "tiny": Shape("tiny", 64, 2, 4, 2, 16, 128, 512, 32, 64, 2, 4, rope_theta=10000.0),
}

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# ----------------------------------------------------------------------------- FLOPs

def step_flops(s: Shape, B: int, S: int, accum: int = 1, step_weights: bool = False) -> dict:
    """Model FLOPs of one LRC micro-batch step, by component (formula in the module docstring).
    step_weights: W_S formed once an optimiser step of `accum` micro-batches (the trainer's path,
    lrc_ext/step_weights.py): the weight products count 1/accum a micro-batch, and a tied head's
    E_S replaces the embedding product by a lookup. Without (this bench's step): every micro-batch."""
    N, Nh, L = B * S, B * (S - 1), s.layers
    d_t, d_s, H, Hkv, h, F, V = s.hidden, s.d_s, s.heads, s.kv_heads, s.head_dim, s.ffn, s.vocab
    per_out = 2 * H * h + 2 * Hkv * h + 3 * F  # sum over the 7 linears of their non-residual dimension
    p_t, p_s = d_t * per_out, d_s * per_out
    attn_fwd = 2 * B * S * S * H * h * L
    share = 1.0 / accum if step_weights else 1.0
    c = {
        "teacher_linears_fwd": 2 * N * L * p_t,
        "teacher_attention_fwd": attn_fwd,
        "student_linears_fwd_bwd": 6 * N * L * p_s,
        "student_attention_fwd_bwd": 3 * attn_fwd,
        "weight_products_fwd_bwd": 4 * d_s * L * p_t * share,
        "clone_targets_fwd_bwd": 2 * 4 * N * L * d_t * d_s,
        "embedding_fwd_bwd": 0 if (step_weights and s.tie) else 4 * N * d_t * d_s,
        "head_teacher_fwd": 2 * Nh * V * d_t,
        "head_student_fwd_bwd": 6 * Nh * V * d_s,
        "head_weight_product_fwd_bwd": 4 * V * d_t * d_s * share,
    }
    c["total"] = sum(c.values())
    return c


def stage_flops(c: dict) -> dict:
    """The FLOP components grouped as the breakdown's stages."""
    return {
        "teacher": c["teacher_linears_fwd"] + c["teacher_attention_fwd"],
        "student.linear": c["student_linears_fwd_bwd"] + c["weight_products_fwd_bwd"] + c["clone_targets_fwd_bwd"],
        "student.attention": c["student_attention_fwd_bwd"],
        "student.other": c["embedding_fwd_bwd"],
        "head": c["head_teacher_fwd"] + c["head_student_fwd_bwd"] + c["head_weight_product_fwd_bwd"],
    }


FLOP_FORMULA = ("FLOPs/step = teacher fwd 2*N*L*P_T + attn_fwd | student fwd+bwd 6*N*L*P_S + 3*attn_fwd | "
                "weight products 4*d_S*L*P_T | clone targets 8*N*L*d_T*d_S | embedding 4*N*d_T*d_S | "
                "head 2*N_h*V*d_T + 6*N_h*V*d_S + 4*V*d_T*d_S (the trainer forms W_S once an optimiser step: "
                "weight products / accum, no embedding product with a tied head); attn_fwd = 2*B*S^2*H*h*L (causal), "
                "P_x = d_x*(2*H*h + 2*H_kv*h + 3*F), N = B*S, N_h = B*(S-1)")


# ----------------------------------------------------------------------------- model

def build_teacher(s: Shape, device: str, dtype, seed: int):
    """A randomly initialised Llama teacher of shape `s`, built directly on `device` in `dtype`."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    cfg = LlamaConfig(hidden_size=s.hidden, intermediate_size=s.ffn, num_hidden_layers=s.layers,
                      num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, head_dim=s.head_dim,
                      vocab_size=s.vocab, tie_word_embeddings=s.tie, max_position_embeddings=max(4096, s.seq),
                      rms_norm_eps=1e-5, rope_theta=s.rope_theta)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        t = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return t.eval()


def _ops_module(name: str):
    import importlib
    return importlib.import_module(f"lrc_ext.ops.{name}")


@contextlib.contextmanager
def preresolved_ops():
    """Swap the model's op switch (resolve_op) for a table of the same functions, so a mode
    can put a compiled function in the table (the compile mode does, for the reference head)."""
    import lrc_ext.model as lm
    import lrc_ext.modules as lmod
    orig = lmod.resolve_op
    table = {(n, f): orig(n, f) for n in ("clone_linear", "distill_head") for f in (True, False, None)}

    def resolve(name, fused, variant=""):  # variant "_ws" (step weights): not this bench's path
        return table[(name, fused)] if not variant else orig(name, fused, variant)
    saved = [(mod, getattr(mod, "resolve_op")) for mod in (lm, lmod) if hasattr(mod, "resolve_op")]
    for mod, _ in saved:
        mod.resolve_op = resolve
    try:
        yield table
    finally:
        for mod, f in saved:
            mod.resolve_op = f


def resolved_names(fused) -> dict:
    from lrc_ext.modules import resolve_op
    out = {}
    for n in ("clone_linear", "distill_head"):
        f = resolve_op(n, fused)
        out[n] = getattr(f, "__name__", str(f))
    return out


# ----------------------------------------------------------------------------- profiler attribution

_ATTN = re.compile(r"scaled_dot_product|flash_attention|efficient_attention|cudnn_attention|"
                   r"ScaledDotProduct|FlashAttention|EfficientAttention|CudnnAttention", re.I)
_EVAL = "autograd::engine::evaluate_function: "
_STAGE = "lrcbench/stage/"
_PHASE = "lrcbench/phase/"


@contextlib.contextmanager
def stage_ranges(lrc):
    """Every module call of the LowRankClone (teacher included) and the head op inside a
    profiler range named after its stage."""
    from torch.autograd.profiler import record_function
    from lrc_ext.modules import FusedCloneLinear
    teacher_ids = {id(m) for m in lrc.teacher.modules()}

    def stage_of(m):
        if id(m) in teacher_ids:
            # the teacher runs under no_grad; a teacher module called with grad on is the
            # student's (LowRankClone reuses the teacher's activation module)
            return "student.other" if torch.is_grad_enabled() else "teacher"
        if isinstance(m, FusedCloneLinear):
            return "student.linear"
        if m is lrc:
            return "student.other"
        if type(m).__name__.endswith("RMSNorm"):
            return "student.norm"
        return "student.other"

    open_ranges = {}
    handles = []

    def pre(m, *_):
        r = record_function(_STAGE + stage_of(m))
        r.__enter__()
        open_ranges.setdefault(id(m), []).append(r)

    def post(m, *_):
        stack = open_ranges.get(id(m))
        if stack:
            stack.pop().__exit__(None, None, None)

    for m in lrc.modules():
        if isinstance(m, (torch.nn.ModuleList, torch.nn.ModuleDict)):
            continue
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    head_mod = _ops_module("distill_head")
    patched = []
    for fname in ("distill_head", "distill_head_reference"):
        f = getattr(head_mod, fname, None)
        if callable(f):
            def wrapped(*a, __f=f, **k):
                with record_function(_STAGE + "head"):
                    return __f(*a, **k)
            functools.update_wrapper(wrapped, f)
            setattr(head_mod, fname, wrapped)
            patched.append((fname, f))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for fname, f in patched:
            setattr(head_mod, fname, f)


def _event_time_us(e, cuda: bool) -> float:
    if cuda:
        return float(sum(k.duration for k in getattr(e, "kernels", []) or []))
    return float(e.self_cpu_time_total)


def attribute(prof, cuda: bool) -> tuple[dict, list, float]:
    """Kernel time (us; CPU: op self time) per (phase, stage), the top kernels, and the total."""
    from torch.autograd import DeviceType
    evs = [e for e in prof.events() if e.device_type == DeviceType.CPU]

    def walk(e):
        """(kind, label): kind 'stage' | 'phase' | 'bwd' (label: sequence nr) | None."""
        attn = False
        x = e
        while x is not None:
            n = x.name
            if n.startswith(_EVAL):
                if "AccumulateGrad" in n:
                    return "bwd_fixed", "accumulate_grad"
                return "bwd", x.sequence_nr
            if _ATTN.search(n):
                attn = True
            if n.startswith(_STAGE):
                st = n[len(_STAGE):]
                if attn and st.startswith("student"):
                    st = "student.attention"
                return "stage", st
            if n.startswith(_PHASE):
                return "phase", n[len(_PHASE):]
            x = x.cpu_parent
        return None, None

    # forward op that created each autograd node: latest-starting forward event with that seq nr
    creators = {}
    info = []
    for e in evs:
        kind, label = walk(e)
        info.append((e, kind, label))
        if kind == "stage" and e.sequence_nr is not None and e.sequence_nr >= 0:
            start = e.time_range.start
            if e.sequence_nr not in creators or start >= creators[e.sequence_nr][0]:
                creators[e.sequence_nr] = (start, label)
    acc = {}
    kernels = {}
    total = 0.0
    for e, kind, label in info:
        t = _event_time_us(e, cuda)
        if t <= 0:
            continue
        total += t
        if kind == "stage":
            key = ("forward", label)
        elif kind == "bwd":
            cr = creators.get(label)
            key = ("backward", cr[1]) if cr else ("backward", "other")
        elif kind == "bwd_fixed":
            key = ("backward", label)
        elif kind == "phase":
            key = (label, "optimizer" if label == "optimizer" else "other")
        else:
            key = ("other", "other")
        acc[key] = acc.get(key, 0.0) + t
        if cuda:
            for k in e.kernels:
                kernels[k.name] = kernels.get(k.name, [0.0, 0])
                kernels[k.name][0] += k.duration
                kernels[k.name][1] += 1
        else:
            kernels.setdefault(e.name, [0.0, 0])
            kernels[e.name][0] += t
            kernels[e.name][1] += 1
    top = sorted(((n, v) for n, v in kernels.items() if not n.startswith("lrcbench/")),
                 key=lambda kv: -kv[1][0])[:12]
    top_rows = [{"kernel": (n if len(n) <= 90 else n[:87] + "..."), "ms": v[0] / 1e3, "calls": v[1],
                 "pct": 100.0 * v[0] / total if total else None} for n, v in top]
    return acc, top_rows, total


STAGE_ORDER = ["teacher", "student.linear", "student.attention", "student.norm", "student.other", "head",
               "accumulate_grad", "optimizer", "other"]


def breakdown_rows(acc: dict, step_ms: float, sflops: dict, gaps: bool = True) -> list[dict]:
    """Stage rows; pct_step is of step_ms. gaps=False (CPU: op times under the profiler are
    inflated, so step_ms is the profiled total and there is no idle row)."""
    stages = {}
    for (phase, st), us in acc.items():
        d = stages.setdefault(st, {"stage": st, "fwd_ms": 0.0, "bwd_ms": 0.0, "other_ms": 0.0})
        if phase == "forward":
            d["fwd_ms"] += us / 1e3
        elif phase == "backward":
            d["bwd_ms"] += us / 1e3
        else:
            d["other_ms"] += us / 1e3
    rows = []
    for st in sorted(stages, key=lambda s: STAGE_ORDER.index(s) if s in STAGE_ORDER else 99):
        d = stages[st]
        d["ms"] = d["fwd_ms"] + d["bwd_ms"] + d["other_ms"]
        d["pct_step"] = 100.0 * d["ms"] / step_ms if step_ms else None
        f = sflops.get(st)
        d["tflops"] = f / (d["ms"] * 1e-3) / 1e12 if f and d["ms"] > 0 else None
        rows.append(d)
    kern = sum(r["ms"] for r in rows)
    if gaps:
        rows.append(
            {"stage": "gaps (idle: launches, syncs)", "fwd_ms": None, "bwd_ms": None, "other_ms": None,
             "ms": max(0.0, step_ms - kern), "pct_step": 100.0 * max(0.0, step_ms - kern) / step_ms
             if step_ms else None, "tflops": None})
    return rows


# ----------------------------------------------------------------------------- one mode

class ModeRun:
    def __init__(self, mode: str, shape: Shape, args, dev: str, dtype):
        self.mode, self.s, self.args, self.dev, self.dtype = mode, shape, args, dev, dtype
        self.cuda = dev.startswith("cuda")
        self.lrc = self.opt = self.fn = self.params = None
        self._stack = contextlib.ExitStack()

    def build(self):
        from lrc_ext.model import LowRankClone
        a = self.args
        teacher = build_teacher(self.s, self.dev, self.dtype, a.seed)
        torch.manual_seed(a.seed + 1)  # the same projections in every mode
        self.lrc = LowRankClone(teacher, self.s.d_s, fused=(self.mode == "fused"), tau=40.0,
                                alpha=self.s.alpha).train()
        self.params = self.lrc.trainable_parameters()
        kw = {"fused": True} if self.cuda else {}
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0, **kw)
        self.fn = self.lrc
        if self.mode == "compile":
            if a.compile_scope == "model":
                self._stack.enter_context(preresolved_ops())
                self.fn = torch.compile(self.lrc, backend=a.compile_backend, mode=a.compile_mode)
            else:
                table = self._stack.enter_context(preresolved_ops())
                table[("distill_head", False)] = torch.compile(table[("distill_head", False)],
                                                               backend=a.compile_backend, mode=a.compile_mode)
                self.lrc._student_layer = torch.compile(self.lrc._student_layer, backend=a.compile_backend,
                                                        mode=a.compile_mode)

    def close(self):
        self._stack.close()
        self.lrc = self.opt = self.fn = self.params = None
        if self.mode == "compile":
            torch._dynamo.reset()
        common.free_memory(self.dev)

    def batch(self, mb: int):
        g = torch.Generator(device="cpu").manual_seed(self.args.seed + 2)
        ids = torch.randint(0, self.s.vocab, (mb, self.s.seq), generator=g)
        return ids.to(self.dev)

    def step(self, ids, timer=None, ranges=False):
        prof_ctx = (lambda n: torch.autograd.profiler.record_function(_PHASE + n)) if ranges else \
            (lambda n: contextlib.nullcontext())
        with prof_ctx("forward"):
            out = self.fn(ids, labels=ids)
            loss = out.loss
        if timer:
            timer.mark("forward")
        with prof_ctx("backward"):
            loss.backward()
        if timer:
            timer.mark("backward")
        with prof_ctx("optimizer"):
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        if timer:
            timer.mark("optimizer")
        return {"loss": loss.detach(), "lm": out.lm.detach(), "kl": out.kl.detach(),
                "clone": sum(v.detach() for v in out.clone.values())}

    def try_step(self, ids) -> tuple[bool, str | None]:
        """One step; (fits, error). OOM -> (False, None), memory released; other errors raise."""
        oom = False
        try:
            self.step(ids)
            common.sync(self.dev)
        except Exception as e:  # noqa: BLE001
            if not common.is_oom(e):
                raise
            oom = True
        if oom:
            self.opt.zero_grad(set_to_none=True)
            common.free_memory(self.dev)
            return False, None
        return True, None


def run_mode(mode: str, s: Shape, args, dev: str, dtype, ceil: dict, deadline: float) -> tuple[dict, dict]:
    """Returns (row, details)."""
    row = {"shape": s.name, "mode": mode}
    det = {"notes": []}
    r = ModeRun(mode, s, args, dev, dtype)
    t_build = time.perf_counter()
    try:
        r.build()
        row["build_s"] = time.perf_counter() - t_build
        row["trainable_params"] = sum(p.numel() for p in r.params)
        row["param_dtype"] = str(r.params[0].dtype).replace("torch.", "")
        det["ops"] = resolved_names(mode == "fused") if mode != "compile" else \
            {k: v + " (torch.compile)" for k, v in resolved_names(False).items()}
        seq = s.seq
        # ---- warm-up at the largest micro-batch <= the asked one that fits
        mb = args.micro_batch or s.micro_batch
        t0 = time.perf_counter()
        first = None
        oom_at = None
        while mb >= 1:
            ids = r.batch(mb)
            try:
                first = r.step(ids)
                common.sync(dev)
                break
            except Exception as e:  # noqa: BLE001
                if not common.is_oom(e):
                    raise
            r.opt.zero_grad(set_to_none=True)
            common.free_memory(dev)
            oom_at = mb
            det["notes"].append(f"micro-batch {mb} x {seq}: out of memory; halving")
            mb //= 2
        if first is None:
            row.update(status="oom", micro_batch=0, max_micro_batch=0, oom_at=1)
            return row, det
        row["first_step_s"] = time.perf_counter() - t0
        row["loss_step0"] = float(first["loss"])
        row.update(lm_step0=float(first["lm"]), kl_step0=float(first["kl"]), clone_step0=float(first["clone"]))
        for _ in range(max(0, args.warmup - 1)):
            r.step(ids)
        # ---- timed steps
        common.reset_peak_memory(dev)
        phases = []
        for _ in range(args.steps):
            timer = common.PhaseTimer(dev)
            last = r.step(ids, timer)
            phases.append(timer.finish())
        peak = common.read_peak_memory(dev)
        step_ms = sorted(sum(p.values()) for p in phases)[len(phases) // 2]
        ph = {k: sorted(p[k] for p in phases)[len(phases) // 2] for k in phases[0]}
        tokens = mb * seq
        fl = step_flops(s, mb, seq)
        tflops = fl["total"] / (step_ms * 1e-3) / 1e12
        row.update(status="ok", micro_batch=mb, seq=seq, tokens_per_step=tokens, step_ms=step_ms,
                   step_ms_min=min(sum(p.values()) for p in phases),
                   tokens_per_s=tokens / (step_ms * 1e-3), achieved_tflops=tflops,
                   mfu_datasheet=(tflops / ceil["datasheet_bf16_tflops"]) if ceil.get("datasheet_bf16_tflops")
                   else None,
                   mfu_measured=tflops / ceil["matmul_tflops"], forward_ms=ph.get("forward"),
                   backward_ms=ph.get("backward"), optimizer_ms=ph.get("optimizer"),
                   peak_mem_gib=None if peak is None else peak / 2 ** 30, loss_last=float(last["loss"]),
                   loss_finite=bool(math.isfinite(float(last["loss"]))))
        if r.cuda:
            row["state_mem_gib"] = torch.cuda.memory_allocated() / 2 ** 30
        det["flops"] = fl
        det["phases_ms"] = phases
        # ---- per-stage breakdown (one profiled step)
        if args.profile and time.time() < deadline:
            try:
                det.update(profile_step(r, ids, step_ms, fl, mode))
            except Exception as e:  # noqa: BLE001 - the breakdown must never cost the figures
                det["notes"].append(f"profile failed: {type(e).__name__}: {str(e)[:300]}")
            r.opt.zero_grad(set_to_none=True)
            common.free_memory(dev)
        elif args.profile:
            det["notes"].append("profile skipped: time budget")
        # ---- largest micro-batch: probe upwards from the timed one, one step each
        largest = mb
        cap = args.max_micro_batch if args.max_micro_batch is not None else s.max_micro_batch
        if oom_at is not None:
            cap = min(cap, oom_at - 1)
        probe = mb * 2
        if mode == "compile" and not args.probe_compile:
            det["notes"].append("micro-batch not probed in compile mode (each new size recompiles)")
            cap = mb
        while probe <= cap:
            if time.time() > deadline:
                det["notes"].append(f"micro-batch probe stopped at {probe}: time budget")
                break
            fits, _ = r.try_step(r.batch(probe))
            if not fits:
                oom_at = probe
                break
            largest = probe
            probe *= 2
        row["max_micro_batch"] = largest
        row["oom_at"] = oom_at
        row["probe_cap"] = cap
    except Exception as e:  # noqa: BLE001 - one mode failing must not lose the others
        import traceback
        row["status"] = "error"
        row["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}"
        det["traceback"] = traceback.format_exc()[-3000:]
        print(f"[{mode}] ERROR {row['error']}", flush=True)
        print(det["traceback"], flush=True)
    finally:
        row["mode_s"] = time.perf_counter() - t_build
        r.close()
    return row, det


def _with(s: Shape, **kw) -> Shape:
    d = dict(s.__dict__)
    d.update({k: v for k, v in kw.items() if v})
    return Shape(**d)


def profile_step(r: ModeRun, ids, step_ms: float, fl: dict, mode: str) -> dict:
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if r.cuda else [])
    ranges = contextlib.nullcontext() if mode == "compile" else stage_ranges(r.lrc)
    common.sync(r.dev)
    with profile(activities=acts) as prof:
        with ranges:
            r.step(ids, ranges=True)
        common.sync(r.dev)
    acc, top, total_us = attribute(prof, r.cuda)
    if r.cuda:
        rows = breakdown_rows(acc, step_ms, stage_flops(fl))
    else:
        rows = breakdown_rows(acc, total_us / 1e3, stage_flops(fl), gaps=False)
        for x in rows:  # CPU op times under the profiler are inflated: keep the shares only
            x["tflops"] = None
    out = {"breakdown": rows, "top_kernels": top, "profiled_kernel_ms": total_us / 1e3,
           "breakdown_basis": "CUDA kernel time; % of the unprofiled step time" if r.cuda else
           "CPU op self time under the profiler; % of the profiled total"}
    if r.cuda:
        from torch.autograd import DeviceType
        dev_us = sum(e.time_range.end - e.time_range.start for e in prof.events()
                     if e.device_type == DeviceType.CUDA)
        out["device_kernel_ms"] = dev_us / 1e3  # every kernel the profiler saw, attributed or not
    if mode == "compile":
        for x in rows:
            if x["stage"] == "other":
                x["stage"] = "model (not split: ranges would break the compiled graphs)"
    return out


# ----------------------------------------------------------------------------- main

def bottleneck(rows: list[dict]) -> str | None:
    cand = [x for x in rows if x.get("ms")]
    if not cand:
        return None
    b = max(cand, key=lambda x: x["ms"])
    return f"{b['stage']} ({b['pct_step']:.0f}% of the step)" if b.get("pct_step") is not None else b["stage"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None,
                    help="default: lrc1.5b with a GPU, tiny without")
    ap.add_argument("--modes", default="fused,eager,compile",
                    help="comma list of fused, eager, compile (run in this order: the target figure first)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=2, help="warm-up steps (the first one also checks memory)")
    ap.add_argument("--micro-batch", type=int, default=None, help="sequences a step (halved on OOM)")
    ap.add_argument("--max-micro-batch", type=int, default=None,
                    help="probe doubling micro-batches up to this (0/1: no probe); default per shape")
    ap.add_argument("--seq", type=int, default=None, help="sequence length (default per shape)")
    ap.add_argument("--d-s", type=int, default=None, help="student width (default per shape)")
    ap.add_argument("--layers", type=int, default=None, help="override the layer count (quick looks)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default bf16 on CUDA, fp32 on CPU")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compile-scope", choices=("layers", "model"), default="layers")
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode (default: its default)")
    ap.add_argument("--probe-compile", action="store_true", help="also probe micro-batches in compile mode")
    ap.add_argument("--no-profile", dest="profile", action="store_false", help="skip the per-stage breakdown")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="soft wall-time budget of the whole run: later modes still run their timed steps, "
                         "but profiling and micro-batch probing stop once it is spent")
    ap.add_argument("--quick", action="store_true", help="1 warm-up + 2 timed steps, no probing")
    ap.add_argument("--json", default=None, help="write results here (rewritten after each mode)")
    args = ap.parse_args(argv)

    dev = common.pick_device(args.device)
    cuda = dev.startswith("cuda")
    s = SHAPES[args.shape or ("lrc1.5b" if cuda else "tiny")]
    if args.quick:
        args.warmup, args.steps = 1, 2
        if args.max_micro_batch is None:
            args.max_micro_batch = 0
    dtype = DTYPES[args.dtype or ("bf16" if cuda else "fp32")]
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"unknown modes {bad}; choose from {MODES}")
    t_start = time.time()
    why = [w for w, bad in (("not CUDA", not cuda), ("layers overridden", args.layers), ("d_S overridden", args.d_s),
                            ("seq overridden", args.seq), ("dtype not bf16", args.dtype not in (None, "bf16")),
                            ("--quick", args.quick)) if bad]
    target_note = ("not the target configuration: " + ", ".join(why)) if why else None
    deadline = t_start + args.budget_s if args.budget_s else float("inf")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    eff = _with(s, layers=args.layers, d_s=args.d_s, seq=args.seq)
    ceil = common.measure_ceilings(dev)  # full size even with --quick: it is MFU's denominator
    meta = common.metadata(dev)
    print(f"device: {meta['device']}; torch {meta['torch']} (CUDA {meta['torch_cuda']}); "
          f"matmul {ceil['matmul_tflops']:.1f} TFLOP/s measured ({ceil['matmul_shape']}), "
          f"datasheet {common.fmt(ceil['datasheet_bf16_tflops'])}", flush=True)
    print(f"shape {s.name}: d_T {eff.hidden} -> d_S {eff.d_s}, {eff.layers} layers, {eff.heads}/{eff.kv_heads} heads "
          f"x {eff.head_dim}, FFN {eff.ffn}, V {eff.vocab}, seq {eff.seq}, {str(dtype).replace('torch.', '')}",
          flush=True)
    print(FLOP_FORMULA, flush=True)

    rows, details, errors = [], {}, []
    config = {"shape": s.name, "shape_params": eff.__dict__, "modes": modes, "steps": args.steps,
              "warmup": args.warmup, "micro_batch": args.micro_batch or s.micro_batch, "dtype": str(dtype),
              "device": dev, "compile_scope": args.compile_scope, "compile_backend": args.compile_backend,
              "compile_mode": args.compile_mode, "optimizer": "AdamW(lr=1e-4, betas=(0.9, 0.999), wd=0, "
              + ("fused=True)" if cuda else "foreach)") + " + clip_grad_norm_(1.0)", "tau": 40.0,
              "alpha": s.alpha, "flop_formula": FLOP_FORMULA, "allow_tf32": bool(cuda)}

    def derive():
        eager = next((x for x in rows if x["mode"] == "eager" and x.get("status") == "ok"), None)
        for x in rows:
            if eager and x.get("status") == "ok":
                x["speedup_vs_eager"] = x["tokens_per_s"] / eager["tokens_per_s"]
                x["loss_rel_diff_vs_eager"] = abs(x["loss_step0"] - eager["loss_step0"]) / max(
                    abs(eager["loss_step0"]), 1e-30)

    def write():
        derive()
        if not args.json:
            return
        tg = targets_for(s.name, rows, target_note)
        common.write_json(args.json, "bench_step", rows, device=dev, config=config, ceilings=ceil, targets=tg,
                          errors=errors, notes=[FLOP_FORMULA], details=details,
                          elapsed_s=time.time() - t_start)

    for mode in modes:
        print(f"\n=== {s.name} / {mode} ===", flush=True)
        need = 150 if mode == "compile" and args.compile_backend == "inductor" and cuda else 0
        if time.time() + need > deadline:
            rows.append({"shape": s.name, "mode": mode, "status": "skipped",
                         "error": f"time budget ({args.budget_s} s) spent before this mode"})
            details[mode] = {"notes": ["skipped: time budget"]}
            print("skipped: time budget", flush=True)
            write()
            continue
        # a placeholder first, so a run stopped from outside (timeout) says which mode it was in
        rows.append({"shape": s.name, "mode": mode, "status": "running (stopped before it finished?)"})
        write()
        row, det = run_mode(mode, eff, args, dev, dtype, ceil, deadline)
        rows[-1] = row
        details[mode] = det
        if row.get("status") == "error":
            errors.append(f"{s.name}/{mode}: {row.get('error')}")
        _print_mode(row, det)
        write()

    derive()
    print()
    common.print_table(rows, ["shape", "mode", "status", "micro_batch", "tokens_per_s", "step_ms", "achieved_tflops",
                              "mfu_datasheet", "mfu_measured", "peak_mem_gib", "max_micro_batch", "oom_at",
                              "speedup_vs_eager", "loss_step0", "loss_rel_diff_vs_eager"],
                       headers={"micro_batch": "mb", "tokens_per_s": "tokens/s", "achieved_tflops": "TFLOP/s",
                                "mfu_datasheet": "MFU (datasheet)", "mfu_measured": "MFU (measured mm)",
                                "peak_mem_gib": "peak GiB", "max_micro_batch": "max mb", "speedup_vs_eager": "x eager",
                                "loss_rel_diff_vs_eager": "loss diff"},
                       title=f"LRC step, {s.name}, {meta['device']}")
    for t in targets_for(s.name, rows, target_note):
        print(f"target ({t['group']}): {t['what']}: {common.fmt(t['value'])} {t['op']} {t['goal']} -> "
              f"{'MET' if t['met'] else 'not met' if t['met'] is False else 'not measured'}")
    write()
    if args.json:
        print(f"wrote {args.json}")
    return 0 if not errors else 1


def targets_for(shape: str, rows: list[dict], note: str | None = None) -> list[dict]:
    """The step targets (tools/targets.py) from the fused and eager rows (note: why this run is not the target setup)."""
    if shape != "lrc1.5b":
        return []
    f = next((x for x in rows if x["mode"] == "fused" and x.get("status") == "ok"), None)
    e = next((x for x in rows if x["mode"] == "eager" and x.get("status") == "ok"), None)
    if f is None:
        return []
    mb_note = note or (None if f.get("oom_at") else f"no OOM up to the probe cap {f.get('probe_cap')}")
    if f.get("max_micro_batch", 0) >= 4 and not note:
        mb_note = None  # fitting 4 is the target; a cap above it does not weaken that
    return [common.target("step.lrc1.5b.fused.tokens_per_s", f["tokens_per_s"], note=note),
            common.target("step.lrc1.5b.fused.mfu", f.get("mfu_datasheet"), note=note),
            common.target("step.lrc1.5b.fused.speedup_vs_eager",
                          f["tokens_per_s"] / e["tokens_per_s"] if e else None, note=note),
            common.target("step.lrc1.5b.fused.max_micro_batch", f.get("max_micro_batch"), note=mb_note)]


def _print_mode(row: dict, det: dict):
    if row.get("status") != "ok":
        print(f"status: {row.get('status')} {row.get('error', '')}", flush=True)
        return
    print(f"ops: {det.get('ops')}; build {row['build_s']:.1f} s, first step {row['first_step_s']:.1f} s "
          f"(compiles, allocates); micro-batch {row['micro_batch']} x {row['seq']}: "
          f"{row['tokens_per_s']:,.0f} tokens/s, step {row['step_ms']:.1f} ms (fwd {row['forward_ms']:.1f}, "
          f"bwd {row['backward_ms']:.1f}, opt {row['optimizer_ms']:.1f}), {row['achieved_tflops']:.1f} TFLOP/s, "
          f"MFU {common.fmt(row.get('mfu_datasheet'))} (datasheet) / {row['mfu_measured']:.3f} (measured matmul), "
          f"peak {common.fmt(row.get('peak_mem_gib'))} GiB; largest micro-batch that fits: "
          f"{row.get('max_micro_batch')} (OOM at {row.get('oom_at')})", flush=True)
    for n in det.get("notes", []):
        print("note:", n, flush=True)
    if det.get("breakdown"):
        common.print_table(det["breakdown"], ["stage", "fwd_ms", "bwd_ms", "other_ms", "ms", "pct_step", "tflops"],
                           headers={"pct_step": "% step", "tflops": "TFLOP/s"},
                           title=f"{row['mode']}: where the step goes ({det.get('breakdown_basis')}; "
                                 f"attributed {det.get('profiled_kernel_ms', 0):.1f} ms"
                                 + (f" of {det['device_kernel_ms']:.1f} ms kernel time"
                                    if det.get("device_kernel_ms") is not None else "")
                                 + f"; step {row['step_ms']:.1f} ms)")
        print(f"bottleneck: {bottleneck(det['breakdown'])}", flush=True)
        common.print_table(det["top_kernels"][:8], ["kernel", "ms", "calls", "pct"],
                           title=f"{row['mode']}: top kernels")


if __name__ == "__main__":
    sys.exit(main())
