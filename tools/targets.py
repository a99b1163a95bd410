"""The speed and memory targets (one H100) that benchmarks report against.

Benches record a measured value with ``target(key, value)`` (bench/common.py re-exports it);
tools/collect_results.py shows every key here in bench/results/README.md, "not measured"
for any key no run has reported yet. ``group`` is what the target is about (its key's first
part): the whole training step, or one op.
"""
from __future__ import annotations

TARGETS = {  # key -> (what, op, goal, unit); op and goal None: a figure reported for information
    # the whole LRC step at the LRC-1.5B shape, fused path
    "step.lrc1.5b.fused.tokens_per_s": ("LRC-1.5B step, fused: tokens/s", ">=", 25000.0, "tokens/s"),
    "step.lrc1.5b.fused.mfu": ("LRC-1.5B step, fused: MFU (vs 989 TFLOP/s)", ">=", 0.45, "fraction"),
    "step.lrc1.5b.fused.speedup_vs_eager": ("LRC-1.5B step: fused / eager tokens/s", ">=", 2.0, "x"),
    "step.lrc1.5b.fused.max_micro_batch": ("LRC-1.5B step, fused: largest micro-batch x 2048 that fits",
                                           ">=", 4, "sequences"),
    # one clone linear, forward + backward (N=8192, d_T=3072, d_S=1536, bf16)
    "clone_linear.speedup_vs_eager": ("clone_linear fwd+bwd: eager / ours time (worst shape)", ">=", 1.5, "x"),
    "clone_linear.speedup_vs_compile": ("clone_linear fwd+bwd: torch.compile / ours time (worst shape)",
                                        ">=", 1.2, "x"),
    "clone_linear.ratio_vs_bare_gemm": ("clone_linear fwd+bwd: ours / bare GEMMs time (worst shape)",
                                        "<=", 1.15, "x"),
    "clone_linear.peak_mem_vs_eager": ("clone_linear: ours / eager peak memory (worst shape)", "<=", 1.0, "x"),
    # the same op on its CUTLASS sm90 path (H100/H200, bf16 and fp16; bench variant "cutlass")
    "clone_linear.cutlass.ratio_vs_bare_gemm": ("clone_linear fwd+bwd, CUTLASS path: cutlass / bare GEMMs time "
                                                "(worst shape)", "<=", 1.10, "x"),
    "clone_linear.cutlass.speedup_vs_eager": ("clone_linear fwd+bwd, CUTLASS path: eager / cutlass time "
                                              "(worst shape)", ">=", 1.5, "x"),
    "clone_linear.cutlass.speedup_vs_compile": ("clone_linear fwd+bwd, CUTLASS path: torch.compile(max-autotune) / "
                                                "cutlass time (worst shape)", ">=", 1.2, "x"),
    "clone_linear.cutlass.speedup_vs_ours": ("clone_linear fwd+bwd: ours (cuBLAS path) / cutlass time "
                                             "(worst shape; for information)", None, None, "x"),
    "clone_linear.cutlass.err_vs_eager": ("clone_linear, CUTLASS path: relative error vs eager, worst of y, mse, "
                                          "grad_x, grad_P (worst shape; for information)", None, None, ""),
    # the LM head with KL + CE (N=8192, V=128256, d_T=3072, d_S=1536, bf16)
    "distill_head.speedup_vs_liger": ("distill_head: Liger / ours time", ">=", 1.5, "x"),
    "distill_head.peak_mem_vs_liger": ("distill_head: ours / Liger peak memory", "<=", 1.0, "x"),
    "distill_head.mem_saving_vs_eager": ("distill_head: eager / ours peak memory", ">=", 5.0, "x"),
}


def group(key: str) -> str:
    return key.split(".", 1)[0]


def target(key: str, value, *, note: str | None = None) -> dict:
    """A measured figure against one of TARGETS (unknown keys are kept, with no goal)."""
    what, op, goal, unit = TARGETS.get(key, (key, None, None, ""))
    met = None
    if value is not None and goal is not None:
        met = bool(value >= goal) if op == ">=" else bool(value <= goal)
    d = {"key": key, "group": group(key), "what": what, "value": value, "op": op, "goal": goal, "unit": unit,
         "met": met}
    if note:
        d["note"] = note
    return d
