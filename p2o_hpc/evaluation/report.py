"""The paper's Table 1 from an eval output dir: one row per model, one column per benchmark, AVG, in %.

Rebuilt from every `<label>/<benchmark>.jsonl` in the folder, so several models of one call, the points of a
`-m` sweep and later calls into the same folder all end in one table (`table.md`, `table.csv`). A cell is the mean
record score (avg@16 or greedy accuracy) × 100; one scored on fewer problems than the benchmark has (a `limit`
slice, or an eval still running) is marked with `*` and its count. AVG is the mean of the six columns and only
shown when the row has all six.

    python -m p2o_hpc.evaluation.report OUTPUT_DIR      # the table again, without evaluating anything
"""

from __future__ import annotations

import csv
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from p2o_hpc.evaluation.benchmarks import BENCHMARKS
from p2o_hpc.evaluation.runner import MODEL_INFO, read_records
from p2o_hpc.io_utils import atomic_write_text

TABLE_MD = "table.md"
TABLE_CSV = "table.csv"


@dataclass
class Cell:
    score: float  # % (mean record score × 100)
    problems: int
    size: int  # problems in the full benchmark
    protocol: str

    @property
    def partial(self) -> bool:
        return self.problems < self.size


@dataclass
class Row:
    label: str
    model: str
    created: float
    cells: dict[str, Cell] = field(default_factory=dict)

    @property
    def average(self) -> float | None:
        if any(name not in self.cells for name in BENCHMARKS):
            return None
        return sum(self.cells[name].score for name in BENCHMARKS) / len(BENCHMARKS)


def collect(output_dir: str | Path) -> list[Row]:
    """A row per model folder that has records, in the order the models were first evaluated."""
    rows = []
    for info_path in sorted(Path(output_dir).glob(f"*/{MODEL_INFO}")):
        info = json.loads(info_path.read_text())
        row = Row(label=info_path.parent.name, model=str(info.get("path", "")), created=float(info.get("created", 0)))
        for name in BENCHMARKS:
            records = read_records(info_path.parent / f"{name}.jsonl", repair=False)  # an eval may be appending
            if records:
                row.cells[name] = Cell(score=100.0 * sum(r["score"] for r in records) / len(records),
                                       problems=len(records), size=int(records[0].get("benchmark_size", len(records))),
                                       protocol=str(records[0].get("protocol", {}).get("name", "")))
        if row.cells:
            rows.append(row)
    return sorted(rows, key=lambda row: (row.created, row.label))


def _cell_text(cell: Cell | None) -> str:
    if cell is None:
        return "–"
    return f"{cell.score:.1f}" + (f"* ({cell.problems}/{cell.size})" if cell.partial else "")


def markdown(rows: list[Row]) -> str:
    header = ["Model", *(spec.column for spec in BENCHMARKS.values()), "AVG"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    for row in rows:
        average = row.average
        cells = [_cell_text(row.cells.get(name)) for name in BENCHMARKS]
        lines.append("| " + " | ".join([row.label, *cells, "–" if average is None else f"{average:.1f}"]) + " |")
    protocols = {name: cell.protocol for row in rows for name, cell in row.cells.items()}
    notes = ", ".join(f"{BENCHMARKS[name].column} {protocols[name]}" for name in BENCHMARKS if name in protocols)
    lines += ["", f"Accuracy in %: {notes}."]
    if any(cell.partial for row in rows for cell in row.cells.values()):
        lines.append("`*`: scored on a slice (problems scored / benchmark size), not the full set.")
    return "\n".join(lines) + "\n"


def csv_text(rows: list[Row]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["model", *(spec.column for spec in BENCHMARKS.values()), "AVG",
                     *(f"{spec.column}_problems" for spec in BENCHMARKS.values()), "path"])
    for row in rows:
        scores = [f"{row.cells[name].score:.2f}" if name in row.cells else "" for name in BENCHMARKS]
        counts = [row.cells[name].problems if name in row.cells else "" for name in BENCHMARKS]
        average = row.average
        writer.writerow([row.label, *scores, "" if average is None else f"{average:.2f}", *counts, row.model])
    return buffer.getvalue()


def write_report(output_dir: str | Path) -> dict[str, Path]:
    """table.md and table.csv in output_dir, rebuilt from all its records; printed to the console."""
    output_dir = Path(output_dir)
    rows = collect(output_dir)
    text = markdown(rows)
    paths = {"markdown": atomic_write_text(output_dir / TABLE_MD, text),
             "csv": atomic_write_text(output_dir / TABLE_CSV, csv_text(rows))}
    print(text, flush=True)  # as written: the Markdown itself is what one pastes
    return paths


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        sys.exit("usage: python -m p2o_hpc.evaluation.report OUTPUT_DIR")
    write_report(sys.argv[1])
