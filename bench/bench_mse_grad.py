"""mse_grad against eager torch and torch.compile of the same expression.

    python bench/bench_mse_grad.py [--quick] [--json PATH] [--device cuda|cpu]

What is timed, per size and dtype (2-D, contiguous):
  sum+grad   ours: lrc_ext.ops.mse_grad(a, b, scale)   -> (sum((a-b)^2), scale*(a-b))
             eager: d = a - b; ((d * d).sum(dtype=fp32), scale * d)
             compile: torch.compile of the eager function (inductor, static shapes)
  sum        ours: mse_grad(a, b); eager: ((a - b) ** 2).sum(dtype=fp32)

Memory-bound: the fewest bytes are a and b read once (+ the gradient written once), so
GB/s = those bytes / time, set against the copy bandwidth measured on the same machine
(bytes read + written). L2 is flushed before each timed call.
"""
from __future__ import annotations

import argparse
import sys
import time

import common

common.setup_path()

import torch  # noqa: E402

GPU_SIZES = [(8192, 3072, torch.bfloat16), (8192, 8192, torch.bfloat16), (8192, 3072, torch.float32)]
GPU_QUICK = [(8192, 3072, torch.bfloat16)]
CPU_SIZES = [(1024, 768, torch.bfloat16), (2048, 2048, torch.bfloat16), (2048, 2048, torch.float32)]
CPU_QUICK = [(256, 384, torch.bfloat16)]
SCALE = 0.37


def eager_sum_grad(a, b, scale: float = SCALE):
    d = a - b
    return (d * d).sum(dtype=torch.float32), scale * d


def eager_sum(a, b):
    return ((a - b) ** 2).sum(dtype=torch.float32)


def dname(dt) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}[dt]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="one small size, fewer iterations")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    ap.add_argument("--json", default=None, help="write the results here (schema: bench/common.py)")
    args = ap.parse_args(argv)

    dev = common.pick_device(args.device)
    cuda = dev.startswith("cuda")
    from lrc_ext.ops import mse_grad

    sizes = (GPU_QUICK if args.quick else GPU_SIZES) if cuda else (CPU_QUICK if args.quick else CPU_SIZES)
    iters = args.iters or ((10 if args.quick else 20) if cuda else 3)
    warmup = 3 if cuda else 1
    ceil = common.measure_ceilings(dev, quick=args.quick)
    copy_gbs = ceil["copy_gbs"]
    print(f"device: {common.metadata(dev)['device']}; measured copy bandwidth {copy_gbs:,.0f} GB/s "
          f"(read + written), datasheet {common.fmt(ceil['datasheet_memory_gbs'])} GB/s", flush=True)

    compiled = None if args.no_compile else torch.compile(eager_sum_grad, dynamic=False)
    rows, errors = [], []
    for rows_n, cols, dt in sizes:
        g = torch.Generator(device=dev).manual_seed(0)
        a = torch.randn(rows_n, cols, device=dev, dtype=torch.float32, generator=g).to(dt)
        b = torch.randn(rows_n, cols, device=dev, dtype=torch.float32, generator=g).to(dt)
        ref = ((a.double() - b.double()) ** 2).sum().item()
        n, esz = a.numel(), a.element_size()
        impls = [("sum+grad", "ours", lambda: mse_grad(a, b, SCALE), 3 * n * esz),
                 ("sum+grad", "eager", lambda: eager_sum_grad(a, b), 3 * n * esz)]
        if compiled is not None:
            impls.append(("sum+grad", "compile", lambda: compiled(a, b), 3 * n * esz))
        impls += [("sum", "ours", lambda: mse_grad(a, b), 2 * n * esz),
                  ("sum", "eager", lambda: eager_sum(a, b), 2 * n * esz)]
        eager_ms = {}
        for variant, impl, fn, nbytes in impls:
            row = {"shape": f"{rows_n}x{cols}", "dtype": dname(dt), "variant": variant, "impl": impl}
            try:
                t0 = time.perf_counter()
                out = fn()  # first call: compiles (compile variant), checked for correctness
                common.sync(dev)
                first_s = time.perf_counter() - t0
                s = out[0] if isinstance(out, tuple) else out
                row["rel_err_sum"] = abs(float(s) - ref) / ref
                del out, s
                t = common.time_fn(fn, device=dev, warmup=warmup, iters=iters, flush=True)
                mem = common.peak_memory(fn, device=dev)
            except Exception as e:  # noqa: BLE001 - record and go on (e.g. compile unavailable)
                msg = f"{row['shape']} {row['dtype']} {variant} {impl}: {type(e).__name__}: {str(e)[:300]}"
                errors.append(msg)
                print("ERROR", msg, flush=True)
                row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
                rows.append(row)
                continue
            ms = t["median_ms"]
            gbs = nbytes / (ms * 1e-3) / 1e9
            if impl == "eager":
                eager_ms[variant] = ms
            row.update(ms=ms, min_ms=t["min_ms"], gb_s=gbs, frac_copy_bw=gbs / copy_gbs,
                       peak_delta_mib=None if mem["delta_bytes"] is None else mem["delta_bytes"] / 2 ** 20,
                       first_call_s=first_s if impl == "compile" else None)
            rows.append(row)
        for r in rows:
            if r["shape"] == f"{rows_n}x{cols}" and r["dtype"] == dname(dt) and "ms" in r and r["variant"] in eager_ms:
                r["speedup_vs_eager"] = eager_ms[r["variant"]] / r["ms"]
        del a, b
        common.free_memory(dev)

    cols_out = ["shape", "dtype", "variant", "impl", "ms", "gb_s", "frac_copy_bw", "speedup_vs_eager",
                "peak_delta_mib", "rel_err_sum", "first_call_s", "error"]
    common.print_table(rows, [c for c in cols_out if any(c in r for r in rows)],
                       headers={"gb_s": "GB/s", "frac_copy_bw": "of copy BW", "speedup_vs_eager": "x eager",
                                "peak_delta_mib": "peak +MiB", "first_call_s": "compile s"},
                       title=f"mse_grad on {common.metadata(dev)['device']} (copy BW {copy_gbs:,.0f} GB/s)")
    notes = ["GB/s counts the fewest bytes: a and b read once, plus the gradient written once (sum+grad)",
             "copy BW: a device-to-device copy, bytes read + bytes written; L2 flushed before each timed call",
             "peak +MiB: peak memory of one call over what was allocated before it "
             + ("(torch allocator)" if cuda else "(process RSS high-water mark, coarse)")]
    if args.json:
        common.write_json(args.json, "bench_mse_grad", rows, device=dev, ceilings=ceil, errors=errors, notes=notes,
                          config={"device": dev, "quick": args.quick, "iters": iters, "warmup": warmup,
                                  "scale": SCALE,
                                  "sizes": [f"{r}x{c} {dname(d)}" for r, c, d in sizes]})
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
