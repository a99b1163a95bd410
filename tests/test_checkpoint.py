"""lrc_ext.checkpoint: safetensors + JSON only, exact round trip of parameters, AdamW state
and RNG, atomic writes, keep-last-K, and what a kill leaves behind."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import pytest
import torch

from lrc_ext import checkpoint


def toy(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.999), weight_decay=0.1)
    return model, opt


def train_steps(model, opt, n, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(5, 8, generator=g)
        loss = model(x).pow(2).mean() + 0.01 * torch.randn(()).abs()  # uses the global RNG too
        loss.backward()
        opt.step()
        opt.zero_grad()
        out.append(loss.item())
    return out


def save(root, step, model, opt, keep=3, **state):
    names = [n for n, _ in model.named_parameters()]
    t, meta = checkpoint.optimizer_state(opt, names)
    return checkpoint.save(root, step, dict(model.named_parameters()), t, {"step": step, "optimizer": meta, **state},
                           keep)


def test_round_trip_continues_bit_exactly(tmp_path):
    model, opt = toy()
    train_steps(model, opt, 3, seed=1)
    path = save(tmp_path, 3, model, opt)
    expect = train_steps(model, opt, 4, seed=2)

    model2, opt2 = toy(seed=123)  # different init: everything must come from the checkpoint
    params, o, state = checkpoint.load(path)
    model2.load_state_dict(params)
    names = [n for n, _ in model2.named_parameters()]
    checkpoint.load_optimizer_state(opt2, names, o, state["optimizer"])
    checkpoint.set_rng_state(state["rng"])
    assert train_steps(model2, opt2, 4, seed=2) == expect
    assert opt2.param_groups[0]["betas"] == (0.9, 0.999) and opt2.param_groups[0]["weight_decay"] == 0.1


def test_files_are_safetensors_and_json_only(tmp_path):
    model, opt = toy()
    train_steps(model, opt, 1, seed=0)
    path = save(tmp_path, 1, model, opt, data_pos=7)
    assert sorted(p.name for p in path.iterdir()) == ["model.safetensors", "optimizer.safetensors",
                                                       "rng.safetensors", "state.json"]
    state = json.loads((path / "state.json").read_text())
    assert state["data_pos"] == 7 and state["format"] == checkpoint.FORMAT
    for p in path.iterdir():  # nothing a pickle loader would accept
        with pytest.raises(Exception):
            pickle.loads(p.read_bytes())


def test_keep_last_k_and_latest(tmp_path):
    model, opt = toy()
    for step in (2, 4, 6, 8):
        save(tmp_path, step, model, opt, keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["step_000006", "step_000008"]
    assert checkpoint.latest(tmp_path).name == "step_000008"
    assert checkpoint.find(tmp_path.parent / tmp_path.name).name == "step_000008"
    assert not list(tmp_path.glob(".t*"))


def test_half_written_checkpoint_is_ignored_and_cleaned(tmp_path):
    model, opt = toy()
    save(tmp_path, 2, model, opt)
    half = tmp_path / ".tmp-step_000004-99999"  # what a kill mid-save leaves
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"partial")
    no_state = tmp_path / "step_000005"  # a directory without state.json is not a checkpoint
    no_state.mkdir()
    assert checkpoint.latest(tmp_path).name == "step_000002"
    save(tmp_path, 4, model, opt)
    assert not half.exists() and checkpoint.latest(tmp_path).name == "step_000004"


def test_kill_during_save_leaves_previous_checkpoint(tmp_path):
    code = f"""
import torch, sys
sys.path.insert(0, {os.path.dirname(__file__)!r})
from test_checkpoint import toy, save
model, opt = toy()
save({str(tmp_path)!r}, 1, model, opt)
save({str(tmp_path)!r}, 2, model, opt)
"""
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "LRC_FAULT_KILL_DURING_SAVE": "2"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == -9, r.stderr
    assert checkpoint.latest(tmp_path).name == "step_000001"
    checkpoint.load(checkpoint.latest(tmp_path))


def test_refuses_non_finite_parameters(tmp_path):
    model, opt = toy()
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="non-finite"):
        save(tmp_path, 1, model, opt)
    assert checkpoint.latest(tmp_path) is None


def test_find_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint here"):
        checkpoint.find(tmp_path)
