"""One smoke-sized GRPO run; prints where a step's time goes and the two overhead ratios we hold ourselves to.

    .venv/bin/python tools/bench_rl_step.py [--steps 5] [hydra overrides …]

Goals on CPU: weight_sync/step ≤ 5 % and reward/step ≤ 5 %. The first step (engine warm-up, first compile
of everything) is reported but left out of the averages. The tiny model's responses almost never hold a
``\boxed{}``, which grades in microseconds; so the same run also grades a step's worth of real MATH500
solutions (right, wrong and box-less, as tools/bench_reward.py builds them) with the configured pool, and
reports that time over the measured step too.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

REPO_ROOT = Path(__file__).resolve().parents[1]
PHASES = ["weight_sync", "generate", "reward", "rollout_wait", "logprob", "refit_check", "update"]
GOAL = 0.05


SETTINGS = {"prompts_per_step": 8, "n_samples": 6, "reward_workers": 2}


def grade_real_step(items: int, samples_per_prompt: int) -> float:
    """Median seconds for the reward pool to grade `items` realistic responses (after a warm-up batch)."""
    import statistics
    import time

    from bench_reward import build_batch

    from p2o_hpc.reward import RewardPool

    with RewardPool(num_workers=SETTINGS["reward_workers"]) as pool:
        pool.score(*build_batch(items, samples_per_prompt, seed=100)[:2])  # warm-up: workers up, parsers built
        seconds = []
        for seed in range(3):
            responses, ground_truths, _ = build_batch(items, samples_per_prompt, seed=seed)
            start = time.perf_counter()
            pool.score(responses, ground_truths)
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main() -> int:
    from p2o_hpc.run_dir import RunDir
    from p2o_hpc.trainer.report import read_metrics

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides, e.g. parallel=tp2")
    args = parser.parse_args()
    console = Console()
    with tempfile.TemporaryDirectory(prefix="bench_rl_step_") as tmp:
        run_dir = Path(tmp) / "run"
        command = [
            sys.executable, "-m", "p2o_hpc.launch", f"hydra.run.dir={run_dir}", "experiment=smoke",
            "data.limit=64", f"algorithm.prompts_per_step={SETTINGS['prompts_per_step']}",
            "algorithm.mini_batch_prompts=4", f"algorithm.n_samples={SETTINGS['n_samples']}",
            "algorithm.micro_batch_size=4", f"reward.workers={SETTINGS['reward_workers']}",
            f"algorithm.max_steps={args.steps}",
            "rollout.max_response_tokens=256", "rollout.refit_check_every=0", "trainer.save_every=100000",
            "logging.wandb.mode=disabled", *args.overrides,
        ]
        with console.status(f"running {args.steps} GRPO steps"):
            result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True,
                                    env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if result.returncode:
            console.print(result.stdout[-2000:], result.stderr[-4000:])
            return result.returncode
        rows = read_metrics(RunDir(run_dir))

    measured = rows[1:] or rows
    items = SETTINGS["prompts_per_step"] * SETTINGS["n_samples"]
    real_reward_s = grade_real_step(items, SETTINGS["n_samples"])
    table = Table(title=f"GRPO step time split (mean of steps 2–{len(rows)}; step 1 shown apart)")
    table.add_column("phase")
    table.add_column("step 1 s", justify="right")
    table.add_column("mean s", justify="right")
    table.add_column("share of step", justify="right")
    step_s = sum(row["time/step"] for row in measured) / len(measured)
    for phase in PHASES + ["step"]:
        key = f"time/{phase}"
        if key not in rows[0]:
            continue
        mean = sum(row.get(key, 0.0) for row in measured) / len(measured)
        table.add_row(phase, f"{rows[0][key]:.3f}", f"{mean:.3f}", f"{mean / step_s:.1%}")
    console.print(table)
    sync_ratio = sum(row["time/weight_sync"] for row in measured) / len(measured) / step_s
    reward_ratio = sum(row["time/reward"] for row in measured) / len(measured) / step_s
    gen_tps = sum(row["perf/gen_tokens_per_s"] for row in measured) / len(measured)
    train_tps = sum(row["perf/train_tokens_per_s"] for row in measured) / len(measured)
    console.print(f"weight_sync/step={sync_ratio:.4f} (goal ≤ {GOAL}) {'OK' if sync_ratio <= GOAL else 'OVER'}")
    console.print(f"reward/step={reward_ratio:.4f} (goal ≤ {GOAL}) {'OK' if reward_ratio <= GOAL else 'OVER'}")
    real_ratio = real_reward_s / step_s
    console.print(f"real_grading/step={real_ratio:.4f} ({items} MATH500 solutions graded in {real_reward_s:.3f} s; "
                  f"goal ≤ {GOAL}) {'OK' if real_ratio <= GOAL else 'OVER'}", soft_wrap=True)
    console.print(f"generation_tokens_per_s={gen_tps:.1f} train_tokens_per_s={train_tps:.1f}")
    console.print(f"response_length_mean={sum(r['response/length_mean'] for r in measured) / len(measured):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
