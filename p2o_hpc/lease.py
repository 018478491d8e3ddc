"""One writer per run dir and role: a lease file with the holder's host, pid and a heartbeat.

Used for the learner (two jobs never train into the same run dir) and the GEPA service, through their run dir
(RunDir.learner_lease, RunDir.service_lease). A second holder is refused while the heartbeat is fresh; a lease
whose holder died (heartbeat older than `stale_s`, or a dead pid on this host) is taken over, so a crashed or
requeued job simply starts again. Works on shared file systems where flock does not.

Processes a local launcher starts (learner ranks, the GEPA service) also watch the launcher itself
(`terminate_when_gone`): a killed launcher leaves nothing running behind it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Callable

from p2o_hpc.io_utils import atomic_write_text


class LeaseHeld(RuntimeError):
    """Another live process holds this lease."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def terminate_when_gone(pid: int, poll_s: float = 1.0, on_gone: Callable[[], None] | None = None) -> threading.Thread:
    """SIGTERM to this process once process `pid` is gone (a real signal: it also ends a blocking call), so the
    process's own SIGTERM handling (unwind and release; the learner's checkpoint-and-stop) runs."""

    def watch() -> None:
        while _pid_alive(pid):
            time.sleep(poll_s)
        if on_gone is not None:
            on_gone()
        os.kill(os.getpid(), signal.SIGTERM)

    thread = threading.Thread(target=watch, name=f"watch-{pid}", daemon=True)
    thread.start()
    return thread


class Lease:
    def __init__(self, path: str | Path, *, heartbeat_s: float = 10.0, stale_s: float = 60.0, role: str = "process"):
        self.path, self.role = Path(path), role
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "token": os.urandom(8).hex()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def live_holder(self) -> dict | None:
        """Who holds it now, or None when it is free or its holder is presumed dead."""
        holder = self.holder()
        return None if holder is None or self._stale(holder) else holder

    def _stale(self, holder: dict) -> bool:
        if time.time() - float(holder.get("heartbeat", 0)) > self.stale_s:
            return True
        return holder.get("host") == self.owner["host"] and not _pid_alive(int(holder.get("pid", -1)))

    def acquire(self, wait_s: float = 0.0) -> "Lease":
        """`wait_s` > 0: keep trying that long (a requeued job whose predecessor's heartbeat is not stale yet)."""
        deadline = time.time() + wait_s
        while True:
            try:
                return self._acquire()
            except LeaseHeld:
                if time.time() >= deadline:
                    raise
                time.sleep(min(self.heartbeat_s, max(0.1, deadline - time.time())))

    def _acquire(self) -> "Lease":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            os.close(fd)
        except FileExistsError:
            holder = self.holder()
            if holder is not None and not self._stale(holder):
                raise LeaseHeld(
                    f"{self.path}: the {self.role} of this run is already running (host {holder.get('host')}, "
                    f"pid {holder.get('pid')}, heartbeat {time.time() - float(holder.get('heartbeat', 0)):.0f} s ago)"
                ) from None
        self._beat()
        time.sleep(0.05)  # two instances taking over a stale lease at once: the last writer wins, the other leaves
        if (self.holder() or {}).get("token") != self.owner["token"]:
            raise LeaseHeld(f"{self.path}: another {self.role} took the lease over at the same time")
        self._thread = threading.Thread(target=self._heartbeat, name=f"lease-{self.path.name}", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        atomic_write_text(self.path, json.dumps({**self.owner, "heartbeat": time.time()}))

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if (self.holder() or {}).get("token") != self.owner["token"]:
                return  # taken over (we were presumed dead): stop claiming it
            self._beat()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if (self.holder() or {}).get("token") == self.owner["token"]:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
