"""What an engine-host rank owns: the tokenizer, the colocated vLLM generator and the reward-grading pool.

One host per node (local rank 0); the trainer splits each step's prompts across hosts and gathers the results.
"""

from __future__ import annotations

import importlib
from typing import Callable, Iterable

import torch

from p2o_hpc.data import Problem, encode_prompt
from p2o_hpc.trainer.rollout_batch import Rollout

REWARDS = {
    "math_verify": "p2o_hpc.reward.math_verify_reward:strict_boxed_reward",  # the paper's strict boxed reward
    "early_substring": "p2o_hpc.reward.sanity:early_substring_reward",  # toy: end-to-end learning checks
}


def resolve_reward(name: str) -> Callable[[str, str], float]:
    """A registered reward name, or "package.module:function" for a grader `(response, ground_truth) -> float`.

    The grader runs in the pool's worker processes, so it must be importable there (module level).
    """
    target = REWARDS.get(name, name)
    if ":" not in target:
        raise KeyError(f"unknown reward {name!r}; known: {sorted(REWARDS)} or 'package.module:function'")
    module_name, function_name = target.split(":", 1)
    try:
        return getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise KeyError(f"reward {name!r}: cannot import {target}: {error}") from error


class RolloutWorker:
    def __init__(self, model_dir: str, *, template: str, max_prompt_tokens: int, max_response_tokens: int,
                 dtype: str, seed: int, gpu_memory_utilization: float, enable_sleep_mode: bool,
                 reward: str, reward_workers: int, reward_timeout_s: float):
        from transformers import AutoTokenizer

        from p2o_hpc.reward.math_verify_reward import RewardPool
        from p2o_hpc.rollout.generator import GeneratorProcess

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.template = template
        self.max_prompt_tokens = max_prompt_tokens
        self.reward_pool = RewardPool(reward_workers, timeout_s=reward_timeout_s, grader=resolve_reward(reward))
        self.generator = GeneratorProcess(
            model_dir,
            dtype=dtype,
            max_model_len=max_prompt_tokens + max_response_tokens,
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_sleep_mode=enable_sleep_mode and torch.cuda.is_available(),
        )

    def encode(self, problems: list[Problem]) -> list[list[int]]:
        encoded = [encode_prompt(self.tokenizer, problem.problem, self.template) for problem in problems]
        for problem, ids in zip(problems, encoded):
            if len(ids) > self.max_prompt_tokens:
                raise ValueError(
                    f"problem {problem.id!r} ({problem.source}) renders to {len(ids)} prompt tokens > "
                    f"data.max_prompt_tokens={self.max_prompt_tokens}"
                )
        return encoded

    def generate(self, problems: list[Problem], first_prompt_index: int, sampling) -> list[Rollout]:
        """K completions per problem, prompt-major; `prompt_index` counts from `first_prompt_index`."""
        prompt_ids = self.encode(problems)
        outputs = self.generator.generate(prompt_ids, sampling)
        return [
            Rollout(
                prompt_index=first_prompt_index + i,
                prompt_ids=prompt_ids[i],
                response_ids=list(completion.token_ids),
                rollout_logprobs=completion.logprobs,
                finish_reason=completion.finish_reason,
                text=self.tokenizer.decode(completion.token_ids, skip_special_tokens=True),
            )
            for i, completions in enumerate(outputs)
            for completion in completions
        ]

    def score(self, rollouts: list[Rollout], ground_truths: list[str]) -> None:
        """Sets each rollout's reward; `ground_truths` is aligned with rollouts."""
        rewards = self.reward_pool.score([rollout.text for rollout in rollouts], ground_truths)
        for rollout, reward in zip(rollouts, rewards):
            rollout.reward = float(reward)

    def update_weights(self, buckets: Iterable[list[tuple[str, torch.Tensor]]]) -> None:
        self.generator.update_weights(buckets)

    def prompt_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        return self.generator.prompt_logprobs(sequences)

    def sleep(self) -> None:
        """GPU sleep mode: hand vLLM's weights and KV cache memory to the colocated learner (no-op on CPU).

        The generator wakes by itself: weights before the next update, the KV cache before generating.
        """
        self.generator.sleep()

    def close(self) -> None:
        self.generator.close()
        self.reward_pool.close()
