"""distill_head (fused LM head with KL + CE) against eager, torch.compile and Liger-Kernel.

    python bench/bench_distill_head.py [--quick] [--json PATH] [--device cuda|cpu]
        [--shapes lrc1.5b,smollm2] [--impls eager,compile,liger,fused] [--chunk-sizes 1024,2048]

What is timed, per shape, side by side in one run: one forward + backward of the whole head
loss ``lm + kl`` (tau = 40, KL(p_T || p_S) summed over the vocabulary and averaged over the
tokens, plus the mean CE), gradients flowing to h_s and P_head through
W_head_S = W_head_T @ P_head:

  eager    lrc_ext.ops.distill_head_reference: full N x V logits, F.log_softmax/kl_div/cross_entropy
  compile  torch.compile of the same function (inductor)
  liger    liger_kernel's LigerFusedLinearJSDLoss with beta = 0 (= forward KL(p_T || p_S)),
           temperature 40, weight_hard_loss = weight_soft_loss = 1, chunk 1024 (its default),
           fed W_head_S = W_head_T @ P_head computed with autograd; only where liger_kernel
           imports (it needs Triton and a GPU): skipped otherwise
  fused    lrc_ext.ops.distill_head (ours); extra rows "fused[c=K]" with --chunk-sizes

Shapes (bf16 on GPU): lrc1.5b N=8192, V=128256, d_T=3072, d_S=1536 (Llama-3.2-3B -> LRC-1.5B),
smollm2 N=8192, V=49152, d_T=576, d_S=288 (--quick on a GPU: lrc1.5b only). CPU (fp32):
cpu N=1024, V=32000, d_T=512, d_S=256; --quick: N=256, V=8000, d_T=128, d_S=64.
Order: fused, eager, liger, compile (its compilation takes minutes), JSON rewritten after
every measurement. Env LRC_DISTILL_HEAD_CHUNK_MB / LRC_DISTILL_HEAD_BWD tune the fused op.

Memory: the peak over the memory held before the call (inputs). CUDA: torch's allocator
peak; CPU: the growth of the resident-set high-water mark over one call, measured in one
fresh process per shape (after a warm-up on a small vocabulary; glibc told to return freed
blocks of 128 KiB or more). Targets (tools/targets.py, one H100, lrc1.5b):
>= 1.5x Liger's speed, peak memory <= Liger's and >= 5x below eager.
"""
from __future__ import annotations

import argparse
import importlib
import math
import sys

import common

common.setup_path()

import torch  # noqa: E402

SHAPES = {
    # name: (N, V, d_T, d_S)
    "lrc1.5b": (8192, 128256, 3072, 1536),
    "smollm2": (8192, 49152, 576, 288),
    "cpu": (1024, 32000, 512, 256),
    "cpu-quick": (256, 8000, 128, 64),
}
TAU = 40.0
KW = dict(tau=TAU, lm_weight=1.0, kl_weight=1.0, kl_reduction="token")


def make_inputs(shape, dtype, device, seed=0):
    n, v, d_t, d_s = shape
    g = torch.Generator(device=device).manual_seed(seed)
    h_s = torch.randn(n, d_s, device=device, generator=g).to(dtype)
    h_t = torch.randn(n, d_t, device=device, generator=g).to(dtype)
    # logits with a standard deviation of ~3 for both models
    w = (torch.randn(v, d_t, device=device, generator=g) * (3.0 / math.sqrt(d_t))).to(dtype)
    p = (torch.randn(d_t, d_s, device=device, generator=g) / math.sqrt(d_s)).to(dtype)
    labels = torch.randint(0, v, (n,), device=device, generator=g)
    labels[:: 97] = -100  # a few unlabelled tokens (no CE, KL still counted)
    return h_s.requires_grad_(True), h_t, w, p.requires_grad_(True), labels


def make_impls(names, chunk_sizes, device):
    """{name: f(h_s, h_t, w, p, labels) -> loss} for the implementations asked for and available."""
    from lrc_ext.ops import distill_head, distill_head_reference
    impls, skipped = {}, {}
    for name in names:
        if name == "eager":
            impls[name] = lambda h_s, h_t, w, p, y: sum(distill_head_reference(h_s, h_t, w, p, y, **KW))
        elif name == "compile":
            f = torch.compile(distill_head_reference, dynamic=False)
            impls[name] = lambda h_s, h_t, w, p, y, f=f: sum(f(h_s, h_t, w, p, y, **KW))
        elif name == "liger":
            if not str(device).startswith("cuda"):
                skipped[name] = "Liger-Kernel runs on GPUs only (Triton)"
                continue
            try:
                lk = importlib.import_module("liger_kernel.chunked_loss")
                loss_mod = lk.LigerFusedLinearJSDLoss(weight_hard_loss=1.0, weight_soft_loss=1.0, beta=0.0,
                                                      ignore_index=-100, temperature=TAU, compiled=True,
                                                      chunk_size=1024)
            except Exception as e:  # not installed, or no Triton
                skipped[name] = f"liger_kernel not importable: {type(e).__name__}: {e}"
                continue
            impls[name] = lambda h_s, h_t, w, p, y, m=loss_mod: m(h_s, w @ p, h_t, w, y)
        elif name == "fused":
            impls[name] = lambda h_s, h_t, w, p, y: sum(distill_head(h_s, h_t, w, p, y, **KW))
            for c in chunk_sizes:
                impls[f"fused[c={c}]"] = (lambda h_s, h_t, w, p, y, c=c:
                                          sum(distill_head(h_s, h_t, w, p, y, chunk_size=c, **KW)))
        else:
            raise SystemExit(f"bench_distill_head: unknown implementation {name!r}")
    return impls, skipped


def cpu_peaks_in_child(shape: str, impls: list[str]) -> dict:
    """{impl: peak RSS growth in bytes} of one forward + backward each, measured in one fresh
    process (after a warm-up of the same code paths on a small vocabulary). glibc's malloc
    is told to map every block of 128 KiB or more on its own, so that freed memory leaves
    the resident set and one implementation's leftovers do not hide the next one's peak."""
    import os
    import subprocess
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    r = subprocess.run([sys.executable, __file__, "--device", "cpu", "--_mem-child", f"{shape}:{','.join(impls)}"],
                       capture_output=True, text=True, timeout=1800, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"memory child failed: {r.stderr[-800:]}")
    out = {}
    for line in r.stdout.splitlines():
        if line.startswith("peak "):
            _, name, val = line.split()
            out[name] = int(val)
    return out


def mem_child(spec: str) -> int:
    shape, names = spec.split(":", 1)
    n, v, d_t, d_s = SHAPES[shape]
    small = make_inputs((min(n, 64), min(v, 500), d_t, d_s), torch.float32, "cpu", seed=1)
    x = make_inputs(SHAPES[shape], torch.float32, "cpu")
    for name in names.split(","):
        chunks = [int(name[len("fused[c="):-1])] if name.startswith("fused[") else []
        impls, _ = make_impls([name.split("[")[0]], chunks, "cpu")
        f = impls[name]
        f(*small).backward()  # load code, start thread pools, compile
        for t in (*small, *x):
            t.grad = None
        mem = common.peak_memory(lambda: f(*x).backward(), device="cpu")  # VmHWM reset, then read
        for t in x:
            t.grad = None
        print(f"peak {name} {mem['delta_bytes'] if mem['delta_bytes'] is not None else -1}", flush=True)
    return 0


def run_shape(sname, impls, dev, dtype, iters, warmup, rows, errors, save) -> dict:
    """Every implementation on one shape, through the shared runner (one after the other, the
    JSON rewritten after each); then CPU peaks in a fresh process, ratios and loss agreement."""
    shape = SHAPES[sname]
    n, v, d_t, d_s = shape
    cuda = dev.startswith("cuda")
    common.free_memory(dev)
    h_s, h_t, w, p, labels = make_inputs(shape, dtype, dev)
    # GEMM FLOPs of the loss and its gradients: W_S, z_S, z_T, dh_S, dW_S, dP (same for all).
    flops = 2 * v * d_t * d_s * 2 + 2 * n * v * (d_s + d_t) + 2 * 2 * n * v * d_s

    def step_of(f):
        def step():
            h_s.grad = None
            p.grad = None
            loss = f(h_s, h_t, w, p, labels)
            loss.backward()
            return loss
        return step

    def first_call(name, loss):  # the value, from the first call
        return {"loss": float(loss.detach()), "grad_norm_h": float(h_s.grad.float().norm()),
                "grad_norm_p": float(p.grad.float().norm())}

    def on_row(row):
        h_s.grad = p.grad = None
        if row["status"] == "ok":
            row["time_ms"] = row.pop("ms")
            row["tflops"] = flops / (row["time_ms"] * 1e-3) / 1e12
            print(f"  {sname:9s} {row['impl']:12s} {row['time_ms']:10.2f} ms  loss {row['loss']:.6f}"
                  + (f"  peak {row['peak_bytes'] / 2 ** 30:.3f} GiB" if row.get("peak_bytes") else ""), flush=True)
        else:
            errors.append(f"{sname}/{row['impl']}: {row['error']}")
            print(f"  {sname}/{row['impl']}: {row['status']}: {row['error']}", flush=True)
        rows.append(row)
        save()

    case = {"shape": sname, "N": n, "V": v, "d_T": d_t, "d_S": d_s, "dtype": str(dtype).replace("torch.", "")}
    shape_rows, _ = common.run_benchmarks(case, {k: step_of(f) for k, f in impls.items()}, device=dev, iters=iters,
                                          warmup=warmup, interleave=False, memory=cuda, first_call=first_call,
                                          on_row=on_row)
    shape_rows = {r["impl"]: r for r in shape_rows}
    h_s = h_t = w = p = labels = None  # the inputs go before the CPU peaks are measured
    common.free_memory(dev)
    if not cuda:  # in-process RSS keeps what earlier runs freed: measure in a fresh process
        ok = [k for k, r in shape_rows.items() if r["status"] == "ok"]
        try:
            for k, b in cpu_peaks_in_child(sname, ok).items():
                shape_rows[k]["peak_bytes"] = b if b >= 0 else None
        except Exception as e:  # noqa: BLE001
            errors.append(f"{sname}: CPU memory measurement: {e}")
    for row in shape_rows.values():
        if row.get("peak_bytes") is not None:
            row["peak_gib"] = row["peak_bytes"] / 2 ** 30
            row["peak_vs_nv_fp32"] = row["peak_bytes"] / (n * v * 4)
    for row in shape_rows.values():  # speed and memory against eager and Liger, and the loss agreement
        for tag in ("eager", "liger"):
            ref = shape_rows.get(tag)
            if row.get("status") == "ok" and ref and ref.get("status") == "ok":
                row[f"speedup_vs_{tag}"] = ref["time_ms"] / row["time_ms"]
                if row.get("peak_bytes") is not None and ref.get("peak_bytes") is not None:
                    row[f"mem_vs_{tag}"] = row["peak_bytes"] / max(ref["peak_bytes"], 1)
                row[f"loss_rel_diff_vs_{tag}"] = abs(row["loss"] - ref["loss"]) / max(abs(ref["loss"]), 1e-30)
    print(f"  {sname}: peak memory (GiB): " + ", ".join(
        f"{k} {common.fmt(r.get('peak_gib'))}" for k, r in shape_rows.items()), flush=True)
    return shape_rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quick", action="store_true", help="CPU: one small shape; GPU: smollm2 only")
    ap.add_argument("--shapes", default=None, help="comma list of: " + ", ".join(SHAPES))
    ap.add_argument("--impls", default=None, help="comma list of eager, compile, liger, fused "
                                                   "(default: all; --quick on CPU: eager, fused)")
    ap.add_argument("--chunk-sizes", default="", help="extra fused rows with these chunk sizes (tokens)")
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--json", default=None, help="write the results here (schema: bench/common.py)")
    ap.add_argument("--_mem-child", dest="mem_child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.mem_child:
        return mem_child(args.mem_child)

    dev = common.pick_device(args.device)
    cuda = dev.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.shapes:
        shapes = args.shapes.split(",")
    elif cuda:
        shapes = ["lrc1.5b"] if args.quick else ["lrc1.5b", "smollm2"]
    else:
        shapes = ["cpu-quick"] if args.quick else ["cpu"]
    # ours first, compile (minutes of compilation) last: a run stopped by a time limit keeps the rest
    default_impls = "fused,eager" if (args.quick and not cuda) else "fused,eager,liger,compile"
    names = (args.impls or default_impls).split(",")
    chunk_sizes = [int(c) for c in args.chunk_sizes.split(",") if c]
    iters = args.iters or ((5 if not args.quick else 3) if cuda else (3 if not args.quick else 2))
    warmup = args.warmup if args.warmup is not None else (2 if cuda else 1)

    impls, skipped = make_impls(names, chunk_sizes, dev)
    print(f"device: {common.metadata(dev)['device']}; dtype {str(dtype).replace('torch.', '')}; "
          f"implementations: {', '.join(impls)}" + (f"; skipped: {skipped}" if skipped else ""), flush=True)

    rows, errors, targets, notes = [], [], [], []
    for name, why in skipped.items():
        notes.append(f"{name}: {why}")

    def save():  # after every measurement, so a run stopped by a time limit keeps what it measured
        if args.json:
            common.write_json(args.json, "bench_distill_head", rows, device=dev, targets=targets, errors=errors,
                              notes=notes, config={"shapes": {s: SHAPES[s] for s in shapes}, "tau": TAU,
                                                   "kl_reduction": "token", "dtype": str(dtype),
                                                   "iters": iters, "warmup": warmup,
                                                   "impls": list(impls), "chunk_sizes": chunk_sizes})

    for sname in shapes:
        if sname not in SHAPES:
            raise SystemExit(f"bench_distill_head: unknown shape {sname!r} (one of {', '.join(SHAPES)})")
        shape_rows = run_shape(sname, impls, dev, dtype, iters, warmup, rows, errors, save)
        ours, base, lig = (shape_rows.get(k) for k in ("fused", "eager", "liger"))
        if cuda and sname == "lrc1.5b" and ours and ours.get("status") == "ok":
            if lig and lig.get("status") == "ok":
                targets.append(common.target("distill_head.speedup_vs_liger", lig["time_ms"] / ours["time_ms"]))
                targets.append(common.target("distill_head.peak_mem_vs_liger",
                                             ours["peak_bytes"] / max(lig["peak_bytes"], 1)))
            if base and base.get("status") == "ok":
                targets.append(common.target("distill_head.mem_saving_vs_eager",
                                             base["peak_bytes"] / max(ours["peak_bytes"], 1)))
        save()

    cols = ["shape", "impl", "status", "time_ms", "peak_gib", "speedup_vs_eager", "speedup_vs_liger",
            "mem_vs_eager", "mem_vs_liger", "tflops", "loss_rel_diff_vs_eager"]
    print()
    common.print_table(rows, cols, title="distill_head: forward + backward of lm + kl")
    for t in targets:
        print(f"target {t['key']}: {common.fmt(t['value'])} (goal {t['op']} {t['goal']}): "
              f"{'met' if t['met'] else 'NOT met'}")
    for note in notes:
        print("note:", note)
    if args.json:
        save()
        print(f"wrote {args.json}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
