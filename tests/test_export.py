"""The exported student carries the model, nothing of how its teacher was stored.

A teacher that transformers loads straight from a GGUF file (``from_pretrained(dir,
gguf_file=...)``) has a ``quantization_config`` naming that file (and its GGUF name as
``_model_name_or_path``); an export that kept them would reload as "quantized" (``.float()``
raises) and point at a file that is not there.
"""
from __future__ import annotations

import json

import numpy as np
import torch
from _extras import require
from _tiny import D_T, FFN, HEADS, KV_HEADS, VOCAB

from lrc_ext.families import TEACHER_STORAGE
from lrc_ext.model import LowRankClone

D_S, LAYERS = 32, 2


def write_tiny_gguf(path, layers=LAYERS, seed=0):
    """A float32 llama GGUF (no quantised blocks: the loader's path is the same) with random weights."""
    import gguf
    rng = np.random.default_rng(seed)
    hd = D_T // HEADS
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-gguf-teacher")
    w.add_context_length(256)
    w.add_embedding_length(D_T)
    w.add_block_count(layers)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(hd)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(VOCAB)

    def t(name, *shape):
        x = 0.1 * rng.standard_normal(shape) + (1.0 if len(shape) == 1 else 0.0)  # norms around 1
        w.add_tensor(name, x.astype(np.float32))
    t("token_embd.weight", VOCAB, D_T)
    t("output_norm.weight", D_T)
    t("output.weight", VOCAB, D_T)
    for i in range(layers):
        p = f"blk.{i}."
        t(p + "attn_norm.weight", D_T)
        t(p + "ffn_norm.weight", D_T)
        t(p + "attn_q.weight", HEADS * hd, D_T)
        t(p + "attn_k.weight", KV_HEADS * hd, D_T)
        t(p + "attn_v.weight", KV_HEADS * hd, D_T)
        t(p + "attn_output.weight", D_T, HEADS * hd)
        t(p + "ffn_gate.weight", FFN, D_T)
        t(p + "ffn_up.weight", FFN, D_T)
        t(p + "ffn_down.weight", D_T, FFN)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_loaded_teacher_exports_a_plain_student(tmp_path):
    require("gguf")
    require("accelerate")  # transformers' from_pretrained(gguf_file=...) insists on it
    from transformers import AutoModelForCausalLM
    write_tiny_gguf(tmp_path / "teacher.gguf")
    teacher = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="teacher.gguf").eval()
    # The premise: this teacher's config does name its GGUF storage.
    t_cfg = teacher.config.to_dict()
    assert t_cfg["quantization_config"]["gguf_file"] == "teacher.gguf", t_cfg.get("quantization_config")
    assert t_cfg["_model_name_or_path"] == "tiny-gguf-teacher"

    model = LowRankClone(teacher, D_S)
    model.export(tmp_path / "student")
    raw = (tmp_path / "student" / "config.json").read_text()
    saved = json.loads(raw)
    assert not set(saved) & set(TEACHER_STORAGE), sorted(set(saved) & set(TEACHER_STORAGE))
    assert "gguf" not in raw.lower() and str(tmp_path) not in raw, raw
    for extra in (tmp_path / "student").glob("generation_config.json"):
        assert "gguf" not in extra.read_text().lower()
    assert saved["model_type"] == "llama" and saved["hidden_size"] == D_S

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "student")
    assert not getattr(reloaded, "is_quantized", False) and getattr(reloaded, "hf_quantizer", None) is None
    reloaded = reloaded.float().eval()  # raised "not supported for quantized model" before
    ids = torch.randint(0, VOCAB, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model.student_logits(ids), atol=1e-5, rtol=0)
