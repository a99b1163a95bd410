"""CPU smoke tests of the benchmark scripts (tiny shapes), so CI keeps them working.

The GPU figures come from tools/gpu_suite.sh on a lent GPU; here we check that each
script runs, writes the JSON the collector reads, and that the collector and the FLOP
formula do what they say.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
TOOLS = ROOT / "tools"
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(TOOLS))

import common  # noqa: E402
import collect_results  # noqa: E402


def run(args, timeout=300):
    r = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    return r


def check_meta(d):
    assert d["schema"] == common.SCHEMA
    for k in ("date", "device", "device_kind", "torch", "python", "commit", "tree_hash", "lrc_ext"):
        assert k in d["meta"], k
    assert d["meta"]["device_kind"] == "cpu"


@pytest.fixture(scope="module")
def step_json(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "step.json"
    # compile with a backend that does not exist: that mode must fail alone, recorded, and the
    # run must still finish the other modes and write its JSON (exit status 1: a mode failed)
    r = run([BENCH / "bench_step.py", "--shape", "tiny", "--modes", "eager,compile,fused", "--quick", "--device",
             "cpu", "--max-micro-batch", "4", "--compile-backend", "no_such_backend", "--json", out])
    assert r.returncode == 1, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(out.read_text()), r.stdout


def test_bench_step_tiny_json(step_json):
    d, stdout = step_json
    check_meta(d)
    assert d["bench"] == "bench_step" and d["config"]["shape"] == "tiny"
    assert "flop_formula" in d["config"] and d["ceilings"]["matmul_tflops"] > 0
    rows = {r["mode"]: r for r in d["rows"]}
    assert set(rows) == {"eager", "compile", "fused"}
    for r in (rows["eager"], rows["fused"]):
        assert r["status"] == "ok", r
        for k in ("tokens_per_s", "step_ms", "forward_ms", "backward_ms", "optimizer_ms", "achieved_tflops",
                  "mfu_measured", "peak_mem_gib", "micro_batch", "max_micro_batch", "loss_step0", "speedup_vs_eager"):
            assert r.get(k) is not None, k
        assert r["tokens_per_s"] > 0 and r["loss_finite"]
        assert r["max_micro_batch"] >= r["micro_batch"] == 2
    # same teacher, projections and tokens: the fused path starts from the reference's loss
    assert rows["fused"]["loss_rel_diff_vs_eager"] < 1e-3
    for mode in ("eager", "fused"):
        det = d["details"][mode]
        assert det["flops"]["total"] > 0
        stages = {b["stage"]: b for b in det["breakdown"]}
        for st in ("teacher", "student.linear", "head", "optimizer"):
            assert stages.get(st, {}).get("ms", 0) > 0, (mode, st, list(stages))
        assert stages["teacher"]["bwd_ms"] == 0  # the teacher has no backward
        assert stages["student.linear"]["bwd_ms"] > 0
        assert det["top_kernels"]
    assert "where the step goes" in stdout and "bottleneck:" in stdout


def test_bench_step_compile_failure_is_recorded(step_json):
    d, _ = step_json
    row = next(r for r in d["rows"] if r["mode"] == "compile")
    assert row["status"] == "error" and "no_such_backend" in row["error"]
    assert any("compile" in e for e in d["errors"])
    assert d["details"]["compile"]["traceback"]


def test_step_flops_formula():
    import bench_step
    s = bench_step.SHAPES["lrc1.5b"]
    f = bench_step.step_flops(s, 4, 2048)
    N = 4 * 2048
    p_t = 3072 * (2 * 24 * 128 + 2 * 8 * 128 + 3 * 8192)
    assert f["teacher_linears_fwd"] == 2 * N * 28 * p_t
    assert f["student_linears_fwd_bwd"] == 6 * N * 28 * p_t // 2  # d_S = d_T / 2
    assert f["weight_products_fwd_bwd"] == 4 * 1536 * 28 * p_t
    assert f["teacher_attention_fwd"] == 2 * 4 * 2048 ** 2 * 24 * 128 * 28
    assert f["head_teacher_fwd"] == 2 * 4 * 2047 * 128256 * 3072
    assert f["total"] == sum(v for k, v in f.items() if k != "total")
    assert 20.5e9 < f["total"] / N < 21.5e9  # about 21 GFLOP a token at this shape
    st = bench_step.stage_flops(f)
    assert sum(st.values()) == f["total"]


def test_collect_results_and_readme(tmp_path):
    meta = {"date": "2026-11-23T00:00:00+00:00", "device": "NVIDIA H100 80GB HBM3", "device_kind": "cuda",
            "commit": "abc1234def", "torch": "2.11.0+cu130"}
    bench = {"schema": common.SCHEMA, "bench": "bench_step", "meta": meta, "config": {"shape": "lrc1.5b"},
             "rows": [{"shape": "lrc1.5b", "mode": "fused", "status": "ok", "tokens_per_s": 30000.0,
                       "mfu_datasheet": 0.6}],
             "targets": [common.target("step.lrc1.5b.fused.tokens_per_s", 30000.0),
                         common.target("step.lrc1.5b.fused.mfu", 0.4)],
             "details": {"fused": {"breakdown": [{"stage": "teacher", "ms": 10.0, "pct_step": 50.0},
                                                 {"stage": "head", "ms": 5.0, "pct_step": 25.0}]}}}
    cpu = dict(bench, meta=dict(meta, device_kind="cpu", device="cpu", date="2026-11-24T00:00:00+00:00"),
               targets=[common.target("step.lrc1.5b.fused.tokens_per_s", 10.0)])
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.json").write_text(json.dumps(bench))
    (tmp_path / "steps.jsonl").write_text(
        '{"step": "build", "status": "ok", "rc": 0, "seconds": 100, "note": ""}\n'
        '{"step": "test_cuda", "status": "failed", "rc": 1, "seconds": 5, "note": ""}\n')
    (tmp_path / "junit_cuda.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1" time="1.5">'
        '<testcase classname="tests.test_x" name="test_a"><failure message="boom"/></testcase>'
        '<testcase classname="tests.test_x" name="test_b"/><testcase classname="tests.test_x" name="test_c">'
        '<skipped/></testcase></testsuite></testsuites>')
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "sanitize_memcheck.log").write_text("1 passed in 3.0s\n========= ERROR SUMMARY: 0 errors\n")
    assert collect_results.main([str(tmp_path / "in"), "--steps", str(tmp_path / "steps.jsonl"), "--junit",
                                 str(tmp_path / "junit_cuda.xml"), "--logs", str(logs), "--out-dir",
                                 str(tmp_path / "out")]) == 0
    (jp,) = (tmp_path / "out").glob("results-20261123-H100-80GB-HBM3-abc1234def.json")
    res = json.loads(jp.read_text())
    assert res["schema"] == collect_results.RESULTS_SCHEMA
    assert res["tests"]["cuda"]["failures"] == 1 and res["tests"]["cuda"]["passed"] == 1
    assert res["sanitizer"]["memcheck"]["errors"] == 0
    assert any("test_cuda" in e for e in res["errors"])
    assert {t["key"]: t["met"] for t in res["targets"]} == {"step.lrc1.5b.fused.tokens_per_s": True,
                                                            "step.lrc1.5b.fused.mfu": False}
    md = jp.with_suffix(".md").read_text()
    assert "NVIDIA H100" in md and "bottleneck" in md and "| fused" in md

    # merging a merged file with a newer CPU run: the README prefers the GPU figure
    (tmp_path / "res").mkdir()
    (tmp_path / "res" / jp.name).write_text(jp.read_text())
    (tmp_path / "res" / "cpu.json").write_text(json.dumps(cpu))
    readme = tmp_path / "res" / "README.md"
    readme.write_text(f"# Results\n\nintro\n\n{collect_results.BEGIN}\nold\n{collect_results.END}\n\ntail\n")
    assert collect_results.main(["--readme", str(readme), str(tmp_path / "res")]) == 0
    text = readme.read_text()
    assert "intro" in text and "tail" in text and "old" not in text
    row = next(line for line in text.splitlines() if "LRC-1.5B step, fused: tokens/s" in line)
    assert "30,000" in row and "MET" in row
    assert "not measured" in text  # targets no run has reported (clone_linear and distill_head here)
    for key in common.TARGETS:
        assert common.TARGETS[key][0] in text


def test_gpu_suite_script_parses(tmp_path):
    r = subprocess.run(["bash", "-n", str(TOOLS / "gpu_suite.sh")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(["bash", str(TOOLS / "gpu_suite.sh"), "no_such_stage"], capture_output=True, text=True,
                       cwd=ROOT, env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path / "out"),
                                      "LRC_SUITE_WORK": str(tmp_path / "work")})
    assert r.returncode == 2 and "unknown stage" in r.stdout
    assert not (tmp_path / "out").exists()  # refused before touching anything


def test_gpu_suite_cpu_build_stage_records_cutlass(tmp_path):
    """On a CPU machine `info build` records the CUTLASS check as skipped (with what
    lrc_ext.info said), writes the results and drops the partial archive."""
    env = dict(os.environ, OUT=str(tmp_path / "out"), LRC_SUITE_WORK=str(tmp_path / "work"), PYTHON=sys.executable)
    env.pop("LRC_SUITE_ASSUME_GPU", None)
    r = subprocess.run(["bash", str(TOOLS / "gpu_suite.sh"), "info", "build"], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    steps = {s["step"]: s for s in map(json.loads, (tmp_path / "work" / "steps.jsonl").read_text().splitlines())}
    c = steps["cutlass_built"]
    assert c["status"] == "skipped" and "cutlass_kernels=" in c["note"], c
    info = json.loads((tmp_path / "work" / "lrc_ext_info.json").read_text())
    assert f"cutlass_kernels={str(info['cutlass_kernels']).lower()}" in c["note"]
    out = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert any(n.startswith("results-") and n.endswith(".json") for n in out), out
    assert not any(n.startswith("partial") for n in out), out


# ----------------------------------------------------------------------------- bench_clone_linear's cutlass variant

def test_bench_clone_linear_cutlass_skipped_on_cpu(tmp_path):
    out = tmp_path / "cl.json"
    r = run([BENCH / "bench_clone_linear.py", "--quick", "--device", "cpu", "--no-compile", "--cases", "in:72:fp16",
             "--json", out])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    d = json.loads(out.read_text())
    check_meta(d)
    rows = {row["variant"]: row for row in d["rows"]}
    assert set(rows) == {"eager", "ours", "cutlass", "bare"}
    assert rows["cutlass"]["status"] == "skipped" and "CUDA" in rows["cutlass"]["note"]
    assert rows["ours"]["status"] == "ok" and rows["ours"]["dtype"] == "fp16"
    assert d["config"]["cases"] == ["in:72:fp16"] and not d["errors"]
    t = {x["key"]: x for x in d["targets"]}
    for k in ("clone_linear.cutlass.ratio_vs_bare_gemm", "clone_linear.cutlass.speedup_vs_eager",
              "clone_linear.cutlass.speedup_vs_compile", "clone_linear.cutlass.speedup_vs_ours",
              "clone_linear.cutlass.err_vs_eager"):
        assert k in common.TARGETS and t[k]["value"] is None and "cutlass skipped" in t[k]["note"], t[k]
    assert "| cutlass" in r.stdout and "skipped" in r.stdout


def test_bench_clone_linear_bad_case():
    r = run([BENCH / "bench_clone_linear.py", "--quick", "--device", "cpu", "--no-compile", "--cases", "in:72:fp8"])
    assert r.returncode != 0 and "bad case 'in:72:fp8'" in r.stderr


TINY = dict(n=24, d_t=16, d_s=8, widths=(16,), dtype=torch.float32, extra=())


def test_bench_clone_linear_refuses_untaken_path(monkeypatch):
    """Where the cutlass variant could run but choose() says cuBLAS, the row fails: it is
    never timed as if it were the CUTLASS path."""
    import bench_clone_linear as bcl
    monkeypatch.setattr(bcl, "cutlass_unavailable", lambda dev, dt: None)
    rows = bcl.run_case("cpu", "in", 16, torch.float32, TINY, ("eager", "ours", "cutlass", "bare"), None, 1, 0)
    row = next(r for r in rows if r["variant"] == "cutlass")
    assert row["status"] == "failed" and "choose() picked 'cublas'" in row["error"] and "ms" not in row
    ratios = [bcl.case_ratios(rows, "in", 16, "fp32")]
    t = {x["key"]: x for x in bcl.targets_of(rows, ratios, cuda=True, quick=False, mode=None, n_cases=1,
                                               partial=False)}
    assert "cutlass failed on 1 of 1 cases" in t["clone_linear.cutlass.speedup_vs_eager"]["note"]
    assert t["clone_linear.speedup_vs_eager"].get("note") is None  # ours is unaffected


def test_bench_clone_linear_cutlass_checks_the_kernels_ran(monkeypatch):
    import bench_clone_linear as bcl
    from lrc_ext.ops import _cutlass
    monkeypatch.setattr(_cutlass, "choose", lambda *a: "cutlass")
    x, w, p, t = torch.ones(4, 8), torch.ones(16, 8), torch.ones(8, 8), torch.ones(4, 16)
    monkeypatch.setattr(_cutlass, "forward", lambda *a: None)  # the op would take cuBLAS after all
    assert "did not run the CUTLASS kernels" in bcl.cutlass_not_taken(lambda: _cutlass.forward(), x, w, p, t, "in")
    assert "did not run" in bcl.cutlass_not_taken(lambda: None, x, w, p, t, "in")  # no call at all
    monkeypatch.setattr(_cutlass, "forward", lambda *a: (1, 2, 3))
    assert bcl.cutlass_not_taken(lambda: _cutlass.forward(), x, w, p, t, "in") is None


def test_bench_clone_linear_cutlass_variant_wiring(monkeypatch):
    """With a stand-in for the kernels (the same math in torch), every call of the cutlass
    variant runs under forced(True) and takes the path; ours never does, with LRC_CUTLASS=1
    in the environment too; the cutlass ratios and targets come out."""
    import bench_clone_linear as bcl
    from lrc_ext.ops import _cutlass
    monkeypatch.setenv(_cutlass.ENV, "1")
    monkeypatch.setattr(bcl, "cutlass_unavailable", lambda dev, dt: None)
    monkeypatch.setattr(_cutlass, "choose", lambda *a: "cutlass" if _cutlass._forced else "cublas")
    taken = []

    def fake(x, w_s, bias, target, proj, side_out):
        if _cutlass.choose(x, w_s, bias, target, proj, side_out) != "cutlass":
            return None
        taken.append(1)
        y = x @ w_s.t()
        d = y - (target @ proj if side_out else target)
        return y, d, (d.float() ** 2).mean()
    monkeypatch.setattr(_cutlass, "forward", fake)
    for side in ("in", "out"):
        taken.clear()
        rows = bcl.run_case("cpu", side, 16, torch.float32, TINY, ("eager", "ours", "cutlass", "bare"), None, 2, 1)
        by = {r["variant"]: r for r in rows}
        assert all(r["status"] == "ok" for r in rows), rows
        # the check's call, first call, 1 warm-up, 2 timed, peak memory, saved bytes: all through the path
        assert len(taken) == 7, len(taken)
        assert by["cutlass"]["err_vs_eager"] < 1e-5 and by["ours"]["err_vs_eager"] < 1e-5
        r = bcl.case_ratios(rows, side, 16, "fp32")
        assert r["ours/cutlass"] == by["ours"]["ms"] / by["cutlass"]["ms"]
        assert r["cutlass/bare"] == by["cutlass"]["ms"] / by["bare"]["ms"]
        t = {x["key"]: x for x in bcl.targets_of(rows, [r], cuda=True, quick=False, mode="default", n_cases=1,
                                                   partial=False)}
        assert t["clone_linear.cutlass.ratio_vs_bare_gemm"]["value"] == r["cutlass/bare"]
        assert t["clone_linear.cutlass.ratio_vs_bare_gemm"].get("note") is None
        assert "max-autotune" in t["clone_linear.cutlass.speedup_vs_compile"]["note"]
        assert t["clone_linear.cutlass.err_vs_eager"]["value"] == by["cutlass"]["err_vs_eager"]


def test_bench_accum_commits_tiny(tmp_path):
    """bench_accum_commits against HEAD (its extension built, CPU kernels): both workers report,
    the JSON holds both sides' step times."""
    from _tiny import tiny_teacher, tiny_tokenizer
    tiny_teacher("llama", tie=True).save_pretrained(tmp_path / "t")
    tiny_tokenizer().save_pretrained(tmp_path / "t")
    r = run([BENCH / "bench_accum_commits.py", "--before", "HEAD", "--teacher", tmp_path / "t", "--micro-batch", "2",
             "--seq", "8", "--tokens-per-step", "32", "--steps", "2", "--block", "1", "--d-s", "16", "--threads", "1",
             "--out", tmp_path / "r.json"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "speed-up (now / before, median of pairs)" in r.stdout
    res = json.loads((tmp_path / "r.json").read_text())
    assert len(res["step_s"]["before"]) == len(res["step_s"]["now"]) == 2
    assert res["step_weights"] == {"before": "True", "now": "True"}  # HEAD on both sides: today's step


def test_bench_accum_tiny(tmp_path):
    """bench_accum on a tiny saved teacher: both paths run, the ratio and the FLOP bound print."""
    from _tiny import tiny_teacher, tiny_tokenizer
    tiny_teacher("llama", tie=True).save_pretrained(tmp_path / "t")
    tiny_tokenizer().save_pretrained(tmp_path / "t")
    r = run([BENCH / "bench_accum.py", "--teacher", tmp_path / "t", "--micro-batch", "2", "--seq", "8",
             "--tokens-per-step", "32", "--steps", "1", "--block", "1", "--d-s", "16"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "W_S per step" in r.stdout and "speed-up" in r.stdout
    bound = float(r.stdout.split("the FLOP count allows ")[1].split("x")[0])
    assert bound > 1.0  # accumulation 2: the weight products count half


def test_bench_cpu_gemm_quick(tmp_path):
    """bench_cpu_gemm: both backends time every product; the JSON holds one row a product."""
    from lrc_ext.ops import _cpu_gemm
    if not _cpu_gemm.onednn_available():
        pytest.skip("this torch has no oneDNN linear op")
    r = run([BENCH / "bench_cpu_gemm.py", "--quick", "--json", tmp_path / "g.json"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "onednn_speedup" in r.stdout and "fp32 CPU GEMMs on" in r.stdout
    rows = json.loads((tmp_path / "g.json").read_text())["rows"]
    assert {x["form"] for x in rows} == {"linear", "grad_x", "grad_w"}
    assert all(x["mkl_ms"] > 0 and x["onednn_ms"] > 0 and x["rel_err"] < 1e-5 for x in rows)


def test_bench_accum_compare_gemm_tiny(tmp_path):
    from _tiny import tiny_teacher, tiny_tokenizer
    from lrc_ext.ops import _cpu_gemm
    if not _cpu_gemm.onednn_available():
        pytest.skip("this torch has no oneDNN linear op")
    tiny_teacher("llama", tie=True).save_pretrained(tmp_path / "t")
    tiny_tokenizer().save_pretrained(tmp_path / "t")
    r = run([BENCH / "bench_accum.py", "--teacher", tmp_path / "t", "--micro-batch", "2", "--seq", "8",
             "--tokens-per-step", "32", "--steps", "1", "--block", "1", "--d-s", "16", "--compare", "gemm"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert "fp32 on oneDNN" in r.stdout and "fp32 on MKL" in r.stdout and "speed-up" in r.stdout
