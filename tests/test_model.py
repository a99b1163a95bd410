"""LowRankClone against independent computations on tiny random teachers of every family.

Run as a script (`python tests/test_model.py`) to print peak activation memory vs layers.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from _tiny import one_thread_per_module  # noqa: F401  (an autouse fixture)
from _tiny import D_T, FAMILIES, VOCAB, randomize_, tiny_config, tiny_teacher, tiny_tokenizer

import lrc_ext
from lrc_ext import LowRankClone
from lrc_ext.init import identity_ as set_identity_

# Written out here (not imported from lrc_ext) so the oracle does not share the model's tables.
LINEARS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "gate": "mlp.gate_proj",
           "up": "mlp.up_proj", "o": "self_attn.o_proj", "down": "mlp.down_proj"}
# Phi-3 fuses them: module -> kinds in row order (split sizes from the config, below).
FUSED = {"self_attn.qkv_proj": ("q", "k", "v"), "mlp.gate_up_proj": ("gate", "up")}
D_S = 32


def fused_sizes(cfg, name):
    if name == "mlp.gate_up_proj":
        return [cfg.intermediate_size] * 2
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return [cfg.num_attention_heads * hd] + [cfg.num_key_value_heads * hd] * 2



def batch(b=2, s=10, lens=(7, 10), left=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (b, s), generator=g)
    am = torch.zeros(b, s, dtype=torch.long)
    for i, n in enumerate(lens):
        am[i, s - n:] = 1 if left else 0
        if not left:
            am[i, :n] = 1
    return ids, am


def positions(am):
    return (am.cumsum(-1) - 1).clamp(min=0)


def run_hooked(model, ids, am):
    """Stock forward; per (layer, kind): (input, output) of each linear."""
    got, hooks = {}, []

    def split(i, name):
        sizes = fused_sizes(model.config, name)
        return lambda m, inp, out: got.update({(i, k): (inp[0], o) for k, o in zip(FUSED[name], out.split(sizes, -1))})
    for i, layer in enumerate(model.model.layers):
        for kind, name in LINEARS.items():
            if hasattr(layer.get_submodule(name.split(".")[0]), name.split(".")[1]):
                hooks.append(layer.get_submodule(name).register_forward_hook(
                    lambda m, inp, out, key=(i, kind): got.__setitem__(key, (inp[0], out))))
        for name in FUSED:
            if hasattr(layer.get_submodule(name.split(".")[0]), name.split(".")[1]):
                hooks.append(layer.get_submodule(name).register_forward_hook(split(i, name)))
    try:
        logits = model(input_ids=ids, attention_mask=am, position_ids=positions(am)).logits
    finally:
        for h in hooks:
            h.remove()
    return logits, got


# ---- identity oracle ------------------------------------------------------------------------
@pytest.mark.parametrize("family,tie,attn", [(f, t, "sdpa") for f in FAMILIES for t in (False, True)] + [
    ("llama", False, "eager"), ("qwen3", True, "eager"), ("gemma3_text", True, "eager"), ("phi3", False, "eager")])
def test_identity_oracle(family, tie, attn):
    teacher = tiny_teacher(family, tie=tie, attn=attn)
    model = LowRankClone(teacher, D_T)
    set_identity_(model)
    ids, am = batch()
    with torch.no_grad():
        z_t = teacher(input_ids=ids, attention_mask=am, position_ids=positions(am)).logits
        z_s = model.student_logits(ids, am)
        out = model(ids, am)
    valid = am.bool()
    torch.testing.assert_close(z_s[valid], z_t[valid], atol=1e-5, rtol=0)
    assert (z_s[~valid] == 0).all()
    for kind, v in out.clone.items():
        assert v.item() < 1e-10, (kind, v.item())
    assert abs(out.kl.item()) < 1e-7
    z_s_full = model.student_logits(ids[1:])  # the unpadded row: every position
    torch.testing.assert_close(z_s_full[0], z_t[1], atol=1e-5, rtol=0)


# ---- every loss term vs a plain fp64 computation -----------------------------------------------
OPTIONS = [
    dict(),
    dict(attn_clone_space="teacher", alpha=0.2),
    dict(tau=2.0, tau_squared=True, kl_reduction="token"),
    dict(use_lm=False, clone_kinds=("gate", "down")),
    dict(use_kl=False, use_clone=False),  # LM only: the teacher is not run
    dict(clone_norm="target"),
    dict(clone_exclude="first", clone_kinds=("q", "o", "down")),
    dict(clone_exclude="outliers", _k=1.05),  # a small k, so that the tiny teacher has outliers
    dict(clone_norm="target", clone_exclude="first,outliers", _k=1.2, attn_clone_space="teacher"),
    dict(clone_norm="target", clone_exclude="first", init="pca"),  # the pca init's walk, then the scales
]


def kept_rows(teacher, ids, am, opts):
    """Per layer: which valid rows the clone terms keep, from the definitions (independent of
    the model's code): position 0 of each sequence out for "first"; for "outliers" the tokens
    whose residual norm at the layer's input is over k x the median over the valid tokens."""
    valid = am.bool().reshape(-1)
    ex = opts.get("clone_exclude", "none")
    with torch.no_grad():
        hs = teacher(input_ids=ids, attention_mask=am, position_ids=positions(am), output_hidden_states=True).hidden_states
    out = []
    for i in range(teacher.config.num_hidden_layers):
        keep = torch.ones(int(valid.sum()), dtype=torch.bool)
        if "first" in ex:
            keep &= positions(am).reshape(-1)[valid] != 0
        if "outliers" in ex:
            norm = hs[i].reshape(-1, hs[i].shape[-1])[valid].norm(dim=-1)
            keep &= norm <= opts["_k"] * norm.median()
        out.append(keep)
    return out


def teacher_scales(teacher, cal, opts):
    """clone_norm "target": per (layer, kind) mean square of the teacher's activation over the
    calibration rows the clone loss keeps."""
    am = torch.ones_like(cal)
    with torch.no_grad():
        _, acts = run_hooked(teacher, cal, am)
    keeps = kept_rows(teacher, cal, am, opts)
    return {(i, k): (acts[(i, k)][1].reshape(-1, acts[(i, k)][1].shape[-1])[keeps[i]] ** 2).mean()
            for i in range(len(keeps)) for k in LINEARS}


@pytest.mark.parametrize("family,tie", [("llama", True), ("qwen2", False), ("qwen3", False), ("mistral", False),
                                        ("gemma3_text", True), ("phi3", False)])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
@pytest.mark.parametrize("fused", [False, True], ids=["reference", "fused"])
def test_losses_match_plain_fp64(family, tie, opts, monkeypatch, fused):
    teacher = tiny_teacher(family, tie=tie, dtype=torch.float64)
    if "_k" in opts:
        monkeypatch.setattr(lrc_ext.model, "OUTLIER_K", opts["_k"])
    kw = {k: v for k, v in opts.items() if not k.startswith("_")}
    cal = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(7))
    if opts.get("clone_norm") == "target" or opts.get("init") == "pca":
        kw["calibration"] = cal
    model = LowRankClone(teacher, D_S, fused=fused, **kw)
    with torch.no_grad():  # norms away from their init so any mix-up shows
        for n, p in model.named_parameters():
            if p.requires_grad and p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    ids, am = batch()
    labels = ids.clone()
    labels[1, 4] = -100  # a user-ignored label
    out = model(ids, am, labels=labels)

    student = model.build_student_model()
    assert student.dtype == torch.float64 and type(student).__module__.startswith("transformers.")
    with torch.no_grad():
        z_t, t_acts = run_hooked(teacher, ids, am)
        z_s, s_acts = run_hooked(student, ids, am)

    tau, alpha = opts.get("tau", 40.0), opts.get("alpha", 0.5)
    kinds = [] if opts.get("use_clone") is False else opts.get("clone_kinds", list(LINEARS))
    valid = am.bool().reshape(-1)
    keeps = kept_rows(teacher, ids, am, opts)
    target_norm = opts.get("clone_norm") == "target"
    scales = teacher_scales(teacher, cal, opts) if target_norm else None
    n_terms = len(model.layers) * len(kinds)

    def mse(a, b, i):
        d = (a - b).reshape(-1, a.shape[-1])[valid][keeps[i]]
        return (d * d).mean()

    clone = {}
    for kind in LINEARS:
        total = torch.zeros((), dtype=torch.float64)
        for i, sl in enumerate(model.layers):
            (x_s, y_s), (_, y_t) = s_acts[(i, kind)], t_acts[(i, kind)]
            p = getattr(sl, kind).proj.detach()
            if kind == "o" and opts.get("attn_clone_space") == "teacher":
                term = mse(x_s @ teacher.model.layers[i].self_attn.o_proj.weight.t(), y_t, i)
            elif kind in ("o", "down"):
                term = mse(y_s, y_t @ p, i)
            else:
                term = mse(y_s, y_t, i)
            total += term / (scales[(i, kind)] * n_terms) if target_norm else term
        clone[kind] = total if kind in kinds else torch.zeros((), dtype=torch.float64)
    if "outliers" in opts.get("clone_exclude", ""):
        assert 0 < sum(int((~k).sum()) for k in keeps) < sum(k.numel() for k in keeps) / 2  # some rows out

    tgt = torch.full_like(labels, -100)
    tgt[:, :-1] = labels[:, 1:]
    tgt[(am == 0) | (torch.cat([am[:, 1:], torch.zeros_like(am[:, :1])], 1) == 0)] = -100
    keep = tgt != -100
    ce = F.cross_entropy(z_s[keep], tgt[keep])
    # the KL over every non-padded position (the last one and the -100 one included)
    pos = am.bool()
    lp_s, lp_t = F.log_softmax(z_s[pos] / tau, -1), F.log_softmax(z_t[pos] / tau, -1)
    kl = (lp_t.exp() * (lp_t - lp_s)).sum()
    kl = kl / (pos.sum() if opts.get("kl_reduction") == "token" else ids.shape[0])
    kl = kl * tau * tau if opts.get("tau_squared") else kl
    lm = ce if opts.get("use_lm", True) else torch.zeros(())
    kl = kl if opts.get("use_kl", True) else torch.zeros(())

    check = lambda got, want: torch.testing.assert_close(got.double(), want.double(), rtol=1e-6, atol=1e-9)
    for kind in LINEARS:
        check(out.clone[kind], clone[kind])
    check(out.lm, lm)
    check(out.kl, kl)
    check(out.loss, lm + kl + alpha * sum(clone.values()))


# ---- gradients: only projections and student norms; the teacher never changes ----------------
@pytest.mark.parametrize("family,tie", [("llama", True), ("qwen2", False), ("qwen3", True), ("gemma3_text", True),
                                        ("phi3", False)])
def test_only_projections_and_norms_train(family, tie):
    teacher = tiny_teacher(family, tie=tie)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    model = LowRankClone(teacher, D_S)
    expected = {"p_emb", "norm.weight"} | ({"p_head"} if not tie else set())
    for i in range(len(model.layers)):
        expected |= {f"layers.{i}.{k}.proj" for k in LINEARS}
        expected |= {f"layers.{i}.{n}.weight" for n in ("input_layernorm", "post_attention_layernorm")}
        if family == "gemma3_text":  # pre/post norms around both blocks
            expected |= {f"layers.{i}.{n}.weight" for n in ("pre_feedforward_layernorm", "post_feedforward_layernorm")}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == expected
    assert model.p_head is None if tie else model.p_head is not model.p_emb
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)  # naive: every parameter
    ids, am = batch()
    for _ in range(3):
        opt.zero_grad()
        model(ids, am).loss.backward()
        with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
        assert with_grad == expected
        assert all(model.get_parameter(n).grad.abs().sum() > 0 for n in expected), "a trainable got no signal"
        opt.step()
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not teacher.training
    model.train()
    assert not teacher.training


def test_trainable_state_dict_round_trip():
    teacher = tiny_teacher("qwen3")
    a, b = LowRankClone(teacher, D_S), LowRankClone(teacher, D_S)
    sd = a.trainable_state_dict()
    assert not any(k.startswith("teacher.") for k in sd)
    b.load_trainable_state_dict(sd)
    ids, _ = batch()
    torch.testing.assert_close(a.student_logits(ids), b.student_logits(ids), atol=0, rtol=0)


# ---- export round trip ----------------------------------------------------------------------
ROUND_TRIPS = [(f, False, None) for f in FAMILIES] + [(f, True, None) for f in FAMILIES] + [
    ("llama", True, False),   # tied teacher, separate P_head: untied export
    ("qwen2", False, True),   # untied teacher, P_head = P_emb: still untied export
    ("gemma3_text", True, False),  # tied Gemma teacher, untied export: only the embedding takes the scale fold
]


@pytest.mark.parametrize("family,tie,tie_head", ROUND_TRIPS)
def test_export_round_trip(tmp_path, family, tie, tie_head):
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
    teacher = tiny_teacher(family, tie=tie)
    model = LowRankClone(teacher, D_S, tie_head=tie_head, tokenizer=tiny_tokenizer())
    with torch.no_grad():
        for p in model.trainable_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.3 * torch.randn_like(p))
    model.export(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    cfg = AutoConfig.from_pretrained(tmp_path)
    tc = teacher.config
    assert cfg.model_type == family and cfg.hidden_size == D_S
    assert cfg.head_dim == teacher.model.layers[0].self_attn.head_dim
    assert cfg.tie_word_embeddings == bool(tie and model.tie_head)
    assert (cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (
        tc.intermediate_size, tc.num_attention_heads, tc.num_key_value_heads, tc.vocab_size)
    assert "auto_map" not in json.loads((tmp_path / "config.json").read_text())
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids, am = batch()
    with torch.no_grad():
        want = model.student_logits(ids, am)
        got = reloaded(input_ids=ids, attention_mask=am, position_ids=positions(am)).logits
    torch.testing.assert_close(got[am.bool()], want[am.bool()], atol=1e-5, rtol=0)
    t0, r0 = teacher.model.layers[0].self_attn, reloaded.model.layers[0].self_attn
    if family == "qwen2":
        assert torch.equal(r0.q_proj.bias, t0.q_proj.bias) and torch.equal(r0.v_proj.bias, t0.v_proj.bias)
    if family == "qwen3":
        assert torch.equal(r0.q_norm.weight, t0.q_norm.weight) and torch.equal(r0.k_norm.weight, t0.k_norm.weight)
    # The tokenizer travels as saved (AutoTokenizer would pick the family's class for this toy vocab).
    assert PreTrainedTokenizerFast.from_pretrained(tmp_path)("w3 w5")["input_ids"] == [3, 5]


def test_export_loads_without_lrc_ext(tmp_path):
    teacher = tiny_teacher("qwen2")
    model = LowRankClone(teacher, D_S)
    model.export(tmp_path / "ckpt")
    ids = torch.randint(0, VOCAB, (1, 9))
    torch.save(ids, tmp_path / "ids.pt")
    # lrc_ext is installed wherever the tests run, so the child blocks it: any import of it
    # (by the checkpoint's config or code) would raise, and the logits are checked after.
    code = ("import sys, torch\n"
            "sys.modules['lrc_ext'] = None\n"
            "from transformers import AutoModelForCausalLM\n"
            "m = AutoModelForCausalLM.from_pretrained('ckpt')\n"
            "assert not any(k.startswith('lrc_ext') and v is not None for k, v in sys.modules.items())\n"
            "torch.save(m(torch.load('ids.pt')).logits, 'logits.pt')\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, check=True, timeout=300)
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), model.student_logits(ids), atol=1e-5, rtol=0)


# ---- padding ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text"])
@pytest.mark.parametrize("left", [True, False])
def test_padding_invariance(family, left):
    teacher = tiny_teacher(family)
    model = LowRankClone(teacher, D_S)
    lens = (7, 10)
    ids, am = batch(lens=lens, left=left)
    out = model(ids, am, return_logits=True)
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.trainable_parameters())
    singles = [model(ids[i:i + 1][am[i:i + 1].bool()][None], return_logits=True) for i in range(2)]
    valid = am.bool()
    for i, s in enumerate(singles):
        torch.testing.assert_close(out.logits[i][valid[i]], s.logits[0], atol=1e-5, rtol=1e-5)
    n = torch.tensor(lens, dtype=torch.float64)
    close = lambda got, want: torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-7)
    close(out.lm, sum((n[i] - 1) * singles[i].lm.double() for i in range(2)) / (n - 1).sum())
    close(out.kl, sum(s.kl.double() for s in singles) / 2)  # batchmean: divided by B
    for kind in LINEARS:
        close(out.clone[kind], sum(n[i] * singles[i].clone[kind].double() for i in range(2)) / n.sum())


# ---- cost shape -------------------------------------------------------------------------------
def test_weights_formed_once_and_embedding_gathered(monkeypatch):
    """Per forward: one clone op per linear (each forms its W_S once), one head op; the embedding
    is gathered then projected, so the only (V, d_S) tensor is the head's W_head_S."""
    from torch.utils._python_dispatch import TorchDispatchMode
    import lrc_ext.model as lm_mod
    calls, resolve = {}, lrc_ext.modules.resolve_op

    def counting(name, fused):
        op = resolve(name, fused)

        def counted(*a, **k):
            calls[name] = calls.get(name, 0) + 1
            return op(*a, **k)
        return counted
    monkeypatch.setattr(lm_mod, "resolve_op", counting)
    monkeypatch.setattr(lrc_ext.modules, "resolve_op", counting)

    class Shapes(TorchDispatchMode):
        seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                self.seen.append(tuple(out.shape))
            return out

    model = LowRankClone(tiny_teacher("llama", layers=3), D_S, fused=False)
    with Shapes() as mode:
        model(*batch())
    assert calls == {"clone_linear": 7 * 3, "distill_head": 1}
    assert mode.seen.count((VOCAB, D_S)) == 1


# ---- fused switch -------------------------------------------------------------------------------
@pytest.mark.parametrize("family,tie", [("llama", True), ("qwen2", False), ("phi3", False)])
def test_fused_matches_reference(family, tie, cpu_gemm):
    """Whatever fused=True resolves to (the reference until the fused ops land) agrees."""
    teacher = tiny_teacher(family, tie=tie)
    ref = LowRankClone(teacher, D_S, fused=False)
    fus = LowRankClone(teacher, D_S, fused=True)
    fus.load_trainable_state_dict(ref.trainable_state_dict())
    ids, am = batch()
    o_r, o_f = ref(ids, am), fus(ids, am)
    close = lambda a, b: torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for a, b in [(o_r.loss, o_f.loss), (o_r.lm, o_f.lm), (o_r.kl, o_f.kl)] + [
            (o_r.clone[k], o_f.clone[k]) for k in LINEARS]:
        close(a, b)
    o_r.loss.backward()
    o_f.loss.backward()
    for (n, a), b in zip(ref.named_parameters(), fus.parameters()):
        if a.requires_grad:
            close(a.grad, b.grad)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_autocast_fp32_masters_bf16_teacher(device):
    """Mixed precision as a trainer runs it: bf16 teacher, fp32 trainables, autocast."""
    teacher = tiny_teacher("qwen3", dtype=torch.bfloat16).to(device)
    outs = []
    for fused in (False, True):
        model = LowRankClone(teacher, D_S, fused=fused)
        if outs:
            model.load_trainable_state_dict(outs[0][0].trainable_state_dict())
        for p in model.trainable_parameters():
            p.data = p.data.float()
        ids, am = (t.to(device) for t in batch())
        with torch.autocast(device, dtype=torch.bfloat16):
            out = model(ids, am)
        out.loss.backward()
        assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss)
        assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.trainable_parameters())
        outs.append((model, out))
    torch.testing.assert_close(outs[0][1].loss, outs[1][1].loss, rtol=5e-2, atol=0)


# ---- CUDA (skipped without a GPU and the CUDA kernels) -------------------------------------------
@pytest.mark.cuda
def test_cuda_matches_cpu():
    teacher = tiny_teacher("qwen2")
    model = LowRankClone(teacher, D_S, fused=False)
    ids, am = batch()
    want = model(ids, am)
    model.cuda()
    for fused in (False, None):
        model.fused = fused
        got = model(ids.cuda(), am.cuda())
        for a, b in [(got.loss, want.loss), (got.lm, want.lm), (got.kl, want.kl)] + [
                (got.clone[k], want.clone[k]) for k in LINEARS]:
            torch.testing.assert_close(a.cpu(), b, rtol=1e-4, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3_text", "phi3"])
def test_cuda_bf16_fused_and_padding(family):
    teacher = tiny_teacher(family, dtype=torch.bfloat16).cuda()
    ref, fus = LowRankClone(teacher, D_S, fused=False), LowRankClone(teacher, D_S, fused=None)
    fus.load_trainable_state_dict(ref.trainable_state_dict())
    ids, am = (t.cuda() for t in batch())
    o_r, o_f = ref(ids, am, return_logits=True), fus(ids, am, return_logits=True)
    for a, b in [(o_r.loss, o_f.loss), (o_r.lm, o_f.lm), (o_r.kl, o_f.kl)] + [
            (o_r.clone[k], o_f.clone[k]) for k in LINEARS]:
        torch.testing.assert_close(a, b, rtol=2e-2, atol=1e-4)
    o_r.loss.backward()
    o_f.loss.backward()
    for a, b in zip(ref.trainable_parameters(), fus.trainable_parameters()):
        assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
        assert F.cosine_similarity(a.grad.float().flatten(), b.grad.float().flatten(), dim=0) > 0.99
    valid = am.bool()
    for i in range(2):  # padded rows vs the sequence alone
        alone = fus.student_logits(ids[i][valid[i]][None])[0]
        torch.testing.assert_close(o_f.logits[i][valid[i]].float(), alone.float(), rtol=3e-2, atol=3e-2)


# ---- bad input ----------------------------------------------------------------------------------
@pytest.mark.parametrize("width", [0, -4, D_T + 1, 1.5, True])
def test_bad_width(width):
    with pytest.raises(ValueError, match="student_hidden_size"):
        LowRankClone(tiny_teacher("llama"), width)


def test_unexportable_width_names_nearest():
    # SmolLM2-style: 9 heads of 64. 288 and 144 export, 192 does not (LlamaConfig wants hidden % heads == 0).
    t = tiny_teacher("llama", layers=1, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
                     head_dim=64, intermediate_size=64)
    for ok in (288, 144):
        LowRankClone(t, ok)
    try:  # older transformers accept any width with head_dim set; then so do we
        type(t.config)(hidden_size=192, num_attention_heads=9, num_key_value_heads=3, head_dim=64)
    except Exception:
        with pytest.raises(ValueError, match=r"student_hidden_size=192.*\[189, 198\]"):
            LowRankClone(t, 192)
    else:
        LowRankClone(t, 192).build_student_model()


@pytest.mark.parametrize("make,match", [
    (lambda: _stock("gpt2"), "model_type 'gpt2' is not supported.*llama, qwen2, qwen3, mistral, gemma3_text, phi3"),
    (lambda: _stock("mixtral"), "model_type 'mixtral' is not supported"),
    (lambda: tiny_teacher("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=0), "sliding-window"),
    (lambda: tiny_teacher("mistral", sliding_window=16), "sliding-window"),
    (lambda: tiny_teacher("llama", attention_bias=True), "bias"),
])
def test_unsupported_teacher(make, match):
    with pytest.raises(ValueError, match=match):
        LowRankClone(make(), D_S)


def test_inactive_sliding_window_is_accepted():
    # A window no layer uses (Qwen: every layer below max_window_layers) or covering every position.
    LowRankClone(tiny_teacher("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=2), D_S)
    LowRankClone(tiny_teacher("mistral", sliding_window=256), D_S)


def _stock(kind):
    from transformers import AutoModelForCausalLM, GPT2Config, MixtralConfig
    cfg = (GPT2Config(n_embd=64, n_layer=1, n_head=4, vocab_size=VOCAB) if kind == "gpt2" else
           MixtralConfig(hidden_size=64, intermediate_size=32, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=VOCAB, num_local_experts=2))
    return AutoModelForCausalLM.from_config(cfg)


def test_bad_inputs():
    model = LowRankClone(tiny_teacher("llama"), D_S)
    ids, am = batch()
    for bad in (ids.clone().fill_(VOCAB), ids.clone().fill_(-1)):
        with pytest.raises(ValueError, match=r"input_ids: ids must be in \[0, 128\)"):
            model(bad)
    with pytest.raises(ValueError, match="input_ids"):
        model(ids.float())
    with pytest.raises(ValueError, match="input_ids"):
        model(ids[0])
    with pytest.raises(ValueError, match="labels: expected shape"):
        model(ids, labels=ids[:, 1:])
    with pytest.raises(ValueError, match="labels: values"):
        model(ids, labels=ids.clone().fill_(VOCAB))
    with pytest.raises(ValueError, match="attention_mask: expected shape"):
        model(ids, attention_mask=am[:, 1:])
    with pytest.raises(ValueError, match="attention_mask: values"):
        model(ids, attention_mask=am * 2)
    with pytest.raises(ValueError, match="attention_mask: every token"):
        model(ids, attention_mask=am * 0)
    with pytest.raises(ValueError, match="clone_kinds"):
        LowRankClone(model.teacher, D_S, clone_kinds=("q", "mlp"))


# ---- memory -------------------------------------------------------------------------------------
def _saved_counter(model):
    """(pack hook, {storage: bytes}) counting what autograd saves, the model's parameters
    (the teacher's included) aside."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(x):
        st = x.untyped_storage()
        if st.data_ptr() not in params:
            saved[st.data_ptr()] = st.nbytes()
        return x
    return pack, saved


def measure_memory(layers, d_t=256, d_s=128, seq=256, batch_size=2, vocab=1024, ffn=None, heads=4, kv_heads=2,
                   fused=None, device="cpu", dtype=torch.float32):
    """Peak bytes allocated during one forward+backward above what was live before it, and bytes
    saved for backward (saved_tensors_hooks, parameters excluded). After a warm-up step, so the
    .grad buffers already exist. CPU: the profiler's allocation events; CUDA: the allocator's peak."""
    from torch.profiler import ProfilerActivity, profile
    torch.manual_seed(0)
    with torch.device(device):
        t = tiny_teacher("llama", layers=layers, hidden_size=d_t, intermediate_size=ffn or 2 * d_t,
                         vocab_size=vocab, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=d_t // heads, dtype=dtype, std=0.02)
    m = LowRankClone(t, d_s, fused=fused)
    ids = torch.randint(0, vocab, (batch_size, seq), device=device)
    m(ids).loss.backward()
    pack, saved = _saved_counter(m)

    def step():
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
            out = m(ids)
        out.loss.backward()

    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base, sum(saved.values())
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    live = peak = 0
    for _, n in sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                       if e.name() == "[memory]"):
        live += n
        peak = max(peak, live)
    return peak, sum(saved.values())


def test_memory_grows_linearly_with_layers():
    res = {L: measure_memory(L, seq=128) for L in (1, 2, 4)}
    for L, (peak, saved) in res.items():
        print(f"layers={L}: peak {peak / 2**20:.2f} MiB, saved for backward {saved / 2**20:.2f} MiB")
    step1, step2 = res[2][1] - res[1][1], (res[4][1] - res[2][1]) / 2
    assert abs(step1 - step2) <= 0.05 * step2  # the same bytes per layer: nothing accumulates


def _saved_bytes(model, ids, am):
    """(output, bytes autograd saved for the backward outside any checkpoint, parameters aside)."""
    pack, saved = _saved_counter(model)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = model(ids, am)
    return out, sum(saved.values())


@pytest.mark.parametrize("family,tie", [("llama", False), ("gemma3_text", True), ("phi3", False)])
@pytest.mark.parametrize("fused", [False, None], ids=["reference", "fused"])
def test_activation_checkpointing_same_losses_and_gradients(family, tie, fused):
    """Checkpointed layer pairs run again in the backward: the same losses and the same gradients
    (fp64, padded batch, target-normalised clone terms with both row exclusions), and far less
    saved for the backward."""
    teacher = tiny_teacher(family, tie=tie, layers=4, dtype=torch.float64)
    cal = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(7))
    model = LowRankClone(teacher, D_S, fused=fused, clone_norm="target", clone_exclude="first,outliers",
                         calibration=cal)
    ids, am = batch()
    res = {}
    for ac in (False, True):
        model.activation_checkpointing = ac
        assert model.activation_checkpointing is ac
        model.zero_grad(set_to_none=True)
        out, saved = _saved_bytes(model, ids, am)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        res[ac] = (out, saved, grads)
    (o0, s0, g0), (o1, s1, g1) = res[False], res[True]
    for a, b in [(o0.loss, o1.loss), (o0.lm, o1.lm), (o0.kl, o1.kl)] + [(o0.clone[k], o1.clone[k]) for k in o0.clone]:
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    assert g0.keys() == g1.keys() and len(g0) == len(list(model.trainable_parameters()))
    for n in g0:
        torch.testing.assert_close(g0[n], g1[n], rtol=1e-10, atol=1e-14, msg=n)
    assert s1 < 0.3 * s0, (s0, s1)  # four layers: what stays is the inputs and the head's
    with torch.no_grad():  # no grad: nothing to checkpoint, the plain forward
        torch.testing.assert_close(model(ids, am).loss, o0.loss, rtol=1e-12, atol=0)


@pytest.mark.parametrize("fused", [False, None])
def test_teacher_targets_die_with_their_layer(fused):
    """Lockstep: when teacher layer i runs, the q/k/v/gate/up targets of earlier layers are freed.
    o/down targets feed MSE(y, t @ P): the reference op keeps t for P's gradient; the fused op
    must not (its gradient term is formed in the forward), so then nothing survives its layer."""
    import weakref
    from lrc_ext.modules import resolve_op
    from lrc_ext.ops.clone_linear import clone_linear_reference
    keeps_out = resolve_op("clone_linear", fused) is clone_linear_reference
    teacher = tiny_teacher("llama", layers=4)
    model = LowRankClone(teacher, D_S, fused=fused)
    refs, alive_at = {}, {}
    for i, layer in enumerate(teacher.model.layers):
        for kind, name in LINEARS.items():
            def hook(m, inp, out, key=(i, kind)):
                if key[1] == "q":
                    alive_at[key[0]] = [k for k, r in refs.items() if r() is not None]
                refs[key] = weakref.ref(out.untyped_storage())  # storages: views count too
            layer.get_submodule(name).register_forward_hook(hook)
    out = model(torch.randint(0, VOCAB, (2, 10)))  # unpadded: targets are views of the outputs
    alive_at["end"] = [k for k, r in refs.items() if r() is not None]
    allowed = ("o", "down") if keeps_out else ()
    for i, alive in alive_at.items():
        assert all(k[1] in allowed for k in alive), (i, alive)
    out.loss.backward()


if __name__ == "__main__":
    # python tests/test_model.py                      # CPU, small
    # python tests/test_model.py cuda                 # GPU, ~Llama-3.2-1B widths, bf16
    dev = sys.argv[1] if len(sys.argv) > 1 else "cpu"
    cfg = (dict(d_t=256, d_s=128, seq=256, batch_size=2, vocab=1024) if dev == "cpu" else
           dict(d_t=2048, d_s=1024, ffn=8192, heads=32, kv_heads=8, seq=2048, batch_size=2, vocab=32768,
                dtype=torch.bfloat16))
    for fused in (False, None):
        print(f"{dev} fused={fused}: llama teacher, {cfg}")
        for L in (1, 2, 4, 8):
            peak, saved = measure_memory(L, fused=fused, device=dev, **cfg)
            print(f"  layers={L}: peak {peak / 2**20:9.2f} MiB   saved for backward {saved / 2**20:9.2f} MiB",
                  flush=True)
