"""Where the trainer's records go besides log.jsonl: ``--report-to none|tensorboard|wandb``.

Several at once are comma-separated (``--report-to tensorboard,wandb``) or repeated. The
default, ``auto``, is TensorBoard when it is installed and nothing otherwise. Each backend
receives exactly the records written to log.jsonl, every key but ``step`` (the x axis).

* tensorboard: event files in OUTPUT_DIR/tensorboard/ (``pip install tensorboard``);
  a resumed run purges the steps logged after its checkpoint.
* wandb: a Weights & Biases run (``pip install "lrc_ext[wandb]"``) with the resolved config,
  its files in OUTPUT_DIR/wandb/. Project from ``WANDB_PROJECT`` (default ``lrc_ext``), name
  from the output directory; the run id is kept in OUTPUT_DIR/wandb/lrc_run_id so ``--resume``
  continues the same run (wandb's steps only grow: steps a killed run had sent past its last
  checkpoint keep their first values there; log.jsonl holds the resumed ones).
  ``WANDB_MODE=offline`` writes it locally (``wandb sync`` later).

No torch import here: config validation calls ``parse`` before anything heavy loads.
"""
from __future__ import annotations

import importlib.util
import os
import secrets
from pathlib import Path

from .config import ConfigError

BACKENDS = ("tensorboard", "wandb")
NEEDS = {"tensorboard": ("tensorboard", "pip install tensorboard"),
         "wandb": ("wandb", 'pip install "lrc_ext[wandb]" (or pip install wandb)')}


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def parse(value: str) -> list[str]:
    """The backends ``--report-to value`` names (``auto`` resolved), each one installed."""
    names = [n.strip().lower() for n in str(value).split(",") if n.strip()]
    bad = [n for n in names if n not in ("auto", "none", *BACKENDS)]
    if bad or not names:
        raise ConfigError(f"--report-to must be auto, none, or a comma-separated list of {', '.join(BACKENDS)}; "
                          f"got {value!r}")
    if ("none" in names or "auto" in names) and len(set(names)) > 1:
        raise ConfigError(f"--report-to {value}: {'none' if 'none' in names else 'auto'} cannot be combined "
                          f"with other backends")
    if names == ["none"]:
        return []
    if names == ["auto"]:
        return ["tensorboard"] if _installed("tensorboard") else []
    for n in dict.fromkeys(names):
        module, how = NEEDS[n]
        if not _installed(module):
            raise ConfigError(f"--report-to {n}: the {module} package is not installed; {how}, "
                              f"or pass --report-to none")
    return list(dict.fromkeys(names))


class TensorBoard:
    def __init__(self, out: Path, step: int, config: dict):
        from torch.utils.tensorboard import SummaryWriter
        self.w = SummaryWriter(str(out / "tensorboard"), purge_step=step + 1 if step else None)

    def log(self, rec: dict, step: int):
        for k, v in rec.items():
            if k != "step":
                self.w.add_scalar(k, v, step)

    def close(self):
        self.w.close()


class Wandb:
    def __init__(self, out: Path, step: int, config: dict):
        import wandb
        root = out / "wandb"
        root.mkdir(parents=True, exist_ok=True)
        id_file = root / "lrc_run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "lrc_ext", name=out.name, dir=str(out),
                              config=config, id=run_id, resume="allow")

    def log(self, rec: dict, step: int):
        self.run.log({k: v for k, v in rec.items() if k != "step"}, step=step)

    def close(self):
        self.run.finish()


CLASSES = {"tensorboard": TensorBoard, "wandb": Wandb}


class Loggers:
    """Fan-out: every record to every backend; close() closes them all."""

    def __init__(self, backends):
        self.backends = list(backends)

    def log(self, rec: dict, step: int):
        for b in self.backends:
            b.log(rec, step)

    def close(self):
        for b in self.backends:
            b.close()
        self.backends = []


def open_all(report_to: str, out: Path, step: int, config: dict) -> Loggers:
    """The backends of ``--report-to`` for a run in `out` starting after `step` (0: fresh)."""
    opened = []
    try:
        for name in parse(report_to):
            opened.append(CLASSES[name](Path(out), step, config))
    except BaseException:
        Loggers(opened).close()
        raise
    return Loggers(opened)
