"""tools/sync_wandb.py: a requeued run's metrics.jsonl becomes one offline wandb run holding each step once, as read
back from the .wandb file wandb itself wrote (not from the tool's own data)."""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from p2o_hpc.config import RunConfig
from p2o_hpc.paths import REPO_ROOT
from p2o_hpc.run_dir import RunDir
from p2o_hpc.trainer.metrics import MetricsSink

TOOL = REPO_ROOT / "tools" / "sync_wandb.py"


def wandb_records(path: Path) -> Iterator:
    """The records of a .wandb transaction log, as wandb.proto Records. wandb 0.31 ships no Python reader (its Go
    wandb-core writes the file), so this reads the format itself: a 7-byte header (':W&B', magic 0xBEE1, version 0),
    then leveldb log blocks of 32 KiB, each record in chunks [crc32(type byte, data), length, type]."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0), data[:7]
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # zero padding to the end of the block
            pos += 32768 - pos % 32768
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad checksum at {pos}"
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL, FIRST; MIDDLE, LAST
        if kind in (1, 4):
            yield wandb_internal_pb2.Record.FromString(pending)


@dataclass
class OfflineRun:
    runs: list  # the run records (RunRecord): one for one run
    history: list[dict]  # {"_step": …, key: value} per logged row, in file order

    @property
    def steps(self) -> list[int]:
        return [row["_step"] for row in self.history]


def read_offline_run(folder: Path) -> OfflineRun:
    files = list(folder.glob("*.wandb"))
    assert len(files) == 1, files
    runs, history = [], []
    for record in wandb_records(files[0]):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            runs.append(record.run)
        elif kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
    return OfflineRun(runs, history)


def sync(*run_dirs: Path, env: dict | None = None, prelude: str = "") -> subprocess.CompletedProcess:
    """The tool as a user runs it (`prelude`: Python run first in its process, to make it fail)."""
    command = [sys.executable, str(TOOL), *map(str, run_dirs)]
    if prelude:
        command = [sys.executable, "-c", f"{prelude}\nimport runpy, sys\nsys.argv = {command[1:]!r}\n"
                   f"runpy.run_path({str(TOOL)!r}, run_name='__main__')"]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
                          env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})


def rebuilt(run_dir: RunDir) -> Path:
    folders = list((run_dir.path / "wandb_sync" / "current" / "wandb").glob("offline-run-*"))
    assert len(folders) == 1, folders
    return folders[0]


@pytest.fixture
def requeued_run(tmp_path) -> RunDir:
    """What a preempted-and-requeued run leaves in metrics.jsonl: job 1 logged steps 1-5 and was killed mid-line;
    job 2 resumed from the step-3 checkpoint (dropping 4, 5 and the torn line), logged 4-8 again with other values,
    and was killed writing step 9."""
    cfg = RunConfig()
    cfg.logging.wandb.name = "requeued"
    run_dir = RunDir(tmp_path / "run")
    run_dir.write_config(cfg, ["experiment=smoke"])
    sink = MetricsSink(run_dir, wandb_mode="disabled", project="p2o_hpc", entity=None, name=None, config={})
    for step in range(1, 6):
        sink.log({"reward/mean": step / 10, "actor/loss": -step}, step)
    with open(run_dir.metrics, "a") as handle:
        handle.write('{"step": 6, "reward/me')
    assert sink.truncate_after(3) == 1
    for step in range(4, 9):
        sink.log({"reward/mean": step / 100, "actor/loss": -step}, step)
    with open(run_dir.metrics, "a") as handle:
        handle.write('{"step": 9, "rew')
    return run_dir


def test_requeued_run_becomes_one_run_with_each_step_once(requeued_run):
    rows = [json.loads(line) for line in requeued_run.metrics.read_text().splitlines()[:-1]]
    assert [row["step"] for row in rows] == list(range(1, 9))
    result = sync(requeued_run.path)
    assert result.returncode == 0, result.stdout + result.stderr
    folder = rebuilt(requeued_run)
    assert f"wandb sync {folder.resolve()}" in result.stdout

    offline = read_offline_run(folder)
    assert len(offline.runs) == 1
    run = offline.runs[0]
    assert run.run_id == requeued_run.wandb_run_id.read_text().strip() and folder.name.endswith(run.run_id)
    assert (run.display_name, run.project) == ("requeued", "p2o_hpc")
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    assert config["algorithm"]["name"] == RunConfig().algorithm.name and "logging" in config
    assert offline.steps == list(range(1, 9))  # continuous, each once
    assert [row["reward/mean"] for row in offline.history] == [0.1, 0.2, 0.3, 0.04, 0.05, 0.06, 0.07, 0.08]
    assert [row["actor/loss"] for row in offline.history] == [-step for step in range(1, 9)]
    assert [row["_timestamp"] for row in offline.history] == [row["_timestamp"] for row in rows]
    assert not (requeued_run.path / "wandb").exists()  # the jobs' own offline folders are not touched or made


def test_a_failed_sync_keeps_the_previous_one(requeued_run):
    assert sync(requeued_run.path).returncode == 0
    current = (requeued_run.path / "wandb_sync" / "current").resolve()
    before = read_offline_run(rebuilt(requeued_run)).history

    sink = MetricsSink(requeued_run, wandb_mode="disabled", project="p2o_hpc", entity=None, name=None, config={})
    sink.truncate_after(8)  # the run went on: a third job redid step 9
    sink.log({"reward/mean": 0.09, "actor/loss": -9}, 9)
    crash = ("import wandb.sdk.wandb_run as wr\nlog = wr.Run.log\n"
             "def failing(self, data, step=None, **kw):\n"
             "    if step == 5: raise OSError('disk full')\n"
             "    return log(self, data, step=step, **kw)\n"
             "wr.Run.log = failing")
    failed = sync(requeued_run.path, prelude=crash)
    assert failed.returncode != 0 and "disk full" in failed.stderr
    assert (requeued_run.path / "wandb_sync" / "current").resolve() == current
    assert read_offline_run(rebuilt(requeued_run)).history == before
    assert [p.name for p in (requeued_run.path / "wandb_sync").glob("build-*")] == [current.name]

    assert sync(requeued_run.path).returncode == 0
    assert read_offline_run(rebuilt(requeued_run)).steps == list(range(1, 10))
    assert len(list((requeued_run.path / "wandb_sync").glob("build-*"))) == 1  # the old build is gone


def test_online_uploads_exactly_the_rebuilt_folder(monkeypatch, capsys, tmp_path):
    spec = importlib.util.spec_from_file_location("sync_wandb", TOOL)
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    folders = {tmp_path / "a": tmp_path / "a" / "wandb_sync" / "build-1" / "wandb" / "offline-run-x-id1"}
    calls = []
    monkeypatch.setattr(tool, "rebuild", lambda run_dir, project, entity: folders[run_dir.path])
    monkeypatch.setattr(tool.subprocess, "run", lambda command, **kwargs: calls.append((command, kwargs)))
    monkeypatch.setenv("WANDB_API_KEY", "secret-key-123")
    assert tool.main([str(tmp_path / "a"), "--online"]) == 0
    assert [command for command, _ in calls] == [[sys.executable, "-m", "wandb", "sync", str(folders[tmp_path / "a"])]]
    assert "env" not in calls[0][1]  # wandb reads the key from the environment it inherits
    out = capsys.readouterr()
    assert "secret-key-123" not in out.out + out.err


def test_a_folder_that_is_no_run_dir_is_refused_in_one_line(tmp_path):
    result = sync(tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"{tmp_path}: not a run dir with metrics" in result.stderr
