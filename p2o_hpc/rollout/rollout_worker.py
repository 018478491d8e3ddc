"""What an engine-host rank owns: the tokenizer, the colocated vLLM generator and the reward-grading pool.

rollout.engines_per_node hosts per node (by default one per GPU, each engine on its host rank's own GPU, fed by CUDA
IPC there); the trainer splits each step's prompts across hosts and gathers the results.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import torch

from p2o_hpc.data import Problem, encode_prompt
from p2o_hpc.data.evolved_templates import rejection_reason
from p2o_hpc.reward.registry import resolve_reward
from p2o_hpc.records import Rollout

# Room for the separator between template and question, and for tokens merging across the join.
TEMPLATE_SLACK_TOKENS = 8


class RolloutWorker:
    def __init__(self, model_dir: str, *, template: str, max_prompt_tokens: int, max_response_tokens: int,
                 dtype: str, seed: int, gpu_memory_utilization: float, enable_sleep_mode: bool,
                 reward: str, reward_workers: int, reward_timeout_s: float, template_max_tokens: int = 0,
                 chat_template_kwargs: dict | None = None):
        from transformers import AutoTokenizer

        from p2o_hpc.reward.math_verify_reward import RewardPool
        from p2o_hpc.rollout.generator_process import GeneratorProcess

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.template = template
        # Every prompt this host sends to its engine is rendered here (rollouts, the CD pair x / x̃, GEPA scores and
        # pass@k), so the chat-template variables (Qwen3: enable_thinking=False) hold on every path.
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.max_prompt_tokens = max_prompt_tokens
        self.template_max_tokens = template_max_tokens  # P²O templates; 0 when P²O is off
        self.reward_pool = RewardPool(reward_workers, timeout_s=reward_timeout_s, grader=resolve_reward(reward))
        self.generator = GeneratorProcess(
            model_dir,
            dtype=dtype,
            max_model_len=max_prompt_tokens + (template_max_tokens + TEMPLATE_SLACK_TOKENS if template_max_tokens else 0)
            + max_response_tokens,
            seed=seed,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_sleep_mode=enable_sleep_mode and torch.cuda.is_available(),
        )

    @classmethod
    def from_config(cls, cfg, model_dir: str, *, max_response_tokens: int | None = None,
                    enable_sleep_mode: bool | None = None) -> "RolloutWorker":
        """The run's engine host (RunConfig `cfg`) on `model_dir`: the learner's, or the GEPA service's own."""
        vllm_dtypes = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
        p2o = cfg.algorithm.p2o
        return cls(
            model_dir, template=cfg.data.template, max_prompt_tokens=cfg.data.max_prompt_tokens,
            max_response_tokens=max_response_tokens or cfg.rollout.max_response_tokens,
            dtype=cfg.rollout.dtype if cfg.rollout.dtype != "auto" else vllm_dtypes[cfg.model.params_dtype],
            seed=cfg.rollout.seed, gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
            enable_sleep_mode=cfg.rollout.enable_sleep_mode if enable_sleep_mode is None else enable_sleep_mode,
            reward=cfg.data.reward, reward_workers=cfg.reward.workers, reward_timeout_s=cfg.reward.timeout_s,
            template_max_tokens=p2o.template_max_tokens if p2o.enabled else 0,
            chat_template_kwargs=dict(cfg.data.chat_template_kwargs),
        )

    def encode(self, problems: list[Problem], p2o_templates: list[str] | None = None) -> list[list[int]]:
        """Prompt ids per problem, each under its P²O template ("" or None: the original prompt)."""
        p2o_templates = p2o_templates or [""] * len(problems)
        encoded = [encode_prompt(self.tokenizer, problem.problem, self.template, p2o_template=p2o_template,
                                 chat_template_kwargs=self.chat_template_kwargs)
                   for problem, p2o_template in zip(problems, p2o_templates)]
        for problem, p2o_template, ids in zip(problems, p2o_templates, encoded):
            limit = self.max_prompt_tokens + (self.template_max_tokens + TEMPLATE_SLACK_TOKENS if p2o_template else 0)
            if len(ids) > limit:
                raise ValueError(
                    f"problem {problem.id!r} ({problem.source}) renders to {len(ids)} prompt tokens > "
                    f"data.max_prompt_tokens={self.max_prompt_tokens}"
                    + (" (+ algorithm.p2o.template_max_tokens)" if p2o_template else "")
                )
        return encoded

    def checked_templates(self, templates: list[list[str]]) -> tuple[list[list[str]], int]:
        """Templates that may reach the model; a rejected one becomes "" (the original prompt). Returns the count."""
        rejected = 0
        checked = []
        for group in templates:
            kept = []
            for template in group:
                if rejection_reason(template, self.tokenizer, self.template_max_tokens) is None:
                    kept.append(template)
                else:
                    kept.append("")
                    rejected += 1
            checked.append(kept)
        return checked, rejected

    def generate(self, problems: list[Problem], first_prompt_index: int, sampling,
                 templates: list[list[str]] | None = None, distill: bool = True) -> list[Rollout]:
        """K completions per problem, prompt-major; `prompt_index` counts from `first_prompt_index`.

        templates[i][k]: the P²O template of problem i's k-th rollout ("" = the original prompt). Templated
        rollouts train on the original prompt when `distill` (context distillation), else on the templated one.
        """
        prompt_ids = self.encode(problems)
        k = sampling.n
        if templates is None or not any(any(group) for group in templates):
            outputs = self.generator.generate(prompt_ids, sampling)
            templates = [[""] * k for _ in problems]
            generation_ids = [[ids] * k for ids in prompt_ids]
        else:
            # One request per rollout (its own prompt); seeds stay a function of (step, prompt, sample).
            flat_problems = [problem for problem in problems for _ in range(k)]
            flat_templates = [template for group in templates for template in group]
            flat_ids = self.encode(flat_problems, flat_templates)
            singles = self.generator.generate(flat_ids, dataclasses.replace(sampling, n=1))
            outputs = [[singles[i * k + j][0] for j in range(k)] for i in range(len(problems))]
            generation_ids = [flat_ids[i * k : (i + 1) * k] for i in range(len(problems))]
        rollouts = []
        for i, completions in enumerate(outputs):
            for j, completion in enumerate(completions):
                template, seen = templates[i][j], generation_ids[i][j]
                rollouts.append(Rollout(
                    prompt_index=first_prompt_index + i,
                    prompt_ids=prompt_ids[i] if (distill or not template) else seen,
                    response_ids=list(completion.token_ids),
                    rollout_logprobs=completion.logprobs,
                    finish_reason=completion.finish_reason,
                    text=self.tokenizer.decode(completion.token_ids, skip_special_tokens=True),
                    template=template,
                    generation_prompt_ids=seen if template else None,
                ))
        return rollouts

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

        The generator wakes by itself: weights before the next update, the KV cache before generating; the
        learner's cached GPU memory is emptied before each such call (GeneratorProcess).
        """
        self.generator.sleep()

    def close(self) -> None:
        self.generator.close()
        self.reward_pool.close()
