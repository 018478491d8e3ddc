"""P²O's own overhead over GRPO on the CPU testbed: the same `experiment=testbed` run three ways, in one invocation.

    .venv/bin/python tools/bench_p2o_overhead.py [--epochs 3] [--out DIR] [--keep] [hydra overrides …]

The three runs, one after the other, each an ordinary run dir made by the project's launcher (`python -m
p2o_hpc.launch`, `cluster=local`):

    grpo          algorithm=grpo
    p2o_blocking  algorithm=p2o gepa=inline   (the testbed default: a GEPA round on the learner's own engine
                                               after every epoch but the last, the learner waiting for it)
    p2o_overlap   algorithm=p2o gepa=overlap  (gepa.mode=service, gepa.schedule=overlap: the launcher starts the
                                               GEPA service as its own process beside the learner; the learner goes
                                               on with the next epoch and waits only when a batch holds a hard
                                               prompt whose templates have not landed)

Base policy: `model=testbed`, the shipped `assets/testbed_model/` (resolved by p2o_hpc.model_dir, rebuilt by
tools/build_testbed_model.py when missing). GEPA's operator is the testbed's offline `reflection=edit`.

What "epoch time" is. Every metrics.jsonl line carries the wall clock at which it was written (`_timestamp`), and
the line of an epoch's last step is written after that epoch's end work. So the wall time of epoch e is the
`_timestamp` of its last line minus that of epoch e−1's last line; for epoch 0 the reference is the step-0 line
(validation.before_training, which the testbed turns on) or, without one, the first line minus its `time/step`.
An epoch's time therefore holds:

    steps       Σ time/step over its steps: weight sync, generation, reward, log-probs (and the context-distillation
                log-probs under templates), the updates — and, under overlap, the learner's wait for templates
                (the batch is taken inside the step)
    GEPA wait   the learner idle for GEPA: p2o/learner_idle_s (blocking: the round at the epoch's end; overlap: the
                wait before a batch with deferred hard prompts, i.e. inside "steps", shown apart here)
    validation  time/validation (the testbed validates every 3 steps = every epoch; P²O also scores the held-out sets
                under the round's best template, one more pass per set)
    other       the rest of the epoch's end: the epoch-end checkpoint, the hard-set write, P²O's policy export for
                the service, the metrics line
It does not hold start-up (process, megatron, vLLM engines, the step-0 validation) nor shut-down; those are in the
"process wall" column, the launcher subprocess's total wall time, measured here.

The last epoch has no GEPA round (no epoch follows it), so N epochs hold N−1 rounds for either P²O schedule; the
ratios are over all N epochs (mean epoch time ÷ GRPO's) and `*_overhead_s_per_round=` spreads the extra time over
the rounds. `--epochs` ≥ 2. Printed: a table, then `key=value` lines:

    epoch_s_grpo= epoch_s_p2o_blocking= epoch_s_p2o_overlap=          mean wall time per epoch
    p2o_blocking_over_grpo= p2o_overlap_over_grpo=                   the ratios (target: overlap ≤ 1.2)
    learner_idle_s_per_epoch_blocking= learner_idle_s_per_epoch_overlap=   Σ p2o/learner_idle_s ÷ epochs
    gepa_round_s_blocking= gepa_round_s_overlap=                     mean round latency: hard_set.jsonl written →
                                                                     templates.json published (file times)

Runs go in a temporary folder, removed at the end unless --keep; with --out DIR they go in DIR/runs (removed
unless --keep) and DIR also gets summary.json and p2o_overhead.png (stacked bars of the epoch time). Extra Hydra
overrides go to all three runs (after the benchmark's own; do not override algorithm= or gepa=). Other work on
the machine's cores shows up in the numbers: the three runs share nothing but the machine, so run it on a quiet one.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from p2o_hpc.io_utils import atomic_write_bytes, atomic_write_text
from p2o_hpc.model_dir import resolve_model_dir
from p2o_hpc.paths import REPO_ROOT
from p2o_hpc.run_dir import RunDir
from p2o_hpc.trainer.report import read_metrics

# (name, overrides that make the variant, whether GEPA waits happen inside time/step: the overlap schedule)
VARIANTS = [
    ("grpo", ["algorithm=grpo"], False),
    ("p2o_blocking", ["algorithm=p2o", "gepa=inline"], False),
    ("p2o_overlap", ["algorithm=p2o", "gepa=overlap"], True),
]
TARGET_OVERLAP = 1.2
IDLE = "p2o/learner_idle_s"
TAIL_CHARS = 4000


class RunFailed(RuntimeError):
    pass


@dataclass
class EpochTimes:
    epoch: int
    steps: int
    wall_s: float
    step_s: float  # Σ time/step, GEPA waits inside steps included
    idle_s: float  # Σ p2o/learner_idle_s
    idle_in_steps_s: float  # the part of idle_s that is inside time/step (overlap)
    validation_s: float

    @property
    def other_s(self) -> float:
        return self.wall_s - self.step_s - self.validation_s - (self.idle_s - self.idle_in_steps_s)


@dataclass
class RunResult:
    name: str
    run_dir: str
    process_wall_s: float
    epochs: list[EpochTimes]
    gepa_rounds_s: list[float]  # per round: hard set written → templates published
    gepa_accepted: int
    gepa_rollouts: int
    hard_sizes: list[int] = field(default_factory=list)

    def mean(self, attribute: str) -> float:
        return sum(getattr(epoch, attribute) for epoch in self.epochs) / len(self.epochs)

    @property
    def epoch_s(self) -> float:
        return self.mean("wall_s")

    @property
    def idle_per_epoch_s(self) -> float:
        return self.mean("idle_s")

    @property
    def gepa_round_s(self) -> float | None:
        return sum(self.gepa_rounds_s) / len(self.gepa_rounds_s) if self.gepa_rounds_s else None


# -- running ---------------------------------------------------------------------------------------------------------

def tail(path: Path, chars: int = TAIL_CHARS) -> str:
    if not path.is_file():
        return ""
    with open(path, "rb") as handle:
        handle.seek(max(0, path.stat().st_size - chars))
        return handle.read().decode(errors="replace")


def run_variant(name: str, command: list[str], run_dir: Path, log_dir: Path, timeout_s: float,
                console: Console) -> float:
    """The launcher in its own process group (its learner ranks and engines with it); returns its wall time. A
    failure raises RunFailed with the tails of its output."""
    out_log, err_log = log_dir / f"{name}.stdout.log", log_dir / f"{name}.stderr.log"
    console.print(f"[bold]{name}[/bold]: {' '.join(command[2:])}", soft_wrap=True)
    started = time.perf_counter()
    with open(out_log, "wb") as stdout, open(err_log, "wb") as stderr, \
            console.status(f"running {name} (logs: {log_dir})"):
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=stdout, stderr=stderr, start_new_session=True,
                                   env={**os.environ, "PYTHONWARNINGS": "ignore"})
        try:
            code = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:  # the whole launcher group goes, not only its first process
            _stop_group(process)
            code = None
        except KeyboardInterrupt:
            _stop_group(process)
            raise
    wall = time.perf_counter() - started
    if code is None or code != 0:
        why = f"timed out after {timeout_s:.0f} s" if code is None else f"exit status {code}"
        service_log = RunDir(run_dir).logs / "gepa_service.log"  # the overlap run's GEPA service, when it has one
        service = f"--- GEPA service log tail ({service_log}) ---\n{tail(service_log, 2000)}\n" \
            if service_log.is_file() else ""
        raise RunFailed(f"{name} failed ({why}) after {wall:.0f} s; run dir {run_dir}\n"
                        f"--- stdout tail ({out_log}) ---\n{tail(out_log, 1500)}\n{service}"
                        f"--- stderr tail ({err_log}) ---\n{tail(err_log)}")
    last = (out_log.read_text(errors="replace").strip().splitlines() or [""])[-1]
    if last != f"run_dir={run_dir.resolve()}":
        raise RunFailed(f"{name}: the launcher ended without its run_dir= line (last line: {last!r})\n"
                        f"--- stderr tail ({err_log}) ---\n{tail(err_log)}")
    console.print(f"  {name}: {wall:.0f} s")
    return wall


def _stop_group(process: subprocess.Popen) -> None:
    for sig, wait_s in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


# -- reading a run ---------------------------------------------------------------------------------------------------

def epoch_times(rows: list[dict], *, idle_inside_steps: bool) -> list[EpochTimes]:
    """Per epoch, from metrics.jsonl (see the module docstring for what each part holds)."""
    training = [row for row in rows if row.get("step", 0) > 0 and "time/step" in row]
    if not training:
        raise ValueError("no training steps in metrics.jsonl")
    before = [row for row in rows if row.get("step") == 0 and "_timestamp" in row]
    start = before[-1]["_timestamp"] if before else training[0]["_timestamp"] - training[0]["time/step"]
    epochs: dict[int, list[dict]] = {}
    for row in training:
        epochs.setdefault(int(row["epoch"]), []).append(row)
    result = []
    for epoch in sorted(epochs):
        members = epochs[epoch]
        end = members[-1]["_timestamp"]
        idle = sum(row.get(IDLE, 0.0) for row in members)
        result.append(EpochTimes(
            epoch=epoch, steps=len(members), wall_s=end - start,
            step_s=sum(row["time/step"] for row in members), idle_s=idle,
            idle_in_steps_s=idle if idle_inside_steps else 0.0,
            validation_s=sum(row.get("time/validation", 0.0) for row in members)))
        start = end
    return result


def gepa_round_latencies(run_dir: RunDir, epochs: int) -> list[float]:
    """Per round that published templates: seconds from the epoch's hard set on disk to its templates.json."""
    latencies = []
    for epoch in range(epochs):
        hard, templates = run_dir.hard_set(epoch), run_dir.templates(epoch)
        if run_dir.done(epoch) and hard.is_file() and templates.is_file():
            latencies.append(templates.stat().st_mtime - hard.stat().st_mtime)
    return latencies


def read_run(name: str, run_path: Path, process_wall_s: float, *, overlap: bool) -> RunResult:
    """From metrics.jsonl and the epoch files alone. (Not through RunDir.load_config / comparison.summarize: they
    type the saved config with this process's schema, which a checkout edited during a long benchmark may no longer
    match.)"""
    run_dir = RunDir(run_path)
    rows = read_metrics(run_dir)
    epochs = epoch_times(rows, idle_inside_steps=overlap)
    return RunResult(name=name, run_dir=str(run_path), process_wall_s=process_wall_s, epochs=epochs,
                     gepa_rounds_s=gepa_round_latencies(run_dir, len(epochs)),
                     gepa_accepted=int(sum(row.get("gepa/accepted", 0) for row in rows)),
                     gepa_rollouts=int(sum(row.get("gepa/budget_used", 0) for row in rows)),
                     hard_sizes=[int(row["hard/size"]) for row in rows if "hard/size" in row])


# -- reporting -------------------------------------------------------------------------------------------------------

def _f(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def results_table(results: list[RunResult], grpo_epoch_s: float) -> Table:
    """Mean seconds per epoch and its parts (module docstring), the GEPA round latency and the process wall."""
    table = Table(title=f"experiment=testbed, {len(results[0].epochs)} epochs: mean s per epoch")
    for column in ("run", "epoch", "×grpo", "steps", "GEPA wait", "valid.", "end", "round", "proc"):
        table.add_column(column, justify="left" if column == "run" else "right", no_wrap=column == "run")
    for result in results:
        table.add_row(
            result.name, _f(result.epoch_s), f"{result.epoch_s / grpo_epoch_s:.2f}",
            _f(result.mean("step_s") - result.mean("idle_in_steps_s")), _f(result.mean("idle_s")),
            _f(result.mean("validation_s")), _f(result.mean("other_s")), _f(result.gepa_round_s),
            _f(result.process_wall_s, 0))
    return table


def run_lines(results: list[RunResult]) -> list[str]:
    """Per run: each epoch's wall time, the hard set after each epoch, GEPA's acceptances and rollouts."""
    return [f"{result.name}: epoch walls {' '.join(f'{e.wall_s:.1f}' for e in result.epochs)} s; hard set "
            f"{' → '.join(map(str, result.hard_sizes))}; GEPA accepted {result.gepa_accepted}, "
            f"{result.gepa_rollouts} rollouts; {result.run_dir}" for result in results]


def key_values(results: dict[str, RunResult]) -> dict[str, float | None]:
    grpo = results["grpo"]
    rounds = max(1, len(grpo.epochs) - 1)
    values: dict[str, float | None] = {f"epoch_s_{name}": result.epoch_s for name, result in results.items()}
    for schedule in ("blocking", "overlap"):
        p2o = results[f"p2o_{schedule}"]
        values[f"p2o_{schedule}_over_grpo"] = p2o.epoch_s / grpo.epoch_s
        values[f"p2o_{schedule}_overhead_s_per_round"] = (p2o.epoch_s - grpo.epoch_s) * len(p2o.epochs) / rounds
        values[f"learner_idle_s_per_epoch_{schedule}"] = p2o.idle_per_epoch_s
        values[f"gepa_round_s_{schedule}"] = p2o.gepa_round_s
    values.update({f"process_wall_s_{name}": result.process_wall_s for name, result in results.items()})
    return values


def plot(results: list[RunResult], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parts = [("steps (GEPA wait excluded)", lambda r: r.mean("step_s") - r.mean("idle_in_steps_s")),
             ("GEPA wait (p2o/learner_idle_s)", lambda r: r.mean("idle_s")),
             ("validation", lambda r: r.mean("validation_s")),
             ("other epoch end", lambda r: max(0.0, r.mean("other_s")))]
    fig, ax = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    names = [result.name for result in results]
    bottom = [0.0] * len(results)
    for label, value in parts:
        heights = [value(result) for result in results]
        ax.bar(names, heights, bottom=bottom, label=label)
        bottom = [b + h for b, h in zip(bottom, heights)]
    grpo = results[0].epoch_s
    for index, result in enumerate(results):
        ax.text(index, bottom[index], f"{result.epoch_s:.1f} s (×{result.epoch_s / grpo:.2f})", ha="center",
                va="bottom", fontsize=9)
    ax.axhline(TARGET_OVERLAP * grpo, color="grey", linestyle="--", linewidth=1,
               label=f"{TARGET_OVERLAP:g} × grpo (overlap target)")
    ax.set_ylabel("seconds per epoch (mean)")
    ax.set_title(f"P²O overhead over GRPO, testbed, {len(results[0].epochs)} epochs")
    ax.legend(fontsize=8, loc="upper left")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return atomic_write_bytes(out, buffer.getvalue())


# -- main ------------------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3, help="algorithm.epochs of every run (≥ 2; default 3)")
    parser.add_argument("--out", help="folder for the runs (DIR/runs), summary.json and p2o_overhead.png")
    parser.add_argument("--keep", action="store_true", help="keep the run dirs")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per run before it is stopped")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for all three runs")
    args = parser.parse_args(argv)
    console = Console()
    if args.epochs < 2:
        console.print("[red]error:[/red] --epochs must be ≥ 2 (the last epoch has no GEPA round)")
        return 2
    if not any(o.startswith(("model=", "model.path=")) for o in args.overrides):
        try:  # the shipped base policy: fail once here instead of three times in the launcher
            console.print(f"base policy: {resolve_model_dir('testbed')}")
        except FileNotFoundError as error:
            console.print(f"[red]error:[/red] {error}")
            return 2

    out = Path(args.out).resolve() if args.out else None
    if out is not None:
        runs = out / "runs"
        if runs.exists() and any(runs.iterdir()):
            console.print(f"[red]error:[/red] {runs} is not empty: the launcher would resume those runs; delete it "
                          "or choose another --out")
            return 2
        runs.mkdir(parents=True, exist_ok=True)
    else:
        runs = Path(tempfile.mkdtemp(prefix="bench_p2o_overhead_"))
    failed = False
    started = time.perf_counter()
    try:
        results = []
        for name, variant, overlap in VARIANTS:
            run_dir = runs / name
            command = [sys.executable, "-m", "p2o_hpc.launch", f"hydra.run.dir={run_dir}", "experiment=testbed",
                       *variant, f"algorithm.epochs={args.epochs}", *args.overrides]
            wall = run_variant(name, command, run_dir, runs, args.timeout, console)
            results.append(read_run(name, run_dir, wall, overlap=overlap))
    except (RunFailed, FileNotFoundError, ValueError, KeyError) as error:
        failed = True
        console.print("[red]error:[/red]", end=" ")
        console.print(str(error), markup=False, highlight=False, soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        failed = True
        console.print("[red]interrupted[/red]")
        return 130
    finally:
        total = time.perf_counter() - started
        if args.keep or failed:
            console.print(f"run dirs (and the launchers' logs) kept in {runs}")
        else:
            shutil.rmtree(runs, ignore_errors=True)

    by_name = {result.name: result for result in results}
    grpo_epoch_s = by_name["grpo"].epoch_s
    console.print(results_table(results, grpo_epoch_s))
    console.print("steps: Σ time/step less GEPA waits; GEPA wait: p2o/learner_idle_s; valid.: time/validation; end: "
                  "the rest of the epoch's end; round: hard set → templates; proc: the launcher's wall time",
                  highlight=False)
    for line in run_lines(results):
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    values = key_values(by_name)
    for key, value in values.items():
        line = f"{key}={_f(value, 4)}"
        if key == "p2o_overlap_over_grpo":
            line += f" (target ≤ {TARGET_OVERLAP:g}) {'OK' if value <= TARGET_OVERLAP else 'OVER'}"
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    console.print(f"benchmark_wall_s={total:.0f}", highlight=False)
    if out is not None:
        summary = {"epochs": args.epochs, "overrides": args.overrides, "benchmark_wall_s": total, **values,
                   "runs": [{**asdict(result), "epoch_s": result.epoch_s,
                             "epochs": [{**asdict(epoch), "other_s": epoch.other_s} for epoch in result.epochs]}
                            for result in results]}
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        console.print(f"chart → {plot(results, out / 'p2o_overhead.png')}; numbers → {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
