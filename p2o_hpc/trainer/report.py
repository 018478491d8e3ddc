"""A run's training curves as one PNG and its last step as a table, from the run dir's ``metrics.jsonl`` alone.

Written at the end of every run (rank 0) and on demand for a run still going or killed:

    python -m p2o_hpc.trainer.report RUN_DIR        # → RUN_DIR/plots/training.png + a table on the terminal
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from p2o_hpc.io_utils import atomic_write_bytes
from p2o_hpc.run_dir import RunDir

# (title, metric keys drawn in that panel)
PANELS = [
    ("reward", ["reward/mean"]),
    ("groups without signal", ["advantage/zero_group_frac", "reward/all_fail_frac"]),
    ("response length (tokens)", ["response/length_mean", "response/length_max"]),
    ("actor", ["actor/grad_norm", "actor/clip_frac"]),
    ("throughput (tokens/s)", ["perf/gen_tokens_per_s", "perf/train_tokens_per_s"]),
    ("refit check: generator vs learner", ["rollout/token_prob_error", "rollout/logprob_gap_max",
                                            "rollout/logprob_gap_mean"]),
]
# Drawn minus this offset, on the scale of the panel's other keys: token_prob_error − 1 ≈ the mean |log-prob gap|.
OFFSETS = {"rollout/token_prob_error": 1.0}
TIME_PHASES = ["weight_sync", "generate", "reward", "rollout_wait", "logprob", "refit_check", "update", "validation"]
TABLE_KEYS = ["reward/mean", "advantage/zero_group_frac", "response/length_mean", "actor/loss", "actor/clip_frac",
              "actor/grad_norm", "actor/lr", "perf/gen_tokens_per_s", "perf/train_tokens_per_s", "time/step"]


def read_metrics(run_dir: RunDir) -> list[dict]:
    """Rows of metrics.jsonl; a line cut short by a kill mid-write is skipped, any other bad line is an error."""
    path = run_dir.metrics
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics (has the run finished a step?)")
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == len(lines):
                break  # the last line of a killed run
            raise ValueError(f"{path}:{number}: not JSON ({error})") from error
    return rows


def plot_training(rows: list[dict], out: str | Path, algorithm: str = "GRPO") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [row["step"] for row in rows]
    fig, axes = plt.subplots(3, 3, figsize=(15, 10), constrained_layout=True)
    axes = axes.ravel()
    for ax, (title, keys) in zip(axes, PANELS):
        for key in keys:
            offset = OFFSETS.get(key, 0.0)
            points = [(row["step"], row[key] - offset) for row in rows if key in row]
            if points:
                label = key.split("/", 1)[1] + (f" − {offset:g}" if offset else "")
                ax.plot(*zip(*points), marker="." if len(points) < 50 else None, label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    time_ax = axes[len(PANELS)]
    bottom = [0.0] * len(rows)
    for phase in TIME_PHASES:
        values = [row.get(f"time/{phase}", 0.0) for row in rows]
        if any(values):
            time_ax.bar(steps, values, bottom=bottom, label=phase)
            bottom = [b + v for b, v in zip(bottom, values)]
    time_ax.set_title("step time split (s)")
    time_ax.set_xlabel("step")
    if time_ax.get_legend_handles_labels()[0]:
        time_ax.legend(fontsize=8)
    epoch_ax = axes[len(PANELS) + 1]
    epochs = [(row["epoch"], row["hard/size"]) for row in rows if "hard/size" in row]
    if epochs:
        epoch_ax.bar([str(epoch) for epoch, _ in epochs], [size for _, size in epochs])
    epoch_ax.set_title("hard set size per epoch")
    epoch_ax.set_xlabel("epoch")
    if not plot_validation(axes[-1], rows):
        axes[-1].axis("off")
    fig.suptitle(f"{algorithm} training, {len(training_rows(rows))} steps")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return atomic_write_bytes(out, buffer.getvalue())


def validation_sets(rows: list[dict]) -> list[str]:
    """The held-out sets with val/<set>/acc somewhere in the run (p2o_hpc.trainer.validation), in order."""
    return list(dict.fromkeys(key[len("val/"):-len("/acc")] for row in rows for key in row
                              if key.startswith("val/") and key.endswith("/acc")))


def training_rows(rows: list[dict]) -> list[dict]:
    """Rows of training steps: without validation.before_training's step-0 line."""
    return [row for row in rows if row["step"] > 0]


def plot_validation(ax, rows: list[dict]) -> bool:
    """val/<set>/acc per set over the steps validated, with templates dashed in the same colour; False: none."""
    sets = validation_sets(rows)
    for index, name in enumerate(sets):
        colour = f"C{index % 10}"
        for suffix, style in (("", "-"), ("_with_templates", "--")):
            points = [(row["step"], row[f"val/{name}/acc{suffix}"]) for row in rows if f"val/{name}/acc{suffix}" in row]
            if points:
                ax.plot(*zip(*points), style, color=colour, marker=".",
                        label=f"{name}{' + templates' if suffix else ''}")
    if not sets:
        return False
    ax.set_title("held-out accuracy (val/<set>/acc)")
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    return True


def summary_table(rows: list[dict]) -> Table:
    table = Table(title=f"step {rows[-1]['step']} (of {len(training_rows(rows))} logged)")
    table.add_column("metric")
    table.add_column("last", justify="right")
    table.add_column("mean over run", justify="right")
    keys = TABLE_KEYS + [f"val/{name}/acc{suffix}" for name in validation_sets(rows)
                         for suffix in ("", "_with_templates")]
    for key in keys:
        values = [row[key] for row in rows if key in row]
        if values:
            table.add_row(key, f"{values[-1]:.4g}", f"{sum(values) / len(values):.4g}")
    return table


def write_report(run_dir: RunDir, console: Console | None = None) -> Path:
    rows = read_metrics(run_dir)
    if not rows:
        raise ValueError(f"{run_dir.metrics}: empty")
    # The title names the run's algorithm (p2o, grpo_2x, …); a bare metrics file is plotted as GRPO's.
    algorithm = str(run_dir.load_config().algorithm.name) if run_dir.config.is_file() else "GRPO"
    path = plot_training(rows, run_dir.plots / "training.png", algorithm)
    if console is not None:
        console.print(summary_table(rows))
        console.print(f"curves → {path}")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    args = parser.parse_args(argv)
    console = Console()
    try:
        write_report(RunDir(args.run_dir), console)
    except (FileNotFoundError, ValueError) as error:
        console.print(f"[red]error:[/red] {error}")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
