"""lrc_ext.store / lrc_ext.prepare / lrc_ext.stream: the memory-mapped token store against the
in-memory reference (PackedData), exact resume from a store, ranks reading disjoint rows, a
killed prepare, streaming resume from the dataset's own state, and every bad input (exit 2, one
line)."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal

import numpy as np
import pytest
import torch

from lrc_ext import data, store, stream
from lrc_ext.config import TrainConfig
from test_train import (build_tokenizer, cli, losses, main_in_process, ok, tiny, tiny_args, tiny_docs,  # noqa: F401
                        write_jsonl, _exit2)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LRC_STORE_CACHE", str(tmp_path / "stores"))


def cfg_for(path, **kw):
    base = dict(data=str(path), seq_len=16, eval_tokens=32, seed=0, micro_batch_size=4)
    base.update(kw)
    return TrainConfig(**base)


def bos_tokenizer():
    """A tokenizer that adds a BOS itself (as Llama's do)."""
    from tokenizers import processors
    tok = build_tokenizer()
    bos = tok.convert_tokens_to_ids("<unk>")  # any special id works as the BOS here
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="<unk> $A",
                                                                        special_tokens=[("<unk>", bos)])
    tok.bos_token = "<unk>"
    return tok


def test_store_matches_in_memory_reference_and_frames_like_the_tokenizer(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", tiny_docs(60) + ["", "  "])
    cfg = cfg_for(path)
    ref = data.PackedData(cfg, tok)
    d = data.open_data(cfg, tok)  # prepared into the cache
    assert isinstance(d, store.StoreData) and d.n_docs == ref.n_docs and d.n_tokens == ref.n_tokens
    assert torch.equal(d.eval, ref.eval) and d.n_train == ref.n_train
    n = ref.n_train
    for pos, k in ((0, 3), (5, 4), (n - 2, 5), (2 * n + 1, 4)):  # across epochs, any position
        assert torch.equal(d.batch(pos, k), ref.batch(pos, k))
    assert torch.equal(torch.cat([d.batch(4 * i, 4) for i in range(40)]), ref.batch(0, 160))  # the prefetched path
    assert d.store.tokens.dtype == np.uint16 and "document <eos>" in d.describe()
    assert data.open_data(cfg, tok).store.path == d.store.path  # reused, not prepared again
    # a tokenizer that adds BOS: each document is BOS ... EOS
    btok = bos_tokenizer()
    m = store.prepare(str(path), btok, tmp_path / "bos")
    s = store.Store(tmp_path / "bos")
    ends = np.asarray(s.doc_ends, dtype=np.int64)
    starts = np.concatenate([[0], ends[:-1]])
    assert m["framing"]["bos"] == btok.bos_token_id and m["n_docs"] == 60
    assert (np.asarray(s.tokens)[starts] == btok.bos_token_id).all()
    assert (np.asarray(s.tokens)[ends - 1] == btok.eos_token_id).all()
    assert store.describe_framing(m["framing"], btok) == "<unk> document <eos>"


def test_cache_key_follows_the_file_and_the_tokenizer(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", tiny_docs(60))
    a = data.open_data(cfg_for(path), tok).store.path
    write_jsonl(path, tiny_docs(61))
    os.utime(path, ns=(1, 1))  # size and mtime both change
    b = data.open_data(cfg_for(path), tok).store.path
    c = data.open_data(cfg_for(path), bos_tokenizer()).store.path
    assert len({a, b, c}) == 3 and all(store.is_store(p) for p in (a, b, c))


def test_ranks_read_disjoint_rows_and_together_all(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", tiny_docs(80))
    world, mb = 2, 4
    cfg = cfg_for(path, micro_batch_size=mb)
    d0 = data.open_data(cfg, tok)
    n = d0.n_train - d0.n_train % mb  # whole micro-batches of one epoch
    read = {r: [] for r in range(world)}
    for r in range(world):
        d = store.StoreData(d0.store, cfg, tok, workers=0)
        seen = []
        orig = d.rows.read
        d.rows.read = lambda pos, k, orig=orig, seen=seen: (seen.extend(range(pos, pos + k)), orig(pos, k))[1]
        for pos in range(0, n, mb):
            read[r].append(d.batch(pos + r * mb // world, mb // world))
        assert set(seen) == {p + r * mb // world + i for p in range(0, n, mb) for i in range(mb // world)}
    order = d0.rows.order(0)
    rows = {r: {int(order[p + r * 2 + i]) for p in range(0, n, mb) for i in range(2)} for r in range(world)}
    assert not rows[0] & rows[1] and len(rows[0] | rows[1]) == n  # disjoint, and each row once
    together = torch.stack([torch.cat([read[0][i], read[1][i]]) for i in range(n // mb)]).flatten(0, 1)
    assert torch.equal(together, data.PackedData(cfg, tok).batch(0, n))  # = one rank reading everything


def test_exact_resume_from_a_store_is_bit_exact(tiny, tmp_path):
    st = tmp_path / "store"
    r = ok(cli("--teacher", tiny["teacher"], "--data", tiny["data"], "--output", st, "--seq-len", 32,
               "--eval-tokens", 64, module="lrc_ext.prepare"))
    assert "tokens/s" in r.stdout and "MiB" in r.stdout and store.is_store(st)
    ref = tmp_path / "ref"
    ok(cli(*tiny_args(tiny, ref, **{"--data": st, "--data-workers": 0})))
    out = tmp_path / "run"
    args = tiny_args(tiny, out, **{"--data": st})
    assert cli(*args, LRC_FAULT_KILL_DURING_SAVE="6").returncode == -signal.SIGKILL
    r = ok(cli(*args, "--resume"))
    assert "resumed  from" in r.stdout and "training sequences of 32" in r.stdout
    assert losses(out) == losses(ref)  # bit for bit, prefetching workers or none


def _prepare_args(tiny, data_path, out, *extra):
    return ["--teacher", str(tiny["teacher"]), "--data", str(data_path), "--output", str(out), "--seq-len", "32",
            "--eval-tokens", "64", *map(str, extra)]


def _same_store(a, b):
    for f in (store.TOKENS, store.DOC_ENDS):
        assert (a / f).read_bytes() == (b / f).read_bytes()
    ma, mb = (json.loads((p / store.MANIFEST).read_text()) for p in (a, b))
    ma.pop("seconds"), mb.pop("seconds")
    assert ma == mb


def test_killed_or_failed_prepare_then_a_new_one_gives_the_same_store(tiny, tmp_path, monkeypatch, capsys):
    from lrc_ext.prepare import main as prepare_main
    docs = write_jsonl(tmp_path / "d.jsonl", tiny_docs(400))
    assert prepare_main(_prepare_args(tiny, docs, tmp_path / "clean")) == 0
    out = tmp_path / "s"
    r = cli(*_prepare_args(tiny, docs, out), module="lrc_ext.prepare", LRC_FAULT_KILL_DURING_PREPARE="1")
    assert r.returncode == -signal.SIGKILL and not out.exists()
    left = list(tmp_path.glob("s.tmp-*"))
    assert left and (left[0] / store.TOKENS).stat().st_size > 0  # killed mid-write
    # a failure mid-write (the disk fills up): one line, no store, the temporary directory removed
    real = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    assert prepare_main(_prepare_args(tiny, docs, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "disk full while preparing" in err[0] and "no store was made" in err[0]
    assert not out.exists() and not list(tmp_path.glob("s.tmp-*"))  # the killed one's leftovers went too
    monkeypatch.setattr(os, "fsync", real)
    assert prepare_main(_prepare_args(tiny, docs, out)) == 0
    _same_store(out, tmp_path / "clean")
    capsys.readouterr()
    assert prepare_main(_prepare_args(tiny, docs, out)) == 0  # already there: reused
    assert "prepared" not in capsys.readouterr().out


def _damaged(src, dst, how):
    shutil.copytree(src, dst)
    f = dst / (store.MANIFEST if how == "manifest" else store.TOKENS)
    if how == "truncate":
        f.write_bytes(f.read_bytes()[:-6])
    elif how == "manifest":
        f.write_text(f.read_text()[:40])
    else:  # a token id outside the vocabulary in the training rows
        b = bytearray(f.read_bytes())
        b[-64:] = b"\xff" * 64
        f.write_bytes(bytes(b))
    return dst


def test_bad_stores_and_bad_inputs_exit_2_with_one_line(tiny, tmp_path, capsys):
    from lrc_ext.prepare import main as prepare_main
    good = tmp_path / "good"
    assert prepare_main(_prepare_args(tiny, tiny["data"], good)) == 0

    def train(st, **over):
        return main_in_process(tiny_args(tiny, tmp_path / f"run{len(list(tmp_path.iterdir()))}",
                                         **{"--data": st, **over}), capsys)
    _exit2(train(_damaged(good, tmp_path / "t", "truncate")), "t/tokens.bin: truncated or corrupt")
    _exit2(train(_damaged(good, tmp_path / "m", "manifest")), "m/manifest.json: corrupt store manifest")
    _exit2(train(good, **{"--seq-len": 20000, "--eval-tokens": 0}), "need at least --seq-len 20000")
    # another tokenizer than the teacher's: both named
    other = tmp_path / "other"
    store.prepare(str(tiny["data"]), bos_tokenizer(), other)
    _exit2(train(other), "made with tokenizer", "uses", "prepare the store again")

    def prep(*args):
        capsys.readouterr()
        code = prepare_main([str(a) for a in args])
        import subprocess
        return subprocess.CompletedProcess(args, code, *capsys.readouterr())
    base = ["--teacher", tiny["teacher"], "--output"]
    _exit2(prep(*base, tmp_path / "e", "--data", write_jsonl(tmp_path / "e.jsonl", ["", " "])), "empty")
    _exit2(prep(*base, tmp_path / "f", "--data", write_jsonl(tmp_path / "f.jsonl", ["a b"], field="body")),
           "no column 'text'")
    _exit2(prep(*base, tmp_path / "g", "--data", tiny["data"], "--seq-len", 50000, "--eval-tokens", 0),
           "need at least --seq-len 50000")
    _exit2(prep(*base, write_jsonl(tmp_path / "x.jsonl", ["a"]), "--data", tiny["data"]), "not a token store")
    _exit2(prep(*base, other, "--data", tiny["data"]), "already holds a store of other data or another tokenizer")
    for d in ("e", "f", "g"):
        assert not (tmp_path / d).exists()


def test_corrupt_token_is_refused_where_it_is_read(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", tiny_docs(60))
    good = data.open_data(cfg_for(path), tok).store.path
    bad = _damaged(good, tmp_path / "bad", "token")
    for workers in (0, 2):  # read here, and in a loader worker
        d = store.StoreData(store.Store(bad), cfg_for(bad), tok, workers=workers)
        with pytest.raises(data.DataError, match=r"bad/tokens.bin: corrupt: token id 65535 at row \d+") as e:
            for pos in range(0, 3 * d.n_train, 4):
                d.batch(pos, 4)
        assert "\n" not in str(e.value)
        d.close()


def test_streaming_resume_from_the_datasets_state_equals_the_uninterrupted_stream(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(stream, "BLOCK", 16)  # many blocks, several epochs
    path = write_jsonl(tmp_path / "d.jsonl", tiny_docs(80))
    cfg = cfg_for(path, streaming=True)
    whole = data.open_data(cfg, tok).batch(0, 400)
    assert torch.equal(data.open_data(cfg, tok).eval, data.PackedData(cfg_for(path), tok).eval)
    for cut in (1, 37, 150, 333):
        a = data.open_data(cfg, tok)
        a.batch(0, cut - 1)
        a.batch(cut - 1, 1)
        state = json.loads(json.dumps(a.state_dict()))  # as the checkpoint keeps it
        b = data.open_data(cfg, tok)
        reads = []
        orig = b._read_block
        b._read_block = lambda: (reads.append(1), orig())[1]
        b.load_state_dict(state)
        assert len(reads) <= 1  # one block re-read at most, never the stream up to the position
        assert torch.equal(b.batch(cut + 2, 30), whole[cut + 2:cut + 32])  # a rank's offset into the micro-batch
    fresh = data.open_data(cfg, tok)  # no state: still right, by re-reading
    assert torch.equal(fresh.batch(123, 7), whole[123:130])
    with pytest.raises(data.DataError, match="not a stream's"):
        fresh.load_state_dict({"store": "abc"})


def test_streaming_run_killed_mid_save_resumes_bit_exact(tiny, tmp_path):
    """Through the trainer: the checkpoint keeps the stream's own state, and the resumed run
    logs the uninterrupted run's losses bit for bit."""
    ref, out = tmp_path / "ref", tmp_path / "run"
    ok(cli(*tiny_args(tiny, ref, **{"--streaming": True})))
    args = tiny_args(tiny, out, **{"--streaming": True})
    assert cli(*args, LRC_FAULT_KILL_DURING_SAVE="6").returncode == -signal.SIGKILL
    ok(cli(*args, "--resume"))
    state = json.loads((out / "checkpoints/step_000006/state.json").read_text())["data_state"]
    assert state["kind"] == "stream" and state["pos"] == 24  # 6 steps x 2 micro-batches x 2 sequences
    assert losses(out) == losses(ref)
