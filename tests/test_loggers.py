"""--report-to: parsing and validation, the fan-out, TensorBoard's calls, and a real offline
wandb run whose history (read back from its .wandb file) holds exactly log.jsonl's records."""
from __future__ import annotations

import json
import shutil
import struct
import sys
import types

import pytest
import yaml
from _extras import require
from test_train import _exit2, log_records, main_in_process, tiny, tiny_args  # noqa: F401 (tiny: a fixture)

from lrc_ext import config, loggers
from lrc_ext.config import ConfigError


@pytest.fixture
def everything_installed(monkeypatch):
    monkeypatch.setattr(loggers, "_installed", lambda module: True)


# ---- parsing -------------------------------------------------------------------------------

def test_parse_names(everything_installed):
    assert loggers.parse("none") == []
    assert loggers.parse("wandb") == ["wandb"]
    assert loggers.parse(" TensorBoard , wandb,wandb") == ["tensorboard", "wandb"]
    assert loggers.parse("auto") == ["tensorboard"]
    for bad, msg in (("mlflow", "must be auto, none"), ("", "must be auto, none"), ("none,wandb", "cannot be combined"),
                     ("auto,tensorboard", "cannot be combined")):
        with pytest.raises(ConfigError, match=msg):
            loggers.parse(bad)


def test_auto_is_tensorboard_only_when_installed(monkeypatch):
    monkeypatch.setattr(loggers, "_installed", lambda module: False)
    assert loggers.parse("auto") == []
    with pytest.raises(ConfigError, match=r"tensorboard package is not installed; pip install tensorboard"):
        loggers.parse("tensorboard")


def test_flag_repeated_comma_separated_and_yaml_list(everything_installed, tmp_path):
    assert config.TrainConfig().report_to == "auto"
    cfg, given = config.parse(["--report-to", "tensorboard", "--report-to", "wandb"])
    assert cfg.report_to == given["report_to"] == "tensorboard,wandb"
    assert config.parse(["--report-to", "wandb,tensorboard"])[0].report_to == "wandb,tensorboard"
    (tmp_path / "run.yaml").write_text("report_to: [wandb, tensorboard]\n")
    assert config.parse(["--config", str(tmp_path / "run.yaml")])[0].report_to == "wandb,tensorboard"
    config.save_yaml(cfg, tmp_path / "config.yaml")  # the resolved config reads back the same
    assert config.parse(["--config", str(tmp_path / "config.yaml")])[0] == cfg
    assert "--report-to" in config.build_parser().format_help()


def test_missing_wandb_is_one_line_exit_2(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: find_spec says None
    r = main_in_process(["--report-to", "wandb", "--output-dir", tmp_path / "o"], capsys)
    _exit2(r, "--report-to wandb", "wandb package is not installed", 'pip install "lrc_ext[wandb]"')
    assert not (tmp_path / "o").exists()  # refused before anything loads or is written
    r = main_in_process(["--report-to", "nope", "--output-dir", tmp_path / "o"], capsys)
    _exit2(r, "--report-to must be auto, none")


# ---- backends ------------------------------------------------------------------------------

class _Fake:
    def __init__(self, name, calls, fail=False):
        if fail:
            raise RuntimeError(f"{name} failed to open")
        self.name, self.calls = name, calls

    def log(self, rec, step):
        self.calls.append((self.name, "log", dict(rec), step))

    def close(self):
        self.calls.append((self.name, "close"))


def test_fan_out_and_cleanup_when_one_fails(everything_installed, monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(loggers, "CLASSES", {"tensorboard": lambda out, step, c: _Fake("tb", calls),
                                             "wandb": lambda out, step, c: _Fake("wb", calls)})
    lg = loggers.open_all("tensorboard,wandb", tmp_path, 0, {})
    lg.log({"step": 3, "loss": 1.5}, 3)
    lg.close()
    assert calls == [("tb", "log", {"step": 3, "loss": 1.5}, 3), ("wb", "log", {"step": 3, "loss": 1.5}, 3),
                     ("tb", "close"), ("wb", "close")]
    calls.clear()
    monkeypatch.setitem(loggers.CLASSES, "wandb", lambda out, step, c: _Fake("wb", calls, fail=True))
    with pytest.raises(RuntimeError, match="wb failed"):
        loggers.open_all("tensorboard,wandb", tmp_path, 0, {})
    assert calls == [("tb", "close")]  # the one already open is closed


def test_tensorboard_gets_every_key_but_step(monkeypatch, tmp_path):
    made = []

    class Writer:
        def __init__(self, logdir, purge_step=None):
            self.logdir, self.purge_step, self.scalars, self.closed = logdir, purge_step, [], False
            made.append(self)

        def add_scalar(self, k, v, step):
            self.scalars.append((k, v, step))

        def close(self):
            self.closed = True
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=Writer))
    tb = loggers.TensorBoard(tmp_path, 0, {})
    tb.log({"step": 2, "loss": 1.0, "lr": 1e-4}, 2)
    tb.close()
    w = made[0]
    assert (w.logdir, w.purge_step, w.scalars, w.closed) == (str(tmp_path / "tensorboard"), None,
                                                            [("loss", 1.0, 2), ("lr", 1e-4, 2)], True)
    loggers.TensorBoard(tmp_path, 6, {})
    assert made[1].purge_step == 7  # resuming after step 6 drops what a killed run logged past it


# ---- a real offline wandb run ----------------------------------------------------------------

def wandb_records(path):
    """The protobuf records of a .wandb file (W&B's 7-byte header, then LevelDB-log framing:
    32 KiB blocks of chunks with a 7-byte header: crc32c, length, type full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2 as pb
    b, block = path.read_bytes(), 32768
    assert b[:4] == b":W&B", b[:7]
    pos, part = 7, b""
    while pos + 7 <= len(b):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", b[pos:pos + 7])
        data, pos = b[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 2):
            part = data
        elif kind in (3, 4):
            part += data
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(part)
            yield rec


def wandb_history(run_dir):
    (f,) = run_dir.glob("run-*.wandb")
    rows, config = [], {}
    for rec in wandb_records(f):
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
        elif kind in ("run", "config"):  # the run's config at init, later updates
            upd = rec.run.config.update if kind == "run" else rec.config.update
            config.update({i.key: json.loads(i.value_json) for i in upd})
    return rows, config


def test_wandb_offline_logs_what_log_jsonl_logs_and_resume_continues_the_run(tiny, tmp_path, monkeypatch,
                                                                             capsys):
    require("wandb")
    from lrc_ext import train
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    common = {"--eval-every": 2, "--save-every": 2, "--gen-tokens": 0, "--report-to": "wandb"}
    assert train.main([str(a) for a in tiny_args(tiny, out, **{"--max-steps": 3, **common})]) == 0
    run_id = (out / "wandb" / "lrc_run_id").read_text().strip()
    (first,) = (out / "wandb").glob(f"offline-run-*-{run_id}")
    rows, cfg = wandb_history(first)
    logged = log_records(out)
    assert [r["_step"] for r in rows] == [r["step"] for r in logged] == [1, 2, 3]
    for row, rec in zip(rows, logged):  # every key, every value, nothing else but wandb's own _keys
        assert {k: v for k, v in row.items() if not k.startswith("_")} == {k: v for k, v in rec.items()
                                                                         if k != "step"}
    assert "eval_lm" in rows[1] and "eval_lm" not in rows[0]
    saved = yaml.safe_load((out / "config.yaml").read_text())  # the resolved config, as the run saved it
    assert {k: cfg.get(k) for k in saved} == saved and saved["report_to"] == "wandb"

    # --resume from the step-2 checkpoint: the same wandb run id, the new records after step 2
    args = tiny_args(tiny, out, **{"--max-steps": 4, **common}) + ["--resume"]
    shutil.rmtree(out / "checkpoints" / "step_000003")  # as if killed before it: resume from step 2
    assert train.main([str(a) for a in args]) == 0
    assert (out / "wandb" / "lrc_run_id").read_text().strip() == run_id
    runs = sorted((out / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 2
    rows2, _ = wandb_history([r for r in runs if r != first][0])
    logged = log_records(out)
    assert [r["_step"] for r in rows2] == [3, 4] and [r["step"] for r in logged] == [1, 2, 3, 4]
    for row, rec in zip(rows2, logged[2:]):
        assert {k: v for k, v in row.items() if not k.startswith("_")} == {k: v for k, v in rec.items()
                                                                         if k != "step"}
