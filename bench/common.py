"""Shared helpers for every bench/bench_*.py: timing, memory, ceilings, metadata, tables, JSON.

Small and stable on purpose; op benchmarks import it as ``from common import ...`` (bench/ is
on sys.path when a script in it runs) after ``common.setup_path()`` is not even needed: the
scripts in bench/ see this file directly.

    import common
    dev = common.pick_device()                      # "cuda" when visible, else "cpu"
    t = common.time_fn(fn, device=dev, warmup=3, iters=10)      # {"median_ms", "min_ms", ...}
    mem = common.peak_memory(fn, device=dev)        # {"peak_bytes", "delta_bytes", "kind"}
    ceil = common.measure_ceilings(dev)             # measured matmul TFLOP/s and copy GB/s
    common.print_table(rows, ["name", "ms", "GB/s"], title="...")
    common.write_json(path, "bench_x", rows, config={...}, targets=[common.target(...)])

JSON written by write_json (schema "lrc_ext.bench/1"; tools/collect_results.py reads it):

    {"schema": "lrc_ext.bench/1", "bench": str, "meta": metadata(), "config": {...},
     "ceilings": {...} | null, "rows": [ {column: value, ...}, ... ],
     "targets": [ {"key", "group", "what", "value", "op", "goal", "unit", "met"} ],
     "errors": [str], "notes": [str], ...extra}

Targets use the keys of TARGETS (tools/targets.py), so bench/results/README.md can show every
target whether or not a run has measured it yet.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = "lrc_ext.bench/1"

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) and memory bandwidth (GB/s) from the
# vendors' datasheets, matched against torch.cuda.get_device_name(). Leads, not readings:
# every bench also reports against the ceilings it measured on the machine it ran on.
DATASHEET = [
    # (substring of the device name, bf16 dense TFLOP/s, memory GB/s)
    ("H100 PCIe", 756.0, 2000.0),
    ("H100 NVL", 835.0, 3900.0),
    ("H100", 989.4, 3350.0),  # SXM5 / "H100 80GB HBM3"
    ("H200", 989.4, 4800.0),
    ("H800", 989.4, 3350.0),
    ("A100", 312.0, 2039.0),
]

# The target table lives with the results tooling (tools/targets.py); benches report with
# common.target(key, value).
sys.path.insert(0, str(ROOT / "tools"))
from targets import TARGETS, target  # noqa: E402,F401

# ----------------------------------------------------------------------------- imports / device

def setup_path():
    """Put the repository root first on sys.path, so `import lrc_ext` takes the source tree
    (whose lrc_ext._ext falls back to an installed copy's compiled module when the tree has
    no build of its own)."""
    r = str(ROOT)
    if r not in sys.path:
        sys.path.insert(0, r)


def pick_device(want: str | None = None) -> str:
    import torch
    if want and want != "auto":
        return want
    return "cuda" if torch.cuda.is_available() else "cpu"


def sync(device) -> None:
    import torch
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- timing

_L2_FLUSH = {}


def flush_l2(device) -> None:
    """Overwrite a buffer larger than any L2 (256 MiB) so the next kernel starts cold."""
    import torch
    if not str(device).startswith("cuda"):
        return
    buf = _L2_FLUSH.get(str(device))
    if buf is None:
        buf = _L2_FLUSH[str(device)] = torch.empty(64 * 2 ** 20, dtype=torch.float32, device=device)
    buf.zero_()


def time_fn(fn, *, device="cuda", warmup: int = 2, iters: int = 5, flush: bool = False) -> dict:
    """Median time of fn() over `iters` calls after `warmup` calls.

    CUDA: one pair of CUDA events around each call (GPU time of the call, launch gaps
    included); CPU: time.perf_counter. With flush=True the L2 is overwritten before each
    call (outside the timed region). Returns median/min/mean/max in ms and every sample.
    """
    import torch
    cuda = str(device).startswith("cuda")
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if flush:
            flush_l2(device)
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median_ms": statistics.median(times), "min_ms": min(times), "mean_ms": statistics.fmean(times),
            "max_ms": max(times), "iters": iters, "times_ms": times}


class PhaseTimer:
    """Named consecutive phases of one iteration: mark("forward"), mark("backward"), ...

    CUDA: events recorded on the current stream, read at finish() (one sync a step);
    CPU: perf_counter. finish() returns {phase: ms} for the iteration.
    """

    def __init__(self, device):
        import torch
        self.cuda = str(device).startswith("cuda")
        self._torch = torch
        self.marks = [("start", self._now())]

    def _now(self):
        if self.cuda:
            e = self._torch.cuda.Event(enable_timing=True)
            e.record()
            return e
        return time.perf_counter()

    def mark(self, name: str):
        self.marks.append((name, self._now()))

    def finish(self) -> dict:
        out = {}
        if self.cuda:
            self.marks[-1][1].synchronize()
        for (_, a), (name, b) in zip(self.marks, self.marks[1:]):
            out[name] = a.elapsed_time(b) if self.cuda else (b - a) * 1e3
        return out


# ----------------------------------------------------------------------------- memory

def _proc_status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_memory(device) -> int:
    """Start a peak-memory window; returns the baseline in bytes.

    CUDA: torch's allocator peak (max_memory_allocated). CPU: the process's resident-set
    high-water mark (Linux VmHWM, reset through /proc/self/clear_refs), so it counts every
    allocation of the process, torch's and others'.
    """
    import torch
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    rss = _proc_status_kib("VmRSS")
    return (rss or 0) * 1024


def read_peak_memory(device) -> int | None:
    import torch
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    hwm = _proc_status_kib("VmHWM")
    return None if hwm is None else hwm * 1024


def peak_memory(fn, *, device="cuda") -> dict:
    """Run fn() once; its peak memory: {"peak_bytes", "delta_bytes" (over the memory held
    before the call), "kind": "cuda_allocated" | "cpu_rss_hwm"}."""
    base = reset_peak_memory(device)
    fn()
    peak = read_peak_memory(device)
    kind = "cuda_allocated" if str(device).startswith("cuda") else "cpu_rss_hwm"
    return {"peak_bytes": peak, "delta_bytes": None if peak is None else max(0, peak - base), "kind": kind}


def is_oom(exc: BaseException) -> bool:
    import torch
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    msg = str(exc)
    return "out of memory" in msg.lower() or "CUBLAS_STATUS_ALLOC_FAILED" in msg


def free_memory(device="cuda") -> None:
    import gc
    import torch
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- the shared runner

def trim_malloc() -> None:
    """Hand freed heap back to the OS (glibc), so the CPU's RSS high-water mark sees the next
    call's allocations instead of reused blocks."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def time_call(fn, device) -> float:
    """ms of one call: CUDA events around it on CUDA, perf_counter on the CPU."""
    import torch
    if str(device).startswith("cuda"):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def run_benchmarks(case: dict, steps: dict, *, device, iters: int, warmup: int, label: str = "impl",
                   interleave: bool = True, memory: bool = True, first_call=None, on_row=None):
    """One case (its shape, as a dict) x implementations `steps` ({name: fn() -> outputs}):
    a row per implementation, `case` + {label: name, "status": "ok" | "oom" | "failed"}, with
    "ms" (median) and "min_ms" over `iters` timed calls after `warmup`, and "peak_bytes" (one
    call's peak over the memory held before it; `memory=False` skips it). With `interleave`
    the implementations are timed round by round (order rotated each round), so machine noise
    hits each alike; without, one after the other (`on_row(row)` after each, so a stopped run
    keeps what it measured). `first_call(name, outputs) -> dict` adds figures from the first
    call (values, errors against a reference). A failing implementation is recorded with its
    error and the others go on. Returns (rows, {name: first outputs}; empty with `first_call`)."""
    rows, outs = {}, {}

    def fail(name, e):
        if is_oom(e):
            free_memory(device)
        rows[name].update(status="oom" if is_oom(e) else "failed", error=f"{type(e).__name__}: {e}"[:300])

    def first(name):
        rows[name] = dict(case, **{label: name})
        try:
            out = steps[name]()  # the first call compiles where it compiles
            if first_call:  # it keeps what it needs; the outputs are not held through the timing
                rows[name].update(first_call(name, out))
            else:
                outs[name] = out
            del out
            return True
        except Exception as e:  # noqa: BLE001 - one failing implementation must not hide the others
            fail(name, e)
            return False

    def finish(name, samples):
        row = rows[name]
        row.update(status="ok", ms=statistics.median(samples), min_ms=min(samples))
        if memory:
            free_memory(device)
            if not str(device).startswith("cuda"):
                trim_malloc()
            row["peak_bytes"] = peak_memory(steps[name], device=device)["delta_bytes"]
        if on_row:
            on_row(row)

    names = list(steps)
    if interleave:
        active = [n for n in names if first(n)]
        sync(device)
        for _ in range(warmup):
            for n in active:
                steps[n]()
        samples = {n: [] for n in active}
        for i in range(iters):
            k = i % max(len(active), 1)
            for n in active[k:] + active[:k]:
                samples[n].append(time_call(steps[n], device))
        for n in active:
            try:
                finish(n, samples[n])
            except Exception as e:  # noqa: BLE001
                fail(n, e)
    else:
        for n in names:
            try:
                if first(n):
                    for _ in range(warmup):
                        steps[n]()
                    finish(n, [time_call(steps[n], device) for _ in range(iters)])
            except Exception as e:  # noqa: BLE001
                fail(n, e)
            if on_row and rows[n]["status"] != "ok":
                on_row(rows[n])
    return [rows[n] for n in names], outs


def add_ratios(rows: list[dict], refs, label: str = "impl") -> None:
    """speedup_vs_<ref> (its time / this one's) and mem_vs_<ref> (this peak / its peak) on every
    ok row of one case, against each reference implementation in `refs` that ran."""
    by = {r[label]: r for r in rows if r.get("status") == "ok"}
    for ref in refs:
        b = by.get(ref)
        if b is None:
            continue
        for r in by.values():
            r[f"speedup_vs_{ref}"] = b["ms"] / r["ms"]
            if r.get("peak_bytes") is not None and b.get("peak_bytes"):
                r[f"mem_vs_{ref}"] = r["peak_bytes"] / b["peak_bytes"]


# ----------------------------------------------------------------------------- ceilings

def datasheet(device_name: str) -> dict:
    for key, tflops, gbs in DATASHEET:
        if key.lower() in device_name.lower():
            return {"name": key, "bf16_dense_tflops": tflops, "memory_gbs": gbs}
    return {"name": None, "bf16_dense_tflops": None, "memory_gbs": None}


_CEILINGS = {}


def measure_ceilings(device="cuda", *, quick: bool = False) -> dict:
    """Measured on this machine, once a process: a bf16 matmul's TFLOP/s on random data
    (8192^3 on CUDA; fp32 1024^3 on CPU) and a device-to-device copy's GB/s counting bytes
    read plus bytes written (1 GiB on CUDA, 256 MiB on CPU); plus the datasheet figures."""
    import torch
    key = (str(device), quick)
    if key in _CEILINGS:
        return _CEILINGS[key]
    cuda = str(device).startswith("cuda")
    if cuda:
        n, dt, copy_bytes = (4096 if quick else 8192), torch.bfloat16, 2 ** 30
    else:
        n, dt, copy_bytes = (512 if quick else 1024), torch.float32, 2 ** 28
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dt, generator=g)
    b = torch.randn(n, n, device=device, dtype=dt, generator=g)
    t_mm = time_fn(lambda: torch.mm(a, b), device=device, warmup=3, iters=10)["median_ms"]
    del a, b
    src = torch.empty(copy_bytes // 4, device=device, dtype=torch.float32).normal_(generator=g)
    dst = torch.empty_like(src)
    t_cp = time_fn(lambda: dst.copy_(src), device=device, warmup=3, iters=10)["median_ms"]
    del src, dst
    name = torch.cuda.get_device_name() if cuda else "cpu"
    ds = datasheet(name) if cuda else {"name": None, "bf16_dense_tflops": None, "memory_gbs": None}
    out = {
        "matmul_tflops": 2 * n ** 3 / (t_mm * 1e-3) / 1e12,
        "matmul_shape": f"{n}x{n}x{n} {str(dt).replace('torch.', '')}",
        "copy_gbs": 2 * copy_bytes / (t_cp * 1e-3) / 1e9,
        "copy_bytes": copy_bytes,
        "datasheet_bf16_tflops": ds["bf16_dense_tflops"],
        "datasheet_memory_gbs": ds["memory_gbs"],
        "datasheet_part": ds["name"],
    }
    _CEILINGS[key] = out
    return out


# ----------------------------------------------------------------------------- metadata

_HASHED = ("csrc", "python", "lrc_ext", "tests", "bench", "tools", "experiments", "CMakeLists.txt", "pyproject.toml")
_HASHED_EXT = {".py", ".cpp", ".cu", ".h", ".cuh", ".hpp", ".toml", ".txt", ".sh", ".cmake"}


def tree_hash(root: Path = ROOT) -> str:
    """sha256 (16 hex) over the source files that make a result (csrc, python, lrc_ext, tests,
    bench minus bench/results, tools, experiments, CMakeLists.txt, pyproject.toml), path and content. Computed the
    same way with or without .git, so a result from a box without the repository's history
    can be matched to a commit here: `python bench/common.py --tree-hash`."""
    h = hashlib.sha256()
    files = []
    for top in _HASHED:
        p = root / top
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            for f in p.rglob("*"):
                rel = f.relative_to(root).as_posix()
                if (f.is_file() and f.suffix in _HASHED_EXT and "__pycache__" not in rel
                        and not rel.startswith("bench/results/")):
                    files.append(f)
    for f in sorted(files, key=lambda f: f.relative_to(root).as_posix()):
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        h.update(f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def git_commit(root: Path = ROOT) -> dict:
    """LRC_COMMIT (set by whoever ships the tree to a box without .git) wins, else git."""
    env = os.environ.get("LRC_COMMIT")
    if env:
        return {"commit": env, "commit_source": "LRC_COMMIT", "dirty": None}
    try:
        c = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if c.returncode == 0:
            d = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
            return {"commit": c.stdout.strip(), "commit_source": "git",
                    "dirty": bool(d.stdout.strip()) if d.returncode == 0 else None}
    except (OSError, subprocess.SubprocessError):
        pass
    return {"commit": "unknown", "commit_source": None, "dirty": None}


def _nvidia_smi(fields: str) -> str | None:
    try:
        r = subprocess.run(["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=20)
        return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


_META = {}


def metadata(device=None) -> dict:
    """Where and on what a figure was measured: date (UTC), device, driver, torch, CUDA,
    Python, transformers, what lrc_ext was built with, commit and tree hash."""
    import torch
    device = pick_device(device)
    if device in _META:
        return dict(_META[device], date=_now_iso())
    m = {
        "date": _now_iso(),
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "device_kind": "cuda" if str(device).startswith("cuda") else "cpu",
    }
    try:
        import transformers
        m["transformers"] = transformers.__version__
    except Exception:  # noqa: BLE001 - metadata must never fail a bench
        m["transformers"] = None
    if m["device_kind"] == "cuda":
        p = torch.cuda.get_device_properties(torch.cuda.current_device())
        m.update(device=p.name, gpu_memory_gib=round(p.total_memory / 2 ** 30, 1), sm_count=p.multi_processor_count,
                 compute_capability=f"{p.major}.{p.minor}")
        smi = _nvidia_smi("driver_version,clocks.max.sm,power.limit")
        if smi:
            parts = [s.strip() for s in smi.split(",")]
            m.update(driver=parts[0], sm_clock_max_mhz=parts[1] if len(parts) > 1 else None,
                     power_limit=parts[2] if len(parts) > 2 else None)
        else:
            m["driver"] = None
    else:
        m.update(device=f"cpu ({_cpu_model()})", driver=None)
    try:
        setup_path()
        from lrc_ext import info as _info
        i = _info.collect()
        m["lrc_ext"] = {k: i.get(k) for k in ("lrc_ext", "extension", "cuda_kernels", "cuda_archs", "cuda_compiler",
                                              "cxx_compiler", "openmp", "cutlass_kernels", "cutlass_path")}
    except Exception as e:  # noqa: BLE001
        m["lrc_ext"] = {"error": f"{type(e).__name__}: {e}"}
    m.update(git_commit())
    m["tree_hash"] = tree_hash()
    _META[device] = m
    return dict(m)


def _now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


# ----------------------------------------------------------------------------- targets, tables, JSON

def fmt(v, digits: int = 3) -> str:
    """Compact human formatting: ints with thousands separators, floats to `digits`
    significant-ish places, None as '-'."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v != v:
            return "nan"
        a = abs(v)
        if a >= 1e4:
            return f"{v:,.0f}"
        if a >= 100:
            return f"{v:.1f}"
        if a >= 1:
            return f"{v:.{max(digits - 1, 0)}f}"
        if a == 0:
            return "0"
        return f"{v:.{digits}g}"
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt(x, digits) for x in v)
    if isinstance(v, dict):
        return "; ".join(f"{k}={fmt(x, digits)}" for k, x in v.items())
    return str(v)


def format_table(rows: list[dict], columns: list[str] | None = None, headers: dict | None = None,
                 title: str | None = None) -> str:
    """A markdown pipe table (readable as plain text too). columns default: every key in
    first-seen order; headers: optional {column: header text}."""
    if columns is None:
        columns = []
        for r in rows:
            columns += [k for k in r if k not in columns and not isinstance(r[k], (dict, list))]
    headers = headers or {}
    head = [headers.get(c, c) for c in columns]
    body = [[fmt(r.get(c)).replace("|", "/") for c in columns] for r in rows]
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(head)]
    lines = []
    if title:
        lines += [f"### {title}", ""]
    lines.append("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths)) + " |")
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for b in body:
        lines.append("| " + " | ".join(x.ljust(w) for x, w in zip(b, widths)) + " |")
    return "\n".join(lines)


def print_table(rows, columns=None, headers=None, title=None) -> None:
    print(format_table(rows, columns, headers, title), flush=True)
    print(flush=True)


def _jsonable(o):
    if isinstance(o, float) and (o != o or o in (float("inf"), float("-inf"))):
        return None
    if isinstance(o, dict):
        return {str(k): _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if isinstance(o, (str, int, float, bool)) or o is None:
        return o
    return str(o)


def write_json(path, bench: str, rows: list[dict], *, config: dict | None = None, ceilings: dict | None = None,
               targets: list[dict] | None = None, errors: list[str] | None = None, notes: list[str] | None = None,
               device=None, **extra) -> dict:
    """Write one bench's results (schema above); returns the payload. NaN/inf become null."""
    payload = {"schema": SCHEMA, "bench": bench, "meta": metadata(device), "config": config or {},
               "ceilings": ceilings, "rows": rows, "targets": targets or [], "errors": errors or [],
               "notes": notes or []}
    payload.update(extra)
    payload = _jsonable(payload)
    if path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(p.suffix + ".tmp")
        tmp.write_text(json.dumps(payload, indent=1) + "\n")
        tmp.replace(p)
    return payload


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if "--tree-hash" in args:
        print(tree_hash())
    elif "--meta" in args:
        print(json.dumps(_jsonable(metadata()), indent=1))
    elif "--ceilings" in args:
        print(json.dumps(measure_ceilings(pick_device()), indent=1))
    else:
        print("usage: python bench/common.py --tree-hash | --meta | --ceilings")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
