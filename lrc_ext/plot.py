"""loss.png from a run's log.jsonl: `python -m lrc_ext.plot RUN_DIR` (the trainer redraws it
at every evaluation and at the end)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def plot(log_path: Path, png: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(ln) for ln in Path(log_path).read_text().splitlines() if ln.strip()]
    if not recs:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in recs]
    for key, label in (("loss", "total"), ("lm", "CE (student)"), ("kl", "KL (tau, batchmean)"),
                       ("clone", "clone (sum of MSEs)")):
        ys = [r.get(key) for r in recs]
        if any(y for y in ys):
            ax1.plot(steps, ys, label=label)
    ax1.set(title="training loss terms", xlabel="step", yscale="log")
    ax1.legend(fontsize=8)
    ev = [r for r in recs if "eval_lm" in r]
    if ev:
        es = [r["step"] for r in ev]
        ax2.plot(es, [r["eval_lm"] for r in ev], "o-", label="student CE")
        ax2.plot(es, [r["teacher_lm"] for r in ev], "--", label="teacher CE")
        ax2.plot(es, [r["eval_kl"] for r in ev], "s-", label="KL to teacher (tau, batchmean)")
        ax2.legend(fontsize=8)
    ax2.set(title="held-out evaluation", xlabel="step")
    fig.tight_layout()
    tmp = Path(png).with_name(Path(png).name + ".tmp")
    fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    os.replace(tmp, png)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m lrc_ext.plot RUN_DIR")
    run = Path(sys.argv[1])
    plot(run / "log.jsonl", run / "loss.png")
    print(run / "loss.png")
