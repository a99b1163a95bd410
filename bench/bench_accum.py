"""Two ways of running the trainer's optimiser step side by side, interleaved in turns of
--block steps (A A B B ..., the last step of each turn timed) on one model, so the ratio
survives a machine whose speed drifts:

  --compare steps (default): W_S formed once a step (lrc_ext/step_weights.py) against once a
                             micro-batch (the ops forming their own), both in --dtype;
  --compare dtype:           bf16 autocast (fp32 master weights) against fp32, both with step
                             weights (what --dtype auto picks on a CPU with native bf16);
  --compare gemm:            fp32 GEMMs of the linear form on oneDNN against MKL, both fp32 with
                             step weights (the trainer's --cpu-gemm; lrc_ext/ops/_cpu_gemm.py).

    python bench/bench_accum.py [--teacher PATH] [--micro-batch 4] [--seq 128]
                                [--tokens-per-step 2048] [--steps 4] [--block 2] [--dtype float32|bfloat16]

The teacher defaults to the trainer's default (SmolLM2-135M-Instruct); inputs are random token
ids; the student has the default job's width (config.TrainConfig.student_hidden_size, 432
today; --d-s to change it), initialised normal (the init does not change a step's cost).
Prints each path's median tokens/s, the median of the per-pair ratios, and the ratio the
FLOP count allows (bench/bench_step.py's step_flops).
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from lrc_ext import config, teacher as teacher_mod
from lrc_ext.model import LowRankClone
from lrc_ext.ops import _cpu_gemm
from lrc_ext.train import Trainer
from bench_step import Shape, step_flops  # this folder's; run as a script, it is on sys.path


class _Rows:
    def __init__(self, rows):
        self.rows = rows

    def batch(self, pos, n):
        return self.rows[torch.arange(pos, pos + n) % self.rows.shape[0]]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default=config.DEFAULT_TEACHER)
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--tokens-per-step", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per path (after one warm-up each)")
    ap.add_argument("--block", type=int, default=2,
                    help="consecutive steps of one path per turn, the last one timed (a step right after the other "
                         "path pays for its buffers again; training never alternates). 1: A B A B, one warm-up round")
    ap.add_argument("--d-s", type=int, default=config.TrainConfig().student_hidden_size,
                    help="the student's width (default: the trainer's)")
    ap.add_argument("--compare", choices=("steps", "dtype", "gemm"), default="steps")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="bfloat16: autocast over fp32 master weights, as the trainer does")
    args = ap.parse_args(argv)
    if args.compare == "gemm" and not _cpu_gemm.onednn_available():
        ap.error("--compare gemm: this torch has no oneDNN linear op")
    if args.compare == "gemm" and args.dtype != "float32":
        ap.error("--compare gemm compares fp32 GEMMs: leave --dtype float32")
    teacher, _, src = teacher_mod.load(args.teacher)
    vocab = teacher.config.vocab_size
    torch.manual_seed(0)
    model = LowRankClone(teacher, args.d_s)
    cfg = config.TrainConfig(micro_batch_size=args.micro_batch, seq_len=args.seq,
                             tokens_per_step=args.tokens_per_step, max_steps=10 ** 6, warmup=0)
    rows = torch.randint(0, vocab, (64, args.seq))
    def amp(dt):
        return torch.autocast("cpu", dtype=torch.bfloat16) if dt == "bfloat16" else contextlib.nullcontext()
    tr = Trainer(cfg, model, _Rows(rows), device=torch.device("cpu"), amp=amp(args.dtype))
    if args.compare == "steps":
        names = {True: "W_S per step", False: "W_S per micro-batch"}
    elif args.compare == "dtype":
        names = {True: "bf16 autocast", False: "fp32"}
    else:
        names = {True: "fp32 on oneDNN", False: "fp32 on MKL"}
    times = {True: [], False: []}
    for i in range(args.steps + (args.block == 1)):
        for sw in (True, False):
            if args.compare == "steps":
                tr.step_weights = sw
            elif args.compare == "dtype":
                tr.amp = amp("bfloat16" if sw else "float32")
            else:
                _cpu_gemm.set_backend("onednn" if sw else "mkl")
            for j in range(args.block):
                t0 = time.perf_counter()
                tr.train_step()
                if j == args.block - 1 and (i or args.block > 1):  # warm: a step after one of its own path
                    times[sw].append(time.perf_counter() - t0)
    tok = cfg.step_tokens()
    ratio = statistics.median(b / a for a, b in zip(times[True], times[False]))
    what = {"steps": args.dtype, "dtype": "step weights", "gemm": "float32, step weights"}[args.compare]
    print(f"teacher {src}, d_S {args.d_s}, {what}, "
          f"{cfg.accum_steps()} x {args.micro_batch} x {args.seq} "
          f"tokens a step, {torch.get_num_threads()} threads, {args.steps} interleaved turns of {args.block} "
          f"step(s) per path, the last of each timed")
    for sw in (False, True):
        ts, name = times[sw], names[sw]
        print(f"  {name:20} {tok / statistics.median(ts):8.1f} tokens/s (median; min {tok / max(ts):.1f}, "
              f"max {tok / min(ts):.1f})")
    print(f"  speed-up ({names[True]} / {names[False]}, median of pairs): {ratio:.3f}x")
    if args.compare == "steps":
        c = teacher.config
        shape = Shape("teacher", c.hidden_size, c.num_hidden_layers, c.num_attention_heads,
                      getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
                      getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads, c.intermediate_size,
                      vocab, args.d_s, args.seq, args.micro_batch, args.micro_batch,
                      tie=bool(getattr(c, "tie_word_embeddings", False)))
        fl = {sw: step_flops(shape, args.micro_batch, args.seq, cfg.accum_steps(), sw)["total"] for sw in (True, False)}
        print(f"  the FLOP count allows {fl[False] / fl[True]:.3f}x ({fl[False] / 1e9:.0f} against "
              f"{fl[True] / 1e9:.0f} GFLOP a micro-batch; bench_step.step_flops)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
