"""The trainer's optimiser step of this tree against another commit's, side by side in one run:
two worker processes (each importing lrc_ext from its own tree, the other commit's extension
built for it, CPU kernels only), driven in interleaved turns of --block steps (A A B B ...,
the last step of each turn timed), so the ratio survives a machine whose speed drifts.

    python bench/bench_accum_commits.py --before a94337a [--micro-batch 4] [--seq 128]
        [--tokens-per-step 2048] [--steps 8] [--block 2] [--d-s 288] [--threads N] [--out F.json]
        [--teacher PATH]

Both sides: the default teacher (SmolLM2-135M-Instruct; --teacher another) in fp32, the same student
(LowRankClone(teacher, d_S), its constructor's defaults, seed 0), random token ids, the
trainer's own step under each tree's defaults (today: W_S formed once a step; a commit from
before that change forms it in every micro-batch). bench/bench_accum.py compares the two
ways within this tree; this one compares the trees, everything else that changed included.
Each worker gets --threads threads (default: all cores, the workers take turns).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# One worker: lrc_ext from `tree` (an editable install's import hook would win over sys.path),
# then "run N" on stdin -> N optimiser steps, the last one's seconds on stdout.
WORKER = """import sys, time
sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith("_editable")]
tree, teacher_spec = sys.argv[1], sys.argv[7]
d_s, mb, seq, tps, threads = map(int, sys.argv[2:7])
sys.path.insert(0, tree)
import torch
torch.set_num_threads(threads)
import lrc_ext
from lrc_ext import config, teacher as teacher_mod
from lrc_ext.model import LowRankClone
from lrc_ext.train import Trainer
assert lrc_ext.__file__.startswith(tree), lrc_ext.__file__
teacher, _, _ = teacher_mod.load(teacher_spec or config.DEFAULT_TEACHER)
torch.manual_seed(0)
model = LowRankClone(teacher, d_s)
cfg = config.TrainConfig(micro_batch_size=mb, seq_len=seq, tokens_per_step=tps, max_steps=10 ** 6, warmup=0)
rows = torch.randint(0, teacher.config.vocab_size, (64, seq))
class Rows:
    def batch(self, pos, n):
        return rows[torch.arange(pos, pos + n) % rows.shape[0]]
tr = Trainer(cfg, model, Rows(), device=torch.device("cpu"))
print("ready", getattr(tr, "step_weights", False), cfg.accum_steps(), flush=True)
for line in sys.stdin:
    n = int(line.split()[1])
    for _ in range(n):
        t0 = time.perf_counter()
        tr.train_step()
    print(time.perf_counter() - t0, flush=True)
"""


def start(tree: Path, a) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, PYTHONPATH=str(tree), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    p = subprocess.Popen([sys.executable, "-c", WORKER, str(tree), str(a.d_s), str(a.micro_batch), str(a.seq),
                          str(a.tokens_per_step), str(a.threads), a.teacher or ""], cwd=tree, env=env, stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    if not line.startswith("ready"):
        raise SystemExit(f"the worker of {tree} did not start (rc {p.poll()})")
    return p, line.split()[1]


def turn(p: subprocess.Popen, n: int) -> float:
    p.stdin.write(f"run {n}\n")
    p.stdin.flush()
    return float(p.stdout.readline())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="the git commit to compare with")
    ap.add_argument("--teacher", default=None, help="default: the trainer's default teacher")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--tokens-per-step", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=8, help="timed turns per side")
    ap.add_argument("--block", type=int, default=2, help="steps a turn, the last one timed")
    ap.add_argument("--d-s", type=int, default=288, help="the student's width, the same on both sides")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    a = ap.parse_args(argv)
    sys.path.insert(0, str(REPO / "bench"))
    from bench_fsdp_rss import build_extension
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", a.before], text=True, capture_output=True,
                            check=True).stdout.strip()
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], text=True, capture_output=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="bench_accum_commits_") as tmp:
        old = Path(tmp) / "before"
        old.mkdir()
        subprocess.run(f"git -C {REPO} archive {commit} | tar -x -C {old}", shell=True, check=True)
        build_extension(old, Path(tmp) / "wheel")
        sides = {}
        for name, tree in (("before", old), ("now", REPO)):
            sides[name] = start(tree, a)
        times = {name: [] for name in sides}
        try:
            for i in range(a.steps):
                for name, (p, _) in sides.items():
                    times[name].append(turn(p, a.block))
                print(f"turn {i + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()), flush=True)
        finally:
            for p, _ in sides.values():
                p.stdin.close()
                p.wait(timeout=60)
    tok = a.tokens_per_step
    ratio = statistics.median(b / n for b, n in zip(times["before"], times["now"]))
    res = {"before": commit, "now": head, "micro_batch": a.micro_batch, "seq": a.seq,
           "tokens_per_step": tok, "d_s": a.d_s, "threads": a.threads, "block": a.block,
           "step_weights": {k: v[1] for k, v in sides.items()}, "step_s": times,
           "tokens_per_s": {k: tok / statistics.median(v) for k, v in times.items()}, "speedup_median_of_pairs": ratio}
    print(f"accum {tok // (a.micro_batch * a.seq)} x {a.micro_batch} x {a.seq} tokens, d_S {a.d_s}, fp32, "
          f"{a.threads} threads a worker, {a.steps} interleaved turns of {a.block} steps (the last timed)")
    for k in ("before", "now"):
        print(f"  {k:6} {res['tokens_per_s'][k]:7.1f} tokens/s (median)  step weights: {res['step_weights'][k]}  "
              f"[{commit[:7] if k == 'before' else head[:7]}]")
    print(f"  speed-up (now / before, median of pairs): {ratio:.3f}x")
    if a.out:
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
