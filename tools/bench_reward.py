"""Reward grading speed: one training step's worth of responses through RewardPool, items/s and seconds.

    python tools/bench_reward.py [--items 768] [--samples-per-prompt 8] [--workers 2] [--repeats 3]

Responses are built from real MATH500 rows, as a GRPO step sees them (items / samples-per-prompt prompts, each
ground truth repeated): ~45% the reference solution (which ends in the boxed gold answer), ~35% the solution
followed by a wrong final box (another row's answer), ~20% without any box. Each repeat draws new prompts (as
consecutive training steps do), so the workers' ground-truth cache helps only within a step. Reported: pool
start-up (spawn + math-verify import, paid once per training run), per repeat the wall time of ``score`` and
items/s, the fraction of rewards equal to the intended label, and for reference the same batch graded serially
in this process (no pool) so the pool's overhead and parallel speed-up show.
"""

from __future__ import annotations

# Spawned reward workers import this file as __mp_main__: keep module-level imports cheap.
import argparse
import json
import random
import statistics
import time


def build_batch(items: int, samples_per_prompt: int, seed: int) -> tuple[list[str], list[str], list[float]]:
    from p2o_hpc.paths import shared_data_dir

    rows = [json.loads(line) for line in (shared_data_dir() / "benchmarks/math500/test.jsonl").open()]
    rng = random.Random(seed)
    prompts = rng.sample(rows, k=max(1, items // samples_per_prompt))
    responses, ground_truths, labels = [], [], []
    for item in range(items):
        row = prompts[item // samples_per_prompt % len(prompts)]
        kind = rng.random()
        if kind < 0.45:
            response, label = row["solution"], 1.0
        elif kind < 0.80:
            other = rng.choice([r for r in rows if r["answer"] != row["answer"]])
            response, label = row["solution"] + f"\n\nWait, recomputing: the answer is $\\boxed{{{other['answer']}}}$.", 0.0
        else:
            response, label = row["problem"] + "\nI am not sure; maybe the answer is 42.", 0.0
        responses.append(response)
        ground_truths.append(row["answer"])
        labels.append(label)
    return responses, ground_truths, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=768)
    parser.add_argument("--samples-per-prompt", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from p2o_hpc.reward import RewardPool, strict_boxed_reward

    batches = [build_batch(args.items, args.samples_per_prompt, args.seed + repeat) for repeat in range(args.repeats + 1)]
    start = time.perf_counter()
    with RewardPool(num_workers=args.workers) as pool:
        pool.score(["\\boxed{1}"] * args.workers, ["1"] * args.workers)  # wait until every worker is up
        print(f"pool start-up ({args.workers} workers): {time.perf_counter() - start:.2f} s")
        pool.score(*batches[0][:2])  # warm-up: math-verify's lazy regex/parser set-up in each worker
        seconds = []
        for repeat, (responses, ground_truths, labels) in enumerate(batches[1:]):
            start = time.perf_counter()
            rewards = pool.score(responses, ground_truths)
            seconds.append(time.perf_counter() - start)
            agree = sum(r == label for r, label in zip(rewards, labels)) / len(labels)
            print(
                f"repeat {repeat}: {len(responses)} items in {seconds[-1]:.2f} s = {len(responses) / seconds[-1]:.0f} "
                f"items/s; mean reward {sum(rewards) / len(rewards):.3f}; agrees with intended label {agree:.3f}"
            )
        print(f"replaced workers: {pool.workers_replaced}")
    median = statistics.median(seconds)
    print(f"pool median: {args.items} items in {median:.2f} s = {args.items / median:.0f} items/s ({args.workers} workers)")

    responses, ground_truths, _ = batches[-1]
    _strict_boxed_reward_cache_clear()
    start = time.perf_counter()
    for response, ground_truth in zip(responses, ground_truths):
        strict_boxed_reward(response, ground_truth)
    serial_s = time.perf_counter() - start
    print(f"serial in-process reference: {args.items} items in {serial_s:.2f} s = {args.items / serial_s:.0f} items/s")


def _strict_boxed_reward_cache_clear() -> None:
    from p2o_hpc.reward.math_verify_reward import _parse_ground_truth

    _parse_ground_truth.cache_clear()

if __name__ == "__main__":
    main()
