"""Rank bodies for tests/test_colocation.py (module level: ranks are spawned)."""

from __future__ import annotations

import json
from pathlib import Path


def build_then_fail(cfg_dict: dict, run_dir: str, model_dir: str, out_path: str) -> None:
    """Builds a GRPODriver with the real engine and learner, spied on to record their order, and fails it on
    purpose once both exist (the Validator): the half-built driver must have closed its engine."""
    from p2o_hpc.config import to_run_config
    from p2o_hpc.rollout.rollout_worker import RolloutWorker
    from p2o_hpc.run_dir import RunDir
    from p2o_hpc.trainer import driver as driver_module

    events: list[str] = []
    engines: list[RolloutWorker] = []
    start, sleep, build_learner = RolloutWorker.__init__, RolloutWorker.sleep, driver_module.LearnerSide.__init__

    def spy_start(self, *args, **kwargs):
        start(self, *args, **kwargs)
        engines.append(self)
        events.append("engine started")

    def spy_sleep(self):
        sleep(self)
        events.append("engine asleep" if self.generator.may_be_asleep else "engine awake")

    def spy_learner(self, *args, **kwargs):
        events.append("learner building")
        build_learner(self, *args, **kwargs)
        events.append("learner built")

    def failing_validator(*args, **kwargs):
        raise RuntimeError("injected failure after the learner")

    RolloutWorker.__init__, RolloutWorker.sleep = spy_start, spy_sleep
    driver_module.LearnerSide.__init__ = spy_learner
    driver_module.Validator = failing_validator
    result: dict = {}
    try:
        driver_module.GRPODriver(to_run_config(cfg_dict), RunDir(run_dir), model_dir)
    except RuntimeError as error:
        result["error"] = str(error)
    result["events"] = events
    result["engine_alive_after_failure"] = [engine.generator.is_alive() for engine in engines]
    result["engine_process_alive"] = [engine.generator._process.is_alive() for engine in engines]
    Path(out_path).write_text(json.dumps(result))
