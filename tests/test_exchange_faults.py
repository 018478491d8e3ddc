"""Faults between the learner and the GEPA service, each reproduced for real: a killed service (its lease goes
stale), a killed launcher, a corrupt or hostile templates.json, a torn metrics line, a run dir whose parent
refuses the `latest` link. Each ends in a bounded time with a clear message or a clean continuation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from p2o_hpc.cluster.local_run import LocalServiceSupervisor
from p2o_hpc.cluster.runs import point_latest
from p2o_hpc.paths import REPO_ROOT
from p2o_hpc.run_dir import RunDir
from p2o_hpc.trainer.metrics import MetricsSink

SERVICE_CONFIG = "algorithm:\n  p2o:\n    enabled: true\ngepa:\n  poll_s: 0.2\n"


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def wait_until(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout} s: {what}")


def lease_pid(run_dir: RunDir) -> int | None:
    holder = run_dir.service_lease().live_holder()
    return None if holder is None else holder["pid"]


# -- the learner waiting for a round ----------------------------------------------------------------------------

def test_a_killed_service_is_given_up_after_service_lost_s(tmp_path):
    """Its lease file stays behind with a dead pid: the learner skips the round instead of waiting 24 h."""
    run_dir = RunDir(tmp_path)
    lease = run_dir.service_lease()
    lease.path.write_text(json.dumps({**lease.owner, "pid": dead_pid(), "heartbeat": time.time()}))
    started = time.monotonic()
    assert run_dir.wait_for_templates(0, timeout_s=3600, poll_s=0.05, service_lost_s=0.5) is False
    assert time.monotonic() - started < 10
    assert run_dir.skipped(0) and "gepa.service_lost_s=0.5" in (run_dir.epoch(0) / "SKIPPED").read_text()


def test_the_learner_waits_as_long_as_the_service_lives(tmp_path):
    run_dir = RunDir(tmp_path)
    with run_dir.service_lease(heartbeat_s=0.1):  # a live service, working longer than service_lost_s
        timer = threading.Timer(1.5, run_dir.publish_templates, args=(0, {"assignments": {}}))
        timer.start()
        assert run_dir.wait_for_templates(0, timeout_s=60, poll_s=0.05, service_lost_s=0.3) is True
        timer.join()
    assert not run_dir.skipped(0)


# -- the service's side -----------------------------------------------------------------------------------------

def service_process(run_dir: RunDir, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "p2o_hpc.gepa.service", "--run-dir", str(run_dir.path), *args],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})


def service_dir(tmp_path: Path) -> RunDir:
    run_dir = RunDir(tmp_path / "run")
    run_dir.path.mkdir()
    run_dir.config.write_text(SERVICE_CONFIG)
    return run_dir


def test_the_service_skips_a_round_the_learner_gave_up(tmp_path):
    run_dir = service_dir(tmp_path)
    run_dir.mark_ready(0)  # no policy folder: a round it started would fail
    run_dir.mark_skipped(0, "test")
    run_dir.mark_finished()
    service = service_process(run_dir)
    out, _ = service.communicate(timeout=120)
    assert service.returncode == 0, out
    assert "evolving" not in out and run_dir.service_failure() is None


def test_a_killed_launcher_takes_its_service_down(tmp_path):
    run_dir = service_dir(tmp_path)
    launcher = subprocess.Popen(["sleep", "600"])
    service = service_process(run_dir, "--parent-pid", str(launcher.pid))
    try:
        wait_until(lambda: lease_pid(run_dir) == service.pid, 60, "the service holds its lease")
        launcher.kill()
        launcher.wait()
        out, _ = service.communicate(timeout=30)
        assert service.returncode == 143 and "is gone: stopping" in out  # stopped as on SIGTERM
        assert not run_dir.service_lease().path.exists()  # released on the way out
    finally:
        for process in (launcher, service):
            if process.poll() is None:
                process.kill()


def test_a_killed_local_service_is_restarted_while_the_learner_runs(tmp_path):
    run_dir = service_dir(tmp_path)
    supervisor = LocalServiceSupervisor(run_dir, max_restarts=1, poll_s=0.2)
    try:
        first = supervisor.process.pid
        wait_until(lambda: lease_pid(run_dir) == first, 60, "the service holds its lease")
        os.kill(first, signal.SIGKILL)  # no failure file, its lease left behind
        second = wait_until(lambda: lease_pid(run_dir) not in (None, first) and lease_pid(run_dir), 60,
                            "a restarted service took the dead one's lease over")
        assert supervisor.restarts == 1 and second == supervisor.process.pid
        os.kill(second, signal.SIGKILL)  # over gepa.max_restarts: left dead (the learner gives the round up)
        time.sleep(1.0)
        assert supervisor.restarts == 1 and supervisor.process.poll() is not None
    finally:
        supervisor.stop()
    assert supervisor.process.poll() is not None


# -- exchange files -------------------------------------------------------------------------------------------

CORRUPT = {
    "truncated": b'{"assignments": {"p1": ["Think', "not UTF-8": b'{"assignments": {"p1": ["\xff"]}}',
    "a list": b"[]", "bad assignments": b'{"assignments": {"p1": "one"}}', "metrics not an object": (
        b'{"assignments": {}, "metrics": [1]}'),
}


@pytest.mark.parametrize("content", CORRUPT.values(), ids=CORRUPT.keys())
def test_a_corrupt_templates_file_is_set_aside_not_read_forever(tmp_path, content):
    run_dir = RunDir(tmp_path)
    run_dir.publish_templates(0, {})
    run_dir.templates(0).write_bytes(content)
    first = run_dir.take_round(0)
    assert first.rejected and first.assignments == {} and "templates.json" in first.rejected
    assert not run_dir.templates(0).exists() and (run_dir.epoch(0) / "templates.json.rejected").read_bytes() == content
    again = run_dir.take_round(0)  # a resumed learner reads the round again: the same verdict, no crash
    assert again.rejected == first.rejected == run_dir.rejected_round(0)


def test_lone_surrogates_never_reach_a_tokenizer_or_a_writer(tmp_path):
    run_dir = RunDir(tmp_path)
    hostile = {"assignments": {"p1": ["Check \ud800 twice."]}, "metrics": {"gepa/x": 1.0, "gepa/text": "no"}}
    run_dir.publish_templates(0, hostile)  # a writer: the lone surrogate cannot be encoded as UTF-8
    assert run_dir.take_round(0).assignments == {"p1": ["Check \ufffd twice."]}
    run_dir.templates(1).parent.mkdir(parents=True)
    run_dir.templates(1).write_text(json.dumps(hostile))  # as JSON escapes ("\ud800"), which parse into one
    (run_dir.epoch(1) / "DONE").write_text("")
    taken = run_dir.take_round(1)
    assert taken.assignments == {"p1": ["Check \ufffd twice."]} and taken.metrics == {"gepa/x": 1.0}


# -- the learner's own files ------------------------------------------------------------------------------------

def test_resume_drops_a_torn_metrics_line(tmp_path):
    run_dir = RunDir(tmp_path)
    run_dir.metrics.write_text('{"step": 1, "a": 1}\n{"step": 2, "a": 2}\n{"step": 3, "a"')
    sink = MetricsSink(run_dir, wandb_mode="disabled", project="p", entity=None, name=None, config={})
    assert sink.truncate_after(2) == 1
    sink.log({"a": 3}, 3)
    assert [json.loads(line)["step"] for line in run_dir.metrics.read_text().splitlines()] == [1, 2, 3]


def test_latest_link_is_skipped_where_it_cannot_be_written(tmp_path, capsys):
    """(As root a read-only folder is still writable, so the refusal here is a `latest` that is a folder.)"""
    target = tmp_path / "run"
    target.mkdir()
    (tmp_path / "latest").mkdir()
    (tmp_path / "latest" / "keep").write_text("")
    assert point_latest(tmp_path, target) is False
    assert "no " in capsys.readouterr().err
    assert point_latest(tmp_path / "elsewhere", target) is True
    assert (tmp_path / "elsewhere" / "latest").resolve() == target.resolve()


def test_templates_for_prompts_outside_the_training_set_are_not_counted(tmp_path):
    from rich.console import Console

    from p2o_hpc.config import RunConfig
    from p2o_hpc.p2o.template_exchange import TemplateExchange

    run_dir = RunDir(tmp_path)
    run_dir.publish_templates(0, {"assignments": {"p1": ["Draw it."], "ghost": ["Draw it."]}, "metrics": {"m": 2}})
    exchange = TemplateExchange(RunConfig(), run_dir, rank=0, console=Console(stderr=True))
    assignments, metrics = exchange._read_round(0, frozenset({"p1", "p2"}))
    assert assignments == {"p1": ["Draw it."]} and metrics == {"m": 2, "p2o/unknown_prompt_ids": 1}


def test_a_lone_surrogate_in_a_data_row_is_cleaned(tmp_path):
    from p2o_hpc.data import load_problems

    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"problem": "What is 1+\ud800?", "answer": "2\ud800"}) + "\n")
    problem = load_problems(path)[0]
    assert problem.problem == "What is 1+\ufffd?" and problem.answer == "2\ufffd"
