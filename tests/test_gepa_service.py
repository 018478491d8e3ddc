"""The GEPA service for real: its own process beside the learner, a real vLLM server of the reference model
for reflection, the policy exported by the learner in its own vLLM engine, one lease per run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_grpo_loop import launch, metrics

from p2o_hpc.paths import REPO_ROOT
from p2o_hpc.run_dir import RunDir

pytestmark = [pytest.mark.vllm, pytest.mark.multiproc]


@pytest.fixture(scope="module")
def sanity_data(toy_data) -> Path:
    """MATH500 questions with a toy answer the tiny model sometimes produces early (reward early_substring)."""
    return toy_data(8)


def p2o_overrides(data: Path, mode: str) -> list[str]:
    """The smoke preset (small GEPA budget) on the toy data: 8 prompts, 2 steps an epoch, 2 epochs."""
    return [
        "experiment=smoke", "algorithm=p2o", "reflection=self", f"gepa.mode={mode}", f"data.train={data}",
        "data.limit=8", "data.reward=early_substring", "algorithm.max_steps=4", "rollout.max_response_tokens=8",
        "reflection.temperature=0", "logging.wandb.mode=disabled",
        # Greedy scoring (the paper preset) gives the tiny model the same miss on every dev item: sampled scores
        # let some template solve something, so the cover and the next epoch's templated rollouts are exercised.
        "gepa.eval_temperature=0.6",
    ]


def check_round(run_dir: RunDir, rows: list[dict]) -> dict:
    assert run_dir.done(0) and run_dir.ready(0) == run_dir.policy(0).is_dir()
    document = run_dir.read_templates(0)
    hard_ids = {row["prompt_id"] for row in run_dir.read_hard_set(0)}
    assert document["pool"][0]["template"] == "" and document["budget"]["used"] <= document["budget"]["total"] == 24
    assert document["counters"]["proposed"] >= 1  # the reference server answered reflection requests
    assert document["assignments"] and set(document["assignments"]) <= hard_ids
    pool = {candidate["template"] for candidate in document["pool"]}
    assert all(len(draws) == 4 and set(draws) <= pool for draws in document["assignments"].values())
    epoch_end = rows[1]
    assert epoch_end["gepa/budget_used"] == document["budget"]["used"]
    assert 0 <= epoch_end["gepa/dev_pass@1_plain"] <= epoch_end["gepa/dev_pass@4_plain"] <= 1  # K=4 rollouts each
    assert 0 <= epoch_end["gepa/dev_pass@1_best_template"] <= epoch_end["gepa/dev_pass@4_best_template"] <= 1
    assert epoch_end["p2o/next_epoch_assigned_prompts"] == len(document["assignments"])
    assert all(row["p2o/assigned_prompts"] == len(document["assignments"]) for row in rows[2:])
    return document


@pytest.fixture(scope="module")
def service_run(tmp_path_factory, sanity_data) -> RunDir:
    run_dir = tmp_path_factory.mktemp("service") / "run"
    launch(run_dir, *p2o_overrides(sanity_data, "service"))
    return RunDir(run_dir)


def test_p2o_with_the_gepa_service_as_its_own_process(service_run):
    run_dir = service_run
    rows = metrics(run_dir.path)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    check_round(run_dir, rows)
    assert rows[1]["reflection/requests"] >= run_dir.read_templates(0)["counters"]["proposed"]
    assert run_dir.finished() and not run_dir.service_lease().path.exists()
    assert "GEPA: epoch 0 done" in (run_dir.logs / "gepa_service.log").read_text()
    assert not run_dir.ready(1)  # no round after the last epoch


@pytest.mark.long
def test_p2o_with_gepa_inline(tmp_path, sanity_data):
    run_dir = RunDir(tmp_path / "run")
    launch(run_dir.path, *p2o_overrides(sanity_data, "inline"))
    rows = metrics(run_dir.path)
    document = check_round(run_dir, rows)
    assert rows[1]["reflection/requests"] >= document["counters"]["proposed"]
    assert not run_dir.policy(0).exists()  # inline evaluates the learner's own engine


def _service(run_dir: RunDir) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "p2o_hpc.gepa.service", "--run-dir", str(run_dir.path)],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})


def _wait_for_lease(run_dir: RunDir, pid: int, timeout: float = 60.0) -> None:
    lease = run_dir.service_lease().path
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lease.exists() and json.loads(lease.read_text() or "{}").get("pid") == pid:
            return
        time.sleep(0.2)
    raise AssertionError(f"pid {pid} never took {lease}")


def test_one_service_per_run_and_a_dead_ones_lease_is_taken_over(tmp_path):
    run_dir = RunDir(tmp_path / "run")
    run_dir.path.mkdir()
    run_dir.config.write_text("algorithm:\n  p2o:\n    enabled: true\ngepa:\n  poll_s: 0.2\n")
    first = _service(run_dir)  # waits for an epoch's READY that never comes
    try:
        _wait_for_lease(run_dir, first.pid)
        second = _service(run_dir)
        out, err = second.communicate(timeout=120)
        assert second.returncode == 3 and "already running" in err and str(first.pid) in err
        first.send_signal(signal.SIGKILL)  # dies without releasing its lease
        first.wait(timeout=30)
        third = _service(run_dir)
        _wait_for_lease(run_dir, third.pid)  # a dead holder's lease is taken over
        run_dir.mark_finished()
        third.communicate(timeout=120)
        assert third.returncode == 0 and not run_dir.service_lease().path.exists()
    finally:
        for process in (first,):
            if process.poll() is None:
                process.kill()


def _copy_round_inputs(source: RunDir, target: RunDir) -> RunDir:
    """What the learner hands the service for epoch 0 (config, hard set, exported policy, READY) and FINISHED."""
    import shutil

    target.epoch(0).mkdir(parents=True)
    shutil.copy(source.config, target.config)
    target.write_hard_set(0, source.read_hard_set(0))
    shutil.copytree(source.policy(0), target.policy(0))
    target.mark_ready(0)
    target.mark_finished()  # the service stops after the rounds that are ready
    return target


def _round_result(run_dir: RunDir) -> dict:
    document = run_dir.read_templates(0)
    return {key: document[key] for key in ("pool", "dev_ids", "cover", "assignments", "budget", "counters")}


@pytest.mark.long
def test_killed_service_resumes_to_the_same_result(tmp_path, service_run):
    """kill -9 mid-evolution, restart: the same templates and budget as the uninterrupted round the learner's run
    got from its service (same inputs, seeded evaluation, greedy reflection), nothing charged twice."""
    expected = _round_result(service_run)
    assert expected["counters"]["parent_steps"] >= 2

    killed = _copy_round_inputs(service_run, RunDir(tmp_path / "killed"))
    service = _service(killed)
    state = killed.gepa_state(0)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and service.poll() is None:
        if state.exists() and json.loads(state.read_text())["counters"]["parent_steps"] >= 1:
            break
        time.sleep(0.05)
    assert service.poll() is None, "the round finished before it could be killed"
    saved = json.loads(state.read_text())
    assert not saved["finished"] and saved["budget"]["used"] < expected["budget"]["used"]
    service.send_signal(signal.SIGKILL)
    service.wait(timeout=30)
    assert not killed.done(0)

    restarted = _service(killed)  # takes over the dead instance's lease and resumes the round
    out, err = restarted.communicate(timeout=600)
    assert restarted.returncode == 0, err[-3000:]
    assert _round_result(killed) == expected
    # the SIGKILLed instance's reference server died with it (parent-death signal), the others stopped cleanly
    leftovers = subprocess.run(["pgrep", "-f", "vllm.entrypoints.openai.api_server"], capture_output=True, text=True)
    assert not leftovers.stdout.split(), leftovers.stdout


@pytest.mark.long
def test_overlap_schedule_defers_hard_prompts_until_their_templates_land(tmp_path, sanity_data):
    run_dir = tmp_path / "run"
    launch(run_dir, *p2o_overrides(sanity_data, "service"), "gepa.schedule=overlap")
    rows = metrics(run_dir)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    deferred = rows[1]["p2o/deferred_prompts"]
    assert deferred == rows[1]["hard/size"] >= 1 and "p2o/learner_idle_s" not in rows[1]  # epoch 0 ended unblocked
    in_batch = [rows[2]["p2o/deferred_in_batch"], rows[3]["p2o/deferred_in_batch"]]
    assert sum(in_batch) == deferred and in_batch == sorted(in_batch)  # the waiting prompts come last
    landed = [row for row in rows[2:] if "p2o/templates_landed_epoch" in row]
    assert len(landed) == 1 and landed[0]["p2o/templates_landed_epoch"] == 0
    first_with_hard = next(row for row in rows[2:] if row["p2o/deferred_in_batch"])
    assert first_with_hard["step"] >= landed[0]["step"]  # no hard prompt was served before its templates
    assert "p2o/learner_idle_s" in landed[0] or landed[0]["step"] < first_with_hard["step"]


def test_gepa_scores_are_greedy_and_deterministic(tiny_model_dir):
    """gepa.eval_temperature=0: a template scored twice, or with another seed, gets the very same responses and
    scores (one greedy rollout per item); pass@k's rollout.temperature still samples."""
    from hydra import compose, initialize_config_dir

    from p2o_hpc.config import register_configs, to_run_config
    from p2o_hpc.data import load_named
    from p2o_hpc.gepa import HardItem
    from p2o_hpc.gepa.runner import PolicyEvaluator
    from p2o_hpc.rollout.rollout_worker import RolloutWorker

    register_configs()
    with initialize_config_dir(str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = to_run_config(compose("config", overrides=[
            "experiment=smoke", "algorithm=p2o", "data.reward=early_substring", "rollout.max_response_tokens=24"]))
    assert cfg.gepa.eval_temperature == 0.0
    items = [HardItem(p.id, p.problem, "\\") for p in load_named("math500")[:6]]
    worker = RolloutWorker.from_config(cfg, str(tiny_model_dir), enable_sleep_mode=False)
    try:
        evaluate = PolicyEvaluator.from_config(cfg, worker)
        other_seed = PolicyEvaluator(worker, temperature=cfg.rollout.temperature, max_tokens=24,
                                     seed=cfg.gepa.seed + 12345, eval_temperature=0.0, reward=cfg.data.reward)
        for template in ("", "Think carefully, then answer."):
            first = evaluate(template, items)
            assert first == evaluate(template, items) == other_seed(template, items)
            assert any(e.response for e in first)
        # the same check at the sampling temperature tells the two apart: the setting reaches the engine
        hot = [PolicyEvaluator(worker, temperature=0.6, max_tokens=24, seed=seed, eval_temperature=0.6)
               for seed in (0, 12345)]
        assert [e.response for e in hot[0]("", items)] != [e.response for e in hot[1]("", items)]
        scores = evaluate.scores_k("", items, 4)  # pass@k: K samples at rollout.temperature
        assert len(scores) == len(items) and all(len(row) == 4 for row in scores)
    finally:
        worker.close()
