"""trainer.profile_steps: chosen steps are recorded with torch.profiler, every phase of PhaseTimer a named range in
the chrome trace (the end-to-end check is in test_grpo_loop.test_skipped_weight_sync_is_caught)."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf.errors import ValidationError

from p2o_hpc.config import to_run_config, validate
from p2o_hpc.run_dir import RunDir
from p2o_hpc.trainer.metrics import PhaseTimer, phase_range
from p2o_hpc.trainer.profiling import StepProfiler

PHASES = ["weight_sync", "gepa_wait", "generate", "refit_check", "reward", "logprob", "cd_logprob", "update",
          "rollout_wait"]


class Printed:
    def __init__(self):
        self.lines = []

    def print(self, text):
        self.lines.append(text)


def trace_names(path) -> set[str]:
    return {event.get("name") for event in json.loads(path.read_text())["traceEvents"]}


def fake_step(timer: PhaseTimer) -> None:
    for name in PHASES:
        with timer.phase(name):
            torch.ones(8, 8) @ torch.ones(8, 8)


def test_a_profiled_step_writes_a_chrome_trace_with_a_range_per_phase(tmp_path):
    run_dir, console = RunDir(tmp_path / "run"), Printed()
    profiler = StepProfiler([2], run_dir, rank=3, console=console)
    timers = [PhaseTimer(), PhaseTimer()]
    for step, timer in enumerate(timers, 1):
        with profiler.step(step):
            fake_step(timer)
    path = run_dir.profile_trace(2, 3)
    assert path == tmp_path / "run" / "profile" / "step_2.rank3.json"
    assert [p.name for p in run_dir.profile.iterdir()] == [path.name]  # step 1 is not profiled; no temp file left
    names = trace_names(path)
    for name in PHASES:
        assert phase_range(name) == f"phase/{name}"
        assert phase_range(name) in names, name
    assert "aten::mm" in names  # the ops inside the ranges
    assert console.lines == [f"step 2: profiler trace → {path} (every rank: {run_dir.profile}/step_2.rank*.json; "
                             "open in https://ui.perfetto.dev)"]
    for timer in timers:  # the timing is the same with or without a profiler
        assert set(timer.seconds) == set(PHASES) and all(seconds >= 0.0 for seconds in timer.seconds.values())


def test_a_step_that_raises_writes_no_trace_and_a_repeated_phase_adds_up(tmp_path):
    run_dir, timer = RunDir(tmp_path), PhaseTimer()
    with pytest.raises(RuntimeError, match="boom"):
        with StepProfiler([1], run_dir, rank=0).step(1):
            with timer.phase("update"):
                raise RuntimeError("boom")
    assert not run_dir.profile.exists() or not any(run_dir.profile.iterdir())
    with timer.phase("update"):
        pass
    assert timer.seconds["update"] > 0.0 and list(timer.seconds) == ["update"]


def test_profile_steps_default_to_none_and_take_a_list():
    assert to_run_config({}).trainer.profile_steps == []
    cfg = to_run_config({"trainer": {"profile_steps": [3, 10]}})
    validate(cfg)
    assert cfg.trainer.profile_steps == [3, 10]


@pytest.mark.parametrize("steps", [[0], [2, -1]])
def test_a_step_below_one_is_named(steps):
    with pytest.raises(ValueError, match=r"trainer\.profile_steps=.*integers ≥ 1"):
        validate(to_run_config({"trainer": {"profile_steps": steps}}))


@pytest.mark.parametrize("steps", [["first"], [1.5], 3])
def test_a_step_that_is_no_integer_is_named_when_composed(steps):
    with pytest.raises(ValidationError, match=r"trainer\.profile_steps"):
        to_run_config({"trainer": {"profile_steps": steps}})
