"""clone_linear, forward + backward of one clone linear, five ways side by side.

    python bench/bench_clone_linear.py [--quick] [--device cuda|cpu] [--json PATH]
                                       [--cases in:3072,out:8192,in:3072:fp16] [--compile-mode MODE]
                                       [--no-compile]

Per case (side, teacher width, dtype), one step = forward, then the gradients of x and P
from grad_y (fixed random) and, for the clone variants, grad_mse = alpha = 0.2:
  eager    lrc_ext.ops.clone_linear_reference (plain PyTorch)
  compile  torch.compile(clone_linear_reference, mode="max-autotune") on CUDA
           (mode "default" on the CPU; --compile-mode to change, --no-compile to skip)
  ours     lrc_ext.ops.clone_linear, cuBLAS path (inside _cutlass.forced(False), so an
           LRC_CUTLASS in the environment changes nothing)
  cutlass  lrc_ext.ops.clone_linear on its CUTLASS sm90 path (inside _cutlass.forced(True);
           every call: first, timed, peak memory, saved bytes). Only on CUDA with the kernels
           built and compute capability 9.0; otherwise a row with status "skipped" and the
           reason. Before timing, the case must take the path (choose() says "cutlass" and
           one call goes through the kernels), else the row fails.
  bare     the same products without the clone loss: W_S = W_T @ P (or P.T @ W_T),
           y = x @ W_S.T, and its backward (grad_x, grad_W_S, grad_P): the floor.
Shapes: LRC-1.5B on CUDA (N = 8192 tokens, d_T = 3072, d_S = 1536, teacher width in
{3072, 1024, 8192}, both sides, bf16, plus in:3072 in fp16); smaller on the CPU (fp32:
bf16 GEMMs have no fast path on most CPUs). "width" is the teacher weight's other
dimension: side=in W_T is (width, d_T) (q: 3072, k/v: 1024, gate/up: 8192); side=out W_T
is (d_T, width) (o: 3072, down: 8192).

Compile time: mode="max-autotune" autotunes every GEMM shape of every case (minutes a
case on an H100); `--compile-mode default` compiles in seconds, `--cases in:3072` runs one.
The compile targets are against max-autotune: under another mode they carry a note.

Columns: median time (CUDA events / perf_counter; the variants interleaved round by round), TFLOP/s of the variant's own products
(the clone variants on the output side do two more N x d_T x d_S GEMMs than the bare
floor: target @ P and its gradient), peak memory over what the inputs already hold
(torch allocator on CUDA; on the CPU the process RSS high-water mark after
malloc_trim, coarse), the bytes kept
for backward (saved_tensors_hooks; x, W_T and P not counted, the teacher's target is:
the model would free it otherwise), and the error of
each clone variant against eager (relative, in the norm; the worst of y, mse, grad_x,
grad_P). Then the ratios per case and the targets (tools/targets.py; worst case over
shapes). With --json the file is rewritten after every case, so a stopped run keeps the
cases it finished.
"""
from __future__ import annotations

import argparse
import contextlib
import sys

import common

common.setup_path()

import torch  # noqa: E402

from lrc_ext.ops import _cutlass  # noqa: E402

ALPHA = 0.2
# `extra`: cases beyond the widths x sides grid, (side, width, dtype).
GPU = dict(n=8192, d_t=3072, d_s=1536, widths=(3072, 1024, 8192), dtype=torch.bfloat16,
           extra=(("in", 3072, torch.float16),))
CPU = dict(n=1024, d_t=512, d_s=256, widths=(512, 192, 1344), dtype=torch.float32, extra=())
QUICK_GPU = dict(n=4096, d_t=3072, d_s=1536, widths=(3072,), dtype=torch.bfloat16,
                 extra=(("in", 3072, torch.float16),))
QUICK_CPU = dict(n=96, d_t=80, d_s=40, widths=(72,), dtype=torch.float32, extra=(("in", 72, torch.float16),))
VARIANTS = ("eager", "compile", "ours", "cutlass", "bare")
CLONE = ("eager", "compile", "ours", "cutlass")  # the variants that compute the clone loss
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def dname(dt) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}[dt]


def flops(side, n, d_t, d_s, width, clone: bool) -> float:
    in_s, out_s = (d_s, width) if side == "in" else (width, d_s)
    f = 2 * width * d_t * d_s            # W_S
    f += 3 * 2 * n * out_s * in_s        # y, grad_x, grad_W_S
    f += 2 * width * d_t * d_s           # grad_P from grad_W_S
    if clone and side == "out":
        f += 2 * 2 * n * d_t * d_s       # target @ P and the gradient through it
    return float(f)


def bare_fn(x, w, p, b, side):
    ws = w @ p if side == "in" else p.t() @ w
    return torch.nn.functional.linear(x, ws, b)


def saved_bytes(fn, exclude) -> int:
    """Bytes of the tensors autograd keeps for backward, other than `exclude` (inputs and
    parameters, held by the caller anyway); each storage counted once."""
    seen, total = set(), 0
    ex = {t.untyped_storage().data_ptr() for t in exclude}

    def pack(t):
        nonlocal total
        if isinstance(t, torch.Tensor):
            s = t.untyped_storage()
            if s.data_ptr() not in ex and s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                total += s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return total


def relerr(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def path(variant):
    """The clone_linear path a variant runs under: ours never, cutlass always the CUTLASS one."""
    if variant == "ours":
        return _cutlass.forced(False)
    if variant == "cutlass":
        return _cutlass.forced(True)
    return contextlib.nullcontext()


def cutlass_unavailable(dev, dtype) -> str | None:
    """Why the cutlass variant cannot run here (None: it can)."""
    if not str(dev).startswith("cuda"):
        return "needs CUDA: an sm_90 GPU (H100/H200)"
    if not _cutlass.built():
        return "lrc_ext built without the CUTLASS sm90 kernels"
    cc = torch.cuda.get_device_capability(dev)
    if cc != (9, 0):
        return f"needs compute capability 9.0 (H100/H200), this GPU has {cc[0]}.{cc[1]}"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"{dname(dtype)}: the CUTLASS kernels are bf16/fp16 only"
    return None


def cutlass_not_taken(step, x, w, p, t, side) -> str | None:
    """None when this case takes the CUTLASS path: choose() says so for the case's tensors
    and one call of the step goes through the kernels."""
    with torch.no_grad(), _cutlass.forced(True):
        ws = w @ p if side == "in" else p.t() @ w
        picked = _cutlass.choose(x, ws, None, t, p, side == "out")
    if picked != "cutlass":
        return f"choose() picked {picked!r} for this case: the CUTLASS path would not be timed"
    seen, real = [], _cutlass.forward

    def spy(*a):
        r = real(*a)
        seen.append(r is not None)
        return r
    _cutlass.forward = spy
    try:
        out = step()  # the step enters forced(True) itself
        del out
    finally:
        _cutlass.forward = real
    if not seen or not all(seen):
        return f"the step did not run the CUTLASS kernels (calls through them: {seen})"
    return None


def make_inputs(dev, side, width, cfg, dt):
    n, d_t, d_s = cfg["n"], cfg["d_t"], cfg["d_s"]
    g = torch.Generator(device=dev).manual_seed(0)

    def r(*shape, s=1.0):
        return (torch.randn(*shape, device=dev, generator=g) * s).to(dt)
    if side == "in":
        w, x, t = r(width, d_t, s=d_t ** -0.5), r(n, d_s), r(n, width)
    else:
        w, x, t = r(d_t, width, s=width ** -0.5), r(n, width), r(n, d_t)
    p = r(d_t, d_s, s=d_s ** -0.5).requires_grad_()
    x.requires_grad_()
    gy = r(*((n, width) if side == "in" else (n, d_s)), s=1e-3)
    return x, w, p, t, gy


def run_case(dev, side, width, dt, cfg, variants, compiled, iters, warmup):
    from lrc_ext.ops.clone_linear import clone_linear, clone_linear_reference
    n, d_t, d_s = cfg["n"], cfg["d_t"], cfg["d_s"]
    x, w, p, t, gy = make_inputs(dev, side, width, cfg, dt)
    alpha = torch.tensor(ALPHA, device=dev, dtype=torch.float32)
    fns = {"eager": clone_linear_reference, "ours": clone_linear, "cutlass": clone_linear, "compile": compiled}

    def clone_step(v):
        def step():
            with path(v):
                y, mse = fns[v](x, w, p, None, t, side)
                return (y, mse) + torch.autograd.grad((y, mse), (x, p), (gy, alpha))
        return step

    steps = {v: clone_step(v) for v in CLONE if v in variants and fns[v] is not None}
    steps["bare"] = _bare_step(x, w, p, side, gy)
    case = {"side": side, "width": width, "dtype": dname(dt)}
    held = {}  # rows decided before timing (the cutlass variant skipped or refused)
    if "cutlass" in steps:
        why = cutlass_unavailable(dev, dt)
        if why is not None:
            held["cutlass"] = dict(case, variant="cutlass", status="skipped", note=why)
        else:
            why = cutlass_not_taken(steps["cutlass"], x, w, p, t, side)
            if why is not None:
                held["cutlass"] = dict(case, variant="cutlass", status="failed", error=why)
        if "cutlass" in held:
            del steps["cutlass"]

    def first_call(v, res):  # clone: CUDA-graph outputs get overwritten
        return {"_out": [o.detach().clone() for o in res]}

    timed, _ = common.run_benchmarks(case, {v: steps[v] for v in variants if v in steps}, device=dev, iters=iters,
                                     warmup=warmup, label="variant", first_call=first_call)
    by = {r["variant"]: r for r in timed}
    by.update(held)
    rows = [by[v] for v in variants if v in by]
    outs = {r["variant"]: r.pop("_out", None) for r in rows}
    for row in rows:
        v = row["variant"]
        if row["status"] != "ok":
            continue
        with path(v):
            if v == "bare":
                sb = saved_bytes(lambda: bare_fn(x, w, p, None, side), (x, w, p))
            else:
                sb = saved_bytes(lambda: fns[v](x, w, p, None, t, side), (x, w, p))
        fl = flops(side, n, d_t, d_s, width, clone=(v != "bare"))
        pb = row.pop("peak_bytes", None)
        row.update(tflops=fl / (row["ms"] * 1e-3) / 1e12, gflop=fl / 1e9,
                   peak_mib=None if pb is None else pb / 2 ** 20, saved_mib=sb / 2 ** 20)
        if outs.get("eager") is not None and v != "bare":  # y, mse, grad_x, grad_P against eager
            row["err_vs_eager"] = max(relerr(a, b) for a, b in zip(outs[v], outs["eager"]))
    return rows


def _bare_step(x, w, p, side, gy):
    def step():
        y = bare_fn(x, w, p, None, side)
        return (y,) + torch.autograd.grad(y, (x, p), gy)
    return step


def case_ratios(rows, side, width, dt) -> dict | None:
    by = {r["variant"]: r for r in rows
          if (r["side"], r["width"], r["dtype"]) == (side, width, dt) and "ms" in r}
    if "ours" not in by and "cutlass" not in by:
        return None

    def t(a, b):
        return by[a]["ms"] / by[b]["ms"] if a in by and b in by else None

    def m(a, b, k):
        return by[a][k] / by[b][k] if a in by and b in by and by[a].get(k) and by[b].get(k) else None
    return {"side": side, "width": width, "dtype": dt,
            "eager/ours": t("eager", "ours"), "compile/ours": t("compile", "ours"), "ours/bare": t("ours", "bare"),
            "peak ours/eager": m("ours", "eager", "peak_mib"), "saved ours/eager": m("ours", "eager", "saved_mib"),
            "eager/cutlass": t("eager", "cutlass"), "compile/cutlass": t("compile", "cutlass"),
            "cutlass/bare": t("cutlass", "bare"), "ours/cutlass": t("ours", "cutlass"),
            "cutlass err_vs_eager": by["cutlass"].get("err_vs_eager") if "cutlass" in by else None}


def targets_of(rows, ratios, *, cuda, quick, mode, n_cases, partial) -> list[dict]:
    """The targets, worst case over the cases; a note where a figure is not the target setup."""
    def worst(key, fn):
        vals = [r[key] for r in ratios if r.get(key) is not None]
        return fn(vals) if vals else None
    base = []
    if not cuda or quick:
        base.append("not the target configuration (needs CUDA, full shapes)")
    if partial:
        base.append(f"partial run: {len(ratios)} of {n_cases} cases")
    comp = [] if mode in ("max-autotune", None) else [f"compile mode {mode}: the goal is against max-autotune"]
    cut = [r for r in rows if r["variant"] == "cutlass"]
    skipped = sorted({r["note"] for r in cut if r["status"] == "skipped"})
    bad = [r for r in cut if r["status"] not in ("ok", "skipped")]
    cnote = list(base) + [f"cutlass skipped: {s}" for s in skipped]
    if bad:
        cnote.append(f"cutlass failed on {len(bad)} of {len(cut)} cases")

    def tg(key, value, notes):
        return common.target(key, value, note="; ".join(notes) or None)
    return [
        tg("clone_linear.speedup_vs_eager", worst("eager/ours", min), base),
        tg("clone_linear.speedup_vs_compile", worst("compile/ours", min), base + comp),
        tg("clone_linear.ratio_vs_bare_gemm", worst("ours/bare", max), base),
        tg("clone_linear.peak_mem_vs_eager", worst("peak ours/eager", max), base),
        tg("clone_linear.cutlass.ratio_vs_bare_gemm", worst("cutlass/bare", max), cnote),
        tg("clone_linear.cutlass.speedup_vs_eager", worst("eager/cutlass", min), cnote),
        tg("clone_linear.cutlass.speedup_vs_compile", worst("compile/cutlass", min), cnote + comp),
        tg("clone_linear.cutlass.speedup_vs_ours", worst("ours/cutlass", min), cnote),
        tg("clone_linear.cutlass.err_vs_eager", worst("cutlass err_vs_eager", max), cnote),
    ]


def parse_cases(spec, default_dtype):
    """'in:3072,out:8192:fp16' -> [(side, width, dtype)]; a bad item exits with status 2."""
    out = []
    for item in spec.split(","):
        parts = item.strip().split(":")
        if len(parts) not in (2, 3) or parts[0] not in ("in", "out") or not parts[1].isdigit() \
                or (len(parts) == 3 and parts[2] not in DTYPES):
            sys.exit(f"bench_clone_linear: bad case {item!r} (side:width[:dtype], side in/out, "
                     f"dtype one of {', '.join(DTYPES)})")
        out.append((parts[0], int(parts[1]), DTYPES[parts[2]] if len(parts) == 3 else default_dtype))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="one small case per side, few iterations (CI smoke)")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--cases", default=None, help="comma list of side:width[:dtype], e.g. in:3072,out:8192:fp16")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode for the reference "
                    "(default: max-autotune on CUDA, default on the CPU)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    ap.add_argument("--json", default=None, help="write the results here (schema: bench/common.py)")
    args = ap.parse_args(argv)

    dev = common.pick_device(args.device)
    cuda = dev.startswith("cuda")
    from lrc_ext.ops.clone_linear import clone_linear_reference

    cfg = (QUICK_GPU if args.quick else GPU) if cuda else (QUICK_CPU if args.quick else CPU)
    cases = [(s, w, cfg["dtype"]) for w in cfg["widths"] for s in ("in", "out")] + list(cfg["extra"])
    if args.cases:
        cases = parse_cases(args.cases, cfg["dtype"])
    iters = args.iters or ((5 if args.quick else 20) if cuda else (2 if args.quick else 5))
    warmup = 1 if args.quick else (3 if cuda else 1)
    mode = args.compile_mode or ("max-autotune" if cuda else "default")
    compiled = None
    if not args.no_compile:
        dyn = torch._dynamo.config  # one recompilation a case (shapes and dtypes differ)
        key = "recompile_limit" if hasattr(dyn, "recompile_limit") else "cache_size_limit"
        setattr(dyn, key, max(getattr(dyn, key), 2 * len(cases)))
        compiled = torch.compile(clone_linear_reference, mode=mode, dynamic=False)
    meta = common.metadata(dev)
    why = cutlass_unavailable(dev, torch.bfloat16)
    print(f"device: {meta['device']}; torch {meta['torch']}; N={cfg['n']}, d_T={cfg['d_t']}, d_S={cfg['d_s']}; "
          f"cases {', '.join(f'{s}:{w}:{dname(d)}' for s, w, d in cases)}; compile mode: "
          f"{None if compiled is None else mode}; iters {iters}; cutlass variant: {why or 'on'}", flush=True)

    config = {"n": cfg["n"], "d_t": cfg["d_t"], "d_s": cfg["d_s"], "dtype": dname(cfg["dtype"]),
              "cases": [f"{s}:{w}:{dname(d)}" for s, w, d in cases], "iters": iters, "warmup": warmup,
              "alpha": ALPHA, "compile_mode": None if compiled is None else mode, "quick": args.quick,
              "cutlass": why or "on"}
    rows, ratios, targets, errors = [], [], [], []
    for i, (side, width, dt) in enumerate(cases):
        case_rows = run_case(dev, side, width, dt, cfg, VARIANTS, compiled, iters, warmup)
        rows += case_rows
        r = case_ratios(rows, side, width, dname(dt))
        if r is not None:
            ratios.append(r)
        common.print_table(case_rows, ["side", "width", "dtype", "variant", "ms", "min_ms", "tflops", "peak_mib",
                                       "saved_mib", "err_vs_eager", "note", "error"],
                           headers={"ms": "ms (median)", "min_ms": "ms (min)", "tflops": "TFLOP/s",
                                    "peak_mib": "peak MiB", "saved_mib": "saved MiB",
                                    "err_vs_eager": "rel err vs eager"})
        targets = targets_of(rows, ratios, cuda=cuda, quick=args.quick, mode=mode if compiled else None,
                             n_cases=len(cases), partial=i + 1 < len(cases))
        errors = [f"{r['side']}:{r['width']}:{r['dtype']} {r['variant']}: {r['error']}" for r in rows if "error" in r]
        if args.json:  # after every case: a run stopped later keeps what it measured
            common.write_json(args.json, "bench_clone_linear", rows, device=dev, config=config, targets=targets,
                              errors=errors, ratios=ratios)

    common.print_table(ratios, title="ratios (a/b of times: > 1 means b is faster; x/bare: 1 is the floor)")
    common.print_table(targets, ["what", "value", "op", "goal", "met", "note"], title="targets (worst case)")
    if args.json:
        print(f"wrote {args.json}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
