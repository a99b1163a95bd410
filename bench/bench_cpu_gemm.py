"""fp32 CPU GEMMs of one LRC step, MKL (torch's own) against oneDNN, side by side.

    python bench/bench_cpu_gemm.py [--tokens 512] [--d-t 576] [--d-s 288] [--ffn 1536]
                                   [--vocab 49152] [--reps 7] [--quick] [--json PATH]

Each row is one product of a clone-linear step or the head at SmolLM2-135M's shape (the
defaults; d_S 288 = half the teacher's width), in the layout the op hands it over:
  linear     y = x @ W.T          (forwards, the teacher's linears, the logits)
  grad_x     g @ W                (input gradients: W.T as a transposed view)
  grad_w     g.T @ x              (weight gradients, the inner dimension over the tokens)
Both paths compute the same fp32 product at full precision; they run interleaved, MKL then
oneDNN, --reps times after a warm-up round, and each row prints both medians, GFLOP/s and
the median of the per-round ratios. lrc_ext sends only the linear and grad_x forms of at
least lrc_ext.ops._cpu_gemm.MIN_MACS multiply-adds to oneDNN (column "lrc_ext uses"): the
grad_w rows show why the weight-gradient form stays with MKL.

A shared machine drifts within minutes: compare the ratios, not the absolute rates, and
rerun before trusting a ratio near 1.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import common
from lrc_ext.ops import _cpu_gemm


def cases(n: int, d_t: int, d_s: int, ffn: int, vocab: int):
    """(name, a, b): the product a @ b.T, with a and b in the layouts the ops pass."""
    r = torch.randn
    return [
        ("q/o in, d_S x d_S", "linear", r(n, d_s), r(d_s, d_s)),
        ("gate/up, d_S -> ffn_S", "linear", r(n, d_s), r(ffn // 2, d_s)),
        ("down, ffn_S -> d_S", "linear", r(n, ffn // 2), r(d_s, ffn // 2)),
        ("teacher gate/up", "linear", r(n, d_t), r(ffn, d_t)),
        ("teacher down", "linear", r(n, ffn), r(d_t, ffn)),
        ("head logits", "linear", r(n, d_s), r(vocab, d_s)),
        ("grad_x gate/up", "grad_x", r(n, ffn // 2), r(ffn // 2, d_s).t()),  # g @ W: b = W.T, a view
        ("grad_x head", "grad_x", r(n, vocab), r(vocab, d_s).t()),
        # g.T @ x: a = g.T (out, N), b = x.T (in, N), both views of token-major tensors
        ("grad_w gate/up", "grad_w", r(n, ffn // 2).t(), r(n, d_s).t()),
    ]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--d-t", type=int, default=576)
    ap.add_argument("--d-s", type=int, default=288)
    ap.add_argument("--ffn", type=int, default=1536)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="small shapes, 2 reps (a smoke run)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if not _cpu_gemm.onednn_available():
        ap.error("this torch has no oneDNN linear op: nothing to compare")
    if args.quick:
        args.tokens, args.d_t, args.d_s, args.ffn, args.vocab, args.reps = 32, 48, 24, 64, 500, 2
    torch.manual_seed(0)
    mkl = lambda a, b: torch.mm(a, b.t())
    dnn = lambda a, b: torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
    rows = []
    with torch.no_grad():
        for name, form, a, b in cases(args.tokens, args.d_t, args.d_s, args.ffn, args.vocab):
            err = ((dnn(a, b).double() - a.double() @ b.double().t()).norm()
                   / (a.double() @ b.double().t()).norm()).item()
            ts = {"mkl": [], "onednn": []}
            for rep in range(args.reps + 1):
                for key, fn in (("mkl", mkl), ("onednn", dnn)):
                    t0 = time.perf_counter()
                    fn(a, b)
                    if rep:  # the first round warms up (allocations, oneDNN's primitive cache)
                        ts[key].append(time.perf_counter() - t0)
            flop = 2 * a.shape[0] * a.shape[1] * b.shape[0]
            med = {k: statistics.median(v) for k, v in ts.items()}
            rows.append({"product": name, "form": form, "M,K,N": f"{a.shape[0]},{a.shape[1]},{b.shape[0]}",
                         "mkl_ms": med["mkl"] * 1e3, "onednn_ms": med["onednn"] * 1e3,
                         "mkl_GF/s": flop / med["mkl"] / 1e9, "onednn_GF/s": flop / med["onednn"] / 1e9,
                         "onednn_speedup": statistics.median(m / d for m, d in zip(ts["mkl"], ts["onednn"])),
                         "lrc_ext uses": (_cpu_gemm.backend() if form != "grad_w" and flop // 2 >= _cpu_gemm.MIN_MACS
                                          else "mkl"),
                         "rel_err": err})
    meta = common.metadata("cpu")
    print(f"{meta.get('cpu', '')}; {torch.get_num_threads()} threads; torch {torch.__version__}; "
          f"{args.reps} interleaved rounds; lrc_ext's backend here: {_cpu_gemm.describe()}")
    common.print_table(rows, ["product", "form", "M,K,N", "mkl_ms", "onednn_ms", "mkl_GF/s", "onednn_GF/s",
                              "onednn_speedup", "lrc_ext uses", "rel_err"])
    if args.json:
        common.write_json(args.json, "bench_cpu_gemm", rows, config=vars(args), device="cpu")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
