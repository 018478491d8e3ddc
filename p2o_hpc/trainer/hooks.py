"""The algorithm hooks a run's config asks for: GRPO's no-ops, or P²O (imported only then)."""

from __future__ import annotations

from p2o_hpc.algo.hooks import AlgorithmHooks
from p2o_hpc.run_dir import RunDir


def algorithm_hooks(cfg, run_dir, *, rank: int, console) -> AlgorithmHooks:
    if not cfg.algorithm.p2o.enabled:
        return AlgorithmHooks()
    from p2o_hpc.p2o.hooks import P2OHooks

    return P2OHooks(cfg, RunDir(run_dir) if not isinstance(run_dir, RunDir) else run_dir, rank=rank, console=console)
