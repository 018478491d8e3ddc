"""Atomic writes: readers on shared storage see the old file or the new one, never a part, and can read it."""

import json
import os
import stat

import pytest

from p2o_hpc import io_utils
from p2o_hpc.io_utils import atomic_write_jsonl, atomic_write_text


def test_replaces_whole_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "hard.jsonl"
    atomic_write_jsonl(path, [{"a": 1}, {"b": "é"}])
    atomic_write_jsonl(path, [{"c": 3}])
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"c": 3}]
    assert sorted(p.name for p in path.parent.iterdir()) == ["hard.jsonl"]


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = atomic_write_text(tmp_path / "config.yaml", "old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(io_utils.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_text(path, "new")
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


def test_mode_follows_umask_not_mkstemp(tmp_path, monkeypatch):
    previous = os.umask(0o027)
    try:
        assert io_utils._file_mode() == 0o640
    finally:
        os.umask(previous)
    monkeypatch.setattr(io_utils, "_FILE_MODE", 0o640)  # mkstemp alone would leave 0o600
    assert stat.S_IMODE(os.stat(atomic_write_text(tmp_path / "m.txt", "x")).st_mode) == 0o640
