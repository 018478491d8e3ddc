"""Verifiable rewards for RL on math: the strict boxed-answer reward graded by math-verify in worker processes."""

from p2o_hpc.reward.math_verify_reward import RewardPool, extract_last_boxed, strict_boxed_reward

__all__ = ["RewardPool", "extract_last_boxed", "strict_boxed_reward"]
