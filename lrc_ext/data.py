"""Text in, packed token sequences out, through Hugging Face ``datasets``.

* ``--data`` is a hub dataset name, a local .txt/.jsonl/.json/.parquet/.csv file or a
  directory of them (recursively), or ``pydoc_data.topics`` (Python's own docs, default).
* Documents are tokenised with the teacher's tokenizer, each followed by EOS, joined and
  cut into sequences of ``seq_len`` tokens (the remainder is dropped).
* Held-out split: the first documents of the data, up to ``eval_tokens`` tokens (whole
  documents, so none is half trained on), never seen in training. It does not depend on
  the seed, so runs with different seeds are evaluated on the same text.
* Training order: sequence ``k`` (counting from the start of training) is element
  ``k % n`` of a permutation of the n training sequences drawn from ``(seed, epoch)`` with
  ``epoch = k // n``. The data position is just ``k``, so resuming is exact.
* The trainer reads through ``open_data``: a memory-mapped token store (lrc_ext/store.py),
  prepared from ``--data`` once; ``PackedData`` is the same rule in memory (the reference).
* ``--streaming``: nothing is tokenised up front (lrc_ext/stream.py); resuming restores the
  dataset's own state.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch

from .config import DEFAULT_DATA, ConfigError, one_line

BUILDERS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "json", ".json": "json",
            ".parquet": "parquet", ".csv": "csv"}


class DataError(ConfigError):
    pass


def open_documents(spec: str, text_field: str, split: str, streaming: bool):
    """A datasets.Dataset (or IterableDataset when streaming) with a `text_field` column."""
    import datasets
    datasets.disable_progress_bars()
    if spec == DEFAULT_DATA:
        from pydoc_data.topics import topics
        ds = datasets.Dataset.from_dict({text_field: [topics[k] for k in sorted(topics)]})
        return ds.to_iterable_dataset() if streaming else ds
    path = Path(os.path.expanduser(spec))
    if path.exists():
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*")
                                                     if p.is_file() and p.suffix.lower() in BUILDERS)
        if not files:
            raise DataError(f"--data {spec}: no {'/'.join(sorted(set(BUILDERS)))} files in this directory")
        kinds = {BUILDERS.get(p.suffix.lower()) for p in files}
        if None in kinds:
            raise DataError(f"--data {spec}: unsupported file type {path.suffix!r} "
                            f"(use .txt, .jsonl, .json, .parquet or .csv)")
        if len(kinds) > 1:
            raise DataError(f"--data {spec}: mixes file types {sorted(kinds)}; give one kind per directory")
        kind = kinds.pop()
        extra = {"sample_by": "paragraph"} if kind == "text" else {}
        try:
            ds = datasets.load_dataset(kind, data_files=[str(p) for p in files], split="train",
                                       streaming=streaming, **extra)
        except Exception as e:
            raise DataError(f"--data {spec}: cannot read it as {kind}: {one_line(e)}") from None
    elif spec.startswith((".", "/", "~")) or Path(spec).suffix.lower() in BUILDERS:
        raise DataError(f"--data {spec}: no such file or directory")
    else:
        try:
            ds = datasets.load_dataset(spec, split=split, streaming=streaming)
        except Exception as e:
            raise DataError(f"--data {spec}: not a local file or directory, and the HF hub could not "
                            f"provide it: {one_line(e)}") from None
    cols = ds.column_names if ds.column_names is not None else list(next(iter(ds), {}).keys())
    if text_field not in cols:
        raise DataError(f"--data {spec}: no column {text_field!r} (columns: {', '.join(cols) or 'none'}); "
                        f"pick one with --text-field")
    return ds


def _tokenize_batch(tokenizer, texts: list) -> list[list[int]]:
    texts = [t for t in texts if isinstance(t, str) and t.strip()]
    if not texts:
        return []
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [x + [tokenizer.eos_token_id] for x in ids]


def check_token_ids(ids, vocab: int, where: str):
    """DataError unless every id is in [0, vocab): the one range check of the training data,
    where it is read (host arrays, no device sync), so the forward need not check per call."""
    if len(ids) == 0:
        return
    arr = ids.numpy() if torch.is_tensor(ids) else np.asarray(ids)
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= vocab:
        raise DataError(f"{where}: token id {lo if lo < 0 else hi} is outside the tokenizer's vocabulary [0, {vocab})")


class PackedData:
    """The whole corpus tokenised once (in memory as one int32 array), packed and split."""

    def __init__(self, cfg, tokenizer):
        ds = open_documents(cfg.data, cfg.text_field, cfg.data_split, streaming=False)
        field = cfg.text_field
        ds = ds.select_columns([field]).map(lambda b: {"ids": _tokenize_batch_keep(tokenizer, b[field])},
                                            batched=True, remove_columns=[field])
        col = ds.data.column("ids").combine_chunks()
        flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.int32)
        lens = pc.list_value_length(col).to_numpy(zero_copy_only=False)
        ends = np.cumsum(lens)  # token index where each document (with its EOS) ends
        self.n_docs, self.n_tokens = int((lens > 0).sum()), int(flat.size)
        check_token_ids(flat, len(tokenizer), f"--data {cfg.data}")
        if self.n_tokens == 0:
            raise DataError(f"--data {cfg.data}: empty, no text in column {field!r}")
        self.eval, cut = split_eval(flat, ends, cfg.eval_tokens, cfg.seq_len, cfg.data)
        train = flat[cut:]
        self.n_train = train.size // cfg.seq_len
        if self.n_train == 0:
            raise DataError(f"--data {cfg.data}: only {train.size} tokens left for training after holding out "
                            f"{cut} for evaluation; need at least --seq-len {cfg.seq_len} (lower --eval-tokens "
                            f"or give more text)")
        self.train = torch.from_numpy(train[: self.n_train * cfg.seq_len].reshape(self.n_train, cfg.seq_len).copy())
        self.seq_len, self.seed = cfg.seq_len, cfg.seed
        self._perm = (None, None)

    def _order(self, epoch: int) -> torch.Tensor:
        if self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.n_train, generator=g))
        return self._perm[1]

    def batch(self, pos: int, n: int) -> torch.Tensor:
        """Training sequences pos .. pos+n-1 (int64, (n, seq_len))."""
        idx = [int(self._order(k // self.n_train)[k % self.n_train]) for k in range(pos, pos + n)]
        return self.train[idx].long()

    def describe(self) -> str:
        return (f"{self.n_docs:,} documents, {self.n_tokens:,} tokens: {self.eval.shape[0]} held-out and "
                f"{self.n_train:,} training sequences of {self.seq_len}")


def _tokenize_batch_keep(tokenizer, texts):
    # one output row per input row (empty for blank documents), as datasets.map wants
    out, good = [], _tokenize_batch(tokenizer, texts)
    it = iter(good)
    for t in texts:
        out.append(next(it) if isinstance(t, str) and t.strip() else [])
    return out


def split_eval(flat: np.ndarray, ends: np.ndarray, eval_tokens: int, seq_len: int, name: str):
    """(eval sequences (m, seq_len) int64, index where training text starts)."""
    m = -(-eval_tokens // seq_len) if eval_tokens > 0 else 0
    if m == 0:
        return torch.zeros(0, seq_len, dtype=torch.long), 0
    need = m * seq_len
    k = int(np.searchsorted(ends, need))  # first doc boundary at or after `need` tokens
    if k >= len(ends) or ends[k] >= flat.size:
        raise DataError(f"--data {name}: {flat.size:,} tokens are too few to hold out {need:,} for evaluation "
                        f"and still train; lower --eval-tokens or give more text")
    cut = int(ends[k])
    return torch.from_numpy(flat[:need].reshape(m, seq_len).astype(np.int64)), cut


def build(cfg, tokenizer):
    if tokenizer.eos_token_id is None:
        raise DataError(f"--teacher {cfg.teacher}: its tokenizer has no EOS token to separate documents")
    if cfg.streaming:
        from .stream import StreamedData
        return StreamedData(cfg, tokenizer)
    return PackedData(cfg, tokenizer)


def open_data(cfg, tokenizer, rank: int = 0, world: int = 1, say=None):
    """The trainer's data (eval, batch(pos, n), describe, state_dict / load_state_dict):
    --streaming: a stream (lrc_ext/stream.py); --data STORE (a directory made by
    `python -m lrc_ext.prepare`): that store; any other --data: the store prepared from it in the
    cache, made the first time (under torchrun rank 0 makes it inside the trainer's main_first()
    while the other ranks wait, then they map the same files). See lrc_ext/store.py."""
    from . import store
    if tokenizer.eos_token_id is None:
        raise DataError(f"--teacher {cfg.teacher}: its tokenizer has no EOS token to separate documents")
    if cfg.streaming:
        from .stream import StreamedData
        return StreamedData(cfg, tokenizer)
    path = Path(os.path.expanduser(cfg.data))
    if not store.is_store(path):
        path = store.cache_path(cfg.data, cfg.text_field, cfg.data_split, tokenizer)
        if not store.is_store(path):
            if rank != 0:
                raise DataError(f"rank {rank}: the token store rank 0 prepared ({path}) is not visible here; "
                                f"the ranks need a shared cache (set LRC_CACHE) or a store made beforehand")
            (say or print)(f"data     preparing {cfg.data} into the token store {path} (once; reused after)")
            store.prepare(cfg.data, tokenizer, path, text_field=cfg.text_field, split=cfg.data_split,
                          eval_tokens=cfg.eval_tokens, seq_len=cfg.seq_len, say=say)
    import torch
    pin = torch.cuda.is_available() and cfg.device != "cpu"
    return store.StoreData(store.Store(path), cfg, tokenizer, workers=getattr(cfg, "data_workers", 2), pin_memory=pin)
