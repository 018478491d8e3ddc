"""The launcher's pieces that need no cluster: config checks, run-dir naming, walltime arithmetic, the run lease,
signal handling, the summary. (The real SLURM paths are in test_slurm.py.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from p2o_hpc.algo.hard_mining import is_hard
from p2o_hpc.cluster.runs import RunHandle, preflight, report
from p2o_hpc.cluster.sweep_launcher import point_dir_name
from p2o_hpc.config import RunConfig, to_run_config, validate
from p2o_hpc.lease import LeaseHeld
from p2o_hpc.paths import REPO_ROOT
from p2o_hpc.run_dir import RunDir
from p2o_hpc.trainer.preemption import StopSignal, parse_slurm_duration, should_checkpoint_early


def launch(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "p2o_hpc.launch", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})


@pytest.mark.parametrize("text, seconds", [("1-02:03:04", 93784), ("02:03:04", 7384), ("03:04", 184),
                                           ("UNLIMITED", None), ("INVALID", None), ("", None)])
def test_parse_slurm_duration(text, seconds):
    assert parse_slurm_duration(text) == seconds


def test_checkpoint_early_only_when_the_next_one_comes_too_late():
    assert should_checkpoint_early(remaining_s=100, step_s=30, steps_to_next_save=3, margin_s=20)  # 90 > 80
    assert not should_checkpoint_early(remaining_s=200, step_s=30, steps_to_next_save=3, margin_s=20)
    assert not should_checkpoint_early(remaining_s=None, step_s=30, steps_to_next_save=3, margin_s=20)


def test_tau_defines_hard():
    six = lambda successes: [1.0] * successes + [0.0] * (6 - successes)  # noqa: E731
    assert is_hard(six(0), tau=0.0) and not is_hard(six(1), tau=0.0)
    assert is_hard(six(1), tau=0.17) and not is_hard(six(2), tau=0.17)  # the authors' near-hard prompts


def test_paper_preset_mines_near_hard_prompts():
    """experiment=paper_p2o mines as the authors' scripts (add_near_hard=True): a K=6 group with one success is
    hard, with two it is not; the hard set reaches GEPA with both kinds."""
    from hydra import compose, initialize_config_dir

    from p2o_hpc.config import register_configs
    from p2o_hpc.algo.hard_mining import HardSampleMiner

    register_configs()
    with initialize_config_dir(str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = to_run_config(compose("config", overrides=["experiment=paper_p2o"]))
    k, tau = cfg.algorithm.n_samples, cfg.algorithm.tau
    assert k == 6 and 1 / k <= tau < 2 / k
    miner = HardSampleMiner(tau=tau, failed_responses=1, max_response_chars=100)
    for prompt_id, successes in (("none", 0), ("one", 1), ("two", 2)):
        miner.add(prompt_id, "q", "1", [1.0] * successes + [0.0] * (k - successes), ["wrong"] * (k - successes))
    assert [row["prompt_id"] for row in miner.hard_set()] == ["none", "one"]


def test_nodes_times_ranks_must_be_the_world_size():
    cfg = RunConfig()
    cfg.cluster.kind = "slurm"
    cfg.parallel.tensor, cfg.parallel.data, cfg.parallel.nodes = 2, 2, 2
    validate(cfg)  # 2 nodes × 2 ranks
    cfg.parallel.gpus_per_node = 4
    with pytest.raises(ValueError, match="parallel.nodes=2 × parallel.gpus_per_node=4"):
        validate(cfg)
    cfg.parallel.gpus_per_node, cfg.cluster.kind = None, "local"
    with pytest.raises(ValueError, match="needs cluster=slurm"):
        validate(cfg)


def test_preflight_names_the_missing_key_variable(monkeypatch):
    cfg = to_run_config({"algorithm": {"p2o": {"enabled": True}}, "reflection": {"kind": "teacher",
                         "base_url": "https://example.invalid/v1", "model": "m", "api_key_env": "P2O_TEST_KEY"}})
    monkeypatch.delenv("P2O_TEST_KEY", raising=False)
    with pytest.raises(ValueError, match=r"\$P2O_TEST_KEY"):
        preflight(cfg)
    monkeypatch.setenv("P2O_TEST_KEY", "secret")
    preflight(cfg)
    cfg.data.train = "/nonexistent/train.jsonl"
    with pytest.raises(FileNotFoundError, match="data.train=/nonexistent/train.jsonl"):
        preflight(cfg)


def test_preflight_refuses_a_teacher_without_an_endpoint(monkeypatch):
    """The teacher preset has no default URL (no public default serves the authors' Kimi model name)."""
    from hydra import compose, initialize_config_dir

    from p2o_hpc.config import register_configs

    monkeypatch.delenv("P2O_TEACHER_BASE_URL", raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "secret")
    register_configs()
    with initialize_config_dir(str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = to_run_config(compose("config", overrides=["experiment=paper_p2o", "reflection=teacher"]))
    assert cfg.reflection.base_url is None and cfg.reflection.model == "moonshotai/Kimi-K2-Instruct-0905"
    with pytest.raises(ValueError, match=r"P2O_TEACHER_BASE_URL"):
        preflight(cfg)
    cfg.reflection.base_url = "http://127.0.0.1:9/v1"
    preflight(cfg)


def test_point_dir_names_are_one_component_and_bounded():
    assert point_dir_name("data.train=/a/b.jsonl,reflection=self") == "data.train=_a_b.jsonl,reflection=self"
    long = point_dir_name("x=" + "y" * 400)
    assert len(long) == 200 and "/" not in long and long != point_dir_name("x=" + "y" * 399 + "z")


def test_lease_refuses_a_live_holder_and_waits_out_a_dead_one(tmp_path):
    run_dir = RunDir(tmp_path)
    holder = run_dir.learner_lease().acquire()
    try:
        with pytest.raises(LeaseHeld, match="the learner of this run is already running"):
            run_dir.learner_lease().acquire()
    finally:
        holder.release()
    assert not holder.path.exists()
    # A holder on another host whose heartbeat goes stale: the waiting acquirer gets it once it is stale.
    holder.path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "t", "heartbeat": time.time() - 59}))
    started = time.monotonic()
    run_dir.learner_lease(heartbeat_s=0.5, stale_s=60).acquire(wait_s=10).release()
    assert 0.5 < time.monotonic() - started < 10


def test_stop_signal_usr2_reaches_the_flag_and_children_survive_it():
    """USR2 is blocked (inherited by children) and taken by a sigwait thread: the flag is set, a child lives."""
    code = r"""
import os, signal, subprocess, sys, time
from p2o_hpc.trainer.preemption import StopSignal
stop = StopSignal().install()
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
os.kill(child.pid, signal.SIGUSR2)
os.kill(os.getpid(), signal.SIGUSR2)
for _ in range(100):
    if stop.requested:
        break
    time.sleep(0.05)
time.sleep(0.5)
print(stop.requested, stop.requeue, child.poll() is None)
child.kill()
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.splitlines()[-1].split() == ["True", "True", "True"], out.stdout + out.stderr[-2000:]


def test_sigterm_stops_without_requeue():
    stop = StopSignal()
    stop._handle(signal.SIGTERM)
    assert stop.requested and not stop.requeue
    stop._handle(signal.SIGUSR2)  # preemption: TERM, then USR2
    assert stop.requeue


def test_summary_reports_each_point(tmp_path, capsys):
    from rich.console import Console

    done, broken = RunDir(tmp_path / "a=1"), RunDir(tmp_path / "a=2")
    done.path.mkdir(), broken.path.mkdir()
    done.metrics.write_text(json.dumps({"step": 1, "reward/mean": 0.5, "hard/size": 3}) + "\n"
                            + json.dumps({"step": 2, "reward/mean": 0.75}) + '\n{"step": 3, "rew')  # killed mid-write
    handles = [RunHandle("a=1", done, RunConfig(), state="COMPLETED"),
               RunHandle("a=2", broken, RunConfig(), state="FAILED", error="ValueError: boom")]
    assert not report(handles, Console(width=200), summary_dir=tmp_path)
    rows = json.loads((tmp_path / "summary.json").read_text())
    assert [(r["point"], r["state"], r["step"], r["reward"], r["hard"]) for r in rows] == [
        ("a=1", "COMPLETED", 2, 0.75, 3), ("a=2", "FAILED", None, None, None)]
    assert "ValueError: boom" in capsys.readouterr().out and "| a=2 |" in (tmp_path / "summary.md").read_text()


def test_resume_refuses_config_changes(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    result = launch(f"resume={run_dir}", "algorithm.lr=1e-3")
    assert result.returncode != 0 and "config.yaml does not exist" in result.stderr
    RunDir(run_dir).config.write_text("model:\n  path: tiny\n")
    result = launch(f"resume={run_dir}", "algorithm.lr=1e-3")
    assert result.returncode != 0 and "['algorithm.lr=1e-3']" in result.stderr and "only cluster=" in result.stderr


def test_sweep_with_a_bad_point_starts_nothing(tmp_path):
    result = launch("-m", "experiment=smoke", "algorithm.n_samples=4,1", f"hydra.sweep.dir={tmp_path}")
    assert result.returncode != 0
    assert "1 of 2 sweep points are invalid; nothing was submitted" in result.stderr
    assert "algorithm.n_samples=1" in result.stderr and "must be ≥ 2" in result.stderr and not list(tmp_path.glob("*/config.yaml"))


def _groups() -> list[tuple[str, str]]:
    conf = REPO_ROOT / "conf"
    return [(group.name, path.stem) for group in sorted(conf.iterdir()) if group.is_dir() and group.name != "hydra"
            for path in sorted(group.glob("*.yaml"))]


@pytest.mark.parametrize("group, name", _groups())
def test_every_preset_composes_and_validates(group, name):
    """Every YAML in conf/ (site presets included) is typed by the schema: a misspelt key there fails here."""
    from hydra import compose, initialize_config_dir

    from p2o_hpc.config import register_configs

    register_configs()
    with initialize_config_dir(str(REPO_ROOT / "conf"), version_base="1.3"):
        cfg = to_run_config(compose("config", overrides=[f"{group}={name}"]))
    validate(cfg)
    assert cfg.cluster.kind in ("local", "slurm")


def test_a_live_learner_keeps_others_out_of_its_run_dir(tmp_path):
    from p2o_hpc.cluster.runs import prepare_run_dir

    run_dir = RunDir(tmp_path)
    run_dir.mark_finished()  # of an earlier launch
    with run_dir.learner_lease():
        with pytest.raises(RuntimeError, match="a learner is already writing this run dir"):
            prepare_run_dir(RunConfig(), run_dir, overrides=[])
    prepare_run_dir(RunConfig(), run_dir, overrides=["a=1"])  # released: free again
    assert "a=1" in run_dir.overrides.read_text() and not run_dir.finished()
    assert run_dir.load_config() == RunConfig()
