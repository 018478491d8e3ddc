"""The GEPA service's command line: ``python -m p2o_hpc.gepa.service --run-dir RUN_DIR [--max-rounds N] [--parent-pid P]``.

Evolves each epoch's templates beside the learner until the run finishes (p2o_hpc.gepa.service_loop).
Exit status: 0 ok, 2 not a run dir (no config.yaml), 3 another service of this run holds the lease,
143 SIGTERM (scancel, the launcher, or the launcher given by --parent-pid is gone).
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from rich.console import Console

from p2o_hpc.gepa.service_loop import run_service
from p2o_hpc.run_dir import RunDir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", required=True, help="the learner's run dir (holds config.yaml)")
    parser.add_argument("--max-rounds", type=int, default=None, help="stop after this many GEPA rounds")
    parser.add_argument("--parent-pid", type=int, default=None, help="stop when this process (the launcher) is gone")
    args = parser.parse_args(argv)
    # SIGTERM (scancel, the launcher) unwinds normally, so the engine and the reference server are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    return run_service(RunDir(Path(args.run_dir).resolve()), Console(stderr=True), max_rounds=args.max_rounds,
                       parent_pid=args.parent_pid)


if __name__ == "__main__":
    sys.exit(main())
