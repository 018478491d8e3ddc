"""Conversion check: does megatron at --tp/--pp compute what transformers computes on the same batch?

    python tools/check_conversion.py --tp 2 [--pp 1] [--model HF_DIR] [--tolerance 1e-4]

Spawns tp×pp processes (gloo on CPU, nccl on GPU). Prints max_abs_logit_diff=<x> and max_abs_logprob_diff=<y>;
exits 0 when both are within tolerance, 1 otherwise. Without --model it uses the project's tiny Qwen3.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

from p2o_hpc.megatron.conversion_check import NEGATIVE_CONTROLS, compare_with_hf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    parser.add_argument("--model", help="HF model folder (default: the project's tiny Qwen3)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tolerance", type=float, default=1e-4, help="max abs diff allowed (fp32: 1e-4)")
    parser.add_argument("--negative-control", choices=NEGATIVE_CONTROLS, default="none",
                        help="load a deliberately wrong variant; the check must then fail")
    args = parser.parse_args(argv)

    model_dir = args.model
    if model_dir is None:
        from p2o_hpc.tiny_model import build_tiny_model

        model_dir = str(build_tiny_model())
    with tempfile.TemporaryDirectory(prefix="p2o_conversion_") as workdir:
        diffs = compare_with_hf(model_dir, args.tp, args.pp, batch=args.batch, seq=args.seq, seed=args.seed,
                                negative_control=args.negative_control, workdir=workdir)
    logit_diff, logprob_diff = diffs["max_abs_logit_diff"], diffs["max_abs_logprob_diff"]
    ok = logit_diff <= args.tolerance and logprob_diff <= args.tolerance
    print(f"layout=tp{args.tp}_pp{args.pp} model={model_dir} negative_control={args.negative_control}")
    print(f"max_abs_logit_diff={logit_diff:.3e}")
    print(f"max_abs_logprob_diff={logprob_diff:.3e}")
    print(f"conversion_check={'PASS' if ok else 'FAIL'} (tolerance {args.tolerance:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
