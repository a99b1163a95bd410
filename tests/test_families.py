"""Family quirks the stock student config cannot express, folded into the exported weights
(Gemma-3: sqrt(d) embedding scale, (1 + w) norms), Phi-3's fused linears, the sliding-window
layers of both, and what is still refused. The identity / fp64 / export / pca guarantees for
these families run in test_model.py and test_init.py with every other family."""
import pytest
import torch

from _tiny import one_thread_per_module  # noqa: F401  (an autouse fixture)
from _tiny import D_T, VOCAB, tiny_teacher

from lrc_ext import LowRankClone
from lrc_ext.init import identity_ as set_identity_

D_S = 32



def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 12), generator=g)
    am = torch.ones_like(ids)
    am[0, :3] = 0  # left padding
    return ids, am


def _logits(model, ids, am):
    return model(input_ids=ids, attention_mask=am, position_ids=(am.cumsum(-1) - 1).clamp(min=0)).logits


def _randomize_norms(model):
    with torch.no_grad():
        for p in model.trainable_parameters():
            if p.dim() == 1:
                p.copy_(0.3 * torch.randn_like(p))


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_gemma3_export_folds_embedding_scale_and_norm_convention(tmp_path, tie):
    from transformers import AutoModelForCausalLM
    teacher = tiny_teacher("gemma3_text", tie=tie)
    model = LowRankClone(teacher, D_S)
    _randomize_norms(model)
    model.export(tmp_path)
    st = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(st).__name__ == "Gemma3ForCausalLM" and st.config.hidden_size == D_S
    assert float(st.model.embed_tokens.embed_scale) == pytest.approx(D_S ** 0.5)  # the stock value at d_S
    k = (D_T / D_S) ** 0.5  # the clone carries sqrt(d_T): folded into the exported embedding
    with torch.no_grad():
        e_s = teacher.get_input_embeddings().weight @ model.p_emb
        torch.testing.assert_close(st.model.embed_tokens.weight, e_s * k, rtol=1e-6, atol=1e-7)
        gain = 1 + model.norm.weight  # the student's norms are Gemma's own class: (1 + w)
        want_final = gain / k if tie else gain  # tied: the head shares the scaled matrix
        torch.testing.assert_close(1 + st.model.norm.weight, want_final, rtol=1e-6, atol=1e-7)
        for n in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                  "post_feedforward_layernorm"):
            assert torch.equal(getattr(st.model.layers[1], n).weight, getattr(model.layers[1], n).weight)
        ids, am = _batch()
        want, got = model.student_logits(ids, am), _logits(st, ids, am)
        torch.testing.assert_close(got[am.bool()], want[am.bool()], atol=1e-5, rtol=0)
        # the fold is not vacuous: the stock scale alone gives other logits
        st.model.embed_tokens.weight.div_(k)
        if tie:
            st.model.norm.weight.copy_(gain - 1)
        assert (_logits(st, ids, am)[am.bool()] - want[am.bool()]).abs().max() > 1e-2


def test_phi3_fused_linears_clone_the_slices_and_export_concatenated(tmp_path):
    from transformers import AutoModelForCausalLM
    from lrc_ext.model import _capture
    teacher = tiny_teacher("phi3")
    model = LowRankClone(teacher, D_S)
    tl, sl = teacher.model.layers[0], model.layers[0]
    qkv, gu = tl.self_attn.qkv_proj.weight, tl.mlp.gate_up_proj.weight
    nq, nkv, ffn = 4 * 16, 2 * 16, teacher.config.intermediate_size
    rows = {"q": qkv[:nq], "k": qkv[nq:nq + nkv], "v": qkv[nq + nkv:], "gate": gu[:ffn], "up": gu[ffn:]}
    for kind, w in rows.items():  # each clone target is its rows of the fused teacher weight
        assert torch.equal(getattr(sl, kind).teacher.weight, w)
    x = torch.randn(2, 5, D_T)
    with torch.no_grad(), _capture(tl, ("q", "v", "gate", "up"), model.layout) as got:
        tl.self_attn.qkv_proj(x), tl.mlp.gate_up_proj(x)
    assert set(got) == {"q", "v", "gate", "up"}
    for kind in got:
        torch.testing.assert_close(got[kind], x @ rows[kind].T)
    model.export(tmp_path)
    st = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(st).__name__ == "Phi3ForCausalLM"
    with torch.no_grad():
        w = st.model.layers[0].self_attn.qkv_proj.weight
        torch.testing.assert_close(w, torch.cat([rows[k] @ getattr(sl, k).proj for k in ("q", "k", "v")]))
        w = st.model.layers[0].mlp.gate_up_proj.weight
        torch.testing.assert_close(w, torch.cat([rows[k] @ getattr(sl, k).proj for k in ("gate", "up")]))


@pytest.mark.parametrize("family,over", [("phi3", {"sliding_window": 4}), ("gemma3_text", {})],
                         ids=["phi3-sliding", "gemma3-sliding-layer"])
def test_sliding_window_layers(tmp_path, family, over):
    """The window is live (12 tokens, window 4): the teacher's logits change without it, and
    the student mirrors it at d_S = d_T and through the export."""
    from transformers import AutoModelForCausalLM
    teacher = tiny_teacher(family, **over)
    ids, am = _batch(1)
    with torch.no_grad():
        z_t = _logits(teacher, ids, am)
        wide = tiny_teacher(family, **{**over, "sliding_window": 64})
        wide.load_state_dict(teacher.state_dict())
        assert (_logits(wide, ids, am) - z_t)[am.bool()].abs().max() > 1e-3
        model = LowRankClone(teacher, D_T)
        set_identity_(model)
        torch.testing.assert_close(model.student_logits(ids, am)[am.bool()], z_t[am.bool()], atol=1e-5, rtol=0)
    small = LowRankClone(teacher, D_S)
    small.export(tmp_path)
    st = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        want = small.student_logits(ids, am)
        torch.testing.assert_close(_logits(st, ids, am)[am.bool()], want[am.bool()], atol=1e-5, rtol=0)


@pytest.mark.parametrize("over,match", [
    ({"final_logit_softcapping": 30.0}, "final_logit_softcapping=30.0 is not supported"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
])
def test_gemma3_refusals(over, match):
    with pytest.raises(ValueError, match=match + r".*Supported: .*gemma3_text, phi3"):
        LowRankClone(tiny_teacher("gemma3_text", **over), D_S)


def test_pca_correct_refused_with_post_norms():
    with pytest.raises(ValueError, match="correct=True does not apply"):
        LowRankClone(tiny_teacher("gemma3_text"), D_S, init="pca", calibration=torch.randint(0, VOCAB, (4, 16)),
                     init_options={"correct": True, "progress": False})


def test_phi3_longrope_width_the_stock_config_refuses():
    # Phi3Config checks longrope factors against hidden_size // heads (not head_dim): only widths
    # keeping that quotient export; the error says so at construction, naming those that work.
    rp = {"rope_type": "longrope", "rope_theta": 1e4, "partial_rotary_factor": 0.75, "short_factor": [1.0] * 6,
          "long_factor": [2.0] * 6, "original_max_position_embeddings": 64}
    teacher = tiny_teacher("phi3", rope_parameters=rp)
    with pytest.raises(ValueError, match=r"student_hidden_size=32 cannot be exported as a phi3.*short_factor.*\[64\]"):
        LowRankClone(teacher, D_S)
    LowRankClone(teacher, D_T).build_student_model()


def test_cli_trains_and_exports_a_gemma3_teacher(tmp_path):
    """The trainer end to end on a saved Gemma-3 text teacher: its own export check reloads the
    student with AutoModelForCausalLM and compares logits with the training-time student."""
    import re
    from test_train import build_tokenizer, cli, ok, tiny_docs, write_jsonl
    tok = build_tokenizer()
    teacher = tiny_teacher("gemma3_text", tie=True, vocab_size=len(tok), eos_token_id=tok.eos_token_id,
                           bos_token_id=None, pad_token_id=None)
    teacher.save_pretrained(tmp_path / "t")
    tok.save_pretrained(tmp_path / "t")
    data = write_jsonl(tmp_path / "d.jsonl", tiny_docs())
    r = ok(cli("--teacher", tmp_path / "t", "--data", data, "--student-hidden-size", 32, "--seq-len", 32,
               "--micro-batch-size", 2, "--tokens-per-step", 64, "--max-steps", 1, "--eval-tokens", 64,
               "--gen-tokens", 0, "--dtype", "float32", "--output-dir", tmp_path / "run"))  # fp32 tolerance
    m = re.search(r"reloaded with AutoModelForCausalLM \(gemma3_text, hidden_size 32, [\d.]+M parameters, the teacher "
                  r"[\d.]+M\); max \|logit difference\| "
                  r"vs the training-time student on a held-out batch: ([^\s,]+), mean KL", r.stdout + r.stderr)
    assert m and float(m.group(1)) < 1e-4, (r.stdout + r.stderr)[-2000:]
