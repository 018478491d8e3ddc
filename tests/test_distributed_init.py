"""A missing peer makes init fail within its timeout instead of hanging the job."""

import os
import subprocess
import sys
import time

from p2o_hpc.megatron.distributed import free_port

SCRIPT = "from p2o_hpc.megatron.distributed import init_megatron; init_megatron(1, 1, timeout_s=5)"


def test_missing_peer_fails_fast():
    env = {**os.environ, "RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert elapsed < 90, f"init took {elapsed:.0f}s to give up"
    assert "timeout" in result.stderr.lower() or "timed out" in result.stderr.lower(), result.stderr[-2000:]
