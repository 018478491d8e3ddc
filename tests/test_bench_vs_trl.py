"""tools/bench_vs_trl.py's settings mapping: our bench config → TRL's GRPOConfig (pure logic: needs no trl)."""

from __future__ import annotations

import sys

import pytest

from p2o_hpc.paths import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "tools"))  # the tools import each other as scripts do (bench_rl_step, plan_memory)
import bench_vs_trl as bench  # noqa: E402
from plan_memory import compose  # noqa: E402


@pytest.fixture(scope="module")
def cfg():
    return compose(bench.our_overrides(4, []))


def test_one_generation_batch_is_two_optimizer_steps(cfg):
    settings = bench.trl_settings(cfg, steps=4)
    # 8 prompts × K=6 = 48 completions per generation, 2 optimizer steps of 24 (our 2 mini-batches of 4 prompts).
    assert settings["num_generations"] == 6
    per_optimizer_step = settings["per_device_train_batch_size"] * settings["gradient_accumulation_steps"]
    assert per_optimizer_step == 24
    assert settings["per_device_train_batch_size"] * settings["steps_per_generation"] == 48
    assert settings["max_steps"] == 8
    micro = bench.trl_settings(cfg, steps=4, micro_batch=4)
    assert (micro["per_device_train_batch_size"], micro["gradient_accumulation_steps"],
            micro["steps_per_generation"]) == (4, 6, 12)
    with pytest.raises(ValueError, match="does not divide"):
        bench.trl_settings(cfg, steps=4, micro_batch=5)


def test_sampling_and_loss_follow_our_config(cfg):
    settings = bench.trl_settings(cfg, steps=4, warmup_steps=2)
    assert (settings["temperature"], settings["top_p"], settings["max_completion_length"]) == (
        cfg.rollout.temperature, cfg.rollout.top_p, 256)
    assert (settings["beta"], settings["loss_type"], settings["scale_rewards"]) == (0.0, "dapo", "group")
    assert (settings["learning_rate"], settings["delta"]) == (cfg.algorithm.lr, cfg.algorithm.dual_clip_c)
    assert (settings["lr_scheduler_type"], settings["warmup_steps"]) == ("constant_with_warmup", 2)
    assert not settings["use_vllm"] and not settings["bf16"] and not settings["gradient_checkpointing"]

