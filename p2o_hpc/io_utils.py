"""Atomic writes for files other jobs read (run dirs live on shared storage: a reader must never see half a file)."""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Iterable


def _file_mode() -> int:
    """What open() would give a new file: mkstemp's 0600 would hide run files from the rest of the group."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write to a temp file in the same folder, fsync, rename over `path`, fsync the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _FILE_MODE)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """`text` with every lone UTF-16 surrogate (valid in JSON and Python, not in UTF-8: a tokenizer or an encoder
    raises on it) replaced by U+FFFD. Text from outside (a teacher's reply, an exchange file) passes through here
    before it reaches a tokenizer or a file."""
    return _LONE_SURROGATE.sub("\ufffd", text)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, clean_text(text).encode("utf-8"))


def atomic_write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    return atomic_write_text(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
