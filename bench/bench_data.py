"""The token store at scale: prepare throughput, host memory of a training run from a small and
a large store, resume deep into the large store, and loader throughput.

    python bench/bench_data.py [--teacher T] [--big-tokens 100000000] [--work DIR]

* prepare: `lrc_ext.prepare` on ~1M tokens of text (Python's docs, repeated) with the teacher's
  tokenizer, tokens/s as it reports them (datasets map with --num-proc);
* peak RSS of a short `lrc_ext.train` run (a few steps of --teacher) from the ~1M-token store
  and from a --big-tokens store (written directly in the store format from random tokens, to
  save tokenising it), measured side by side: goal, within 200 MB of each other;
* resume: the data work before the first step when resuming at the last tenth of the big store
  (open the store, cut the held-out split, read the first micro-batch and the first prefetched
  one): goal < 2 s;
* loader: tokens/s the DataLoader delivers from the big store (random rows, 2 workers): goal
  >= 5M tokens/s.

Everything is written under --work (a temporary directory by default, removed at the end).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lrc_ext import data, store  # noqa: E402
from lrc_ext.config import DEFAULT_TEACHER, TrainConfig  # noqa: E402


def small_corpus(path: Path, repeat: int) -> Path:
    from pydoc_data.topics import topics
    with open(path, "w") as f:
        for r in range(repeat):
            for k in sorted(topics):
                f.write(json.dumps({"text": f"[{r}] {topics[k]}"}) + "\n")
    return path


def synth_store(path: Path, n_tokens: int, tok, seed: int = 0, chunk: int = 1 << 24) -> Path:
    """A store of random tokens and random document lengths, in the format prepare writes."""
    rng = np.random.default_rng(seed)
    ident, fr = store.tokenizer_identity(tok), store.framing(tok)
    dtype = np.uint16 if ident["vocab_size"] <= 1 << 16 else np.uint32
    tmp = path.parent / f"{path.name}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True)
    done, docs = 0, 0
    with open(tmp / store.TOKENS, "wb") as ft, open(tmp / store.DOC_ENDS, "wb") as fe:
        while done < n_tokens:
            n = min(chunk, n_tokens - done)
            t = rng.integers(0, ident["vocab_size"], n, dtype=np.int64).astype(dtype)
            lens = rng.integers(64, 2048, n // 64 + 2)
            ends = np.cumsum(lens)
            ends = ends[ends < n]
            ends = np.append(ends, n)
            t[ends - 1] = fr["eos"]
            ft.write(t.tobytes())
            fe.write((ends + done).astype(np.uint64).tobytes())
            done, docs = done + n, docs + ends.size
    ends = np.memmap(tmp / store.DOC_ENDS, dtype=np.uint64, mode="r")
    start, ev = store.split_point(ends, n_tokens, 1024, 128, str(path))
    m = {"format": store.FORMAT, "kind": store.KIND, "dtype": np.dtype(dtype).name, "n_tokens": n_tokens,
         "n_docs": docs, "max_token_id": ident["vocab_size"] - 1, "tokenizer": ident, "framing": fr,
         "data": {"spec": f"synthetic:{n_tokens}", "text_field": "text", "split": "train", "key": f"synth{seed}"},
         "held_out": {"eval_tokens": 1024, "seq_len": 128, "eval_docs": ev, "train_start": start},
         "files": {f: (tmp / f).stat().st_size for f in (store.TOKENS, store.DOC_ENDS)},
         "seconds": 0.0}
    (tmp / store.MANIFEST).write_text(json.dumps(m, indent=1))
    os.rename(tmp, path)
    return path


RUN = """
import resource, sys, json
from lrc_ext.train import main
code = main(sys.argv[1:])
import gc
from lrc_ext.store import StoreData
for o in gc.get_objects():  # end the loader workers, so that their peak counts as the children's
    if isinstance(o, StoreData):
        o.close()
print("RSS " + json.dumps({"code": code, "self_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                           "children_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def train_rss(teacher: str, st: Path, out: Path, steps: int) -> dict:
    args = ["--teacher", teacher, "--data", str(st), "--max-steps", str(steps), "--seq-len", "128",
            "--micro-batch-size", "4", "--tokens-per-step", "512", "--eval-tokens", "128", "--eval-every", "0",
            "--save-every", "0", "--gen-tokens", "0", "--output-dir", str(out)]
    env = dict(os.environ, PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false")
    r = subprocess.run([sys.executable, "-c", RUN, *args], capture_output=True, text=True, env=env, cwd=REPO)
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("RSS ")]
    if r.returncode or not line:
        raise SystemExit(f"training run from {st} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return json.loads(line[0][4:])


def resume_seconds(st: Path, tok, teacher: str, frac: float = 0.9) -> tuple[float, int]:
    cfg = TrainConfig(teacher=teacher, data=str(st), seq_len=128, micro_batch_size=4, eval_tokens=1024)
    t0 = time.perf_counter()
    d = data.open_data(cfg, tok)
    pos = int(frac * d.n_train) // 4 * 4
    d.batch(pos, 4)
    d.batch(pos + 4, 4)  # the first one from the prefetching loader
    dt = time.perf_counter() - t0
    d.close()
    return dt, pos


def loader_tokens_per_s(st: Path, tok, teacher: str, workers: int, seconds: float = 5.0,
                        mb: int = 64, seq_len: int = 2048) -> float:
    cfg = TrainConfig(teacher=teacher, data=str(st), seq_len=seq_len, micro_batch_size=mb, eval_tokens=0,
                      data_workers=workers)
    d = store.StoreData(store.Store(st), cfg, tok, workers=workers)
    pos = 0
    d.batch(pos, mb)  # starts the loader
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        pos += mb
        n += d.batch(pos, mb).numel()
    rate = n / (time.perf_counter() - t0)
    d.close()
    return rate


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default=DEFAULT_TEACHER)
    p.add_argument("--big-tokens", type=int, default=100_000_000)
    p.add_argument("--small-repeat", type=int, default=9, help="copies of Python's docs (~113K tokens each)")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--num-proc", type=int, default=2)
    p.add_argument("--work", default=None)
    a = p.parse_args(argv)
    from lrc_ext.prepare import main as prepare_main, tokenizer_of
    from lrc_ext.teacher import resolve
    teacher = str(resolve(a.teacher))
    tok = tokenizer_of(teacher)
    work_ctx = tempfile.TemporaryDirectory(prefix="bench_data_") if a.work is None else None
    work = Path(a.work or work_ctx.name)
    work.mkdir(parents=True, exist_ok=True)
    res = {}
    try:
        corpus = small_corpus(work / "small.jsonl", a.small_repeat)
        small = work / "small_store"
        t0 = time.perf_counter()
        assert prepare_main(["--teacher", teacher, "--data", str(corpus), "--output", str(small),
                             "--num-proc", str(a.num_proc)]) == 0
        m = store.read_manifest(small)
        res["prepare"] = {"tokens": m["n_tokens"], "seconds": m["seconds"], "wall_s": time.perf_counter() - t0,
                          "tokens_per_s": m["n_tokens"] / m["seconds"], "num_proc": a.num_proc}
        big = work / "big_store"
        t0 = time.perf_counter()
        synth_store(big, a.big_tokens, tok)
        res["synth_big_s"] = time.perf_counter() - t0
        rs = train_rss(teacher, small, work / "run_small", a.steps)
        rb = train_rss(teacher, big, work / "run_big", a.steps)
        res["rss"] = {"small_tokens": m["n_tokens"], "big_tokens": a.big_tokens, "small": rs, "big": rb,
                      "diff_mb": rb["self_mb"] - rs["self_mb"]}
        dt, pos = resume_seconds(big, tok, teacher)
        res["resume"] = {"seconds": dt, "at_sequence": pos}
        res["loader"] = {f"workers_{w}": loader_tokens_per_s(big, tok, teacher, w) for w in (2, 0)}
    finally:
        if work_ctx is not None:
            work_ctx.cleanup()
    pr, rss, rz, ld = res["prepare"], res["rss"], res["resume"], res["loader"]
    print(json.dumps(res, indent=1))
    print(f"prepare  {pr['tokens']:,} tokens in {pr['seconds']:.1f}s: {pr['tokens_per_s']:,.0f} tokens/s "
          f"(num_proc {pr['num_proc']})")
    print(f"rss      training run peak: {rss['small']['self_mb']:.0f} MB from {rss['small_tokens']:,} tokens, "
          f"{rss['big']['self_mb']:.0f} MB from {rss['big_tokens']:,} tokens: {rss['diff_mb']:+.0f} MB (goal within "
          f"200 MB); loader workers peak {rss['small']['children_mb']:.0f} / {rss['big']['children_mb']:.0f} MB")
    print(f"resume   at sequence {rz['at_sequence']:,} of the big store: {rz['seconds']:.2f}s of data work before "
          f"the first step (goal < 2 s)")
    print(f"loader   {ld['workers_2'] / 1e6:.1f}M tokens/s with 2 workers, {ld['workers_0'] / 1e6:.1f}M tokens/s "
          f"read in the training process (goal >= 5M)")


if __name__ == "__main__":
    main()
