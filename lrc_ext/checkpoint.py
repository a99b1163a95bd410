"""Checkpoints: safetensors + JSON only (no pickle), written atomically, last K kept.

A checkpoint is a directory ``checkpoints/step_000120/``:

* ``model.safetensors``     the trainable parameters only, by name (the frozen teacher is
                            reloaded from ``--teacher``, recorded in the config);
* ``optimizer.safetensors`` AdamW's per-parameter tensors as ``<param>/<key>``
                            (exp_avg, exp_avg_sq, step);
* ``rng.safetensors``       the torch CPU (and CUDA) generator states;
* ``state.json``            step, tokens, data position, the resolved config, the
                            optimiser's hyper-parameters, format version.

It is written under a temporary name (``.tmp-step_000120-<pid>``), every file fsynced, and
renamed into place: a kill at any moment, mid-save included, leaves either the complete new
checkpoint or none, and the previous ones untouched. Older checkpoints beyond the last K
are renamed away before being deleted, so a half-deleted one is never mistaken for a good one.

Testing hook: ``LRC_FAULT_KILL_DURING_SAVE=<step>`` makes the process SIGKILL itself halfway
through writing that step's checkpoint.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FORMAT = 1
_NAME = re.compile(r"^step_(\d{6,})$")


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:06d}"


def list_checkpoints(root: Path) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def fsync(path: Path):
    """fsync a file or a directory (so a rename into it is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- optimiser and RNG state as tensors + JSON ----------------------------------------------

def optimizer_state(opt: torch.optim.Optimizer, names: list[str]) -> tuple[dict, dict]:
    """(tensors keyed '<param name>/<key>', JSON-able rest) of an optimiser over `names`, in order."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                if hasattr(v, "full_tensor"):  # a DTensor shard (FSDP2): gathered, a collective on every rank
                    v = v.full_tensor()
                tensors[f"{names[idx]}/{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{names[idx]}/{k}"] = v
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def load_optimizer_state(opt: torch.optim.Optimizer, names: list[str], tensors: dict, meta: dict):
    index = {n: i for i, n in enumerate(names)}
    state: dict = {}
    for key, v in list(tensors.items()) + list(meta["scalars"].items()):
        name, k = key.rsplit("/", 1)
        if name not in index:
            raise ValueError(f"checkpoint optimiser state names an unknown parameter {name!r}")
        state.setdefault(index[name], {})[k] = v
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


def rng_state() -> dict:
    d = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            d[f"torch_cuda_{i}"] = s
    return d


def set_rng_state(d: dict):
    torch.set_rng_state(d["torch_cpu"])
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            if f"torch_cuda_{i}" in d:
                torch.cuda.set_rng_state(d[f"torch_cuda_{i}"], i)


# -- save / load -------------------------------------------------------------------------

def save(root: Path, step: int, params: dict, opt_tensors: dict, state: dict, keep: int) -> Path:
    """Write checkpoint `step` atomically; keep the last `keep`. Returns its directory."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = step_dir(root, step)
    if (final / "state.json").is_file():
        return final  # already saved (e.g. Ctrl-C right after a scheduled save)
    bad = [n for n, t in params.items() if not torch.isfinite(t).all()]
    if bad:  # never write a checkpoint that cannot be resumed
        raise FloatingPointError(f"refusing to checkpoint step {step}: non-finite values in {bad[:3]}")
    for stale in root.glob(".tmp-*"):  # left by a run killed mid-save
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    tmp.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in params.items()}, tmp / "model.safetensors",
              metadata={"format": "lrc_ext.checkpoint", "step": str(step)})
    if os.environ.get("LRC_FAULT_KILL_DURING_SAVE") == str(step):
        os.kill(os.getpid(), signal.SIGKILL)
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    save_file({k: v.contiguous() for k, v in rng_state().items()}, tmp / "rng.safetensors")
    (tmp / "state.json").write_text(json.dumps({"format": FORMAT, **state}, indent=1) + "\n")
    for f in tmp.iterdir():
        fsync(f)
    fsync(tmp)
    os.rename(tmp, final)
    fsync(root)
    for old in list_checkpoints(root)[:-keep]:
        trash = root / f".trash-{old.name}-{os.getpid()}"
        os.rename(old, trash)
        shutil.rmtree(trash, ignore_errors=True)
    for stale in root.glob(".trash-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load(path: Path) -> tuple[dict, dict, dict]:
    """(trainable params, optimiser tensors, state) of a checkpoint directory; state["rng"] holds
    the generator states for set_rng_state."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
        params = load_file(path / "model.safetensors")
        opt = load_file(path / "optimizer.safetensors")
        rng = load_file(path / "rng.safetensors")
    except (OSError, ValueError) as e:
        raise ValueError(f"checkpoint {path} is unreadable: {e}") from None
    if state.get("format") != FORMAT:
        raise ValueError(f"checkpoint {path}: unknown format {state.get('format')!r}")
    state["rng"] = rng
    return params, opt, state


def read_state(path: Path) -> dict:
    try:
        return json.loads((Path(path) / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"checkpoint {path} is unreadable: {e}") from None


def find(path: Path) -> Path:
    """A checkpoint directory from a checkpoint, a checkpoints/ folder or a run directory."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    for root in (path / "checkpoints", path):
        found = latest(root)
        if found is not None:
            return found
    raise FileNotFoundError(f"{path}: no checkpoint here (expected a run directory, its checkpoints/ "
                            f"or a checkpoints/step_NNNNNN directory)")
