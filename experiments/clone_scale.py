"""How much the clone term drowns the task at initialisation, raw and with the clone-loss options.

On the default teacher and data (SmolLM2-135M-Instruct, Python's docs), --seq-len 512, a
width-288 student at init normal and init pca (built by the trainer's own build_model, the
teacher loaded by lrc_ext.teacher as the trainer does), for each clone-loss setting: the norm
of the clone term's gradient (alpha * sum of the clone terms) over every trainable parameter,
divided by the norm of CE + KL's gradient, and the cosine between the two gradients. Also the
teacher's residual-stream norms over the batch (token / median per layer), which set the
"outliers" threshold (lrc_ext.model.OUTLIER_K).

    python experiments/clone_scale.py [--sequences 2] [--out bench/results]

Writes clone_scale.json and clone_scale.md under --out. Cheap: a few sequences, one
forward/backward per setting (CPU, a few minutes on 2 cores; pca init is the longest part).
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lrc_ext import config, data as data_mod, model as model_mod, teacher as teacher_mod  # noqa: E402
from lrc_ext.train import build_model  # noqa: E402

# (label, clone_norm, clone_exclude, alpha)
SETTINGS = [
    ("raw a=0.5 (paper)", "none", "none", 0.5),
    ("raw a=0.005", "none", "none", 0.005),
    ("target a=1", "target", "none", 1.0),
    ("target a=0.1", "target", "none", 0.1),
    ("exclude first a=0.5", "none", "first", 0.5),
    ("exclude outliers a=0.5", "none", "outliers", 0.5),
    ("exclude first,outliers a=0.5", "none", "first,outliers", 0.5),
    ("target + first,outliers a=1", "target", "first,outliers", 1.0),
    ("target + first,outliers a=0.1", "target", "first,outliers", 0.1),
]


def grad_stats(model, ids, params):
    """(clone/task gradient-norm ratio, cosine, loss values) for the model's current settings.
    Both are linear in alpha (the ratio) or free of it (the cosine), so settings that differ
    only in alpha share one forward/backward (see main)."""
    out = model(ids)
    task = out.lm + out.kl
    clone = model.alpha * sum(out.clone.values())
    g_task = torch.autograd.grad(task, params, retain_graph=True, allow_unused=True)
    g_clone = torch.autograd.grad(clone, params, allow_unused=True)
    flat = lambda gs: torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double()  # noqa: E731
                                 for g, p in zip(gs, params)])
    a, b = flat(g_clone), flat(g_task)
    ratio = (a.norm() / b.norm()).item()
    cos = (a @ b / (a.norm() * b.norm())).item()
    return ratio, cos, {"lm": out.lm.item(), "kl": out.kl.item(), "clone": clone.item(),
                        "clone_over_task_loss": clone.item() / task.item()}


@torch.no_grad()
def residual_norms(model, ids):
    """Per layer input: the first token's and the largest other token's norm over the median."""
    walk = model_mod.LayerWalk(model, ids, None)
    x_t, rows = walk.e_t, []
    first = walk.pick(walk.pos.reshape(walk.B, walk.S, 1))[:, 0] == 0
    for i, tl in enumerate(model.teacher.model.layers):
        n = walk.pick(x_t).float().norm(dim=-1)
        r = n / n.median()
        rows.append({"layer": i, "first_over_median_min": r[first].min().item(),
                     "others_over_median_max": r[~first].max().item(),
                     "others_over_median_p999": r[~first].quantile(0.999).item(),
                     "others_over_k": int((r[~first] > model_mod.OUTLIER_K).sum())})
        x_t = walk.teacher_layer(tl, x_t)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sequences", type=int, default=2, help="sequences of --seq-len in the measured batch")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--inits", default="normal,pca")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    a = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.time()
    results = {"setup": {"teacher": config.DEFAULT_TEACHER, "data": config.DEFAULT_DATA, "seq_len": a.seq_len,
                         "sequences": a.sequences, "student_hidden_size": 288, "outlier_k": model_mod.OUTLIER_K,
                         "torch": torch.__version__, "machine": platform.machine(),
                         "threads": torch.get_num_threads(), "note": "machine busy (shared 2-core box)"},
               "runs": [], "residual_norms": None}
    for init in a.inits.split(","):
        # clone_norm target at build: the clone_scale buffer exists and is measured on the
        # --calibration-tokens, exactly as the trainer does; the settings below switch it.
        cfg = config.TrainConfig(seq_len=a.seq_len, init=init, clone_norm="target")
        teacher, tok, _ = teacher_mod.load(cfg.teacher)
        data = data_mod.build(cfg, tok)
        model = build_model(cfg, teacher, tok, data=data)
        cal = data.batch(0, -(-cfg.calibration_tokens // cfg.seq_len))
        ids = data.batch(cal.shape[0], a.sequences)  # the sequences after the calibration ones
        params = model.trainable_parameters()
        if results["residual_norms"] is None:
            results["residual_norms"] = residual_norms(model, ids)
        measured_for, done = None, {}
        for label, norm, excl, alpha in SETTINGS:
            if (norm, excl) not in done:  # one forward/backward at alpha 1 per (norm, exclude)
                model.clone_norm, model.clone_exclude, model.alpha = norm, excl, 1.0
                if norm == "target" and measured_for != excl:  # scales over the rows the loss keeps
                    model.measure_clone_scales_(cal)
                    measured_for = excl
                done[(norm, excl)] = grad_stats(model, ids, params)
            ratio, cos, vals = done[(norm, excl)]
            vals = {**vals, "clone": vals["clone"] * alpha, "clone_over_task_loss": vals["clone_over_task_loss"] * alpha}
            row = {"init": init, "setting": label, "clone_norm": norm, "clone_exclude": excl, "alpha": alpha,
                   "grad_norm_ratio": ratio * alpha, "cosine": cos, **vals}
            print(json.dumps(row), flush=True)
            results["runs"].append(row)
    results["setup"]["seconds"] = time.time() - t0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "clone_scale.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "clone_scale.md").write_text(markdown(results))
    print(f"wrote {out / 'clone_scale.json'} and {out / 'clone_scale.md'} in {time.time() - t0:.0f}s")


def markdown(r) -> str:
    s = r["setup"]
    lines = [f"# Clone term vs CE + KL at initialisation ({s['teacher']} -> d_S {s['student_hidden_size']})", "",
             f"Made by `python experiments/clone_scale.py`: {s['data']}, {s['sequences']} sequences of "
             f"{s['seq_len']} tokens (after the calibration ones), fp32 on CPU ({s['threads']} threads, "
             f"{s['note']}; {s['seconds']:.0f} s). Gradients over every trainable parameter; ratio = "
             f"|grad(alpha * clone)| / |grad(CE + KL)|; cosine between the two. `target`: scales measured "
             f"on the --calibration-tokens, over the rows the loss keeps.", "",
             "| init | setting | grad ratio | cosine | clone / (CE+KL) loss | CE | KL |", "|---|---|---|---|---|---|---|"]
    for x in r["runs"]:
        lines.append(f"| {x['init']} | {x['setting']} | {x['grad_norm_ratio']:.3g} | {x['cosine']:.3f} | "
                     f"{x['clone_over_task_loss']:.3g} | {x['lm']:.3f} | {x['kl']:.4g} |")
    lines += ["", f"Teacher residual norm / median over the batch, per layer input (outliers: > "
              f"{s['outlier_k']:g} x median):", "",
              "| layer | position 0 (min) | other tokens (max) | other tokens (99.9%) | others > k |",
              "|---|---|---|---|---|"]
    for x in r["residual_norms"]:
        lines.append(f"| {x['layer']} | {x['first_over_median_min']:.2f} | {x['others_over_median_max']:.2f} | "
                     f"{x['others_over_median_p999']:.2f} | {x['others_over_k']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
