"""The launcher against a real SLURM cluster: two slurmd "nodes" on this machine (slurm/local_cluster.sh).

Every test runs ``python -m p2o_hpc.launch … cluster=slurm`` as a user would; the jobs are real submitit jobs with
real vLLM-CPU generators, megatron learners and GEPA service jobs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import submitit

from p2o_hpc.paths import REPO_ROOT
from p2o_hpc.run_dir import RunDir
from tests.test_sync_wandb import read_offline_run

pytestmark = [pytest.mark.slurm, pytest.mark.vllm, pytest.mark.multiproc]

SLURM = ["cluster=slurm", "cluster.poll_s=2", "logging=none"]


def launch(*args: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "p2o_hpc.launch", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})})


def sacct_state(job_id: str) -> str:
    """sacct is asynchronous: poll until the job has a terminal state recorded."""
    state = ""
    for _ in range(30):
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"], capture_output=True, text=True)
        state = out.stdout.strip().split(" ")[0] if out.stdout.strip() else ""
        if state and state not in ("RUNNING", "PENDING", "COMPLETING", "REQUEUED"):
            return state
        time.sleep(1)
    return state


def queued_jobs() -> list[str]:
    out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True)
    return out.stdout.split()


def metrics(run_dir: RunDir) -> list[dict]:
    return [json.loads(line) for line in run_dir.metrics.read_text().splitlines()]


def jobs(run_dir: RunDir) -> dict:
    return json.loads(run_dir.jobs.read_text())


@pytest.fixture(scope="module")
def sanity_data(toy_data) -> Path:
    """MATH500 prompts with the toy answer of the `early_substring` reward: nonzero rewards and losses."""
    return toy_data(8)


@pytest.fixture(scope="module", autouse=True)
def teacher_server(tiny_model_dir, tmp_path_factory):
    """A real OpenAI-compatible server (vLLM) standing in for the teacher endpoint. It starts in the background
    when this module starts (a minute on CPU) and is waited for by the tests that use it, which come last."""
    from p2o_hpc.reflection import ReferenceServer

    server = ReferenceServer(tiny_model_dir, log_dir=tmp_path_factory.mktemp("teacher"), served_model_name="teacher",
                             max_model_len=2048, start_timeout_s=300)
    # The server dies with the thread that started it (PR_SET_PDEATHSIG): that thread lives until teardown.
    executor = ThreadPoolExecutor(1)
    starting = executor.submit(server.start)
    try:
        yield server, starting
    finally:
        try:
            starting.result()
        finally:
            server.stop()
            executor.shutdown()


@pytest.fixture
def teacher(teacher_server) -> dict:
    server, starting = teacher_server
    starting.result()  # raises if the server did not come up
    return {"P2O_TEACHER_BASE_URL": server.base_url, "P2O_TEACHER_MODEL": "teacher", "OPENAI_API_KEY": "local"}


def test_bad_override_fails_before_submission(slurm_cluster, tmp_path):
    before = set(queued_jobs())
    result = launch("-m", *SLURM, "experiment=smoke", "algorithm.tau=0,1.5", f"hydra.sweep.dir={tmp_path / 's'}")
    assert result.returncode != 0
    assert "1 of 2 sweep points are invalid; nothing was submitted" in result.stderr, result.stderr[-3000:]
    assert "algorithm.tau=1.5" in result.stderr
    assert set(queued_jobs()) == before and not list((tmp_path / "s").glob("*/config.yaml"))

    typo = launch("-m", *SLURM, "experiment=smoke", "algorithm.tua=0,0.17", f"hydra.sweep.dir={tmp_path / 't'}")
    assert typo.returncode != 0 and "algorithm.tua" in typo.stderr and "Key 'tua' not in 'AlgorithmConfig'" in typo.stderr


@pytest.mark.long
def test_two_nodes_two_ranks_each(slurm_cluster, tmp_path):
    """TP=2 × DP=2: step 1 as 4 local processes, then `resume=` on SLURM over 2 nodes × 2 tasks: ranks on both
    nodes, TP inside a node, DP across, and the run continues from the local checkpoint with step 2."""
    run_dir = RunDir(tmp_path / "run")
    first = launch("experiment=smoke", "parallel.tensor=2", "parallel.data=2", "trainer.stop_after_steps=1",
                   "logging=none", f"hydra.run.dir={run_dir.path}")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    result = launch(f"resume={run_dir.path}", *SLURM[:2], "parallel.nodes=2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "slurm" in run_dir.config.read_text()
    assert "trainer.stop_after_steps=1" in run_dir.overrides.read_text()  # the original overrides are kept
    job_id = jobs(run_dir)["learner"]
    placements = submitit.SlurmJob(run_dir.submitit("slurm"), job_id, tasks=range(4)).results()
    by_rank = {p["rank"]: p for p in placements}
    assert [by_rank[r]["host"] for r in range(4)] == ["node1", "node1", "node2", "node2"]
    assert [by_rank[r]["local_rank"] for r in range(4)] == [0, 1, 0, 1]
    assert by_rank[0]["tp_group"] == [0, 1] and by_rank[2]["tp_group"] == [2, 3]
    assert by_rank[0]["dp_group"] == [0, 2] and by_rank[3]["dp_group"] == [1, 3]
    assert all(p["pp_group"] == [p["rank"]] and p["step"] == 2 for p in placements)
    assert [row["step"] for row in metrics(run_dir)] == [1, 2]
    log = (run_dir.submitit("slurm") / f"{job_id}_0_log.out").read_text()
    assert "resumed from" in log and "at step 1" in log


def test_preemption_requeues_and_resumes(slurm_cluster, tmp_path, sanity_data):
    """USR2 (the timeout path) while step 1 of 4 is under way (2 steps an epoch, so step 1 has no regular
    checkpoint): checkpoint at the step boundary, requeue, resume; no step lost or repeated, and the resumed steps
    equal an uninterrupted run of the same config. The preempted run logs to wandb offline: each of its jobs leaves
    an offline run (wandb ignores `resume` offline), and tools/sync_wandb.py makes them one run of its steps."""
    common = [*SLURM[:2], "experiment=smoke", f"data.train={sanity_data}", "data.limit=8",
              "data.reward=early_substring", "rollout.max_response_tokens=8", "algorithm.max_steps=4",
              "algorithm.lr=2e-3", "trainer.save_every=100", "cluster.time_min=5", "cluster.max_num_timeout=3"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    straight, preempted = RunDir(tmp_path / "straight"), RunDir(tmp_path / "preempted")
    procs = [subprocess.Popen([sys.executable, "-m", "p2o_hpc.launch", *common, logging,
                               f"hydra.run.dir={run_dir.path}"], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
             for run_dir, logging in ((straight, "logging=none"), (preempted, "logging=wandb_offline"))]
    try:
        deadline = time.time() + 600
        while time.time() < deadline and procs[1].poll() is None:
            if preempted.learner_lease().path.exists():  # the trainer is up (its signal handling too)
                break
            time.sleep(0.2)
        job_id = jobs(preempted)["learner"]
        submitit.SlurmJob(preempted.submitit("slurm"), job_id)._interrupt(timeout=True)  # scancel --signal USR2
        outputs = [proc.communicate(timeout=900) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    for proc, (out, err) in zip(procs, outputs):
        assert proc.returncode == 0, out[-3000:] + err[-5000:]

    log = "".join(path.read_text() for path in preempted.submitit("slurm").glob(f"{job_id}_0_log.*"))
    assert "caught SIGUSR2" in log and f"Requeued job {job_id}" in log, log[-3000:]
    assert "step 1: checkpoint before stopping (signal)" in log and "resumed from" in log and "at step 1" in log
    # Save-before-deadline: 5 min of walltime (read from squeue) is less than the 99 steps to the next regular
    # checkpoint, so the uninterrupted run checkpointed right after step 1.
    straight_log = "".join(path.read_text() for path in straight.submitit("slurm").glob("*_0_log.out"))
    assert "step 1: checkpoint early" in straight_log, straight_log[-3000:]
    a, b = metrics(straight), metrics(preempted)
    assert [row["step"] for row in b] == [1, 2, 3, 4]  # the counter continued, nothing repeated
    for row_a, row_b in zip(a, b):
        for key in ("reward/mean", "actor/loss", "actor/grad_norm", "response/length_mean"):
            assert row_b[key] == pytest.approx(row_a[key], rel=1e-4, abs=1e-6), (row_b["step"], key)
    assert any(row["actor/loss"] != 0 for row in a)  # a comparison of something
    assert sacct_state(job_id) == "COMPLETED"

    # wandb offline: one offline run per job, under the run's one id; the tool rebuilds the run from metrics.jsonl.
    run_id = preempted.wandb_run_id.read_text().strip()
    per_job = sorted((preempted.path / "wandb").glob("offline-run-*"))
    assert len(per_job) == 2 and all(folder.name.endswith(run_id) for folder in per_job), per_job
    assert log.count("wandb offline: this job's part of the run is") == 2
    assert [read_offline_run(folder).steps for folder in per_job] == [[1], [2, 3, 4]]  # what `wandb sync` would get
    synced = subprocess.run([sys.executable, "tools/sync_wandb.py", str(preempted.path)], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert synced.returncode == 0, synced.stdout + synced.stderr
    folder = Path(synced.stdout.split("wandb sync ")[-1].strip())
    run = read_offline_run(folder)
    assert [record.run_id for record in run.runs] == [run_id]
    assert run.steps == [row["step"] for row in b]  # continuous and unique (above), each once
    assert [row["reward/mean"] for row in run.history] == [row["reward/mean"] for row in b]


@pytest.mark.long
def test_runtime_failure_is_isolated(slurm_cluster, tmp_path, teacher):
    """A point that crashes in its job is reported FAILED (its GEPA service cancelled); its sibling completes.
    (gepa.min_hard=100: no GEPA round, the completing point's service just ends with its run.)"""
    sweep = tmp_path / "sweep"
    result = launch("-m", *SLURM, "experiment=smoke", "algorithm=p2o", "reflection=teacher", "gepa.min_hard=100",
                    "data.max_prompt_tokens=512,8", f"hydra.sweep.dir={sweep}", env=teacher)
    assert result.returncode != 0
    rows = {Path(row["run_dir"]).name: row for row in json.loads((sweep / "summary.json").read_text())}
    failed = next(row for name, row in rows.items() if "max_prompt_tokens=8" in name)
    ok = next(row for name, row in rows.items() if "max_prompt_tokens=512" in name)
    assert ok["state"] == "COMPLETED" and ok["step"] == 2
    assert failed["state"] == "FAILED" and "max_prompt_tokens" in failed["error"], failed
    assert "FAILED" in result.stdout and "ended FAILED" in result.stderr
    service = jobs(RunDir(failed["run_dir"]))["gepa_service"][0]
    assert sacct_state(service) == "CANCELLED"


@pytest.mark.long
def test_sweep_reflection_self_teacher(slurm_cluster, tmp_path, teacher):
    """`-m reflection=self,teacher`: two points, each a learner job + a GEPA service job; the self point's service
    is cancelled before its round and resubmitted by the launcher; both services end with their runs.

    The smoke data: the tiny model solves none of the 4 prompts, all are hard; a budget of 40 rollouts leaves
    room for one reflective proposal after the seed's dev evaluation (16)."""
    sweep = tmp_path / "sweep"
    command = [sys.executable, "-m", "p2o_hpc.launch", "-m", *SLURM, "experiment=smoke", "algorithm=p2o",
               "reflection=self,teacher", "gepa.max_metric_calls=40", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore", **teacher})
    killed, self_dir = None, None
    try:
        deadline = time.time() + 600
        while killed is None and time.time() < deadline and proc.poll() is None:
            for point in sweep.glob("*reflection=self*"):
                if not RunDir(point).jobs.exists():
                    continue
                first = jobs(RunDir(point))["gepa_service"][0]
                if first in queued_jobs():
                    subprocess.run(["scancel", first], check=True)  # the service dies while its learner lives
                    killed, self_dir = first, RunDir(point)
            time.sleep(1)
        out, err = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:] + err[-5000:]
    assert killed is not None, "the self point's service job was never seen in the queue"

    summary = json.loads((sweep / "summary.json").read_text())
    assert len(summary) == 2 and all(row["state"] == "COMPLETED" for row in summary), summary
    assert {Path(row["run_dir"]).name for row in summary} == {p.name for p in sweep.iterdir() if p.is_dir()}
    assert "p2o_hpc runs" in out and "COMPLETED" in out
    for row in summary:
        run_dir = RunDir(row["run_dir"])
        assert [r["step"] for r in metrics(run_dir)] == [1, 2]
        assert run_dir.read_templates(0)["counters"]["proposed"] >= 1  # the reflection endpoint answered
        config = run_dir.config.read_text()
        assert ("kind: teacher" in config) == ("reflection=teacher" in run_dir.name)
        point_jobs = jobs(run_dir)
        assert sacct_state(point_jobs["learner"]) == "COMPLETED"
        for service in point_jobs["gepa_service"]:
            assert sacct_state(service) in ("COMPLETED", "CANCELLED"), service
            assert service not in queued_jobs()
    self_jobs = jobs(self_dir)["gepa_service"]
    assert self_jobs[0] == killed and len(self_jobs) == 2  # resubmitted once
    assert (sweep.parent / "latest").resolve() == sweep.resolve()
