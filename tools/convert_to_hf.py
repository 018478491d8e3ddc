"""Learner checkpoints → Hugging Face folders, offline, in this one process (no GPU, no torch.distributed world).

    python tools/convert_to_hf.py <run dir>/checkpoints/step_N [<out dir>] [--base-model HF_DIR] [--dtype bf16]
    python tools/convert_to_hf.py --run <run dir> [--all]      # latest (or every) complete checkpoint → <run>/hf/step_N

Any TP/PP/DP layout converts the same way. The export is checked against the base model (every key with its
shape and dtype, nothing extra, equal parameter count) before its COMPLETE marker is written; a half-written
checkpoint, or one of another base model, is refused with the reason. Prints one line per export with its size,
seconds, MB/s and this process's peak resident memory; exits 1 on a refusal.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from p2o_hpc.megatron.checkpoint_to_hf import DTYPES, CheckpointConversionError, convert_checkpoint, run_checkpoints


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", help="a checkpoints/step_N folder")
    parser.add_argument("out_dir", nargs="?", help="where the HF folder goes (default: <run dir>/hf/step_N)")
    parser.add_argument("--run", help="a run dir: convert its latest complete checkpoint (or every one with --all)")
    parser.add_argument("--all", action="store_true", help="with --run: every complete checkpoint")
    parser.add_argument("--base-model", help="HF folder of the base model (default: model.path of the run's config)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: the base model's dtype")
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="safetensors shard size (default 5)")
    args = parser.parse_args(argv)
    console = Console(stderr=True)

    if bool(args.run) == bool(args.checkpoint):
        parser.error("give a checkpoint folder or --run <run dir> (not both)")
    if args.run:
        if args.out_dir:
            parser.error("--run writes <run dir>/hf/step_N; an out dir goes with a single checkpoint")
        found = run_checkpoints(args.run)
        if not found:
            console.print(f"[red]{Path(args.run) / 'checkpoints'}: no complete checkpoint[/red]")
            return 1
        checkpoints = found if args.all else found[-1:]
    else:
        checkpoints = [Path(args.checkpoint)]

    for checkpoint in checkpoints:
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True) as progress:
            task = progress.add_task(f"converting {checkpoint.name}", total=None)
            try:
                stats = convert_checkpoint(checkpoint, args.out_dir, base_model_dir=args.base_model, dtype=args.dtype,
                                           max_shard_bytes=int(args.max_shard_gb * 1024**3),
                                           progress=lambda done, total: progress.update(task, completed=done,
                                                                                        total=total))
            except (CheckpointConversionError, FileNotFoundError, NotImplementedError) as error:
                progress.stop()
                console.print(f"[red]refused:[/red] {error}")
                return 1
        if stats.skipped:
            print(f"hf_dir={stats.out_dir} (already complete for {checkpoint})")
        else:
            print(f"hf_dir={stats.out_dir} parameters={stats.parameters} bytes={stats.bytes_written} "
                  f"seconds={stats.seconds:.2f} mb_per_s={stats.mb_per_s:.1f} peak_rss_mb={stats.peak_rss_bytes / 1e6:.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
