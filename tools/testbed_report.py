"""The paper's table at CPU scale: every algorithm of the comparison on the testbed, several seeds each, plus a
`reflection=self` point (the testbed's own model as the reflector), run as ordinary sweeps through the project's
launcher, then one table (mean ± std over seeds), a CSV of every run and the figures in one folder.

    python tools/testbed_report.py --out reports/testbed [--seeds 1 2 3] [--algorithms grpo p2o ...] [overrides]

Each point is a normal run dir (config.yaml, metrics.jsonl, plots/), so any of them can be inspected or re-run alone:
`python -m p2o_hpc.launch experiment=testbed algorithm=p2o trainer.seed=2`. Runs that already finished in --out are
kept (the launcher resumes a run dir whose checkpoint is complete), so an interrupted report continues.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from p2o_hpc.trainer.comparison import summarize, write_comparison

ALGORITHMS = ("grpo", "grpo_2x", "p2o", "p2o_no_cd", "p2o_same_template")


def sweep(out: Path, overrides: list[str], console: Console) -> None:
    command = [sys.executable, "-m", "p2o_hpc.launch", "-m", "experiment=testbed", *overrides,
               f"hydra.sweep.dir={out}"]
    console.rule(" ".join(command[2:]))
    result = subprocess.run(command)
    if result.returncode != 0:  # the sweep's own summary names the failed points; the others are still reported
        console.print(f"[yellow]sweep {out.name} ended with status {result.returncode}[/yellow]")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="reports/testbed")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--algorithms", nargs="+", default=list(ALGORITHMS))
    parser.add_argument("--no-self", action="store_true", help="skip the reflection=self point")
    parser.add_argument("overrides", nargs="*", help="config overrides for every point, e.g. model.path=DIR")
    args = parser.parse_args(argv)
    console = Console()
    out = Path(args.out).resolve()
    seeds = ",".join(map(str, args.seeds))
    sweep(out / "runs", [f"algorithm={','.join(args.algorithms)}", f"trainer.seed={seeds}", *args.overrides], console)
    if not args.no_self:
        sweep(out / "runs_reflection_self", ["algorithm=p2o", "reflection=self", f"trainer.seed={args.seeds[0]}",
                                               *args.overrides], console)
    run_dirs = sorted(path.parent for path in out.glob("runs*/*/metrics.jsonl"))
    points = [summarize(run_dir) for run_dir in run_dirs]  # named from their overrides (reflection=self included)
    algorithms = sorted({point.algorithm for point in points})
    write_comparison(points, out, console, title=f"CPU testbed: {', '.join(algorithms)} × seeds {seeds}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
