"""Rank bodies for tests/test_control_group.py (module level: ranks are spawned)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import torch.distributed as dist

from p2o_hpc.megatron.distributed import control_group, init_megatron, wait_together
from p2o_hpc.run_dir import RunDir

TIMEOUT_S = 3.0  # every collective's timeout, megatron's and the control group's: far shorter than the wait


def wait_for_the_service(run_dir: str, out_dir: str) -> None:
    """The ranks wait together for a round that lands after 3 × TIMEOUT_S, then for one whose service failed; last,
    a plain barrier behind a rank that is busy for longer than the timeout (it must time out: the control)."""
    init_megatron(1, 1, timeout_s=TIMEOUT_S, control_timeout_s=TIMEOUT_S)
    rank, runs = dist.get_rank(), RunDir(run_dir)
    result: dict = {}
    if rank == 0:
        threading.Timer(3 * TIMEOUT_S, runs.publish_templates, args=(0, {"templates": []})).start()
    started = time.monotonic()
    look = runs.template_wait(0, timeout_s=600, service_lost_s=600) if rank == 0 else None
    result["settled"] = wait_together(look, poll_s=0.2)
    result["waited_s"] = time.monotonic() - started

    def failed_service():
        raise RuntimeError("the GEPA service failed: out of memory")

    try:
        wait_together(failed_service if rank == 0 else None, poll_s=0.2)
    except RuntimeError as error:
        result["failure"] = str(error)

    if rank == 0:
        time.sleep(3 * TIMEOUT_S)
    try:
        dist.barrier(group=control_group())
        result["plain_barrier"] = "completed"
    except Exception as error:  # noqa: BLE001 - the timeout's type differs by backend and version
        result["plain_barrier"] = f"{type(error).__name__}: {error}"
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
