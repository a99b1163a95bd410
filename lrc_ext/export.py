"""`python -m lrc_ext.export CHECKPOINT_DIR OUT_DIR`: a standard Hugging Face model from any
training checkpoint.

CHECKPOINT_DIR is a run directory (its latest checkpoint is used), its checkpoints/ folder,
or one checkpoints/step_NNNNNN directory. The checkpoint records the config it was trained
with, so the teacher is reloaded from its --teacher and nothing else needs to be repeated.
OUT_DIR then loads with ``AutoModelForCausalLM.from_pretrained(OUT_DIR)`` (lrc_ext not needed).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

PROG = "lrc_ext.export"


def export(ckpt_dir, out_dir) -> Path:
    import torch

    from . import checkpoint, config
    from . import teacher as teacher_mod
    from .train import build_model
    try:
        ckpt = checkpoint.find(Path(ckpt_dir))
        params, _, state = checkpoint.load(ckpt)
    except (FileNotFoundError, ValueError) as e:
        raise config.ConfigError(str(e)) from None
    cfg = config.from_dict(state["config"], f"{ckpt}/state.json", saved=True)
    teacher, tok, _ = teacher_mod.load(cfg.teacher)
    model = build_model(cfg, teacher, tok)
    model.load_trainable_state_dict(params)
    with torch.no_grad():
        model.export(Path(out_dir), tokenizer=tok)
    print(f"{ckpt} (step {state['step']}, {state['tokens']:,} tokens) -> {out_dir}: "
          f"{cfg.teacher} student, hidden_size {cfg.student_hidden_size}")
    return Path(out_dir)


def main(argv=None) -> int:
    from .config import ConfigError
    p = argparse.ArgumentParser(prog=f"python -m {PROG}", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint_dir", help="a run directory, its checkpoints/, or a checkpoints/step_N directory")
    p.add_argument("out_dir", help="where to write the Hugging Face model")
    a = p.parse_args(argv)
    try:
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        export(a.checkpoint_dir, a.out_dir)
    except ConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
