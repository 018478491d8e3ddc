"""Runs side by side: the paper's table and figures from the run dirs' config.yaml and metrics.jsonl alone.

A `-m` sweep ends with it (p2o_hpc.cluster.sweep_launcher), and tools/testbed_report.py aggregates seeds with it:

    python -m p2o_hpc.trainer.comparison RUN_DIR [RUN_DIR ...] --out FOLDER

Per run (a "point"): held-out accuracy without and with templates at the end (val/<set>/acc, .../acc_with_templates,
pass@K), the hard-set size after each epoch, GEPA's acceptances, the rollouts spent (the policy's K per prompt per
step, plus GEPA's budgeted evaluations), and the wall time. Points that share every setting but the seed form one
group: mean ± std. Figures: Fig. 3 (validation accuracy over steps per point), Fig. 4 (hard-set size per epoch;
pass@1 / pass@K with vs without templates on held-out sets).
"""

from __future__ import annotations

import argparse
import csv
import io
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from p2o_hpc.io_utils import atomic_write_bytes, atomic_write_text
from p2o_hpc.run_dir import RunDir
from p2o_hpc.trainer.report import read_metrics, validation_sets


@dataclass
class PointSummary:
    """One run's numbers for the comparison."""

    name: str
    algorithm: str
    seed: int
    group: str  # the point's name without its seed: seeds of one group are averaged
    steps: int
    final: dict[str, float]  # last value of each val/* key
    curves: dict[str, list[tuple[int, float]]]  # val/<set>/acc[...]: (step, value)
    hard_sizes: list[int]  # after each epoch
    gepa_accepted: int
    rollouts_policy: int
    rollouts_gepa: int
    wall_s: float  # from the first metrics line to the last (start-up before the first line is not in it)
    val_sets: list[str] = field(default_factory=list)

    @property
    def rollouts_total(self) -> int:
        return self.rollouts_policy + self.rollouts_gepa


def _without_seed(name: str) -> str:
    parts = [part for part in name.split(",") if not part.startswith("trainer.seed=")]
    return ",".join(parts) or "default"


def summarize(run_path: str | Path, name: str | None = None) -> PointSummary:
    """The numbers of one run dir (finished, or stopped: what it logged so far)."""
    run_dir = RunDir(run_path)
    cfg = run_dir.load_config()
    rows = read_metrics(run_dir)
    name = name or run_dir.path.name
    steps = [row for row in rows if row.get("step", 0) > 0 and "reward/mean" in row]
    final, curves = {}, {}
    for row in rows:
        for key, value in row.items():
            if key.startswith("val/") and isinstance(value, (int, float)):
                final[key] = float(value)
                curves.setdefault(key, []).append((int(row["step"]), float(value)))
    hard = [int(row["hard/size"]) for row in rows if "hard/size" in row]
    stamps = [row["_timestamp"] for row in rows if "_timestamp" in row]
    return PointSummary(
        name=name, algorithm=str(cfg.algorithm.name), seed=int(cfg.trainer.seed), group=_without_seed(name),
        steps=len(steps), final=final, curves=curves, hard_sizes=hard,
        gepa_accepted=int(sum(row.get("gepa/accepted", 0) for row in rows)),
        rollouts_policy=len(steps) * cfg.algorithm.prompts_per_step * cfg.algorithm.n_samples,
        rollouts_gepa=int(sum(row.get("gepa/budget_used", 0) for row in rows)),
        wall_s=(stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0, val_sets=validation_sets(rows))


# -- table ---------------------------------------------------------------------------------------------------------

def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table_rows(points: list[PointSummary]) -> list[dict[str, str]]:
    """One row per group (seeds averaged): mean ± std where there are several seeds."""
    groups: dict[str, list[PointSummary]] = {}
    for point in points:
        groups.setdefault(point.group, []).append(point)
    val_keys = list(dict.fromkeys(f"val/{name}/acc{suffix}" for point in points for name in point.val_sets
                                  for suffix in ("", "_with_templates")))
    rows = []
    for group, members in groups.items():
        row = {"point": group, "algorithm": members[0].algorithm, "seeds": str(len(members))}
        for key in val_keys:
            row[key[len("val/"):]] = _mean_std([m.final[key] for m in members if key in m.final])
        epochs = max(len(m.hard_sizes) for m in members)
        row["hard set per epoch"] = " → ".join(
            _mean_std([float(m.hard_sizes[e]) for m in members if e < len(m.hard_sizes)]).replace(".000", "")
            for e in range(epochs)) or "-"
        row["GEPA accepted"] = _mean_std([float(m.gepa_accepted) for m in members]).replace(".000", "")
        row["rollouts (policy + GEPA)"] = " + ".join(
            _mean_std([float(getattr(m, attr)) for m in members]).replace(".000", "")
            for attr in ("rollouts_policy", "rollouts_gepa"))
        row["wall, first to last line (s)"] = _mean_std([m.wall_s for m in members]).replace(".000", "")
        rows.append(row)
    return rows


def rich_table(rows: list[dict[str, str]], title: str) -> Table:
    table = Table(title=title)
    for column in rows[0] if rows else ["point"]:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*row.values())
    return table


def markdown(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "(no runs)\n"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row[c] for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def csv_text(points: list[PointSummary]) -> str:
    """Every point (not averaged), every number: for a reader's own statistics."""
    keys = sorted({key for point in points for key in point.final})
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["point", "group", "algorithm", "seed", "steps", *keys, "hard_sizes", "gepa_accepted",
                     "rollouts_policy", "rollouts_gepa", "wall_s"])
    for p in points:
        writer.writerow([p.name, p.group, p.algorithm, p.seed, p.steps, *(p.final.get(k, "") for k in keys),
                         " ".join(map(str, p.hard_sizes)), p.gepa_accepted, p.rollouts_policy, p.rollouts_gepa,
                         f"{p.wall_s:.1f}"])
    return buffer.getvalue()


# -- figures -------------------------------------------------------------------------------------------------------

def _figure_bytes(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    return buffer.getvalue()


def plot_fig3(points: list[PointSummary], out: Path) -> Path:
    """Validation accuracy (no templates) over steps: one panel per held-out set, one line per point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(dict.fromkeys(name for p in points for name in p.val_sets)) or ["(none)"]
    fig, axes = plt.subplots(1, len(sets), figsize=(6 * len(sets), 4.5), constrained_layout=True, squeeze=False)
    groups = list(dict.fromkeys(p.group for p in points))
    for ax, name in zip(axes[0], sets):
        for p in points:
            curve = p.curves.get(f"val/{name}/acc", [])
            if curve:
                colour = f"C{groups.index(p.group) % 10}"
                label = p.group if p is next(q for q in points if q.group == p.group) else None
                ax.plot(*zip(*curve), color=colour, marker=".", alpha=0.8, label=label)
        ax.set_title(f"{name}: accuracy without templates")
        ax.set_xlabel("step")
        ax.set_ylim(-0.02, 1.02)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return atomic_write_bytes(out, _figure_bytes(fig))


def plot_fig4(points: list[PointSummary], out: Path) -> Path:
    """Left: hard-set size after each epoch per group (mean over seeds). Right: final pass@1 / pass@K on each
    held-out set with vs without templates, per group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.5), constrained_layout=True)
    groups: dict[str, list[PointSummary]] = {}
    for p in points:
        groups.setdefault(p.group, []).append(p)
    for index, (group, members) in enumerate(groups.items()):
        epochs = max(len(m.hard_sizes) for m in members)
        means = [statistics.mean(m.hard_sizes[e] for m in members if e < len(m.hard_sizes)) for e in range(epochs)]
        if means:
            left.plot(range(epochs), means, marker="o", color=f"C{index % 10}", label=group)
    left.set_title("hard-set size after each epoch")
    left.set_xlabel("epoch")
    left.xaxis.get_major_locator().set_params(integer=True)
    if left.get_legend_handles_labels()[0]:
        left.legend(fontsize=8)
    bars = []  # (label, without, with)
    for group, members in groups.items():
        for name in dict.fromkeys(n for m in members for n in m.val_sets):
            for metric in sorted({key.split("/")[-1] for m in members for key in m.final
                                  if key.startswith(f"val/{name}/") and (key.endswith("/acc")
                                                                        or "/pass@" in key)
                                  and not key.endswith("_with_templates")}):
                plain = [m.final[f"val/{name}/{metric}"] for m in members if f"val/{name}/{metric}" in m.final]
                templated = [m.final.get(f"val/{name}/{metric}_with_templates") for m in members]
                templated = [t for t in templated if t is not None]
                label = f"{group}\n{name} {'pass@1' if metric == 'acc' else metric}"
                bars.append((label, statistics.mean(plain) if plain else 0.0,
                             statistics.mean(templated) if templated else None))
    positions = range(len(bars))
    right.bar([x - 0.2 for x in positions], [b[1] for b in bars], width=0.4, label="without templates")
    right.bar([x + 0.2 for x in positions], [b[2] or 0.0 for b in bars], width=0.4, label="with templates")
    right.set_xticks(list(positions), [b[0] for b in bars], rotation=60, ha="right", fontsize=7)
    right.set_ylim(0, 1.02)
    right.set_title("held-out pass@1 / pass@K, with vs without templates (end of run)")
    right.legend(fontsize=8)
    return atomic_write_bytes(out, _figure_bytes(fig))


def write_comparison(points: list[PointSummary], out_dir: str | Path, console: Console | None = None,
                     title: str = "comparison") -> Path:
    """comparison.md, comparison.csv, fig3_validation.png, fig4_hard_set_and_templates.png in `out_dir`."""
    out_dir = Path(out_dir)
    rows = table_rows(points)
    atomic_write_text(out_dir / "comparison.md", f"# {title}\n\n" + markdown(rows))
    atomic_write_text(out_dir / "comparison.csv", csv_text(points))
    plot_fig3(points, out_dir / "fig3_validation.png")
    plot_fig4(points, out_dir / "fig4_hard_set_and_templates.png")
    if console is not None:
        console.print(rich_table(rows, title))
        console.print(f"table, csv and figures → {out_dir}")
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    write_comparison([summarize(path) for path in args.run_dirs], args.out, Console())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
