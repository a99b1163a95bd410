"""The prepared token store: a corpus tokenised once, on disk, read by index through np.memmap.

A store is a directory:

* ``tokens.bin``    every document's tokens, back to back (uint16 when the tokenizer's vocabulary
                    fits, else uint32), framed as the teacher's tokenizer frames text: BOS first
                    where it adds one, EOS after every document;
* ``doc_ends.bin``  uint64: the token index where each document (with its EOS) ends;
* ``manifest.json`` format version, tokenizer identity and hash, framing, the data spec and its
                    content key, counts, file sizes, the held-out split prepare made.

Held-out split and training rows follow the in-memory rule of lrc_ext/data.py exactly: the
first documents, up to ``--eval-tokens``, are held out (cut at a document boundary); training
row ``r`` is the ``seq_len`` tokens from ``train_start + r * seq_len``; sequence ``k`` of training
is row ``perm(seed, k // n)[k % n]``. A row is two integers away from its tokens, so resuming at
any position is O(1) and host memory does not grow with the corpus (the page cache holds what
was read; the permutation costs 8 bytes a row).

Writing is atomic: everything goes into ``<store>.tmp-<pid>`` (fsynced), the manifest last, and
the directory is renamed into place. A killed or failed prepare leaves only a temporary
directory, which the next prepare removes before starting over; a directory without a valid
manifest is never opened as a store.

Testing hook: ``LRC_FAULT_KILL_DURING_PREPARE=1`` makes the process SIGKILL itself after writing
the first chunk of tokens.
"""
from __future__ import annotations

import atexit
import errno
import hashlib
import json
import os
import shutil
import signal
import sys
import time
import weakref
from pathlib import Path

import numpy as np

from .checkpoint import fsync as _fsync
from .data import DataError, check_token_ids, open_documents

FORMAT = 1
KIND = "lrc_ext.token_store"
TOKENS, DOC_ENDS, MANIFEST = "tokens.bin", "doc_ends.bin", "manifest.json"
CHUNK_DOCS = 16_384  # documents per write: bounds prepare's host memory


# ---- identity: tokenizer, framing, content key -------------------------------------------------

def tokenizer_identity(tok) -> dict:
    """Name, vocabulary size and a hash of everything that decides the token ids."""
    h = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # a slow tokenizer: its vocabulary
        h.update(json.dumps(sorted(tok.get_vocab().items())).encode())
    h.update(json.dumps([type(tok).__name__, tok.bos_token_id, tok.eos_token_id, framing(tok)]).encode())
    return {"name": str(getattr(tok, "name_or_path", "") or type(tok).__name__), "class": type(tok).__name__,
            "vocab_size": len(tok), "hash": h.hexdigest()[:16]}


def framing(tok) -> dict:
    """{'bos': id or None, 'eos': id}: BOS where the tokenizer adds one itself, EOS after every document."""
    bos = tok.bos_token_id
    adds = bos is not None and tok("a", add_special_tokens=True)["input_ids"][:1] == [bos]
    return {"bos": bos if adds else None, "eos": tok.eos_token_id}


def describe_framing(fr: dict, tok=None) -> str:
    name = (lambda i: tok.convert_ids_to_tokens(i)) if tok is not None else str
    head = f"{name(fr['bos'])} " if fr.get("bos") is not None else ""
    return f"{head}document {name(fr['eos'])}"


def data_key(spec: str, text_field: str, split: str) -> str:
    """Identity of the text itself: local files by path, size and mtime; the default corpus by its
    contents; a hub set by its datasets fingerprint (read from the datasets cache)."""
    from .config import DEFAULT_DATA
    from .data import BUILDERS
    h = hashlib.sha256(json.dumps([spec, text_field, split]).encode())
    path = Path(os.path.expanduser(spec))
    if spec == DEFAULT_DATA:
        from pydoc_data.topics import topics
        h.update(json.dumps(sorted(topics.items())).encode())
    elif path.exists():
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*")
                                                     if p.is_file() and p.suffix.lower() in BUILDERS)
        for p in files:
            st = p.stat()
            h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    else:
        ds = open_documents(spec, text_field, split, streaming=False)
        h.update(str(getattr(ds, "_fingerprint", "")).encode())
    return h.hexdigest()[:16]


def cache_root() -> Path:
    """Where raw --data is prepared: $LRC_STORE_CACHE, else the lrc_ext cache's stores/."""
    if os.environ.get("LRC_STORE_CACHE"):
        return Path(os.environ["LRC_STORE_CACHE"]).expanduser()
    from .teacher import cache_dir
    return cache_dir() / "stores"


def cache_path(spec: str, text_field: str, split: str, tok) -> Path:
    ident = tokenizer_identity(tok)
    key = hashlib.sha256(json.dumps([FORMAT, data_key(spec, text_field, split), ident["hash"],
                                     framing(tok)]).encode()).hexdigest()[:20]
    return cache_root() / key


def is_store(path) -> bool:
    """A directory prepare made (or one that claims to be, to be checked by Store): it has the
    token file, or a manifest of this kind. A data directory with a manifest.json of its own is not."""
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / TOKENS).exists():
        return True
    try:
        return json.loads((path / MANIFEST).read_text()).get("kind") == KIND
    except (OSError, ValueError, AttributeError):
        return False


# ---- writing -----------------------------------------------------------------------------------

def _frame_batch(tok, fr, field):
    bos, eos = ([fr["bos"]] if fr["bos"] is not None else []), [fr["eos"]]

    def fn(batch):
        texts = batch[field]
        keep = [i for i, t in enumerate(texts) if isinstance(t, str) and t.strip()]
        ids = tok([texts[i] for i in keep], add_special_tokens=False)["input_ids"] if keep else []
        out = [[] for _ in texts]
        for i, x in zip(keep, ids):
            out[i] = bos + x + eos
        return {"ids": out}
    return fn


def _clean_stale(final: Path):
    """Remove temporary directories left by killed prepares of `final` (not by live ones)."""
    for stale in final.parent.glob(f"{final.name}.tmp-*"):
        try:
            pid = int(stale.name.rsplit("-", 1)[1])
            if pid != os.getpid():
                os.kill(pid, 0)
                continue  # another prepare is writing it right now
        except ProcessLookupError:
            pass
        except (ValueError, PermissionError):
            continue
        shutil.rmtree(stale, ignore_errors=True)


def prepare(spec: str, tok, output, *, text_field: str = "text", split: str = "train", num_proc: int = 1,
            eval_tokens: int = 1024, seq_len: int = 128, say=None, progress: bool | None = None) -> dict:
    """Tokenise `spec` with `tok` into a store at `output`. Returns the manifest. If `output` is
    already a store of the same data and tokenizer it is reused as it is. The progress bar
    (stderr) shows when stderr is a terminal unless `progress` says otherwise."""
    progress = sys.stderr.isatty() if progress is None else progress
    say = say or (lambda m: print(m, file=sys.stderr, flush=True))
    final = Path(os.path.expanduser(str(output)))
    if tok.eos_token_id is None:
        raise DataError(f"the tokenizer {tokenizer_identity(tok)['name']} has no EOS token to separate documents")
    key, ident, fr = data_key(spec, text_field, split), tokenizer_identity(tok), framing(tok)
    if final.exists():
        if is_store(final):
            m = read_manifest(final)
            if m.get("data", {}).get("key") == key and m.get("tokenizer", {}).get("hash") == ident["hash"]:
                return m
            raise DataError(f"--output {final}: already holds a store of other data or another tokenizer; "
                            f"remove it or choose another --output")
        if final.is_file() or any(final.iterdir()):
            raise DataError(f"--output {final}: exists and is not a token store; choose another --output")
        final.rmdir()
    final.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale(final)
    tmp = final.parent / f"{final.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        m = _write(spec, tok, tmp, key, ident, fr, text_field, split, num_proc, eval_tokens, seq_len, progress)
        os.rename(tmp, final)
        _fsync(final.parent)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno in (errno.ENOTEMPTY, errno.EEXIST) and is_store(final):
            # another process prepared the same store meanwhile: theirs is as good as ours
            m = read_manifest(final)
            if m.get("data", {}).get("key") == key and m.get("tokenizer", {}).get("hash") == ident["hash"]:
                return m
        if e.errno == errno.ENOSPC:
            where = f" ({e.filename})" if e.filename else ""
            per = 2 if ident["vocab_size"] <= 1 << 16 else 4
            raise DataError(f"disk full while preparing {final}{where}: no store was made; free space (a store "
                            f"needs ~{per} bytes a token) and run it again") from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(f"prepared {final}: {m['n_docs']:,} documents, {m['n_tokens']:,} tokens ({m['dtype']}, "
        f"{m['files'][TOKENS] / 2**20:.1f} MiB) in {m['seconds']:.1f}s, {m['n_tokens'] / max(m['seconds'], 1e-9):,.0f} "
        f"tokens/s")
    return m


def _write(spec, tok, tmp, key, ident, fr, field, split, num_proc, eval_tokens, seq_len, progress) -> dict:
    import datasets
    t0 = time.time()
    ds = open_documents(spec, field, split, streaming=False)
    (datasets.enable_progress_bars if progress else datasets.disable_progress_bars)()
    dtype = np.uint16 if ident["vocab_size"] <= 1 << 16 else np.uint32
    feats = datasets.Features({"ids": datasets.List(datasets.Value("uint32"))})
    ds = ds.select_columns([field]).map(_frame_batch(tok, fr, field), batched=True, remove_columns=[field],
                                        features=feats, num_proc=num_proc if num_proc > 1 else None,
                                        desc="tokenising")
    datasets.disable_progress_bars()
    import pyarrow.compute as pc
    n_tokens = n_docs = max_id = 0
    kill = os.environ.get("LRC_FAULT_KILL_DURING_PREPARE") == "1"
    with open(tmp / TOKENS, "wb") as ft, open(tmp / DOC_ENDS, "wb") as fe:
        for t in ds.with_format("arrow").iter(batch_size=CHUNK_DOCS):
            col = t.column("ids").combine_chunks()
            flat = col.flatten().to_numpy(zero_copy_only=False)
            lens = pc.list_value_length(col).to_numpy(zero_copy_only=False)
            lens = lens[lens > 0].astype(np.uint64)
            if flat.size:
                max_id = max(max_id, int(flat.max()))
                ft.write(flat.astype(dtype).tobytes())
                fe.write((np.cumsum(lens) + np.uint64(n_tokens)).tobytes())
            n_tokens, n_docs = n_tokens + int(flat.size), n_docs + int(lens.size)
            if kill:
                ft.flush()
                os.kill(os.getpid(), signal.SIGKILL)
        ft.flush(), fe.flush()
        os.fsync(ft.fileno()), os.fsync(fe.fileno())
    if n_tokens == 0:
        raise DataError(f"--data {spec}: empty, no text in column {field!r}")
    if max_id >= ident["vocab_size"]:
        raise DataError(f"--data {spec}: the tokenizer produced id {max_id}, outside its vocabulary of "
                        f"{ident['vocab_size']}")
    ends = np.memmap(tmp / DOC_ENDS, dtype=np.uint64, mode="r", shape=(n_docs,))
    train_start, eval_docs = split_point(ends, n_tokens, eval_tokens, seq_len, spec)
    if (n_tokens - train_start) // seq_len == 0:
        raise DataError(too_small(spec, n_tokens - train_start, train_start, seq_len))
    m = {"format": FORMAT, "kind": KIND, "dtype": np.dtype(dtype).name, "n_tokens": n_tokens, "n_docs": n_docs,
         "max_token_id": max_id, "tokenizer": ident, "framing": fr,
         "data": {"spec": spec, "text_field": field, "split": split, "key": key},
         "held_out": {"eval_tokens": eval_tokens, "seq_len": seq_len, "eval_docs": eval_docs,
                      "train_start": train_start},
         "files": {TOKENS: (tmp / TOKENS).stat().st_size, DOC_ENDS: (tmp / DOC_ENDS).stat().st_size},
         "seconds": round(time.time() - t0, 3)}
    (tmp / MANIFEST).write_text(json.dumps(m, indent=1) + "\n")
    _fsync(tmp / MANIFEST)
    _fsync(tmp)
    return m


def split_point(ends, n_tokens: int, eval_tokens: int, seq_len: int, name: str) -> tuple[int, int]:
    """(token index where training starts, held-out documents): the first documents up to
    ceil(eval_tokens / seq_len) whole sequences, cut at the next document boundary."""
    m = -(-eval_tokens // seq_len) if eval_tokens > 0 else 0
    if m == 0:
        return 0, 0
    need = m * seq_len
    k = int(np.searchsorted(ends, need))  # O(log n) page reads on a memmap
    if k >= len(ends) or int(ends[k]) >= n_tokens:
        raise DataError(f"--data {name}: {n_tokens:,} tokens are too few to hold out {need:,} for evaluation "
                        f"and still train; lower --eval-tokens or give more text")
    return int(ends[k]), k + 1


def too_small(name, left, held, seq_len) -> str:
    return (f"--data {name}: only {left} tokens left for training after holding out {held} for evaluation; "
            f"need at least --seq-len {seq_len} (lower --eval-tokens or give more text)")


# ---- reading -----------------------------------------------------------------------------------

def read_manifest(path) -> dict:
    f = Path(path) / MANIFEST
    try:
        m = json.loads(f.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: not a token store (no {MANIFEST}); make one with python -m lrc_ext.prepare") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{f}: corrupt store manifest ({' '.join(str(e).split())[:200]})") from None
    if not isinstance(m, dict) or m.get("kind") != KIND:
        raise DataError(f"{f}: not a token store manifest")
    if m.get("format") != FORMAT:
        raise DataError(f"{f}: store format {m.get('format')!r}, this lrc_ext reads format {FORMAT}; "
                        f"prepare the store again")
    need = ("dtype", "n_tokens", "n_docs", "tokenizer", "framing", "data", "files")
    missing = [k for k in need if k not in m]
    if missing or m["dtype"] not in ("uint16", "uint32"):
        raise DataError(f"{f}: corrupt store manifest (missing or bad: {', '.join(missing) or 'dtype'})")
    return m


class Store:
    """An opened, checked store: `tokens` and `doc_ends` are read-only memory maps."""

    def __init__(self, path):
        self.path = Path(os.path.expanduser(str(path)))
        self.manifest = m = read_manifest(self.path)
        self.dtype = np.dtype(m["dtype"])
        self.n_tokens, self.n_docs = int(m["n_tokens"]), int(m["n_docs"])
        for name, want in ((TOKENS, self.n_tokens * self.dtype.itemsize), (DOC_ENDS, self.n_docs * 8)):
            f = self.path / name
            have = f.stat().st_size if f.is_file() else None
            if have is None:
                raise DataError(f"{f}: missing from the store")
            if have != want or m["files"].get(name) != want:
                raise DataError(f"{f}: truncated or corrupt: {have:,} bytes, the manifest's counts need {want:,}")
        self.tokens = np.memmap(self.path / TOKENS, dtype=self.dtype, mode="r", shape=(self.n_tokens,))
        self.doc_ends = np.memmap(self.path / DOC_ENDS, dtype=np.uint64, mode="r", shape=(self.n_docs,))
        if self.n_docs == 0 or int(self.doc_ends[-1]) != self.n_tokens or int(self.doc_ends[0]) == 0:
            raise DataError(f"{self.path / DOC_ENDS}: corrupt: its document ends do not match the "
                            f"{self.n_tokens:,} tokens of {TOKENS}")

    def check_tokenizer(self, tok, teacher: str):
        want, have = self.manifest["tokenizer"], tokenizer_identity(tok)
        if want.get("hash") != have["hash"]:
            raise DataError(f"--data {self.path}: the store was made with tokenizer {want.get('name')} (hash "
                            f"{want.get('hash')}), but --teacher {teacher} uses {have['name']} (hash {have['hash']}); "
                            f"prepare the store again with this teacher")

    def describe_framing(self, tok=None) -> str:
        return describe_framing(self.manifest["framing"], tok)


# ---- training rows: the trainer's interface, fed by a torch DataLoader ------------------------

class _Rows:
    """Training rows of a store for one (seq_len, held-out cut, seed): sequence k -> tokens.
    Picklable (the memory maps are reopened in each loader worker)."""

    def __init__(self, path, cut: int, n_train: int, seq_len: int, seed: int, vocab: int):
        self.path, self.cut, self.n_train, self.seq_len = path, cut, n_train, seq_len
        self.seed, self.vocab = seed, vocab
        self._tokens, self._perm = None, (None, None)

    def __getstate__(self):
        return {**self.__dict__, "_tokens": None, "_perm": (None, None)}

    def order(self, epoch: int):
        import torch
        if self._perm[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = (epoch, torch.randperm(self.n_train, generator=g).numpy())
        return self._perm[1]

    def read(self, pos: int, n: int):
        """Sequences pos .. pos+n-1 of training, (n, seq_len) int64."""
        import torch
        if self._tokens is None:
            self._tokens = Store(self.path).tokens
        rows = [int(self.order(k // self.n_train)[k % self.n_train]) for k in range(pos, pos + n)]
        out = np.empty((n, self.seq_len), dtype=np.int64)
        for i, r in enumerate(rows):
            s = self.cut + r * self.seq_len
            out[i] = self._tokens[s:s + self.seq_len]
        if n and int(out.max()) >= self.vocab:  # validated where it is read: a corrupt byte is never trained on
            i = int(out.max(axis=1).argmax())
            raise DataError(f"{Path(self.path) / TOKENS}: corrupt: token id {int(out[i].max())} at row {rows[i]} is "
                            f"outside the tokenizer's vocabulary of {self.vocab}")
        return torch.from_numpy(out)


class _MicroBatches:
    """Map-style dataset for the DataLoader: item j = this rank's rows of micro-batch j after `start`."""

    def __init__(self, rows: _Rows, start: int, stride: int, n: int):
        self.rows, self.start, self.stride, self.n = rows, start, stride, n

    def __getitem__(self, j: int):
        return self.rows.read(self.start + j * self.stride, self.n)

    def __len__(self):
        return 1 << 62


def _worker_init(_):
    # Ctrl-C belongs to the trainer (it finishes the step, then checkpoints). SIGTERM (torchrun
    # stopping a job, multiprocessing ending daemonic workers at exit) ends a worker quietly:
    # killed by a signal, the DataLoader would raise in the trainer at any point of a step; a
    # clean exit only surfaces at the next fetch, which the trainer then reads itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))


def _close_ref(ref):
    obj = ref()
    if obj is not None:
        obj.close()


class StoreData:
    """What the trainer reads: `eval` (held-out sequences), `batch(pos, n)`, `describe()`,
    `state_dict()` / `load_state_dict()`. Sequences are read from the memory map; the next
    micro-batches are prefetched by a torch DataLoader (`workers` processes) in the stride the
    trainer reads them (`stride` = the global micro-batch), restarted wherever a read breaks it."""

    def __init__(self, store: Store, cfg, tokenizer, *, workers: int = 2, pin_memory: bool = False, prefetch: int = 4):
        import torch
        self.store, self.seq_len, self.tok = store, cfg.seq_len, tokenizer
        store.check_tokenizer(tokenizer, cfg.teacher)
        self.cut, self.eval_docs = split_point(store.doc_ends, store.n_tokens, cfg.eval_tokens, cfg.seq_len,
                                               str(store.path))
        m = -(-cfg.eval_tokens // cfg.seq_len) if cfg.eval_tokens > 0 else 0
        self.eval = torch.from_numpy(np.asarray(store.tokens[:m * cfg.seq_len], dtype=np.int64).reshape(m, cfg.seq_len))
        # the held-out rows' one range check (the training rows are checked by _Rows.read)
        check_token_ids(self.eval, int(store.manifest["tokenizer"]["vocab_size"]), f"{store.path / TOKENS}: corrupt")
        self.n_train = (store.n_tokens - self.cut) // cfg.seq_len
        if self.n_train == 0:
            raise DataError(too_small(store.path, store.n_tokens - self.cut, self.cut, cfg.seq_len))
        self.n_docs, self.n_tokens = store.n_docs, store.n_tokens
        self.rows = _Rows(str(store.path), self.cut, self.n_train, cfg.seq_len, cfg.seed,
                          int(store.manifest["tokenizer"]["vocab_size"]))
        self.stride, self.workers, self.pin, self.prefetch = cfg.micro_batch_size, workers, pin_memory, prefetch
        self._next, self._it = None, None  # (pos, n) the loader yields next, its iterator
        # end the workers before multiprocessing's own exit hook SIGTERMs them (which the
        # DataLoader's SIGCHLD handler would report as a crash, e.g. on an error exit)
        atexit.register(_close_ref, weakref.ref(self))

    def batch(self, pos: int, n: int):
        """Training sequences pos .. pos+n-1 (int64, (n, seq_len))."""
        if self._it is not None and self._next == (pos, n):
            try:
                x = next(self._it)
                self._next = (pos + self.stride, n)
                return x
            except Exception:  # a worker failed: read here, which raises the one-line error if the data is bad
                self.close()
        x = self.rows.read(pos, n)
        self._start(pos + self.stride, n)
        return x

    def _start(self, pos: int, n: int):
        import torch
        self.close()
        if self.workers == 0:
            return
        ds = _MicroBatches(self.rows, pos, self.stride, n)
        loader = torch.utils.data.DataLoader(
            ds, batch_size=None, sampler=range(1 << 62), num_workers=self.workers, pin_memory=self.pin,
            prefetch_factor=self.prefetch, worker_init_fn=_worker_init,
            generator=torch.Generator())  # its seed draw must not advance the training RNG
        self._it, self._next = iter(loader), (pos, n)

    def close(self):
        if self._it is not None:
            it, self._it = self._it, None
            if hasattr(it, "_shutdown_workers"):
                it._shutdown_workers()

    def state_dict(self) -> dict:
        return {"store": self.store.manifest["data"]["key"], "tokenizer": self.store.manifest["tokenizer"]["hash"]}

    def load_state_dict(self, state):
        if state and state.get("store") not in (None, self.store.manifest["data"]["key"]):
            raise DataError(f"--resume: the data changed since the checkpoint was written (store "
                            f"{state.get('store')}, now {self.store.manifest['data']['key']} at {self.store.path}); "
                            f"resume needs the same text")

    def describe(self) -> str:
        m = self.store.manifest
        return (f"{self.n_docs:,} documents, {self.n_tokens:,} tokens ({m['dtype']} store {self.store.path}, framed "
                f"'{describe_framing(m['framing'], self.tok)}'): {self.eval.shape[0]} held-out and "
                f"{self.n_train:,} training sequences of {self.seq_len}")
