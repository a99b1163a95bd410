"""Smoke test of experiments/token_efficiency.py on a tiny random teacher and a tiny word corpus
(seconds), and its read-outs on hand-made curves. It checks the arms start where they should
and that the analysis is right, not the quality figures."""
from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from _tiny import one_thread_per_module, tiny_teacher, tiny_tokenizer  # noqa: F401  (fixture)
from test_quality import _corpus

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import token_efficiency as te  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("te")
    teacher_dir, corpus, out = tmp / "teacher", tmp / "corpus", tmp / "out"
    tok = tiny_tokenizer()
    tok.eos_token = "<unk>"
    tok.bos_token = "<unk>"
    tiny_teacher("llama", tie=True).save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    _corpus(corpus)
    argv = ["--teacher", str(teacher_dir), "--data", str(corpus), "--out", str(out), "--width", "32",
            "--seq-len", "16", "--micro-batch", "2", "--tokens", "128", "--warmup", "1", "--heldout-tokens", "600",
            "--eval-rows", "6", "--calibration-tokens", "64", "--calibration-generated", "32", "--boot", "50",
            "--dtype", "float32"]
    assert te.main(argv) == 0
    return out, json.loads((out / "results.json").read_text())


def test_smoke_outputs(smoke):
    out, res = smoke
    m = res["meta"]
    assert m["budget_tokens"] == 128 and m["steps"] == 4 and m["heldout_rows"] == 6
    assert len(m["runs"]) == 1 and m["runs"][0]["arms"] == list(te.ARMS)  # one invocation made every arm
    assert set(res["arms"]) == set(te.ARMS)
    for k, a in res["arms"].items():
        assert a["done"], k
        assert [p["step"] for p in a["points"]] == [0, 1, 2, 4], k
        assert all(len(p["rows"]) == 6 and math.isfinite(p["ce"]) for p in a["points"]), k
        assert a["step_flops"] > 0, k
    arms = res["arms"]
    for k in ("A1", "A2"):  # from random init, a few steps on this repetitive text lower the CE
        assert arms[k]["points"][-1]["ce"] < arms[k]["points"][0]["ce"], k
    # prune + KD (B) and LRC without clone (C) start exactly where LRC (D) starts, at each seed
    for b in ("B1", "B2", "C", "D2"):
        assert arms[b]["points"][0]["rows"] == pytest.approx(arms["D"]["points"][0]["rows"], abs=1e-5), b
    assert arms["B1s1"]["points"][0]["rows"] == pytest.approx(arms["Ds1"]["points"][0]["rows"], abs=1e-5)
    assert arms["Ds1"]["points"][0]["rows"] != pytest.approx(arms["D"]["points"][0]["rows"], abs=1e-5)
    # the pca tokens count before step 0 for B, C, D; none for scratch and the paper's init
    assert {k: a["pre_tokens"] for k, a in arms.items() if k in ("A1", "B1", "C", "D", "E", "G")} == \
        dict(A1=0, B1=96, C=96, D=96, E=0, G=0)
    assert arms["F"]["pre_tokens"] == 64  # its clone scales: a teacher pass over 64 training tokens
    # all weights free for the KD and scratch arms, projections only for LRC
    assert arms["A1"]["trainable_params"] == arms["B1"]["trainable_params"] > arms["D"]["trainable_params"]
    # clone terms cost FLOPs, the KD step has no clone
    assert arms["D"]["step_flops"] > arms["C"]["step_flops"]
    an = res["analysis"]
    assert an["best_scratch"] in ("A1", "A2") and list(an["thresholds"]) == ["32", "64", "128"]
    for row in an["thresholds"].values():
        assert row["ce_ci"][0] <= row["ce"] <= row["ce_ci"][1]
        best = row["arms"][an["best_scratch"]]
        assert best["speedup_vs_ref"] == pytest.approx(1.0)
    assert an["vs_kd"]["ref"] in ("B1", "B2")  # the seed-0 prune + KD arms only
    for row in an["vs_kd"]["thresholds"].values():
        assert row["arms"][an["vs_kd"]["ref"]]["speedup_vs_ref"] == pytest.approx(1.0)
    assert set(an["final_ce_diff"]) == set(te.ARMS) - {"D"}
    text = (out / "README.md").read_text()
    assert "x fewer than scratch" in text and "Thresholds from prune + KD" in text and (out / "curves.png").stat().st_size > 1000
    # a rerun skips finished arms; --render rebuilds the tables from the JSON with hand notes
    (out / "notes.md").write_text("hand-written note")
    assert te.main(["--render", "--out", str(out), "--boot", "50"]) == 0
    assert "hand-written note" in (out / "README.md").read_text()
    assert json.loads((out / "results.json").read_text())["analysis"] == an


def test_crossing():
    xs, ys = [0, 100, 400], [10.0, 8.0, 6.0]
    assert te.crossing(xs, ys, 7.0) == pytest.approx(200)  # log-linear between 100 and 400
    assert te.crossing(xs, ys, 9.0) == pytest.approx(50)   # linear from a start at 0
    assert te.crossing(xs, ys, 10.0) == 0                  # at init
    assert te.crossing(xs, ys, 5.0) == math.inf
    assert te.crossing([96, 128], [4.0, 3.0], 5.0) == 96  # a pca start below: its calibration tokens
    assert te.eval_steps(32) == [0, 1, 2, 4, 8, 16, 32] and te.eval_steps(5) == [0, 1, 2, 4, 5]


def test_analysis_paired_bootstrap():
    """Two arms, the second 0.5 nats below the first on every row at every point: its speed-up
    is the same in every draw, and the CE difference's interval is one point."""
    rows = [3.0, 4.0, 5.0, 6.0]
    pts = lambda off: [dict(tokens=t, ce=sum(r - off - t / 64 for r in rows) / 4,
                            rows=[r - off - t / 64 for r in rows]) for t in (0, 32, 64, 128)]
    res = {"arms": {"A1": dict(done=True, pre_tokens=0, points=pts(0.0)),
                    "D": dict(done=True, pre_tokens=0, points=pts(0.5))}}
    an = te.analyse(res, n_boot=40)
    assert an["best_scratch"] == "A1"
    row = an["thresholds"]["128"]
    assert row["arms"]["A1"]["tokens"] == pytest.approx(128)
    assert row["arms"]["D"]["tokens"] == pytest.approx(math.sqrt(64 * 128))  # halfway from 64 to 128, in log
    assert row["arms"]["D"]["speedup_ci"][0] == pytest.approx(row["arms"]["D"]["speedup_ci"][1])
    assert an["final_ce_diff"]["A1"]["diff"] == pytest.approx(0.5)
    assert an["final_ce_diff"]["A1"]["ci"] == [pytest.approx(0.5), pytest.approx(0.5)]
    assert torch.isfinite(torch.tensor(row["arms"]["D"]["tokens_ci"])).all()
