"""The reward registry: graders by name (picked per dataset by ``data.reward``) and each one's format rule.

A grader is a module-level function ``(response, ground_truth) -> float`` that RewardPool runs in its spawned
worker processes, so it is named here by "package.module:function" and imported there (never a closure, never a
thread: math-verify's timeouts are ``signal.alarm`` in the worker's main thread).

``format_ok`` answers, cheaply and in-process, whether a response keeps the answer FORMAT that reward demands
(the GEPA feedback builder uses it to tell the reflection model that the format, not the maths, was wrong).

REWARDS is keyed by p2o_hpc.choices.RewardName, the names the config's validate() accepts for data.reward
(tests/test_config_schema.py keeps the two equal).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from p2o_hpc.choices import RewardName
from p2o_hpc.reward.math_verify_reward import MAX_BOXED_CHARS, extract_last_boxed

REWARDS: dict[str, str] = {
    RewardName.math_verify: "p2o_hpc.reward.math_verify_reward:strict_boxed_reward",  # the paper's strict box
    # The authors' per-dataset graders (verl/utils/reward_score/__init__.py:default_compute_score by data_source).
    RewardName.deepscaler: "p2o_hpc.reward.dataset_graders:deepscaler_reward",
    RewardName.deepmath: "p2o_hpc.reward.dataset_graders:deepmath_reward",  # exactly one \boxed{}
    RewardName.early_substring: "p2o_hpc.reward.sanity:early_substring_reward",  # toy: end-to-end learning checks
}
UNKNOWN = "unknown reward {!r}; known: " + ", ".join(RewardName) + " or 'package.module:function'"


def resolve_reward(name: str) -> Callable[[str, str], float]:
    """A registered reward name, or "package.module:function" for a grader `(response, ground_truth) -> float`.

    The grader runs in the pool's worker processes, so it must be importable there (module level).
    """
    target = REWARDS.get(name, name)
    if ":" not in target:
        raise KeyError(UNKNOWN.format(name))
    module_name, function_name = target.split(":", 1)
    try:
        return getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as error:
        raise KeyError(f"reward {name!r}: cannot import {target}: {error}") from error


def has_final_box(response: str) -> bool:
    """A complete, non-empty last ``\\boxed{...}`` of at most MAX_BOXED_CHARS (what the strict reward grades)."""
    answer = extract_last_boxed(response, max_chars=MAX_BOXED_CHARS)
    return answer is not None and bool(answer.strip())


def has_exactly_one_box(response: str) -> bool:
    """DeepMath's rule: ``\\boxed`` occurs exactly once (the authors' ``solution_str.count("\\\\boxed") == 1`` in
    verl/utils/reward_score/deepmath.py:reward_func), and that one box is complete and gradable."""
    return response.count("\\boxed") == 1 and has_final_box(response)


# Rewards without an entry (early_substring, "package.module:function") have no format rule.
FORMAT_RULES: dict[str, Callable[[str], bool]] = {
    RewardName.math_verify: has_final_box,
    RewardName.deepscaler: has_final_box,  # deepscaler.py:compute_score scores 0 when no final \boxed{...} is found
    RewardName.deepmath: has_exactly_one_box,
}


def format_ok(reward: str, response: str) -> bool:
    """Whether ``response`` meets the FORMAT rule of reward ``reward`` (pure string work, no math-verify).

    math_verify / deepscaler: a complete last ``\\boxed{...}``; deepmath: exactly one ``\\boxed`` and it is
    complete; early_substring or a "package.module:function" grader: True (no format rule). A non-string
    response never meets a rule. An unknown bare name raises KeyError, like resolve_reward.
    """
    rule = FORMAT_RULES.get(reward)
    if rule is None:
        if reward not in REWARDS and ":" not in reward:
            raise KeyError(UNKNOWN.format(reward))
        return True
    return isinstance(response, str) and rule(response)
