"""clone_linear, forward + backward of one clone linear, four ways side by side.

    python bench/bench_clone_linear.py [--quick] [--device cuda|cpu] [--json PATH]
                                       [--cases in:3072,out:8192] [--compile-mode MODE] [--no-compile]

Per case (side, teacher width), one step = forward, then the gradients of x and P from
grad_y (fixed random) and, for the clone variants, grad_mse = alpha = 0.2:
  eager    lrc_ext.ops.clone_linear_reference (plain PyTorch)
  compile  torch.compile(clone_linear_reference, mode="max-autotune") on CUDA
           (mode "default" on the CPU; --compile-mode to change, --no-compile to skip)
  ours     lrc_ext.ops.clone_linear (fused)
  bare     the same products without the clone loss: W_S = W_T @ P (or P.T @ W_T),
           y = x @ W_S.T, and its backward (grad_x, grad_W_S, grad_P): the floor.
Shapes: LRC-1.5B on CUDA (N = 8192 tokens, d_T = 3072, d_S = 1536, teacher width in
{3072, 1024, 8192}, both sides, bf16); smaller on the CPU (fp32: bf16 GEMMs have no fast
path on most CPUs). "width" is the teacher weight's other dimension: side=in W_T is
(width, d_T) (q: 3072, k/v: 1024, gate/up: 8192); side=out W_T is (d_T, width) (o: 3072,
down: 8192).

Compile time: mode="max-autotune" autotunes every GEMM shape of every case (minutes a
case on an H100); `--compile-mode default` compiles in seconds, `--cases in:3072` runs one.

Columns: median time (CUDA events / perf_counter; the variants interleaved round by round), TFLOP/s of the variant's own products
(the clone variants on the output side do two more N x d_T x d_S GEMMs than the bare
floor: target @ P and its gradient), peak memory over what the inputs already hold
(torch allocator on CUDA; on the CPU the process RSS high-water mark after
malloc_trim, coarse), the bytes kept
for backward (saved_tensors_hooks; x, W_T and P not counted, the teacher's target is:
the model would free it otherwise), and the error of
ours against eager (relative, in the norm). Then the ratios per case and the targets
(tools/targets.py; worst case over shapes).
"""
from __future__ import annotations

import argparse
import sys

import common

common.setup_path()

import torch  # noqa: E402

ALPHA = 0.2
GPU = dict(n=8192, d_t=3072, d_s=1536, widths=(3072, 1024, 8192), dtype=torch.bfloat16)
CPU = dict(n=1024, d_t=512, d_s=256, widths=(512, 192, 1344), dtype=torch.float32)
QUICK_GPU = dict(n=4096, d_t=3072, d_s=1536, widths=(3072,), dtype=torch.bfloat16)
QUICK_CPU = dict(n=96, d_t=80, d_s=40, widths=(72,), dtype=torch.float32)
VARIANTS = ("eager", "compile", "ours", "bare")


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


def run_case(dev, side, width, cfg, variants, compiled, iters, warmup):
    from lrc_ext.ops.clone_linear import clone_linear, clone_linear_reference
    n, d_t, d_s, dt = cfg["n"], cfg["d_t"], cfg["d_s"], cfg["dtype"]
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
    alpha = torch.tensor(ALPHA, device=dev, dtype=torch.float32)

    def clone_step(fn):
        def step():
            y, mse = fn(x, w, p, None, t, side)
            return (y, mse) + torch.autograd.grad((y, mse), (x, p), (gy, alpha))
        return step

    steps = {
        "eager": clone_step(clone_linear_reference),
        "ours": clone_step(clone_linear),
        "bare": _bare_step(x, w, p, side, gy),
    }
    if compiled is not None:
        steps["compile"] = clone_step(compiled)
    fns = {"eager": clone_linear_reference, "ours": clone_linear, "compile": compiled}

    def first_call(v, res):  # clone: CUDA-graph outputs get overwritten
        return {"_out": [o.detach().clone() for o in res]}

    rows, _ = common.run_benchmarks({"side": side, "width": width}, {v: steps[v] for v in variants if v in steps},
                                    device=dev, iters=iters, warmup=warmup, label="variant", first_call=first_call)
    outs = {r["variant"]: r.pop("_out", None) for r in rows}
    for row in rows:
        v = row["variant"]
        if row["status"] != "ok":
            continue
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="one small case per side, few iterations (CI smoke)")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--cases", default=None, help="comma list of side:width, e.g. in:3072,out:8192")
    ap.add_argument("--compile-mode", default=None, help="torch.compile mode for the reference "
                    "(default: max-autotune on CUDA, default on the CPU)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    ap.add_argument("--json", default=None, help="write the results here (schema: bench/common.py)")
    args = ap.parse_args(argv)

    dev = common.pick_device(args.device)
    cuda = dev.startswith("cuda")
    from lrc_ext.ops.clone_linear import clone_linear_reference

    cfg = (QUICK_GPU if args.quick else GPU) if cuda else (QUICK_CPU if args.quick else CPU)
    cases = [(s, w) for w in cfg["widths"] for s in ("in", "out")]
    if args.cases:
        cases = [(c.split(":")[0], int(c.split(":")[1])) for c in args.cases.split(",")]
    iters = args.iters or ((5 if args.quick else 20) if cuda else (2 if args.quick else 5))
    warmup = 1 if args.quick else (3 if cuda else 1)
    mode = args.compile_mode or ("max-autotune" if cuda else "default")
    compiled = None if args.no_compile else torch.compile(clone_linear_reference, mode=mode, dynamic=False)
    meta = common.metadata(dev)
    print(f"device: {meta['device']}; torch {meta['torch']}; dtype {dname(cfg['dtype'])}; N={cfg['n']}, "
          f"d_T={cfg['d_t']}, d_S={cfg['d_s']}; compile mode: {None if compiled is None else mode}; "
          f"iters {iters}", flush=True)

    rows = []
    for side, width in cases:
        case_rows = run_case(dev, side, width, cfg, VARIANTS, compiled, iters, warmup)
        rows += case_rows
        common.print_table(case_rows, ["side", "width", "variant", "ms", "min_ms", "tflops", "peak_mib", "saved_mib",
                                       "err_vs_eager", "error"],
                           headers={"ms": "ms (median)", "min_ms": "ms (min)", "tflops": "TFLOP/s", "peak_mib": "peak MiB",
                                    "saved_mib": "saved MiB", "err_vs_eager": "rel err vs eager"})

    # Ratios per case, then the targets (worst case).
    ratios = []
    for side, width in cases:
        by = {r["variant"]: r for r in rows if r["side"] == side and r["width"] == width and "ms" in r}
        if "ours" not in by:
            continue
        o = by["ours"]
        ratios.append({
            "side": side, "width": width,
            "eager/ours": by["eager"]["ms"] / o["ms"] if "eager" in by else None,
            "compile/ours": by["compile"]["ms"] / o["ms"] if "compile" in by else None,
            "ours/bare": o["ms"] / by["bare"]["ms"] if "bare" in by else None,
            "peak ours/eager": (o["peak_mib"] / by["eager"]["peak_mib"]
                                if "eager" in by and o["peak_mib"] and by["eager"]["peak_mib"] else None),
            "saved ours/eager": (o["saved_mib"] / by["eager"]["saved_mib"]
                                 if "eager" in by and by["eager"]["saved_mib"] else None),
        })
    common.print_table(ratios, title="ratios (time: >1 means ours is faster; ours/bare: 1 is the floor)")

    def worst(key, fn):
        vals = [r[key] for r in ratios if r.get(key) is not None]
        return fn(vals) if vals else None
    note = None if cuda and not args.quick else "not the target configuration (needs CUDA, full shapes)"
    targets = [
        common.target("clone_linear.speedup_vs_eager", worst("eager/ours", min), note=note),
        common.target("clone_linear.speedup_vs_compile", worst("compile/ours", min), note=note),
        common.target("clone_linear.ratio_vs_bare_gemm", worst("ours/bare", max), note=note),
        common.target("clone_linear.peak_mem_vs_eager", worst("peak ours/eager", max), note=note),
    ]
    common.print_table(targets, ["what", "value", "op", "goal", "met"], title="targets (worst case)")
    errors = [f"{r['side']}:{r['width']} {r['variant']}: {r['error']}" for r in rows if "error" in r]
    if args.json:
        common.write_json(args.json, "bench_clone_linear", rows, device=dev,
                          config={"n": cfg["n"], "d_t": cfg["d_t"], "d_s": cfg["d_s"], "dtype": dname(cfg["dtype"]),
                                  "cases": [f"{s}:{w}" for s, w in cases], "iters": iters, "warmup": warmup,
                                  "alpha": ALPHA, "compile_mode": None if compiled is None else mode,
                                  "quick": args.quick},
                          targets=targets, errors=errors, ratios=ratios)
        print(f"wrote {args.json}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
