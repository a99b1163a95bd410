"""init="pca" (lrc_ext/init.py): exactness at d_S = d_T for every family, better than the paper's
normal init below it, bad input, and the trainer's --init / --calibration-tokens plumbing."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _tiny import D_T, FAMILIES, VOCAB, tiny_teacher

from lrc_ext.model import LowRankClone

QUIET = {"progress": False}


def _ids(b, s, seed):
    return torch.randint(0, VOCAB, (b, s), generator=torch.Generator().manual_seed(seed))


def _kl(z_s, z_t):
    """Mean over tokens of KL(teacher || student)."""
    lt, ls = F.log_softmax(z_t.detach().float(), -1), F.log_softmax(z_s.detach().float(), -1)
    return float((lt.exp() * (lt - ls)).sum(-1).mean())


# Logits of the tiny teachers are O(3); fp32 rounding through the fits (float64 solves, fp32 weights)
# leaves ~5e-6. 5e-5 is 10x that, and any real error (a missed norm weight, the final norm in a wrong
# basis, a bias) is O(0.1..1).
EXACT_ATOL = 5e-5


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", FAMILIES)
def test_pca_at_full_width_reproduces_the_teacher(family, tie):
    teacher = tiny_teacher(family, tie=tie, layers=2)
    # a list of sequences of different lengths: right-padded inside, padding ignored
    cal = [_ids(4, 24, 1), _ids(3, 16, 2)[0], _ids(2, 20, 3)]
    ev = _ids(2, 16, 4)
    z_t = teacher(ev).logits
    for opts in ({}, {"refit": False, "basis": "raw"}, {"basis": "read"}):
        m = LowRankClone(teacher, D_T, init="pca", calibration=cal, init_options={**QUIET, **opts})
        err = (m.student_logits(ev) - z_t).abs().max().item()
        assert err < EXACT_ATOL, (family, tie, opts, err)
        assert m.init_info["tokens"] == 4 * 24 + 16 + 2 * 20 and m.init_info["seconds"] > 0
        assert m.init_info["energy_fraction"] == pytest.approx(1.0)
    # the exported stock model is the same function
    stock = m.build_student_model()
    assert (stock(ev).logits - z_t).abs().max().item() < EXACT_ATOL
    # and the test can fail: the paper's init is nowhere near
    assert (LowRankClone(teacher, D_T).student_logits(ev) - z_t).abs().max().item() > 100 * EXACT_ATOL


def test_pca_full_width_with_attention_mask_and_untied_head_override():
    teacher = tiny_teacher("qwen2", tie=True, layers=2)  # tied teacher, untied student head
    cal, mask = _ids(4, 32, 5), torch.ones(4, 32, dtype=torch.long)
    mask[1, 20:] = 0
    mask[3, 5:] = 0
    ev = _ids(2, 16, 6)
    m = LowRankClone(teacher, D_T, tie_head=False, init="pca", calibration=cal,
                     calibration_attention_mask=mask, init_options=QUIET)
    assert m.p_head is not None and m.init_info["tokens"] == int(mask.sum())
    assert (m.student_logits(ev) - teacher(ev).logits).abs().max().item() < EXACT_ATOL


def low_rank_teacher(family, tie, rank=20, leak=0.05, seed=0):
    """A tiny teacher whose residual stream lives (mostly) in a rank-`rank` subspace, as real
    teachers' streams do: embedding rows and every o/down output projected onto it, plus a leak."""
    torch.manual_seed(seed)
    t = tiny_teacher(family, tie=tie, layers=2)
    Q, _ = torch.linalg.qr(torch.randn(D_T, D_T))
    P = Q[:, :rank] @ Q[:, :rank].T
    keep = P + leak * (torch.eye(D_T) - P)
    with torch.no_grad():
        emb = t.get_input_embeddings().weight
        emb.copy_(emb @ keep)
        for layer in t.model.layers:
            for lin in (layer.self_attn.o_proj, layer.mlp.down_proj):
                lin.weight.copy_(keep @ lin.weight)
    return t


@pytest.mark.parametrize("family,tie", [("llama", True), ("qwen3", False), ("gemma3_text", True), ("phi3", False)])
def test_pca_below_width_is_much_closer_than_normal(family, tie):
    teacher = low_rank_teacher(family, tie)
    cal, ev = _ids(32, 32, 7), _ids(4, 32, 8)
    z_t = teacher(ev).logits
    d_s = 24  # above the stream's rank, well below d_T = 64
    normal = _kl(LowRankClone(teacher, d_s).student_logits(ev), z_t)
    kls = {}
    for name, opts in (("set", {"refit": False}), ("refit", {})):
        m = LowRankClone(teacher, d_s, init="pca", calibration=cal, init_options={**QUIET, **opts})
        kls[name] = _kl(m.student_logits(ev), z_t)
        assert 0.9 < m.init_info["energy_fraction"] < 1.0
    assert normal > 0.1, normal  # the check below is not vacuous
    assert kls["set"] < 0.2 * normal and kls["refit"] < 0.2 * normal, (normal, kls)


# ---- bad input --------------------------------------------------------------------------------
def test_bad_input_errors_name_the_argument():
    teacher = tiny_teacher("llama", layers=1)
    with pytest.raises(ValueError, match="calibration: init='pca' needs"):
        LowRankClone(teacher, 32, init="pca")
    with pytest.raises(ValueError, match=r"calibration: 20 tokens are too few .* student_hidden_size=32"):
        LowRankClone(teacher, 32, init="pca", calibration=_ids(1, 20, 0))
    with pytest.raises(ValueError, match="init must be one of"):
        LowRankClone(teacher, 32, init="svd")
    with pytest.raises(ValueError, match="only used with init='pca'"):
        LowRankClone(teacher, 32, calibration=_ids(2, 32, 0))
    with pytest.raises(ValueError, match="calibration: expected a non-empty 1-D or 2-D integer tensor"):
        LowRankClone(teacher, 32, init="pca", calibration=torch.rand(4, 32))
    with pytest.raises(ValueError, match="input_ids: ids must be in"):
        LowRankClone(teacher, 32, init="pca", calibration=torch.full((4, 32), VOCAB))
    with pytest.raises(ValueError, match="calibration_attention_mask"):
        LowRankClone(teacher, 32, init="pca", calibration=_ids(4, 32, 0),
                     calibration_attention_mask=torch.ones(4, 31, dtype=torch.long))
    with pytest.raises(ValueError, match="basis must be one of"):
        LowRankClone(teacher, 32, init="pca", calibration=_ids(4, 32, 0), init_options={"basis": "pooled"})


# ---- trainer -------------------------------------------------------------------------------------
def test_trainer_flags_validate():
    from lrc_ext import config
    cfg, _ = config.parse(["--init", "pca", "--calibration-tokens", "512", "--student-hidden-size", "64"])
    assert cfg.init == "pca" and cfg.calibration_tokens == 512
    d = config.parse([])[0]  # the lrc_ext recipe: pca from training and teacher-sampled tokens
    assert (d.init, d.calibration_generated) == ("pca", 4096)
    assert (config.parse(["--recipe", "paper"])[0].init, config.parse(["--recipe", "paper"])[0].calibration_generated) \
        == ("normal", 0)
    with pytest.raises(config.ConfigError, match="--calibration-generated must be >= 0"):
        config.parse(["--calibration-generated", "-1"])
    with pytest.raises(config.ConfigError, match="--init must be normal or pca"):
        config.parse(["--init", "svd"])
    with pytest.raises(config.ConfigError, match="--calibration-tokens 32 is too few"):
        config.parse(["--init", "pca", "--calibration-tokens", "32", "--student-hidden-size", "64"])
    assert {"init", "calibration_tokens", "calibration_generated"} <= set(config.RUN_IDENTITY)


class _Data:
    """Stand-in for PackedData: records which training sequences build_model takes."""

    def __init__(self, seq_len):
        self.seq_len, self.calls = seq_len, []

    def batch(self, pos, n):
        self.calls.append((pos, n))
        return _ids(n, self.seq_len, pos)


def test_build_model_calibrates_on_the_first_training_sequences():
    from lrc_ext import config, train
    teacher = tiny_teacher("llama", tie=True, layers=1)
    cfg, _ = config.parse(["--init", "pca", "--calibration-tokens", "100", "--student-hidden-size", "32",
                           "--seq-len", "32", "--calibration-generated", "0"])
    data = _Data(32)
    m = train.build_model(cfg, teacher, None, data=data)
    assert data.calls == [(0, 4)] and m.init_info["init"] == "pca" and m.init_info["tokens"] == 128
    assert train.build_model(cfg, teacher, None).init_info["init"] == "normal"  # resuming: no calibration
    # with teacher samples: the same training rows, plus ceil(70 / 32) = 3 sampled sequences
    cfg, _ = config.parse(["--init", "pca", "--calibration-tokens", "100", "--student-hidden-size", "32",
                           "--seq-len", "32", "--calibration-generated", "70"])
    data = _Data(32)
    m = train.build_model(cfg, teacher, _Tok(bos=None, eos=VOCAB - 1), data=data)
    assert data.calls == [(0, 4)] and m.init_info["tokens"] == 128 + 3 * 32


class _Tok:
    def __init__(self, bos, eos):
        self.bos_token_id, self.eos_token_id = bos, eos


def test_teacher_samples_shape_seed_and_distribution():
    from lrc_ext.init import teacher_samples
    teacher = tiny_teacher("llama", layers=1)
    rng = torch.random.get_rng_state()
    a = teacher_samples(teacher, _Tok(3, 5), 100, 16, seed=1, progress=False)
    assert torch.equal(torch.random.get_rng_state(), rng)  # its own generator: the global RNG untouched
    assert a.shape == (7, 16) and a.dtype == torch.long and (a[:, 0] == 3).all() and int(a.max()) < VOCAB
    assert torch.equal(a, teacher_samples(teacher, _Tok(3, 5), 100, 16, seed=1, progress=False))
    assert not torch.equal(a, teacher_samples(teacher, _Tok(3, 5), 100, 16, seed=2, progress=False))
    assert (teacher_samples(teacher, _Tok(None, 5), 10, 4, progress=False)[:, 0] == 5).all()  # no BOS: EOS
    # rows longer than a sample: samples of `piece` packed end to end, each from BOS
    c = teacher_samples(teacher, _Tok(3, 5), 50, 20, seed=1, progress=False, piece=8)
    assert c.shape == (3, 20) and (c.reshape(-1)[::8] == 3).all() and int((c == 3).sum()) >= 8
    with pytest.raises(ValueError, match="neither a BOS nor an EOS"):
        teacher_samples(teacher, _Tok(None, None), 10, 4, progress=False)
    # the tokens are draws from the teacher's softmax at temperature 1: the empirical distribution
    # of the first sampled token over 20,000 sequences is close to it (total variation; sampling
    # noise ~0.03), and far from uniform (so the check can fail)
    n = 20000
    first = teacher_samples(teacher, _Tok(3, 5), 2 * n, 2, progress=False, batch=n)[:, 1]
    p = torch.softmax(teacher(torch.tensor([[3]])).logits[0, -1].detach().double(), -1)
    emp = torch.bincount(first, minlength=VOCAB).double() / n
    assert 0.5 * float((emp - p).abs().sum()) < 0.06
    assert 0.5 * float((p - 1.0 / VOCAB).abs().sum()) > 0.15


def test_pca_under_bf16_autocast_keeps_fp32_products(monkeypatch):
    """A bf16 teacher under the run's autocast (the default on CPUs with native bf16): the fits'
    products run in fp32 with autocast off, and the student lands as close to the teacher as with
    float64 products (KL within 2%; products left to autocast's bf16 are 17% worse here)."""
    from lrc_ext import init as init_mod
    teacher = tiny_teacher("qwen2", layers=2, dtype=torch.bfloat16)
    cal, ev = _ids(8, 32, 0), _ids(4, 32, 1)
    z_t = teacher(ev).logits

    def kl_after_init():
        torch.manual_seed(0)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            m = LowRankClone(teacher, 40, init="pca", calibration=cal, init_options=QUIET, param_dtype=torch.float32)
            return _kl(m.student_logits(ev), z_t)

    assert init_mod._ct(LowRankClone(teacher, 40, param_dtype=torch.float32)) == torch.float32
    fast = kl_after_init()
    monkeypatch.setattr(init_mod, "_ct", lambda model: torch.float64)
    exact = kl_after_init()
    assert abs(fast - exact) < 0.02 * exact, (fast, exact)


def test_cli_run_with_init_pca(tmp_path):
    from test_train import build_teacher, cli, ok, tiny_docs, write_jsonl
    teacher, data = build_teacher(tmp_path / "t"), write_jsonl(tmp_path / "d.jsonl", tiny_docs())
    out = tmp_path / "run"
    r = ok(cli("--teacher", teacher, "--data", data, "--student-hidden-size", 32, "--seq-len", 32,
               "--micro-batch-size", 2, "--tokens-per-step", 64, "--max-steps", 1, "--eval-tokens", 64,
               "--gen-tokens", 0, "--init", "pca", "--calibration-tokens", 256, "--calibration-generated", 40,
               "--lr", 1e-4, "--output-dir", out))
    assert "init     pca on 256 training tokens + 64 sampled from the teacher" in r.stdout + r.stderr
    assert "note     --lr 0.0001 from a pca start" in r.stdout  # the default lr measured unstable from pca
    assert "init: pca" in (out / "config.yaml").read_text()
