"""lrc_ext.data: loading (jsonl, txt, parquet, directories, pydoc default, streaming), tokenising,
packing with EOS separators, the held-out split, and the seeded, resumable order."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lrc_ext import data
from lrc_ext.config import TrainConfig
from test_train import build_tokenizer, tiny_docs, write_jsonl


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def cfg_for(path, **kw):
    base = dict(data=str(path), seq_len=16, eval_tokens=32, seed=0, micro_batch_size=2)
    base.update(kw)
    return TrainConfig(**base)


def test_packing_eos_separators_and_held_out_split(tok, tmp_path):
    docs = tiny_docs(60)
    path = write_jsonl(tmp_path / "d.jsonl", docs)
    d = data.build(cfg_for(path), tok)
    eos = tok.eos_token_id
    ids = [tok(t, add_special_tokens=False)["input_ids"] + [eos] for t in docs]
    flat = [i for x in ids for i in x]
    assert d.n_docs == 60 and d.n_tokens == len(flat)
    # held out: the first 32 tokens, and training starts at the next document boundary
    assert d.eval.shape == (2, 16) and d.eval.flatten().tolist() == flat[:32]
    ends = np.cumsum([len(x) for x in ids])
    cut = int(ends[np.searchsorted(ends, 32)])
    train = flat[cut:]
    assert d.n_train == len(train) // 16
    rows = {tuple(r) for r in d.train.tolist()}
    assert rows == {tuple(train[i * 16:(i + 1) * 16]) for i in range(d.n_train)}
    assert sum(r.count(eos) for r in d.train.tolist()) > 0  # documents joined with EOS


def test_order_is_a_seeded_permutation_per_epoch_and_resumable(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", tiny_docs(60))
    a = data.build(cfg_for(path, seed=1), tok)
    b = data.build(cfg_for(path, seed=1), tok)
    c = data.build(cfg_for(path, seed=2), tok)
    n = a.n_train
    epoch0 = a.batch(0, n)
    assert torch.equal(epoch0, b.batch(0, n)) and not torch.equal(epoch0, c.batch(0, n))
    assert sorted(map(tuple, epoch0.tolist())) == sorted(map(tuple, a.train.long().tolist()))  # each once
    assert not torch.equal(a.batch(n, n), epoch0)  # reshuffled for epoch 1
    # any position gives the same sequences as reading from the start (resume)
    whole = a.batch(0, 2 * n + 3)
    assert torch.equal(b.batch(n - 2, 5), whole[n - 2:n + 3])
    assert torch.equal(a.eval, c.eval)  # the held-out split does not depend on the seed


def test_text_parquet_and_directory(tok, tmp_path):
    docs = tiny_docs(40)
    (tmp_path / "txt").mkdir()
    (tmp_path / "txt/a.txt").write_text("\n\n".join(docs[:20]))
    (tmp_path / "txt/sub").mkdir()
    (tmp_path / "txt/sub/b.txt").write_text("\n\n".join(docs[20:]))
    d = data.build(cfg_for(tmp_path / "txt"), tok)
    assert d.n_docs == 40  # one document per paragraph, files found recursively
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"body": docs}), tmp_path / "d.parquet")
    p = data.build(cfg_for(tmp_path / "d.parquet", text_field="body"), tok)
    assert p.n_docs == 40
    j = data.build(cfg_for(write_jsonl(tmp_path / "d.jsonl", docs)), tok)
    assert torch.equal(p.train, j.train) and torch.equal(p.eval, j.eval)


def test_default_is_pythons_docs(tok):
    d = data.build(TrainConfig(seq_len=64, eval_tokens=128), tok)
    from pydoc_data.topics import topics
    assert d.n_docs == len(topics) and d.n_train > 100
    first = topics[sorted(topics)[0]]
    assert tok.decode(d.eval[0][:8]) in first


def test_streaming_matches_its_own_resume(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", tiny_docs(80))
    cfg = cfg_for(path, streaming=True)
    s = data.build(cfg, tok)
    assert torch.equal(s.eval, data.build(cfg_for(path), tok).eval)  # same held-out rule
    seqs = s.batch(0, 300)  # more than one epoch
    assert seqs.shape == (300, 16)
    again = data.build(cfg, tok)
    assert torch.equal(again.batch(123, 7), seqs[123:130])
    assert "streaming" in s.describe()


def test_data_errors(tok, tmp_path, monkeypatch):
    with pytest.raises(data.DataError, match="no such file"):
        data.build(cfg_for(tmp_path / "missing.jsonl"), tok)
    (tmp_path / "mixed").mkdir()
    (tmp_path / "mixed/a.txt").write_text("x")
    (tmp_path / "mixed/b.jsonl").write_text(json.dumps({"text": "y"}))
    with pytest.raises(data.DataError, match="mixes file types"):
        data.build(cfg_for(tmp_path / "mixed"), tok)
    with pytest.raises(data.DataError, match="empty"):
        data.build(cfg_for(write_jsonl(tmp_path / "e.jsonl", ["", " "])), tok)
    with pytest.raises(data.DataError, match="too few"):
        data.build(cfg_for(write_jsonl(tmp_path / "s.jsonl", ["one two"])), tok)
    with pytest.raises(data.DataError, match="no column 'text'"):
        data.build(cfg_for(write_jsonl(tmp_path / "c.jsonl", ["a"], field="x")), tok)
    import datasets
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no 20 s of retries without network
    with pytest.raises(data.DataError, match="HF hub could not provide it"):
        data.build(cfg_for("no-such-org-xyz/no-such-dataset-xyz"), tok)
