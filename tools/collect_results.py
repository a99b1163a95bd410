"""Merge benchmark JSON files into one results JSON and a markdown table; regenerate the
"latest figures against the targets" table of bench/results/README.md.

    # on the GPU box (tools/gpu_suite.sh does this):
    python tools/collect_results.py WORK/json --steps WORK/steps.jsonl --junit WORK/junit_cuda.xml \
        --logs WORK/logs --out-dir $OUT
    # here, after copying a run's results-*.json into bench/results/:
    python tools/collect_results.py --readme bench/results/README.md bench/results
    # merge two calls of one suite run (part1 + part2) into one file:
    python tools/collect_results.py a.json b.json --out-dir bench/results

Inputs: per-bench JSON files written by common.write_json (schema lrc_ext.bench/1),
merged results files written by this script (schema lrc_ext.results/1), or directories
(every *.json inside). Needs only the Python standard library (no torch, no GPU).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1] / "bench"))
from common import fmt, format_table  # noqa: E402  (common imports torch lazily only)
from targets import TARGETS, group  # noqa: E402

RESULTS_SCHEMA = "lrc_ext.results/1"
BEGIN, END = "<!-- BEGIN RESULTS (tools/collect_results.py --readme) -->", "<!-- END RESULTS -->"


# ----------------------------------------------------------------------------- reading

def _load(p: Path):
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        print(f"collect_results: skipping {p}: {e}", file=sys.stderr)
        return None


def bench_key(payload: dict) -> str:
    cfg = payload.get("config") or {}
    key = payload.get("bench", "unknown")
    if cfg.get("shape"):
        key += f":{cfg['shape']}"
    return key


def read_inputs(paths) -> tuple[dict, list, dict, dict, list]:
    """(benches {key: payload}, steps, tests, sanitizer, metas of merged inputs)."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(x for x in p.glob("*.json") if not x.name.endswith(".tmp"))
        elif p.exists():
            files.append(p)
    benches, steps, tests, san, metas = {}, [], {}, {}, []
    for f in files:
        d = _load(f)
        if not isinstance(d, dict):
            continue
        if d.get("schema") == RESULTS_SCHEMA:
            metas.append(d.get("meta") or {})
            for k, b in (d.get("benches") or {}).items():
                _put(benches, k, b)
            steps += d.get("steps") or []
            tests.update(d.get("tests") or {})
            san.update(d.get("sanitizer") or {})
        elif "bench" in d and "rows" in d:
            _put(benches, bench_key(d), d)
        elif d.get("kind") == "env":
            metas.append(d.get("meta") or {})
    return benches, steps, tests, san, metas


def _put(benches: dict, key: str, payload: dict):
    """Keep the newest payload for a key (by meta.date)."""
    old = benches.get(key)
    if old is None or (payload.get("meta") or {}).get("date", "") >= (old.get("meta") or {}).get("date", ""):
        benches[key] = payload


def read_steps(path) -> list[dict]:
    out = []
    if path and Path(path).exists():
        for line in Path(path).read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except ValueError:
                    out.append({"step": "?", "status": "unparsed", "note": line[:200]})
    return out


def read_junit(paths) -> dict:
    """{name: {tests, failures, errors, skipped, time_s, failed: [ids]}} from pytest junit XML."""
    out = {}
    for p in paths or []:
        p = Path(p)
        if not p.exists():
            continue
        try:
            root = ET.parse(p).getroot()
        except ET.ParseError as e:
            out[p.stem] = {"error": f"unreadable junit: {e}"}
            continue
        suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
        agg = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "time_s": 0.0, "failed": []}
        for s in suites:
            for k in ("tests", "failures", "errors", "skipped"):
                agg[k] += int(s.get(k, 0) or 0)
            agg["time_s"] += float(s.get("time", 0) or 0)
            for tc in s.iter("testcase"):
                if tc.find("failure") is not None or tc.find("error") is not None:
                    agg["failed"].append(f"{tc.get('classname', '')}::{tc.get('name', '')}")
        agg["passed"] = agg["tests"] - agg["failures"] - agg["errors"] - agg["skipped"]
        agg["failed"] = agg["failed"][:50]
        name = p.stem[len("junit_"):] if p.stem.startswith("junit_") else p.stem
        out[name] = agg
    return out


_SAN_ERR = re.compile(r"ERROR SUMMARY: (\d+) error")
_RACE = re.compile(r"RACECHECK SUMMARY: (\d+) hazards? displayed \((\d+) errors?, (\d+) warnings?\)")
_PYTEST_LINE = re.compile(r"^=*\s*(\d+ (?:passed|failed|error|skipped|deselected).*?)\s*=*$")


def read_sanitizer(log_dir) -> dict:
    """From logs named sanitize_<tool>.log: the tool's summary and pytest's result line."""
    out = {}
    if not log_dir or not Path(log_dir).is_dir():
        return out
    for p in sorted(Path(log_dir).glob("sanitize_*.log")):
        tool = p.stem[len("sanitize_"):]
        text = p.read_text(errors="replace")
        d = {"log": p.name}
        m = _SAN_ERR.findall(text)
        d["errors"] = sum(int(x) for x in m) if m else None
        r = _RACE.findall(text)
        if r:
            d["hazards"] = sum(int(x[0]) for x in r)
            d["race_errors"] = sum(int(x[1]) for x in r)
            d["race_warnings"] = sum(int(x[2]) for x in r)
        pl = [mm.group(1) for line in text.splitlines() if (mm := _PYTEST_LINE.match(line.strip()))]
        d["pytest"] = pl[-1] if pl else None
        ids = re.findall(r"^SANITIZED: (.*)$", text, re.M)
        d["tests"] = ids[-1] if ids else None
        if d["errors"] is None and "hazards" not in d:
            d["note"] = "no sanitizer summary in the log (tool failed to start, or was stopped)"
        out[tool] = d
    return out


# ----------------------------------------------------------------------------- merging

def merged(benches, steps, tests, san, metas) -> dict:
    meta = {}
    for m in metas:  # the suite's env.json (or merged inputs) first, then any bench's
        if m:
            meta = dict(m)
            break
    if not meta:
        for b in benches.values():
            if b.get("meta"):
                meta = dict(b["meta"])
                break
    targets = []
    for k, b in sorted(benches.items()):
        bm = b.get("meta") or {}
        for t in b.get("targets") or []:
            t = dict(t)
            t.update(bench=k, device=bm.get("device"), device_kind=bm.get("device_kind"), date=bm.get("date"),
                     commit=bm.get("commit"))
            t["qualifies"] = bool(t.get("device_kind") == "cuda" and not t.get("note") and t.get("value") is not None)
            targets.append(t)
    errors = []
    for k, b in sorted(benches.items()):
        errors += [f"{k}: {e}" for e in b.get("errors") or []]
    errors += [f"step {s.get('step')}: {s.get('status')} (rc {s.get('rc')})" for s in steps
               if s.get("status") not in ("ok", "skipped")]
    return {"schema": RESULTS_SCHEMA, "generated": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
            "meta": meta, "steps": steps, "tests": tests, "sanitizer": san, "targets": targets, "errors": errors,
            "benches": benches}


# ----------------------------------------------------------------------------- markdown

def _meta_lines(m: dict) -> list[str]:
    lx = m.get("lrc_ext") or {}
    return [
        f"- device: **{m.get('device', '?')}**"
        + (f" ({m.get('gpu_memory_gib')} GiB, {m.get('sm_count')} SMs, cc {m.get('compute_capability')})"
           if m.get("device_kind") == "cuda" else ""),
        f"- driver {m.get('driver') or '-'}; torch {m.get('torch', '?')} (CUDA {m.get('torch_cuda') or '-'}); "
        f"Python {m.get('python', '?')}; transformers {m.get('transformers') or '-'}",
        f"- lrc_ext build: CUDA kernels {fmt(lx.get('cuda_kernels'))} {', '.join(lx.get('cuda_archs') or [])} "
        f"({lx.get('cuda_compiler') or '-'}), CUTLASS sm90 kernels {fmt(lx.get('cutlass_kernels'))}, "
        f"{lx.get('cxx_compiler') or '-'}",
        f"- date {m.get('date', '?')}; commit {m.get('commit', '?')}"
        + (" (dirty)" if m.get("dirty") else "") + f"; tree hash {m.get('tree_hash', '?')}",
    ]


STEP_COLS = ["shape", "mode", "status", "micro_batch", "tokens_per_s", "step_ms", "forward_ms", "backward_ms",
             "optimizer_ms", "achieved_tflops", "mfu_datasheet", "mfu_measured", "peak_mem_gib", "max_micro_batch",
             "oom_at", "speedup_vs_eager", "loss_rel_diff_vs_eager", "error"]
STEP_HEAD = {"micro_batch": "mb", "tokens_per_s": "tokens/s", "achieved_tflops": "TFLOP/s",
             "mfu_datasheet": "MFU", "mfu_measured": "MFU (meas. mm)", "peak_mem_gib": "peak GiB",
             "max_micro_batch": "max mb", "speedup_vs_eager": "x eager", "loss_rel_diff_vs_eager": "loss diff",
             "forward_ms": "fwd ms", "backward_ms": "bwd ms", "optimizer_ms": "opt ms"}
_DROP = {"times_ms", "min_ms", "max_ms", "mean_ms", "traceback"}


def bench_md(key: str, b: dict, full: bool = True) -> str:
    rows = b.get("rows") or []
    out = [f"### {key}", ""]
    c = b.get("ceilings") or {}
    if c:
        out.append(f"ceilings measured: matmul {fmt(c.get('matmul_tflops'))} TFLOP/s ({c.get('matmul_shape')}), "
                   f"copy {fmt(c.get('copy_gbs'))} GB/s; datasheet {fmt(c.get('datasheet_bf16_tflops'))} TFLOP/s, "
                   f"{fmt(c.get('datasheet_memory_gbs'))} GB/s")
        out.append("")
    if b.get("bench") == "bench_step":
        cols = [k for k in STEP_COLS if any(k in r for r in rows)]
        out += [format_table(rows, cols, STEP_HEAD), ""]
        det = b.get("details") or {}
        for mode, d in det.items():
            if d.get("breakdown"):
                from_row = next((r for r in rows if r.get("mode") == mode), {})
                bn = _bottleneck(d["breakdown"])
                out += [f"{mode}: {d.get('breakdown_basis', 'kernel time')}; ops {fmt(d.get('ops'))}; "
                        f"bottleneck: **{bn}**", "",
                        format_table(d["breakdown"], ["stage", "fwd_ms", "bwd_ms", "other_ms", "ms", "pct_step",
                                                      "tflops"], {"pct_step": "% step", "tflops": "TFLOP/s"}), ""]
                if full and d.get("top_kernels"):
                    out += [format_table(d["top_kernels"][:8], ["kernel", "ms", "calls", "pct"]), ""]
                del from_row
            for n in d.get("notes") or []:
                out.append(f"- {mode}: {n}")
        if (b.get("config") or {}).get("flop_formula"):
            out += ["", f"FLOPs: {b['config']['flop_formula']}", ""]
    else:
        cols = []
        for r in rows:
            cols += [k for k in r if k not in cols and k not in _DROP and not isinstance(r[k], (dict, list))]
        if rows:
            out += [format_table(rows, cols), ""]
        for extra in ("ratios",):
            if isinstance(b.get(extra), list) and b[extra]:
                out += [format_table(b[extra]), ""]
    for e in b.get("errors") or []:
        out.append(f"- error: {e}")
    return "\n".join(out).rstrip() + "\n"


def _bottleneck(rows):
    cand = [r for r in rows if r.get("ms")]
    if not cand:
        return "-"
    b = max(cand, key=lambda r: r["ms"])
    return f"{b['stage']} ({fmt(b.get('pct_step'))}% of the step)"


def targets_md(targets: list[dict]) -> str:
    rows = [{"group": t.get("group") or group(t.get("key", "")), "what": t.get("what"), "value": t.get("value"),
             "goal": _goal(t.get("op"), t.get("goal")), "met": _met(t), "bench": t.get("bench"),
             "note": t.get("note")} for t in targets]
    return format_table(rows, ["group", "what", "value", "goal", "met", "bench", "note"])


def _goal(op, goal, unit=""):
    """'>= 1.50 x', or 'for information' for a figure with no goal."""
    return "for information" if goal is None else f"{op} {fmt(goal)} {unit}".strip()


def _met(t):
    if t.get("goal") is None and t.get("value") is not None:
        return "info" if t.get("qualifies", True) else "info (not the target setup)"
    if t.get("met") is None:
        return "not measured"
    s = "MET" if t["met"] else "not met"
    return s if t.get("qualifies", True) else s + " (not the target setup)"


def results_md(res: dict, full: bool = True) -> str:
    m = res.get("meta") or {}
    out = [f"# lrc_ext GPU suite results ({m.get('device', '?')}, {m.get('date', '?')[:10]})", ""]
    out += _meta_lines(m) + [""]
    if res.get("steps"):
        out += ["## Steps", "", format_table(res["steps"], ["step", "status", "rc", "seconds", "tag", "at", "note"]), ""]
    if res.get("tests"):
        keys = ("tests", "passed", "failures", "errors", "skipped", "time_s")
        trows = [{"suite": k, **{kk: v.get(kk) for kk in keys}, "failed": ", ".join(v.get("failed") or [])[:300]}
                 for k, v in res["tests"].items()]
        out += ["## Tests", "", format_table(trows), ""]
    if res.get("sanitizer"):
        srows = [{"tool": k, **{kk: v.get(kk) for kk in ("errors", "hazards", "race_errors", "race_warnings",
                                                           "pytest", "note")}} for k, v in res["sanitizer"].items()]
        out += ["## compute-sanitizer", "", format_table(srows), ""]
        tested = next((v.get("tests") for v in res["sanitizer"].values() if v.get("tests")), None)
        if tested:
            out += [f"tests run under the sanitizer: {tested}", ""]
    if res.get("targets"):
        out += ["## Targets", "", targets_md(res["targets"]), ""]
    if res.get("errors"):
        out += ["## Errors", ""] + [f"- {e}" for e in res["errors"]] + [""]
    out += ["## Benchmarks", ""]
    for k in sorted(res.get("benches") or {}, key=lambda k: (not k.startswith("bench_step"), k)):
        out += [bench_md(k, res["benches"][k], full=full), ""]
    return "\n".join(out).rstrip() + "\n"


# ----------------------------------------------------------------------------- README

def readme_table(paths) -> str:
    """Every target in tools/targets.py: the latest qualifying figure (a CUDA run of the target
    configuration) from the results files, else the latest figure of any run, flagged."""
    benches, *_ = read_inputs(paths)
    # read_inputs keeps the newest payload per bench key; for the README look at all files
    allb = []
    for p in map(Path, paths):
        for f in (sorted(p.glob("*.json")) if p.is_dir() else [p]):
            d = _load(f)
            if not isinstance(d, dict):
                continue
            if d.get("schema") == RESULTS_SCHEMA:
                allb += [(k, b, f.name) for k, b in (d.get("benches") or {}).items()]
            elif "bench" in d and "rows" in d:
                allb.append((bench_key(d), d, f.name))
    best = {}
    for k, b, fname in allb:
        bm = b.get("meta") or {}
        for t in b.get("targets") or []:
            q = bm.get("device_kind") == "cuda" and not t.get("note") and t.get("value") is not None
            cand = (q, bm.get("date", ""), t, bm, fname)
            old = best.get(t["key"])
            if old is None or (cand[0], cand[1]) > (old[0], old[1]):
                best[t["key"]] = cand
    rows = []
    for key, (what, op, goal, unit) in TARGETS.items():
        b = best.get(key)
        if b is None:
            rows.append({"group": group(key), "target": what, "goal": _goal(op, goal, unit),
                         "latest": "not measured", "status": "-", "device / date / commit": "-", "file": "-"})
            continue
        q, date, t, bm, fname = b
        status = "no GPU figure yet" if not q else "info" if goal is None else "MET" if t.get("met") else "not met"
        rows.append({"group": group(key), "target": what, "goal": _goal(op, goal, unit),
                     "latest": fmt(t.get("value")) + ("" if q else f" ({bm.get('device_kind')}, not the target setup)"),
                     "status": status,
                     "device / date / commit": f"{bm.get('device', '?')} / {str(date)[:10]} / "
                                               f"{str(bm.get('commit', '?'))[:10]}",
                     "file": fname})
    out = [format_table(rows, ["group", "target", "goal", "latest", "status", "device / date / commit", "file"]), ""]
    # the latest CUDA step figures, every mode
    steps = sorted(((b.get("meta") or {}).get("date", ""), k, b, fname) for k, b, fname in allb
                   if b.get("bench") == "bench_step" and (b.get("meta") or {}).get("device_kind") == "cuda")
    latest = {}
    for date, k, b, fname in steps:
        latest[k] = (b, fname)
    for k, (b, fname) in sorted(latest.items()):
        bm = b.get("meta") or {}
        rows = b.get("rows") or []
        out += [f"**{k}** ({bm.get('device')}, {str(bm.get('date'))[:10]}, commit {str(bm.get('commit'))[:10]}, "
                f"{fname}):", "",
                format_table(rows, [c for c in ("mode", "status", "micro_batch", "tokens_per_s", "mfu_datasheet",
                                                "peak_mem_gib", "max_micro_batch", "speedup_vs_eager")
                                    if any(c in r for r in rows)], STEP_HEAD), ""]
        for mode, d in (b.get("details") or {}).items():
            if d.get("breakdown"):
                out.append(f"- {mode}: bottleneck {_bottleneck(d['breakdown'])}")
        out.append("")
    if not latest:
        out += ["No GPU run of bench_step.py is recorded yet.", ""]
    return "\n".join(out).rstrip() + "\n"


def update_readme(readme: Path, table: str) -> None:
    text = readme.read_text() if readme.exists() else f"# Benchmark results\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip() + f"\n\n{BEGIN}\n{END}\n"
    a, rest = text.split(BEGIN, 1)
    _, b = rest.split(END, 1)
    readme.write_text(a + BEGIN + "\n" + table + END + b)


# ----------------------------------------------------------------------------- main

def slug(s: str) -> str:
    s = re.sub(r"^(NVIDIA|cpu)\s*", "", s or "unknown").strip()
    return re.sub(r"[^A-Za-z0-9]+", "-", s).strip("-")[:24] or "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="*", help="bench JSON files, merged results files, or directories")
    ap.add_argument("--steps", help="steps.jsonl written by gpu_suite.sh")
    ap.add_argument("--junit", nargs="*", default=[], help="pytest junit XML files")
    ap.add_argument("--logs", help="directory with sanitize_<tool>.log files")
    ap.add_argument("--out-dir", help="write results-<date>-<device>-<commit>.{json,md} here")
    ap.add_argument("-o", "--output", help="write the merged JSON to this path instead")
    ap.add_argument("--md", help="write the markdown to this path (with -o)")
    ap.add_argument("--tag", default="", help="suffix for the file names (e.g. part1)")
    ap.add_argument("--readme", help="regenerate the results table of this README from the inputs")
    ap.add_argument("--print", dest="print_summary", action="store_true", help="print a short summary")
    args = ap.parse_args(argv)

    if args.readme:
        update_readme(Path(args.readme), readme_table(args.inputs or [Path(args.readme).parent]))
        print(f"updated {args.readme}")
        if not (args.out_dir or args.output):
            return 0

    benches, steps, tests, san, metas = read_inputs(args.inputs)
    steps = steps + read_steps(args.steps)
    tests.update(read_junit(args.junit))
    san.update(read_sanitizer(args.logs))
    res = merged(benches, steps, tests, san, metas)
    if args.output or args.out_dir:
        if args.output:
            jp = Path(args.output)
            mp = Path(args.md) if args.md else jp.with_suffix(".md")
        else:
            m = res["meta"]
            date = (m.get("date") or res["generated"])[:10].replace("-", "")
            name = f"results-{date}-{slug(m.get('device', ''))}-{str(m.get('commit') or 'unknown')[:10]}"
            if args.tag:
                name += f"-{args.tag}"
            jp = Path(args.out_dir) / f"{name}.json"
            mp = Path(args.out_dir) / f"{name}.md"
        jp.parent.mkdir(parents=True, exist_ok=True)
        jp.write_text(json.dumps(res, indent=1) + "\n")
        mp.write_text(results_md(res))
        print(f"wrote {jp} and {mp}")
    if args.print_summary or not (args.output or args.out_dir):
        print(summary(res))
    return 0


def summary(res: dict) -> str:
    """Short text for the end of a log: steps, tests, sanitizer, targets, step figures."""
    out = []
    m = res.get("meta") or {}
    out += _meta_lines(m) + [""]
    if res.get("steps"):
        out += [format_table(res["steps"], ["step", "status", "rc", "seconds", "note"]), ""]
    for k, v in (res.get("tests") or {}).items():
        out.append(f"tests {k}: {v.get('passed')} passed, {v.get('failures')} failed, {v.get('errors')} errors, "
                   f"{v.get('skipped')} skipped" + (f"; failed: {', '.join(v.get('failed') or [])[:400]}"
                                                      if v.get("failed") else ""))
    for k, v in (res.get("sanitizer") or {}).items():
        out.append(f"sanitizer {k}: errors {fmt(v.get('errors'))}"
                   + (f", hazards {v.get('hazards')}" if "hazards" in v else "") + f"; pytest: {v.get('pytest')}"
                   + (f" ({v['note']})" if v.get("note") else ""))
    out.append("")
    if res.get("targets"):
        out += [targets_md(res["targets"]), ""]
    for k, b in sorted((res.get("benches") or {}).items()):
        if b.get("bench") == "bench_step":
            rows = b.get("rows") or []
            cols = [c for c in ("mode", "status", "micro_batch", "tokens_per_s", "mfu_datasheet", "peak_mem_gib",
                                "max_micro_batch", "speedup_vs_eager", "error") if any(c in r for r in rows)]
            out += [f"{k}:", format_table(rows, cols, STEP_HEAD)]
            for mode, d in (b.get("details") or {}).items():
                if d.get("breakdown"):
                    out.append(f"  {mode} bottleneck: {_bottleneck(d['breakdown'])}")
            out.append("")
        else:
            errs = b.get("errors") or []
            out.append(f"{k}: {len(b.get('rows') or [])} rows" + (f", {len(errs)} errors" if errs else ""))
    if res.get("errors"):
        out += ["", "errors:"] + [f"- {e[:300]}" for e in res["errors"][:20]]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
