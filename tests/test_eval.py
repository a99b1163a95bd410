"""`python -m lrc_ext.eval`: lm-eval on an exported student and its teacher (a local task,
written here as YAML + JSONL, through --include-path: no hub), and held-out perplexity.

The numbers are checked against oracles computed here: multiple-choice accuracy from the
models' own log-probabilities, perplexity from transformers' own loss on the trainer's
held-out split.
"""
from __future__ import annotations

import json
import math
import random
import sys

import pytest
import torch
from _extras import require
from _tiny import VOCAB, tiny_teacher, tiny_tokenizer
from test_train import _exit2

from lrc_ext import eval as ev

D_S = 32


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny llama teacher (with an EOS: lm-eval needs one) and its exported width-32 student."""
    from lrc_ext.model import LowRankClone
    root = tmp_path_factory.mktemp("eval")
    tok = tiny_tokenizer()
    tok.eos_token = "w0"
    teacher = tiny_teacher("llama", std=0.3)
    teacher.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    torch.manual_seed(1)
    LowRankClone(teacher, D_S, tokenizer=tok).export(root / "student")
    return root


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """Two local tasks in one --include-path (shared: lm-eval indexes its task files once a process)."""
    root = tmp_path_factory.mktemp("tasks")
    d, a = write_task(root, "tiny_mc", n=16, seed=0)
    _, b = write_task(root, "tiny_mc_b", n=10, seed=1)
    return d, {"tiny_mc": a, "tiny_mc_b": b}


def write_task(root, name="tiny_mc", n=16, seed=0):
    """A 3-way multiple-choice task in lm-eval's YAML format over a local JSONL file."""
    rng = random.Random(seed)
    docs = [{"question": " ".join(f"w{rng.randrange(1, VOCAB - 1)}" for _ in range(6)),
             "choices": [f"w{rng.randrange(1, VOCAB - 1)}" for _ in range(3)], "answer": rng.randrange(3)}
            for _ in range(n)]
    d = root / "tasks"
    d.mkdir(exist_ok=True)
    (d / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in docs))
    (d / f"{name}.yaml").write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {d / f'{name}.jsonl'}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""")
    return d, docs


def oracle_acc(model_dir, docs) -> float:
    """Accuracy by the models' own log-probabilities: the choice's token after the question's."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
    m = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    right = 0
    for d in docs:
        ids = tok(d["question"])["input_ids"]
        with torch.no_grad():
            logp = m(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
        scores = [logp[tok(c)["input_ids"][0]].item() for c in d["choices"]]
        right += max(range(3), key=scores.__getitem__) == d["answer"]
    return right / len(docs)


def test_tasks_student_and_teacher_side_by_side(models, tasks, tmp_path, capsys):
    """--limit 12: the first 12 of tiny_mc's 16 examples, all 10 of tiny_mc_b."""
    require("lm_eval")
    tasks, docs = tasks
    out = tmp_path / "res" / "scores.json"
    code = ev.main([str(models / "student"), "--teacher", str(models / "teacher"), "--tasks", "tiny_mc,tiny_mc_b",
                    "--include-path", str(tasks), "--limit", "12", "--batch-size", "4", "--device", "cpu",
                    "--output", str(out)])
    assert code == 0
    rep = json.loads(out.read_text())
    want = {"tiny_mc": {w: 100 * oracle_acc(models / w, docs["tiny_mc"][:12]) for w in ("student", "teacher")},
            "tiny_mc_b": {w: 100 * oracle_acc(models / w, docs["tiny_mc_b"]) for w in ("student", "teacher")}}
    assert [r["task"] for r in rep["rows"]] == ["tiny_mc", "tiny_mc_b"]
    for row in rep["rows"]:
        w = want[row["task"]]
        assert row["metric"] == "acc"
        assert row["student"] == pytest.approx(w["student"]) and row["teacher"] == pytest.approx(w["teacher"])
        assert row["difference"] == pytest.approx(w["student"] - w["teacher"])
    avg = rep["average"]
    assert avg["student"] == pytest.approx(sum(w["student"] for w in want.values()) / 2)
    assert avg["difference"] == pytest.approx(avg["student"] - avg["teacher"])
    assert rep["student"]["n-samples"]["tiny_mc"] == {"original": 16, "effective": 12}
    assert rep["student"]["n-samples"]["tiny_mc_b"] == {"original": 10, "effective": 10}
    assert rep["student"]["model"] == str(models / "student") and rep["teacher"]["model"] == str(models / "teacher")
    md = (tmp_path / "res" / "scores.md").read_text()
    assert md.startswith("| task | metric | student | teacher | student - teacher |")
    row = next(ln for ln in md.splitlines() if ln.startswith("| tiny_mc |"))
    assert f"{want['tiny_mc']['student']:.2f}" in row and f"{want['tiny_mc']['teacher']:.2f}" in row
    assert "| average |" in md and md in capsys.readouterr().out
    # the installed lm-eval knows the paper's nine (the index is the one built above)
    known = set(ev.task_manager(str(tasks)).all_tasks)
    assert set(ev.PAPER_TASKS) <= known, sorted(set(ev.PAPER_TASKS) - known)


def test_table_without_teacher():
    rows = ev.compare({"table": {"a": {"metric": "acc", "value": 0.5}}}, None, percent=True)
    assert rows == [{"task": "a", "metric": "acc", "student": 50.0, "teacher": None, "difference": None}]
    md = ev.markdown(rows, None, False, "u")
    assert md == "| task | metric | student |\n|---|---|---:|\n| a | acc | 50.00 |\n\nu\n"


def test_paper_names_the_nine_tasks():
    assert ev.task_names("paper") == ["arc_easy", "arc_challenge", "logiqa", "commonsense_qa", "piqa", "winogrande",
                                      "boolq", "sciq", "mmlu"]
    assert ev.task_names("boolq, paper,tiny") == ["boolq", "arc_easy", "arc_challenge", "logiqa", "commonsense_qa",
                                                  "piqa", "winogrande", "sciq", "mmlu", "tiny"]


def test_primary_metric_prefers_acc_norm():
    assert ev.primary_metric({"alias": "x", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.6,
                              "acc_norm_stderr,none": 0.2}) == ("acc_norm", 0.6, 0.2)
    assert ev.primary_metric({"acc,none": 0.25, "acc_stderr,none": "N/A"}) == ("acc", 0.25, None)
    assert ev.primary_metric({"exact_match,strict-match": 0.1}) == ("exact_match", 0.1, None)


def test_perplexity_on_the_trainers_held_out_split(models, tmp_path):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    from lrc_ext import data as data_mod
    from lrc_ext.config import TrainConfig
    rng = random.Random(0)
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"body": " ".join(f"w{rng.randrange(1, VOCAB - 1)}"
                                                         for _ in range(rng.randint(5, 40)))}) + "\n"
                            for _ in range(40)))
    out = tmp_path / "ppl.json"
    assert ev.main([str(models / "student"), "--teacher", str(models / "teacher"), "--data", str(docs),
                    "--text-field", "body", "--seq-len", "16", "--eval-tokens", "64", "--batch-size", "3",
                    "--device", "cpu", "--output", str(out)]) == 0
    rep = json.loads(out.read_text())
    tok = PreTrainedTokenizerFast.from_pretrained(models / "student")
    cfg = TrainConfig(data=str(docs), text_field="body", seq_len=16, eval_tokens=64)
    held = data_mod.build(cfg, tok).eval  # what the trainer holds out (not streamed)
    assert held.shape == (4, 16) and rep["student"]["sequences"] == 4
    assert torch.equal(ev.held_out(tok, ev.build_parser().parse_args(
        ["x", "--data", str(docs), "--text-field", "body", "--seq-len", "16", "--eval-tokens", "64"]), "x"), held)
    rows = {r["task"]: r for r in rep["rows"]}
    for who in ("student", "teacher"):
        m = AutoModelForCausalLM.from_pretrained(models / who).eval()
        with torch.no_grad():
            ce = m(held, labels=held).loss.item()  # transformers' own shifted mean CE
        assert rows["ce"][who] == pytest.approx(ce, rel=1e-5, abs=1e-6)
        assert rows["perplexity"][who] == pytest.approx(math.exp(ce), rel=1e-5)
    assert rows["ce"]["difference"] == pytest.approx(rows["ce"]["student"] - rows["ce"]["teacher"])
    assert "| perplexity | exp(ce) |" in (tmp_path / "ppl.md").read_text()


def test_bad_input_one_line_exit_2(models, tasks, tmp_path, monkeypatch, capsys):
    s = str(models / "student")

    def run(*args):
        capsys.readouterr()
        try:
            code = ev.main([str(a) for a in args])
        except SystemExit as e:  # argparse
            code = e.code
        return type("R", (), {"returncode": code, "stderr": capsys.readouterr().err, "stdout": ""})

    _exit2(run(tmp_path / "nope", "--tasks", "x"), "not a Hugging Face model directory")
    _exit2(run(s), "one of the arguments --tasks --data is required")
    _exit2(run(s, "--tasks", "a", "--data", "b"), "not allowed with")
    _exit2(run(s, "--tasks", "x", "--include-path", tmp_path / "none"), "--include-path", "no such directory")
    _exit2(run(s, "--tasks", "x", "--batch-size", "0"), "--batch-size must be >= 1")
    _exit2(run(s, "--data", tmp_path / "none.jsonl"), "no such file or directory")
    _exit2(run(s, "--data", tmp_path), "no .csv/")
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # as if not installed
    _exit2(run(s, "--tasks", "paper"), "lm-evaluation-harness", 'pip install ".[eval]"')
    monkeypatch.undo()
    require("lm_eval")
    inc = ("--include-path", tasks[0])
    _exit2(run(s, "--tasks", "tiny_nope,tiny_mc", *inc), "unknown to lm-eval: tiny_nope")
    _exit2(run(s, "--tasks", "tiny_mc", "--teacher", tmp_path / "t.gguf", *inc), "--teacher", "no such file")
