"""The learner's share of a GRPO step (old log-probs + update) with fixed-size micro-batches against token-budget
micro-batches, each right-padded and THD-packed, on a long-tailed response-length mix, in one run.

    python tools/bench_micro_batching.py [--sequences 48] [--micro-batch-size 4] [--iters 3] [--dtype float32]

The rollouts are synthetic: a fixed 96-token prompt and responses of log-normal length (median --median-response,
sigma --sigma, at most --max-response tokens), as RL response lengths are long-tailed. The three modes run the
same LearnerSide code as training (rollout_batch.rank_micro_batches → old log-probs → train_step over
--mini-batches optimizer steps); only algorithm.micro_batch_tokens and parallel.pack_sequences differ. The token
budget is the fixed path's worst case, micro_batch_size × the longest possible sequence, so all modes bound
memory alike. The modes alternate (the order rotates every iteration), warm-up excluded, the median reported;
`speedup_<mode>=` is the fixed padded path's time over the mode's (the default training setup is
token_budget_packed when algorithm.micro_batch_tokens is set, fixed_packed otherwise). `padding_frac_*` are the
share of token slots that hold padding in the layers (what perf/padding_frac logs per step).

Without --model it builds the larger tiny Qwen3 of tools/bench_learner.py. On a GPU (tools/gpu_check.sh) the same
command runs on CUDA; with --dtype bfloat16 there.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench_learner import add_timing_arguments, bench_model_dir, check_timing_arguments

PROMPT_TOKENS = 96
MODES = {"fixed": (False, False), "fixed_packed": (False, True), "token_budget": (True, False),
         "token_budget_packed": (True, True)}  # (token budget, THD packing)


def long_tailed_rollouts(args, vocab_size: int):
    from p2o_hpc.records import Rollout

    generator = torch.Generator().manual_seed(args.seed)
    normal = torch.randn(args.sequences, generator=generator)
    lengths = (torch.tensor(float(args.median_response)).log() + args.sigma * normal).exp()
    lengths = lengths.clamp(4, args.max_response).long().tolist()
    k = args.samples_per_prompt
    return [Rollout(i // k, torch.randint(3, vocab_size, (PROMPT_TOKENS,), generator=generator).tolist(),
                    torch.randint(3, vocab_size, (length,), generator=generator).tolist(), None, "stop", "",
                    reward=float(i % 3 == 0)) for i, length in enumerate(lengths)]


def build_side(model_dir: str, args):
    from p2o_hpc.choices import ParamsDtype
    from p2o_hpc.config import AlgorithmConfig, RunConfig
    from p2o_hpc.megatron.distributed import init_megatron
    from p2o_hpc.trainer.learner_side import LearnerSide

    init_megatron(1, 1)
    cfg = RunConfig()
    cfg.model.params_dtype = ParamsDtype({"float32": "fp32", "bfloat16": "bf16"}[args.dtype])
    prompts = args.sequences // args.samples_per_prompt
    cfg.algorithm = AlgorithmConfig(n_samples=args.samples_per_prompt, prompts_per_step=prompts,
                                    mini_batch_prompts=prompts // args.mini_batches,
                                    micro_batch_size=args.micro_batch_size, lr=1e-6, warmup_ratio=0.0)
    return LearnerSide(cfg, model_dir, total_steps=1000)


def learner_step(side, batch, budget: int, packed: bool) -> tuple[float, float]:
    """Seconds for micro-batching + old log-probs + the update, and the step's padding fraction."""
    from p2o_hpc.algo.rollout_batch import padding_fraction

    side.algo.micro_batch_tokens, side.learner.pack_sequences = budget, packed
    device = torch.device(torch.cuda.current_device()) if torch.cuda.is_available() else None
    if device is not None:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    mini_batches = side.micro_batches(batch)
    micro_batches = [mb for mini in mini_batches for mb in mini]
    side.old_logprobs(micro_batches)
    side.update(mini_batches)
    if device is not None:
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, padding_fraction(micro_batches, packed=packed)


def run(args) -> dict:
    from p2o_hpc.records import Problem, StepBatch

    model_dir = bench_model_dir(args.model)
    side = build_side(model_dir, args)
    rollouts = long_tailed_rollouts(args, side.arch.vocab_size)
    prompts = args.sequences // args.samples_per_prompt
    batch = StepBatch([Problem(str(i), "", "", "bench") for i in range(prompts)], epoch=0, epoch_finished=False,
                      rollouts=rollouts)
    batch.advantages = side.advantages(batch)
    budget = args.micro_batch_size * (PROMPT_TOKENS + args.max_response)
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    padding: dict[str, float] = {}
    for i in range(args.warmup + args.iters):
        order = list(MODES)[i % len(MODES):] + list(MODES)[:i % len(MODES)]
        for mode in order:
            use_budget, packed = MODES[mode]
            seconds, padding[mode] = learner_step(side, batch, budget if use_budget else 0, packed)
            if i >= args.warmup:
                times[mode].append(seconds)
    lengths = [len(r.sequence) for r in rollouts]
    median = {mode: statistics.median(values) for mode, values in times.items()}
    return {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "model": model_dir,
            "budget": budget, "lengths": lengths, "times": times, "median": median, "padding": padding,
            "tokens": sum(lengths)}


def print_report(result: dict, args) -> None:
    from rich.console import Console
    from rich.table import Table

    lengths = sorted(result["lengths"])
    table = Table(title=(f"learner step (old log-probs + {args.mini_batches} updates), {len(lengths)} sequences, "
                         f"lengths median {lengths[len(lengths) // 2]} max {lengths[-1]}, {args.dtype}, "
                         f"{result['device']}, median of {args.iters}"))
    for column in ("micro-batches", "median s", "min s", "tokens/s", "padding", "speedup"):
        table.add_column(column, justify="right" if column != "micro-batches" else "left")
    fixed = result["median"]["fixed"]
    labels = {"fixed": f"{args.micro_batch_size} sequences, padded", "fixed_packed": f"{args.micro_batch_size} sequences, THD",
              "token_budget": f"≤ {result['budget']} tokens, padded",
              "token_budget_packed": f"≤ {result['budget']} tokens, THD"}
    for mode, label in labels.items():
        seconds = result["median"][mode]
        table.add_row(label, f"{seconds:.3f}", f"{min(result['times'][mode]):.3f}",
                      f"{result['tokens'] / seconds:.0f}", f"{result['padding'][mode]:.1%}", f"{fixed / seconds:.2f}×")
    Console().print(table)
    print(f"device={result['device']}")
    for mode in MODES:
        print(f"{mode}_s={result['median'][mode]:.4f}")
        print(f"padding_frac_{mode}={result['padding'][mode]:.4f}")
    for mode in list(MODES)[1:]:
        print(f"speedup_{mode}={fixed / result['median'][mode]:.3f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sequences", type=int, default=48)
    parser.add_argument("--samples-per-prompt", type=int, default=6)
    parser.add_argument("--mini-batches", type=int, default=2)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--median-response", type=int, default=160)
    parser.add_argument("--sigma", type=float, default=1.0)
    parser.add_argument("--max-response", type=int, default=1536)
    add_timing_arguments(parser, warmup=1, iters=3)
    args = parser.parse_args(argv)
    check_timing_arguments(parser, args)
    prompts, rest = divmod(args.sequences, args.samples_per_prompt)
    if rest or prompts % args.mini_batches:
        parser.error("--sequences must be --samples-per-prompt × a multiple of --mini-batches prompts")
    if (args.sequences // args.mini_batches) % args.micro_batch_size:
        parser.error("--micro-batch-size must divide a mini-batch's sequences (--sequences / --mini-batches)")
    print_report(run(args), args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
