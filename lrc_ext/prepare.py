"""`python -m lrc_ext.prepare`: tokenise a corpus once into a memory-mapped token store.

    python -m lrc_ext.prepare --teacher T --data D --output STORE [--seq-len N] [--num-proc K]
    python -m lrc_ext.train --teacher T --data STORE ...

The store (lrc_ext/store.py) holds the tokens of every document framed as the teacher's
tokenizer frames text, the document boundaries, the held-out split and a manifest naming the
tokenizer. Only the tokenizer of --teacher is loaded, not its weights. Exit codes: 0 done (or
STORE already holds this data prepared with this tokenizer); 2 bad input (one line on stderr).
"""
from __future__ import annotations

import argparse
import sys

from .config import DEFAULT_DATA, DEFAULT_TEACHER, ConfigError

PROG = "lrc_ext.prepare"


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=f"python -m {PROG}", description="Tokenise --data with --teacher's tokenizer into a "
                "memory-mapped token store that `python -m lrc_ext.train --data STORE` trains from.")
    p.add_argument("--teacher", default=DEFAULT_TEACHER, help="the teacher whose tokenizer is used (as for train)")
    p.add_argument("--data", default=DEFAULT_DATA, help="text: a hub dataset, a local .txt/.jsonl/.json/.parquet/"
                   ".csv file or a directory of them (as for train)")
    p.add_argument("--output", required=True, help="the store directory to write (made atomically)")
    p.add_argument("--text-field", default="text", help="column holding the text (default: text)")
    p.add_argument("--data-split", default="train", help="split of a hub dataset (default: train)")
    p.add_argument("--seq-len", type=int, default=128, help="training sequence length the store must hold at "
                   "least one sequence of, after the held-out split (default: 128)")
    p.add_argument("--eval-tokens", type=int, default=1024, help="tokens held out for evaluation (default: 1024)")
    p.add_argument("--num-proc", type=int, default=1, help="tokenising processes (datasets map num_proc)")
    return p


def tokenizer_of(spec: str):
    """The teacher's tokenizer alone (no weights)."""
    from transformers import AutoTokenizer

    from .config import one_line
    from .teacher import TeacherError, resolve
    src = resolve(spec)
    try:
        tok = AutoTokenizer.from_pretrained(src)
    except Exception as e:
        raise TeacherError(f"--teacher {spec}: cannot load its tokenizer: {one_line(e)}") from None
    tok.model_max_length = 1 << 40
    return tok


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        if a.seq_len < 2 or a.eval_tokens < 0 or a.num_proc < 1:
            raise ConfigError(f"--seq-len must be >= 2, --eval-tokens >= 0 and --num-proc >= 1 (got {a.seq_len}, "
                              f"{a.eval_tokens}, {a.num_proc})")
        from transformers.utils import logging as hf_logging

        from . import store
        hf_logging.set_verbosity_error()
        tok = tokenizer_of(a.teacher)
        m = store.prepare(a.data, tok, a.output, text_field=a.text_field, split=a.data_split, num_proc=a.num_proc,
                          eval_tokens=a.eval_tokens, seq_len=a.seq_len, say=print)
        print(f"store    {a.output}: framing '{store.describe_framing(m['framing'], tok)}', tokenizer "
              f"{m['tokenizer']['name']} (hash {m['tokenizer']['hash']}), {m['held_out']['eval_docs']} held-out "
              f"documents; train with: python -m lrc_ext.train --teacher {a.teacher} --data {a.output}")
        return 0
    except ConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted (no store was made; run it again to start over)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
