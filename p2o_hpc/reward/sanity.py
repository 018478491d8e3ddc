"""A learnable toy reward for end-to-end checks of the RL loop (gradient sign, weight sync), not for research.

A tiny random model never solves math, so every math reward is 0 and nothing moves. This one pays when the
ground-truth string shows up in the first characters of the response: a few in ten samples of the tiny model
do so by chance, and a working loop raises that rate within a few dozen steps.
"""

EARLY_CHARS = 16


def early_substring_reward(response: str, ground_truth: str) -> float:
    return 1.0 if ground_truth and ground_truth in response[:EARLY_CHARS] else 0.0
