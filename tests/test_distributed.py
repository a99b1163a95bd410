"""Multi-rank training on the CPU: `torchrun --standalone --nproc-per-node 2 -m lrc_ext.train` with
the gloo backend, DDP and FSDP2, on the tiny random teacher and corpus of test_train.py.

Tolerance: a 2-rank run computes each global micro-batch as two halves (loss terms averaged over
ranks, gradients averaged by DDP / reduce-scattered by FSDP2), so its float32 sums round
differently from one rank's. Every logged number (loss terms, lr, grad norm, held-out terms)
must agree with the 1-rank run within ``rel 1e-5`` (abs 1e-7 for terms near zero, such as the
held-out KL of ~3e-4); measured: ~1e-7 relative on the training terms, 2.3e-5 relative
(6e-9 absolute) on the held-out KL. Resuming on another number of ranks is held to the same
tolerance against the uninterrupted 1-rank run.

Every subprocess has a timeout; each run takes seconds.
"""
from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from test_train import REPO, env, log_records, ok, tiny  # noqa: F401  (tiny: the shared fixture)

RTOL, ATOL = 1e-5, 1e-7
TIMING = ("tok_per_s", "elapsed_s")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def args_for(tiny, out, **over):
    a = {"--teacher": tiny["teacher"], "--data": tiny["data"], "--student-hidden-size": 32, "--seq-len": 32,
         "--micro-batch-size": 2, "--tokens-per-step": 128, "--max-steps": 6, "--eval-every": 3,
         "--save-every": 2, "--keep-checkpoints": 2, "--eval-tokens": 64, "--gen-tokens": 0, "--output-dir": out}
    # fp32: the tolerances here are fp32's (--dtype auto is bf16 autocast on CPUs with native bf16)
    a.setdefault("--dtype", "float32")
    a.setdefault("--recipe", "paper")  # init normal: no calibration, the quickest tiny runs
    a.update(over)
    return [str(x) for k, v in a.items() for x in ((k,) if v is True else (k, v))]


def run1(args, timeout=120, **extra_env):
    return subprocess.run([sys.executable, "-m", "lrc_ext.train", *args], cwd=REPO, env=env(**extra_env),
                          capture_output=True, text=True, timeout=timeout)


def run2(args, timeout=150, **extra_env):
    return subprocess.run([*TORCHRUN, "-m", "lrc_ext.train", *args], cwd=REPO, env=env(**extra_env),
                          capture_output=True, text=True, timeout=timeout)


def assert_close_logs(got, want, upto=None):
    """Same steps and keys; every number within RTOL / ATOL."""
    got, want = log_records(got), log_records(want)
    if upto is not None:
        got, want = [r for r in got if r["step"] <= upto], [r for r in want if r["step"] <= upto]
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for g, w in zip(got, want):
        assert set(g) == set(w), (set(g) ^ set(w))
        for k in w:
            if k not in TIMING:
                assert math.isclose(g[k], w[k], rel_tol=RTOL, abs_tol=ATOL), (w["step"], k, g[k], w[k])


@pytest.fixture(scope="module")
def base1(tiny, tmp_path_factory):
    """The uninterrupted 1-rank run (no parallelism) every multi-rank run must reproduce."""
    out = tmp_path_factory.mktemp("dist") / "base1"
    ok(run1(args_for(tiny, out, **{"--keep-checkpoints": 3})))  # steps 2, 4, 6
    return out


def test_ddp_rank_killed_exits_cleanly_then_resume_on_one_rank(base1, tiny, tmp_path):
    """DDP on 2 ranks from scratch matches 1 rank; rank 1 SIGKILLs itself as step 5 starts: the job
    exits non-zero within the timeout and rank 0 explains; the checkpoint of step 4 (written by 2
    ranks) resumes on 1 rank to the losses of the uninterrupted run."""
    out = tmp_path / "ddp2"
    args = args_for(tiny, out, **{"--parallel": "ddp"})
    t0 = time.time()
    r = run2(args, LRC_TEST_KILL_RANK_AT_STEP="1:5")
    took = time.time() - t0
    assert r.returncode != 0, r.stdout[-2000:]
    assert "another rank died or stopped answering" in r.stderr, r.stderr[-3000:]
    assert "SIGKILL" in r.stderr and "rank      : 1" in r.stderr, r.stderr[-3000:]  # torchrun's report
    assert took < 120
    assert r.stdout.count("plan     ") == 1, r.stdout  # rank 0 alone prints
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step_")) == \
        ["step_000002", "step_000004"]
    assert_close_logs(out, base1, upto=4)  # DDP on 2 ranks = 1 rank, up to the kill
    ok(run1(args_for(tiny, out, **{"--parallel": "none"}) + ["--resume"]))
    assert_close_logs(out, base1)


def test_fsdp_resumes_a_one_rank_checkpoint_on_two_ranks_matches_and_exports(base1, tiny, tmp_path):
    """The 1-rank run's step-2 checkpoint and log in a fresh run directory (--resume drops the
    log's later steps), resumed by 2 ranks with FSDP2: steps 3-6 (losses, held-out evaluation),
    the checkpoints FSDP2 gathers and writes, and the export match the 1-rank run."""
    out = tmp_path / "fsdp2"
    shutil.copytree(base1 / "checkpoints" / "step_000002", out / "checkpoints" / "step_000002")
    shutil.copy(base1 / "log.jsonl", out / "log.jsonl")
    args = args_for(tiny, out, **{"--parallel": "fsdp", "--gen-tokens": 2, "--prompt": "the"})
    r = ok(run2(args + ["--resume"]))
    assert_close_logs(out, base1)
    assert r.stdout.count("plan     ") == 1 and r.stdout.count("export   ") == 1, r.stdout
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("parallel fsdp over 2 ranks (gloo)"))
    t_local, t_full = (float(x) for x in line.split("teacher ")[1].split(" MiB")[0].split(" of "))
    assert t_local < 0.6 * t_full, line  # the teacher is sharded too
    diff = float(r.stdout.split("on a held-out batch: ")[1].split(",")[0])
    assert diff < 1e-4
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(out / "student").config.hidden_size == 32
    # what FSDP2 gathered and rank 0 wrote is what the 1-rank run wrote: full tensors, same values
    from safetensors.torch import load_file
    for f in ("model.safetensors", "optimizer.safetensors"):
        a, b = (load_file(d / "checkpoints/step_000006" / f) for d in (out, base1))
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].shape == b[k].shape, k
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-7, msg=k)


def test_fsdp_fresh_pca_run_fits_on_rank_0_and_matches_one_rank(tiny, tmp_path):
    """The lrc_ext recipe (pca on training and teacher-sampled tokens, clone scales) from scratch
    under --parallel fsdp: rank 0 fits the start on a whole teacher of its own and sends it; every
    rank's training teacher is built on the meta device and holds only its shard; the losses are
    the 1-rank run's."""
    over = {"--recipe": "lrc_ext", "--calibration-tokens": 64, "--calibration-generated": 32, "--max-steps": 2,
            "--eval-every": 0, "--save-every": 0}
    one = tmp_path / "one"
    ok(run1(args_for(tiny, one, **over)))
    two = tmp_path / "two"
    r = ok(run2(args_for(tiny, two, **{**over, "--parallel": "fsdp"})))
    assert r.stdout.count("fsdp     the student's start fitted on rank 0's whole teacher") == 1, r.stdout
    assert r.stdout.count("init     pca on 64 training tokens + 32 sampled") == 1, r.stdout
    assert "teacher built on the meta device, each rank read its shard" in r.stdout, r.stdout
    assert_close_logs(two, one)


def test_bad_parallel_settings_exit_2(tiny, tmp_path, capsys, monkeypatch):
    from test_train import _exit2, main_in_process
    _exit2(main_in_process(args_for(tiny, tmp_path / "o", **{"--parallel": "zero3"}), capsys),
           "--parallel must be auto, none, ddp or fsdp")
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it: checked before joining any group
    _exit2(main_in_process(args_for(tiny, tmp_path / "o", **{"--micro-batch-size": 3}), capsys),
           "--micro-batch-size 3 is the global micro-batch", "2 ranks")
    _exit2(main_in_process(args_for(tiny, tmp_path / "o", **{"--parallel": "none"}), capsys),
           "--parallel none under torchrun")


# ---- the FSDP2 design: one layer pair gathered at a time ---------------------------------------

def _join(rank, world, port):
    """A spawned probe process: the torchrun environment for `rank`, one thread."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)


def _probe(rank, world, port, q):
    _join(rank, world, port)
    from _tiny import tiny_teacher
    from torch.distributed.tensor import DTensor

    from lrc_ext.distributed import Parallel, param_bytes
    from lrc_ext.model import LowRankClone
    par = Parallel("fsdp")
    par.init("cpu", 60)
    try:
        torch.manual_seed(0)
        model = LowRankClone(tiny_teacher("qwen3", layers=3, tie=False), 32)
        par.wrap(model, torch.device("cpu"), find_unused=False)
        tls = list(model.teacher.model.layers)

        def gathered():  # teacher layers whose weights are unsharded right now
            return tuple(i for i, tl in enumerate(tls) if not isinstance(tl.mlp.down_proj.weight, DTensor))
        seen = {"fwd": [], "bwd": set()}
        for i, tl in enumerate(tls):
            tl.register_forward_hook(lambda m, a, o, i=i: seen["fwd"].append((i, gathered())))
        x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(rank))

        def unpack(t):  # every saved tensor read by the backward: which layers are gathered then
            seen["bwd"].add(gathered())
            return t
        for _ in range(2):
            with torch.autograd.graph.saved_tensors_hooks(lambda t: t, unpack):
                out = model(x)
            seen["after_forward"] = gathered()
            out.loss.backward()
            seen["after_backward"] = gathered()
        with par.teacher_alone():
            model.teacher(x)
        seen["after_teacher_alone"] = gathered()
        seen["bytes"] = param_bytes(model)
        from lrc_ext.modules import FusedCloneLinear
        seen["recompute_ws"] = {m.recompute_ws for m in model.modules() if isinstance(m, FusedCloneLinear)}
        if rank == 0:
            q.put({k: (sorted(v) if isinstance(v, set) else v) for k, v in seen.items()})
    finally:
        par.barrier()
        import torch.distributed as dist
        dist.destroy_process_group()


def test_fsdp_gathers_one_teacher_layer_at_a_time():
    import socket

    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_probe, args=(r, 2, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        seen = q.get(timeout=120)
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    # forward: at teacher layer i, exactly layer i is gathered (twice: two iterations, then teacher_alone)
    assert seen["fwd"] == [(i, (i,)) for i in range(3)] * 3
    # backward: never more than one layer pair gathered; each one is, in turn
    assert all(len(g) <= 1 for g in seen["bwd"]) and {g for g in map(tuple, seen["bwd"]) if g} == {(0,), (1,), (2,)}
    assert seen["after_forward"] == seen["after_backward"] == seen["after_teacher_alone"] == ()
    assert seen["recompute_ws"] == [True]  # no layer's W_S kept from its forward to its backward
    b = seen["bytes"]
    assert b["teacher_local"] <= b["teacher_full"] / 2 + 4096 and b["student_local"] <= b["student_full"] / 2 + 4096


# ---- FSDP2 with a meta-device teacher: each rank reads its own shard ------------------------

def _meta_probe(rank, world, port, root, q):
    """Today's path (the whole teacher on every rank, then sharded) and the meta-device path
    (sharded first, each rank reading its rows from the safetensors) on the same tiny teacher:
    the same losses and gradient shards over two optimiser steps."""
    _join(rank, world, port)
    from lrc_ext import teacher as teacher_mod
    from lrc_ext.distributed import Parallel
    from lrc_ext.model import LowRankClone
    par = Parallel("fsdp")
    par.init("cpu", 60)
    try:
        res = {}
        for meta in (False, True):
            t, _, src = teacher_mod.load(root, meta=meta)
            res[f"meta_before_wrap_{meta}"] = all(p.is_meta for p in t.parameters())
            torch.manual_seed(0)
            model = LowRankClone(t, 32, param_dtype=torch.float32)
            par.wrap(model, torch.device("cpu"), find_unused=False)
            if meta:
                par.load_teacher(model.teacher, src, torch.device("cpu"))
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
            x = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(rank))
            losses, grads = [], []
            for _ in range(2):
                out = model(x)
                out.loss.backward()
                losses.append(out.loss.item())
                grads.append([p.grad.to_local().clone() for p in model.parameters() if p.requires_grad])
                opt.step()
                opt.zero_grad()
            res[meta] = (losses, grads)
        same = res[False][0] == res[True][0] and all(
            torch.equal(a, b) for ga, gb in zip(res[False][1], res[True][1]) for a, b in zip(ga, gb))
        q.put((rank, same, res[False][0], res[True][0], res["meta_before_wrap_True"], res["meta_before_wrap_False"]))
    finally:
        par.barrier()
        import torch.distributed as dist
        dist.destroy_process_group()


def test_fsdp_meta_teacher_matches_the_whole_teacher_path(tmp_path):
    import socket

    import torch.multiprocessing as mp
    from _tiny import tiny_teacher
    from test_train import build_tokenizer
    root = tmp_path / "teacher"
    tiny_teacher("llama", layers=3, tie=True).save_pretrained(root)  # tied: the LM head is the embedding
    build_tokenizer().save_pretrained(root)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_meta_probe, args=(r, 2, port, str(root), q)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = [q.get(timeout=120) for _ in procs]
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    for rank, same, want, meta_losses, was_meta, whole_was_meta in got:
        assert was_meta and not whole_was_meta, rank  # nothing of the teacher real before wrapping
        assert same, (rank, want, meta_losses)        # bit for bit: same shards, same order of sums
        assert len(set(want)) == 2                    # the optimiser step changed the loss


def test_fsdp_no_rank_holds_the_whole_teacher_before_wrapping(tiny, tmp_path):
    """A teacher of 65 MB in bf16 (two 65536 x 256 embeddings): under --parallel fsdp the resident
    memory each rank's teacher and student take before wrapping (the trainer measures it from
    /proc/self/statm around building them and reports it) is under half the whole teacher;
    loading the whole teacher (converted from the fp32 file, so resident) takes all of it. An
    fp32 teacher loaded whole is a lazy memory map of the file: resident only where touched."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from test_train import build_tokenizer
    root = tmp_path / "teacher"
    cfg = AutoConfig.for_model("llama", hidden_size=256, intermediate_size=256, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=65536,
                               max_position_embeddings=512, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(root)
    build_tokenizer().save_pretrained(root)
    r = ok(run2(args_for(tiny, tmp_path / "o", **{"--teacher": root, "--parallel": "fsdp", "--max-steps": 1,
                                                     "--eval-tokens": 0, "--save-every": 0,
                                                     "--dtype": "bfloat16"})))
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("memory   host RSS a rank for the teacher"))
    grew = [float(x) for x in line.split(": ")[1].split(" MiB")[0].split(", ")]
    whole = float(line.split("the whole teacher is ")[1].split()[0])
    assert len(grew) == 2 and whole > 60, line  # bf16: 65 MB
    assert all(g < 0.5 * whole for g in grew), line
    assert "peak host RSS per rank up to the end of training" in r.stdout
    assert "host memory trimmed around each layer" in r.stdout  # --host-trim auto: on for FSDP on the CPU
