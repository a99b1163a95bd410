"""lrc_ext/teacher.py's whole and sharded loads from safetensors: SafetensorsRows against the
safetensors library, load_whole against from_pretrained, a corrupt file's one-line errors; and
lrc_ext/distributed.py's host-heap trim hooks."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from _tiny import VOCAB, tiny_teacher
from lrc_ext import distributed
from lrc_ext import teacher as teacher_mod
from lrc_ext.model import LowRankClone
from lrc_ext.teacher import SafetensorsRows, TeacherError


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {"w32": torch.randn(7, 5, generator=g), "w16": torch.randn(9, 3, generator=g).half(),
            "wbf": torch.randn(11, 4, 2, generator=g).bfloat16(), "bias": torch.randn(13, generator=g).double(),
            "ids": torch.randint(-5, 5, (6, 2), generator=g), "empty": torch.zeros(0, 4)}


def test_rows_equal_the_safetensors_library(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file
    ts = _tensors()
    path = tmp_path / "m.safetensors"
    save_file(ts, path, metadata={"format": "pt"})
    r = SafetensorsRows(path)
    with safe_open(path, "pt") as f:
        for name, t in ts.items():
            assert r.shape(name) == tuple(t.shape)
            n = t.shape[0]
            for start, count in ((0, n), (1, 2), (n // 2, n), (n, 3)):  # the last: past the end, 0 rows
                got = r.rows(name, start, count)
                want = f.get_slice(name)[start:start + count]
                assert got.dtype == t.dtype and got.shape == want.shape and torch.equal(got, want), (name, start)


def _corrupt(path, how):
    raw = bytearray(path.read_bytes())
    n = int.from_bytes(raw[:8], "little")
    if how == "truncated":
        return bytes(raw[:-10])
    if how == "header size":
        return (len(raw) * 2).to_bytes(8, "little") + bytes(raw[8:])
    if how == "header json":
        return bytes(raw[:8]) + b"{" * n + bytes(raw[8 + n:])
    head = json.loads(raw[8:8 + n])
    head["w32"]["data_offsets"][1] += 4  # offsets that do not match the shape
    text = json.dumps(head).encode()
    return len(text).to_bytes(8, "little") + text + bytes(raw[8 + n:])


@pytest.mark.parametrize("how,match", [("truncated", "ends inside tensor"), ("header size", "unreadable"),
                                       ("header json", "unreadable"), ("offsets", "bad entry")])
def test_corrupt_file_one_line_error(tmp_path, how, match):
    from safetensors.torch import save_file
    path = tmp_path / "m.safetensors"
    save_file({"w32": torch.randn(64, 5), "last": torch.randn(3)}, path)
    data = _corrupt(path, how)
    assert data is not None
    path.write_bytes(data)
    with pytest.raises(TeacherError, match=match) as e:
        r = SafetensorsRows(path, "T")
        for name in ("w32", "last"):
            r.rows(name, 0, r.shape(name)[0])
    assert "\n" not in str(e.value) and "m.safetensors" in str(e.value)


def test_missing_tensor_named(tmp_path):
    from safetensors.torch import save_file
    save_file({"a": torch.zeros(2)}, tmp_path / "ok.safetensors")
    with pytest.raises(TeacherError, match="tensor nope in ok.safetensors: bad entry None"):
        SafetensorsRows(tmp_path / "ok.safetensors").shape("nope")


def _save_teacher(tmp_path, tie=False):
    from test_train import build_tokenizer
    t = tiny_teacher("llama", tie=tie, layers=2)
    root = tmp_path / "teacher"
    t.save_pretrained(root)
    build_tokenizer().save_pretrained(root)
    return root


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_load_whole_equals_from_pretrained(tmp_path, tie, dtype):
    root = _save_teacher(tmp_path, tie)
    a, _, _ = teacher_mod.load(str(root), dtype=dtype)
    b, _, _ = teacher_mod.load_whole(str(root), dtype=dtype)
    assert not b.lrc_meta and not any(p.is_meta for p in b.parameters())
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sb[k].dtype == sa[k].dtype and torch.equal(sa[k], sb[k]), k
    assert (b.get_input_embeddings().weight is b.get_output_embeddings().weight) == tie
    ids = torch.randint(0, VOCAB, (2, 8))
    torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=0, atol=0)


_PEAK = """
import sys, torch
from lrc_ext import teacher as t
def hwm():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) * 1024
import transformers, lrc_ext.families
t.load(sys.argv[1], dtype=torch.bfloat16, meta=True)  # imports and the tokenizer, before the baseline
base = hwm()
getattr(t, sys.argv[2])(sys.argv[1], dtype=torch.bfloat16)
print(hwm() - base)
"""


def test_load_whole_never_holds_the_file_beside_the_copy(tmp_path):
    """An fp32 file (65 MiB, half of it one 32 MiB embedding) loaded in bf16 (33 MiB): load_whole's
    peak growth stays near the bf16 teacher plus a 16 MiB block of rows as stored; from_pretrained
    holds the mapped file beside the converted copy."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from test_train import build_tokenizer
    root = tmp_path / "teacher"
    cfg = AutoConfig.for_model("llama", hidden_size=256, intermediate_size=256, num_hidden_layers=1,
                               num_attention_heads=4, num_key_value_heads=2, vocab_size=16384 * 2,
                               max_position_embeddings=64, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(root)
    build_tokenizer().save_pretrained(root)
    bf16 = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters()) * 2
    grew = {}
    for fn in ("load_whole", "load"):
        r = subprocess.run([sys.executable, "-c", _PEAK, str(root), fn], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        grew[fn] = int(r.stdout.split()[-1])
    print({k: v / 2**20 for k, v in grew.items()}, bf16 / 2**20)
    # measured 2.03x and 3.06x: the bf16 teacher, a block in flight and its predecessor not yet
    # reused by malloc, against the file mapped beside the converted copy
    assert grew["load_whole"] < 2.25 * bf16, grew
    assert grew["load_whole"] < 0.75 * grew["load"], grew


def test_trim_hooks_fire_around_each_layer_and_change_nothing(monkeypatch):
    calls = []
    monkeypatch.setattr(distributed, "_malloc_trim", lambda: (lambda: calls.append(1)))
    teacher = tiny_teacher("llama", layers=3, dtype=torch.float64)
    model = LowRankClone(teacher, 16)
    ids = torch.randint(0, VOCAB, (2, 9))
    model(ids).loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    assert distributed.trim_host_heap_per_layer(model.layers)
    out = model(ids)
    assert len(calls) == 3  # after each pair's forward
    out.loss.backward()
    assert len(calls) == 6  # and as each pair's backward starts
    for n, p in model.named_parameters():
        if p.grad is not None:
            assert torch.equal(p.grad, want[n]), n
    with torch.no_grad():
        model(ids)  # no gradient to hook
    assert len(calls) == 9
    monkeypatch.setattr(distributed, "_malloc_trim", lambda: None)
    assert not distributed.trim_host_heap_per_layer(model.layers)  # no glibc: nothing hooked


@pytest.mark.skipif(__import__("platform").libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_malloc_trim_found_with_glibc():
    trim = distributed._malloc_trim()
    assert callable(trim)
    trim()
