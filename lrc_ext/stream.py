"""--streaming: documents read, shuffled, tokenised and packed on the fly, resumable from the
dataset's own state.

The training stream (the documents after the held-out ones) is read in blocks of ``BLOCK``
documents; each block is shuffled by a permutation drawn from (seed, epoch, block) and its
documents are framed as the teacher's tokenizer frames text (see lrc_ext/store.py) and packed
into sequences of ``seq_len``, the remainder carried over. The position is therefore fully
described by: the ``datasets.IterableDataset.state_dict()`` at the start of the current block,
the block's number, the next document in it and the carried tokens. ``state_dict()`` returns
that (it goes into the checkpoint); ``load_state_dict()`` restores it with the dataset's own
``load_state_dict`` and re-reads one block at most, never the stream up to the position.
(datasets' own shuffle buffer is not used: its contents are lost on resume.)
"""
from __future__ import annotations

from itertools import islice

import numpy as np
import torch

from .data import DataError, check_token_ids, open_documents

BLOCK = 10_000  # documents shuffled together


class StreamedData:
    """The trainer's data interface (eval, batch(pos, n), describe, state_dict) over a stream."""

    def __init__(self, cfg, tokenizer):
        from .store import _frame_batch, framing
        self.cfg, self.field = cfg, cfg.text_field
        self.frame = _frame_batch(tokenizer, framing(tokenizer), cfg.text_field)
        ds = open_documents(cfg.data, cfg.text_field, cfg.data_split, streaming=True).select_columns([self.field])
        # held-out: the first documents of the stream, up to eval_tokens
        buf, n_docs = [], 0
        m = -(-cfg.eval_tokens // cfg.seq_len) if cfg.eval_tokens > 0 else 0
        if m:
            for row in ds:
                n_docs += 1
                buf.extend(self._ids([row[self.field]])[0])
                if len(buf) >= m * cfg.seq_len:
                    break
        if m and len(buf) < m * cfg.seq_len:
            raise DataError(f"--data {cfg.data}: the stream ended after {len(buf):,} tokens, too few to hold out "
                            f"{m * cfg.seq_len:,} for evaluation; lower --eval-tokens")
        self.eval = (torch.tensor(buf[: m * cfg.seq_len], dtype=torch.long).view(m, cfg.seq_len) if m
                     else torch.zeros(0, cfg.seq_len, dtype=torch.long))
        self.vocab = len(tokenizer)
        check_token_ids(self.eval, self.vocab, f"--data {cfg.data}")
        self.skip_docs = n_docs
        self._reset()

    def _ids(self, texts):
        return self.frame({self.field: texts})["ids"]

    def _train_stream(self, epoch: int, state):
        ds = open_documents(self.cfg.data, self.field, self.cfg.data_split, streaming=True)
        ds = ds.select_columns([self.field]).skip(self.skip_docs)
        ds.set_epoch(epoch)  # the starting state applies to its own epoch only
        if state is not None:
            ds.load_state_dict(state)
        return ds

    def _reset(self):
        self.pos, self.epoch, self.block, self.block_state, self.doc, self.carry = 0, 0, 0, None, 0, []
        self._ds = self._it = self._after = None
        self._docs, self._got = [], False

    def _read_block(self):
        """Load the next block (or, after a reset/resume, the block `block_state` starts)."""
        if self._it is None:
            self._ds = self._train_stream(self.epoch, self.block_state)
            self._it = iter(self._ds)
        else:
            self.block, self.block_state = self.block + 1, self._after
        rows = list(islice(self._it, BLOCK))
        if not rows:  # the epoch is over
            if not self._got:
                raise DataError(f"--data {self.cfg.data}: no training text left after the held-out documents "
                                f"(need at least --seq-len {self.cfg.seq_len} tokens)")
            self.epoch, self.block, self.block_state, self._it, self._got = self.epoch + 1, 0, None, None, False
            return self._read_block()
        self._after = self._ds.state_dict()
        ids = self._ids([r[self.field] for r in rows])
        order = np.random.default_rng([self.cfg.seed, self.epoch, self.block]).permutation(len(ids))
        self._docs, self.doc = [ids[i] for i in order if ids[i]], 0

    def _next_seq(self) -> list[int]:
        L = self.cfg.seq_len
        while len(self.carry) < L:
            if self.doc >= len(self._docs):
                self._read_block()
                continue
            self.carry.extend(self._docs[self.doc])
            self.doc += 1
            self._got = True
        seq, self.carry = self.carry[:L], self.carry[L:]
        self.pos += 1
        return seq

    def batch(self, pos: int, n: int) -> torch.Tensor:
        if pos < self.pos:  # cannot rewind a stream: start over
            self._reset()
        while self.pos < pos:  # at most a micro-batch after load_state_dict; from the start without one
            self._next_seq()
        rows = torch.tensor([self._next_seq() for _ in range(n)], dtype=torch.long)
        check_token_ids(rows, self.vocab, f"--data {self.cfg.data}")  # the one range check of these ids
        return rows

    def state_dict(self) -> dict:
        return {"kind": "stream", "pos": self.pos, "epoch": self.epoch, "block": self.block,
                "block_state": self.block_state, "doc": self.doc, "carry": list(self.carry)}

    def load_state_dict(self, state):
        if not state:
            return  # a checkpoint without one: batch() re-reads up to the position
        if state.get("kind") != "stream":
            raise DataError("--resume: the checkpoint's data state is not a stream's (was it made without "
                            "--streaming?)")
        self._reset()
        self.epoch, self.block, self.block_state = state["epoch"], state["block"], state["block_state"]
        if state["pos"]:
            self._read_block()
            self.doc = state["doc"]
            self._got = True
        self.pos, self.carry = state["pos"], list(state["carry"])

    def describe(self) -> str:
        return (f"streaming: {self.eval.shape[0]} held-out sequences of {self.cfg.seq_len} "
                f"(first {self.skip_docs} documents), the rest shuffled in blocks of {BLOCK:,} documents")
