"""In-training validation (validation.*): held-out accuracy of the policy after the configured steps, like verl's
trainer.test_freq / val_before_train, on the step's metrics line (metrics.jsonl and wandb; step 0 for
before_training).

Per set, with K = validation.n_samples responses per problem (greedy K = 1 by default):

    val/<set>/acc                  mean reward over every problem's K samples (K = 1, T = 0: the greedy answer)
    val/<set>/pass@K               (K > 1) share of problems with a solved sample (reward ≥ 1)
    val/<set>/response_length      mean response tokens
    val/<set>/problems             problems scored (a prompt longer than data.max_prompt_tokens is skipped)
    val/<set>/acc_with_templates, val/<set>/pass@K_with_templates
                                   P²O with validation.with_templates: the same problems under one template

The template rule: held-out problems never had a template assigned, so every one is scored under the single
template that did best on the current GEPA round's dev set (the pool's highest dev_mean, ties to the earlier
candidate: RunDir.best_template). It is one extra pass per set, its choice never looks at the held-out answers,
and it is the template GEPA's own gepa/dev_pass@k_best_template measures. When that template is ε (nothing beat
the plain prompt) the with-templates numbers are the plain ones. No round yet (or a skipped/set-aside one), a
template the engine refuses, or a GRPO run: no *_with_templates keys. (Taking the best of every cover template
per problem would be an oracle over the held-out answers, and cost one pass per template.)

Sets are read by the training data's own loader (recipe_split without a recipe: registered names, .json/.jsonl
paths, hf:<name>); "holdout" is data.recipe's held-out split of data.train. A resumed run does not validate a
step again whose val/ keys are already in metrics.jsonl.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch.distributed as dist

from p2o_hpc.config import RunConfig, ValidationConfig, validation_sets
from p2o_hpc.data import DatasetError, Problem, recipe_split
from p2o_hpc.rollout.generator import SamplingSettings

HOLDOUT = "holdout"  # validation.sets.<name>.data: the problems data.recipe holds out of data.train
PREFIX = "val/"


def load_validation_sets(cfg: RunConfig) -> dict[str, list[Problem]]:
    """Every validation set's problems (first `limit`); a bad one is a DatasetError naming validation.sets.<name>.
    Also the launcher's preflight, so a misspelt name fails before anything starts."""
    sets = {}
    for name, spec in validation_sets(cfg.validation).items():
        try:
            if spec.data == HOLDOUT:
                data = cfg.data
                problems = recipe_split(data.train, data.recipe, seed=data.recipe_seed, holdout=data.holdout,
                                        take=data.take).holdout
                if not problems:
                    raise DatasetError(f"data.recipe={data.recipe} holds nothing out of data.train={data.train}")
            else:
                problems = recipe_split(spec.data, None, split=spec.split).train
        except DatasetError as error:
            raise DatasetError(f"validation.sets.{name}.data={spec.data}: {error}") from error
        sets[name] = problems[: spec.limit] if spec.limit else problems
    return sets


def is_due(val: ValidationConfig, step: int, total_steps: int) -> bool:
    """Whether the schedule asks for a validation after `step` steps (0: before training)."""
    if step == 0:
        return val.before_training
    return (val.every_n_steps > 0 and step % val.every_n_steps == 0) or (val.at_end and step == total_steps)


def set_metrics(name: str, rows: list, *, suffix: str = "") -> dict:
    """val/<name>/* of one scoring pass. rows: per problem (rewards of its K samples, their lengths), None for a
    skipped problem. Nothing scored → only the count (an empty set has no accuracy, never a fake 0)."""
    scored = [row for row in rows if row is not None]
    key = f"{PREFIX}{name}/"
    metrics = {f"{key}problems": len(scored)} if not suffix else {}
    if not scored:
        return metrics
    rewards = [rewards for rewards, _ in scored]
    k = len(rewards[0])
    metrics[f"{key}acc{suffix}"] = float(np.mean([np.mean(r) for r in rewards]))
    if k > 1:
        metrics[f"{key}pass@{k}{suffix}"] = float(np.mean([max(r) >= 1.0 for r in rewards]))
    if not suffix:
        metrics[f"{key}response_length"] = float(np.mean([np.mean(lengths) for _, lengths in scored]))
    return metrics


def with_templates_metrics(name: str, plain: list, templated: list | None) -> dict:
    """The *_with_templates keys: from `templated` (the pass under the best template), or the plain pass itself when
    that template is ε (templated is None then)."""
    return set_metrics(name, plain if templated is None else templated, suffix="_with_templates")


def validated_steps(metrics_path: Path) -> set[int]:
    """Steps that already have val/ keys in metrics.jsonl (a resumed run must not log them twice)."""
    if not metrics_path.is_file():
        return set()
    steps = set()
    for line in metrics_path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
            if any(str(key).startswith(PREFIX) for key in row):
                steps.add(int(row["step"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            continue  # a torn line: the sink drops it
    return steps


class Validator:
    """The run's validation: which steps, which sets, how to decode; `run` scores the engine's current weights."""

    def __init__(self, cfg: RunConfig, total_steps: int, console=None):
        self.val, self.total_steps, self.console = cfg.validation, total_steps, console
        scheduled = self.val.every_n_steps > 0 or self.val.before_training or self.val.at_end
        self.sets = load_validation_sets(cfg) if scheduled else {}
        self.max_tokens = self.val.max_tokens or cfg.rollout.max_response_tokens
        self.logged: set[int] = set()  # steps already in metrics.jsonl (resume), then each validated step

    @property
    def enabled(self) -> bool:
        return bool(self.sets)

    def due(self, step: int) -> bool:
        return self.enabled and step not in self.logged and is_due(self.val, step, self.total_steps)

    def sampling(self) -> SamplingSettings:
        val = self.val
        return SamplingSettings(n=val.n_samples, temperature=val.temperature, top_p=val.top_p,
                                max_tokens=self.max_tokens, seed=val.seed, logprobs=False)

    def run(self, step: int, rollouts, template: str | None) -> dict:
        """Collective (rollouts: the RolloutSide, its engine loaded with the policy to score): val/* of every set,
        plain and, when validation.with_templates and `template` is not None, under `template`."""
        started, sampling = time.perf_counter(), self.sampling()
        template = template if self.val.with_templates else None
        metrics = {}
        for name, problems in self.sets.items():
            plain = rollouts.graded(problems, sampling)
            metrics.update(set_metrics(name, plain))
            if template is not None:
                templated = rollouts.graded(problems, sampling, template) if template else None
                if templated is not None or not template:  # None with a template: the engine refused it
                    metrics.update(with_templates_metrics(name, plain, templated))
        metrics["time/validation"] = time.perf_counter() - started
        self.logged.add(step)
        if self.console is not None and dist.get_rank() == 0:
            accs = ", ".join(f"{name} {metrics[f'{PREFIX}{name}/acc']:.3f}" for name in self.sets
                             if f"{PREFIX}{name}/acc" in metrics)
            self.console.print(f"step {step}: validation acc {accs or '(nothing scored)'}")
        return metrics
