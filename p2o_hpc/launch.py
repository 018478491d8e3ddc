"""Main entry point: ``python -m p2o_hpc.launch``.

Until the training loop lands (the GRPO issue turns this into the Hydra app), the main job is the foundation
end to end on the embedded CPU default: build the tiny Qwen3, shard it into megatron at TP=2 across two
processes, verify logits/log-prob parity against transformers, and print the report.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

from rich.console import Console
from rich.table import Table

from p2o_hpc.megatron.refit_check import compare_with_hf

TOLERANCE = 1e-4


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="HF model folder (default: the project's tiny Qwen3)")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--pp", type=int, default=1)
    args = parser.parse_args(argv)

    console = Console()
    with console.status("building / finding the tiny model"):
        if args.model is None:
            from p2o_hpc.tiny_model import build_tiny_model

            args.model = str(build_tiny_model())
    with console.status(f"megatron at TP={args.tp} PP={args.pp} vs transformers ({args.tp * args.pp} processes)"):
        with tempfile.TemporaryDirectory(prefix="p2o_launch_") as workdir:
            diffs = compare_with_hf(args.model, args.tp, args.pp, workdir=workdir)

    ok = all(value <= TOLERANCE for value in diffs.values())
    table = Table(title=f"Megatron ↔ HF parity (tp={args.tp}, pp={args.pp})")
    table.add_column("quantity")
    table.add_column("max |megatron − HF|", justify="right")
    table.add_column(f"≤ {TOLERANCE:g}", justify="center")
    for name, value in diffs.items():
        table.add_row(name, f"{value:.3e}", "yes" if value <= TOLERANCE else "NO")
    console.print(table)
    console.print(f"model={args.model}")
    console.print(f"parity={'PASS' if ok else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
