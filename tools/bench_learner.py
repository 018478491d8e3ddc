"""Learner speed check: megatron-core (TP1, PP1) forward+backward time over transformers' on the same model and batch.

    python tools/bench_learner.py [--model HF_DIR] [--batch 4] [--seq 256] [--warmup 2] [--iters 5] [--dtype float32]

Both models get the same random token batch and the same loss (mean next-token NLL: log_softmax + gather for
transformers, megatron's vocab-parallel cross entropy for megatron), then ``.backward()``; grads are zeroed
between iterations. The two measurements alternate (the order flips every iteration) so machine noise hits both
alike; warmup iterations are excluded and the median of ``--iters`` is reported. ``ratio_megatron_over_hf`` is
megatron's time over transformers' (goal: <= 1.3 on CPU; below 1 means megatron is faster); the tokens/s figures
are batch x seq over the median time. ``ratio_min_megatron_over_hf`` (fastest over fastest) is the steadier
figure on a busy machine.

Without --model it builds a larger variant of the project's tiny Qwen3 (hidden 256, 8 layers) so timings mean
something. The same command runs unchanged on a GPU machine (``python tools/bench_learner.py``): then both models
go on ``cuda`` and timings are bracketed by ``torch.cuda.synchronize()``.

On CPU, ``init_megatron`` switches on the compat layer (:mod:`p2o_hpc.megatron.cpu_compat`) for the whole process:
its TorchFunctionMode then also intercepts every torch call of the transformers model, so both sides pay its
per-op Python overhead here. Measured: ~1.7 us per torch call, ~1k calls per step, so ~2 ms of a ~0.4 s step (<1%);
the transformers figure is thus a touch slower than in a process without megatron.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

DEFAULT_OVERRIDES = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 8}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _hf_step(model, input_ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=input_ids).logits
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token_logprobs = logprobs.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    loss = -token_logprobs.mean()
    loss.backward()
    return loss.detach()


def _megatron_step(model, input_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    from p2o_hpc.megatron.forward import next_token_logprobs

    logits = model(input_ids, None, None)
    loss = -next_token_logprobs(logits, input_ids, vocab_size).mean()
    loss.backward()
    return loss.detach()


def _timed(step, model, device: torch.device) -> tuple[float, float]:
    model.zero_grad(set_to_none=True)
    _sync(device)
    start = time.perf_counter()
    loss = step(model)
    _sync(device)
    elapsed = time.perf_counter() - start
    return elapsed, float(loss)


def bench_model_dir(model: str | None) -> str:
    """--model, or (None) the larger variant of the project's tiny Qwen3 these benchmarks default to."""
    if model is not None:
        return model
    from p2o_hpc.tiny_model import build_tiny_model

    return str(build_tiny_model("qwen3-tiny", overrides=DEFAULT_OVERRIDES))


def add_timing_arguments(parser: argparse.ArgumentParser, *, warmup: int, iters: int) -> None:
    """--model, --warmup, --iters, --dtype, --seed (shared with tools/bench_micro_batching.py)."""
    parser.add_argument("--model", help="HF model folder (default: a larger variant of the project's tiny Qwen3)")
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--iters", type=int, default=iters)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--seed", type=int, default=0)


def check_timing_arguments(parser: argparse.ArgumentParser, args) -> None:
    if args.model is not None and not Path(args.model).is_dir():
        parser.error(f"--model {args.model}: not a folder")
    if args.iters < 1:
        parser.error("--iters must be >= 1")


def build_models(model_dir: str, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM

    from p2o_hpc.megatron.distributed import init_megatron
    from p2o_hpc.megatron.hf_weights import load_hf_weights
    from p2o_hpc.megatron.model_provider import build_gpt_model, build_transformer_config, read_hf_architecture

    init_megatron(1, 1)
    arch = read_hf_architecture(model_dir)
    mcore = build_gpt_model(arch, build_transformer_config(arch, params_dtype=dtype))
    load_hf_weights(mcore, model_dir, arch)
    mcore = mcore.to(device).train()

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).train()
    return arch, mcore, hf


def run(args) -> dict[str, float | str]:
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dtype = DTYPES[args.dtype]
    model_dir = bench_model_dir(args.model)
    arch, mcore, hf = build_models(model_dir, dtype, device)

    generator = torch.Generator().manual_seed(args.seed)
    input_ids = torch.randint(0, arch.vocab_size, (args.batch, args.seq), generator=generator).to(device)

    steps = {
        "megatron": (lambda m: _megatron_step(m, input_ids, arch.vocab_size), mcore),
        "transformers": (lambda m: _hf_step(m, input_ids), hf),
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    losses: dict[str, float] = {}
    for i in range(args.warmup + args.iters):
        order = list(steps) if i % 2 == 0 else list(reversed(steps))
        for name in order:
            step, model = steps[name]
            elapsed, losses[name] = _timed(step, model, device)
            if i >= args.warmup:
                times[name].append(elapsed)

    tokens = args.batch * args.seq
    mcore_s = statistics.median(times["megatron"])
    hf_s = statistics.median(times["transformers"])
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "model": model_dir,
        "megatron_fwd_bwd_s": mcore_s,
        "transformers_fwd_bwd_s": hf_s,
        "ratio_megatron_over_hf": mcore_s / hf_s,
        "ratio_min_megatron_over_hf": min(times["megatron"]) / min(times["transformers"]),
        "megatron_tokens_per_s": tokens / mcore_s,
        "hf_tokens_per_s": tokens / hf_s,
        "megatron_loss": losses["megatron"],
        "hf_loss": losses["transformers"],
        "megatron_times": times["megatron"],
        "hf_times": times["transformers"],
    }


def print_report(result: dict, args) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=(f"fwd+bwd, batch {args.batch} x seq {args.seq}, {args.dtype}, device {result['device']}, "
               f"{torch.get_num_threads()} threads, median of {args.iters}")
    )
    table.add_column("implementation")
    table.add_column("median s", justify="right")
    table.add_column("min s", justify="right")
    table.add_column("tokens/s", justify="right")
    table.add_column("last loss", justify="right")
    table.add_row("megatron-core TP1", f"{result['megatron_fwd_bwd_s']:.4f}", f"{min(result['megatron_times']):.4f}",
                  f"{result['megatron_tokens_per_s']:.0f}", f"{result['megatron_loss']:.5f}")
    table.add_row("transformers", f"{result['transformers_fwd_bwd_s']:.4f}", f"{min(result['hf_times']):.4f}",
                  f"{result['hf_tokens_per_s']:.0f}", f"{result['hf_loss']:.5f}")
    Console().print(table)
    print(f"model={result['model']}")
    print(f"device={result['device']}")
    print(f"megatron_fwd_bwd_s={result['megatron_fwd_bwd_s']:.6f}")
    print(f"transformers_fwd_bwd_s={result['transformers_fwd_bwd_s']:.6f}")
    print(f"ratio_megatron_over_hf={result['ratio_megatron_over_hf']:.4f}")
    print(f"ratio_min_megatron_over_hf={result['ratio_min_megatron_over_hf']:.4f}")
    print(f"megatron_tokens_per_s={result['megatron_tokens_per_s']:.1f}")
    print(f"hf_tokens_per_s={result['hf_tokens_per_s']:.1f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    add_timing_arguments(parser, warmup=2, iters=5)
    args = parser.parse_args(argv)
    check_timing_arguments(parser, args)
    print_report(run(args), args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
