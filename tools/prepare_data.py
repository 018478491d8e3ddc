"""The paper's training sets (DeepScaleR and DeepMath recipes) written as JSONL with a manifest, and every training set
checked for contamination against every evaluation benchmark.

    python tools/prepare_data.py [--out DIR] [--full] [--drop-contaminated] [--train FILE_OR_NAME ...]

Writes, under --out (default <cache dir>/prepared, i.e. .cache/prepared or $P2O_CACHE_DIR/prepared):
  <set>/train.jsonl, <set>/holdout.jsonl   one set per recipe, named after its source (deepscaler_partial, …);
                                           train on one with data.train=<out>/<set>/train.jsonl data.recipe=null
  MANIFEST.json, MANIFEST.md               source + sha256, recipe parameters, row counts, output sha256
  CONTAMINATION.json, CONTAMINATION.md     hits per (training set × benchmark) with example pairs

The selection is recipe_selection's (p2o_hpc.data.datasets), the one place the authors' recipe lives; the contamination
check is p2o_hpc.data.contamination (normalised exact match + word 13-grams). Found contamination is reported, not an
error: the exit status is 0, or 1 with --fail-on-contamination when a written train file or a --train set still holds
a hit, and 2 for bad input (the message names the file and row).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from p2o_hpc.data import contamination
from p2o_hpc.data.datasets import (DATASETS, HF_DATASETS, HF_PREFIX, RECIPES, DatasetError, load_named, load_problems,
                                   recipe_selection, source_rows)
from p2o_hpc.data.prepared import manifest_markdown, sha256_file, write_problems
from p2o_hpc.io_utils import atomic_write_text
from p2o_hpc.paths import cache_dir, shared_data_dir
from p2o_hpc.records import Problem

BENCHMARKS = ("aime24", "aime25", "amc23", "math500", "minerva_math", "olympiadbench")
LOCAL_SOURCES = {"deepscaler": "deepscaler_partial", "deepmath": "deepmath_partial"}
FULL_SOURCES = {"deepscaler": "deepscaler", "deepmath": "deepmath"}
PAPER_TAKE = 5000
EXIT_CONTAMINATED, EXIT_ERROR = 1, 2


@dataclass
class PreparedSet:
    """One recipe's selection, before and after contamination is dropped, with what the manifest says of it."""

    name: str
    recipe: str
    source: str
    params: dict
    source_info: dict
    source_rows: int
    unanswered_train: int  # selected by the recipe, then dropped for a null/empty answer
    unanswered_holdout: int
    train: list[Problem]
    holdout: list[Problem]
    dropped: dict[str, list[str]] = field(default_factory=dict)  # train id → benchmarks (when dropped)

    @property
    def report_name(self) -> str:
        """Its name in the contamination report: the train file, never confused with a --train set of the same
        dataset (which checks the whole source)."""
        return f"{self.name}/train.jsonl"


def describe_source(source: str) -> tuple[dict, int]:
    """(what the manifest records of a source: its files with sha256, or its hf name and a hash of its rows,
    the number of rows the recipe sees, unanswered ones included)."""
    rows = source_rows(source, "train")
    if source in DATASETS:
        entry = DATASETS[source]
        root = shared_data_dir()
        files = [root / rel for rel in ((entry,) if isinstance(entry, str) else entry)]
    elif source in HF_DATASETS or source.startswith(HF_PREFIX):
        digest = hashlib.sha256()
        for raw in rows:  # no file to hash: the rows as read, canonical JSON, one per line
            digest.update(json.dumps(raw.row, sort_keys=True, ensure_ascii=False, default=str).encode() + b"\n")
        return {"name": source, "hf": HF_DATASETS.get(source, source), "rows_sha256": digest.hexdigest()}, len(rows)
    else:
        files = [Path(source)]
    file_rows: dict[str, int] = {}
    for raw in rows:
        path = raw.where.rsplit(" ", 2)[0]  # "<path> line N" / "<path> index N"
        file_rows[path] = file_rows.get(path, 0) + 1
    info = {"name": source, "files": [{"path": str(f), "sha256": sha256_file(f), "rows": file_rows.get(str(f), 0)}
                                      for f in files]}
    return info, len(rows)


def select(recipe: str, source: str, args: argparse.Namespace) -> PreparedSet:
    params = {"seed": args.seed, "holdout": args.holdout, "take": args.take, "min_difficulty": args.min_difficulty,
              "balance": not args.no_balance}
    source_info, _ = describe_source(source)
    selection = recipe_selection(source, recipe, seed=args.seed, holdout=args.holdout, take=args.take,
                                 min_difficulty=args.min_difficulty, balance=not args.no_balance)
    name = source if (source in DATASETS or source in HF_DATASETS) else recipe
    return PreparedSet(name, recipe, source, params, source_info, selection.source_rows, selection.unanswered_train,
                       selection.unanswered_holdout, list(selection.train), list(selection.holdout))


def load_any(source: str) -> list[Problem]:
    """A benchmark or an extra training set: a registered name, or a .json/.jsonl file / hf: name."""
    if source in DATASETS or source in HF_DATASETS:
        return load_named(source)
    return load_problems(source, skip_unanswered=True)


def parse_sources(items: list[str], full: bool) -> dict[str, str]:
    sources = dict(FULL_SOURCES if full else LOCAL_SOURCES)
    for item in items:
        recipe, sep, source = item.partition("=")
        if not sep or recipe not in RECIPES or not source:
            raise DatasetError(f"--source {item!r}: expected RECIPE=SOURCE with RECIPE one of {', '.join(RECIPES)}")
        sources[recipe] = source
    return sources


_PARTIAL = {"deepscaler_partial": "only DeepScaleR's AIME + MATH parts (8,449 of about 40k rows)",
            "deepmath_partial": "a 4,994-row sample of DeepMath-103K"}


def notes(sets: list[PreparedSet], args: argparse.Namespace) -> list[str]:
    out = []
    for s in sets:
        selected = len(s.train) + len(s.dropped) + s.unanswered_train
        pool = selected + len(s.holdout) + s.unanswered_holdout
        if s.source in _PARTIAL:
            out.append(f"{s.name} is a partial local copy, {_PARTIAL[s.source]}: the recipe runs on it as on the full "
                       "set, so its rows are drawn from a smaller pool and are not the paper's rows.")
        if selected < s.params["take"]:
            after = " (difficulty filter and answer-type balancing)" if s.recipe == "deepmath" else ""
            out.append(f"{s.name}: the recipe selects {selected} training rows, fewer than take={s.params['take']} "
                       f"(the paper trains on {PAPER_TAKE:,}): {s.source_rows} source rows leave {pool} after the "
                       f"recipe's selection{after}, of which {len(s.holdout) + s.unanswered_holdout} are held out.")
        if s.unanswered_train or s.unanswered_holdout:
            out.append(f"{s.name}: {s.unanswered_train} selected train row(s) and {s.unanswered_holdout} holdout "
                       "row(s) had a null/empty answer and were dropped after the selection, as recipe_split does.")
        if s.dropped:
            out.append(f"{s.name}: {len(s.dropped)} contaminated training row(s) dropped (--drop-contaminated); "
                       "see contaminated_train_ids.")
    out.append(f"Contamination: normalised exact match, and word {args.ngram}-grams ({_rule_text(args)}), against "
               f"{', '.join(args.benchmarks)}; see CONTAMINATION.md.")
    return out


def build_manifest(sets: list[PreparedSet], outputs: dict[str, dict], reports, args, argv: list[str]) -> dict:
    by_set = {}
    for r in reports:
        by_set.setdefault(r.train_set, {})[r.benchmark] = {"exact": r.exact, "ngram": r.ngram, "hits": len(r.hits),
                                                            "any_ngram": r.any_ngram}
    return {
        "command": "python tools/prepare_data.py " + shlex.join(argv),
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "sets": [{
            "name": s.name, "recipe": s.recipe, "source": s.source_info, "recipe_params": s.params,
            "counts": {"source_rows": s.source_rows,
                       "selected_train": len(s.train) + len(s.dropped) + s.unanswered_train,
                       "selected_holdout": len(s.holdout) + s.unanswered_holdout,
                       "dropped_unanswered": s.unanswered_train + s.unanswered_holdout,
                       "dropped_unanswered_train": s.unanswered_train, "dropped_contaminated": len(s.dropped),
                       "train": len(s.train), "holdout": len(s.holdout)},
            "contamination": by_set.get(s.report_name, {}),
            "contaminated_train_ids": s.dropped,
            "outputs": outputs[s.name],
        } for s in sets],
        "contamination_check": {"benchmarks": list(args.benchmarks), "ngram": args.ngram,
                                "min_shared_ngrams": args.min_shared, "min_overlap": args.min_overlap,
                                "dropped": args.drop_contaminated},
        "notes": notes(sets, args),
    }


def run(args: argparse.Namespace, argv: list[str], console: Console) -> int:
    out = Path(args.out) if args.out else cache_dir() / "prepared"
    sources = parse_sources(args.source, args.full)
    rule = contamination.Rule(min_shared=args.min_shared, min_overlap=args.min_overlap)
    sets: list[PreparedSet] = []
    for recipe in args.recipes:
        with console.status(f"selecting {recipe} from {sources[recipe]} …"):
            sets.append(select(recipe, sources[recipe], args))
    names = [s.name for s in sets]
    reported = [s.report_name for s in sets]
    if len(set(names)) != len(names):
        raise DatasetError(f"two recipes would write the same set {names}: give each its own --source")
    with console.status("loading benchmarks …"):
        benchmarks = {name: load_any(name) for name in args.benchmarks}
        extra = {name: load_any(name) for name in args.train}
        index = contamination.BenchmarkIndex(benchmarks, n=args.ngram)
    train_sets = {**{s.report_name: s.train for s in sets}, **extra}
    started = time.perf_counter()
    with Progress(TextColumn("contamination"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, transient=True) as progress:
        task = progress.add_task("check", total=sum(map(len, train_sets.values())))
        reports = contamination.check(train_sets, index, rule=rule,
                                      advance=lambda k: progress.advance(task, k))
    check_s = time.perf_counter() - started

    outputs: dict[str, dict] = {}
    for s in sets:
        found = contamination.contaminated_ids(reports, s.report_name)
        if args.drop_contaminated and found:
            s.dropped = {tid: sorted(found[tid]) for tid in sorted(found)}
            s.train = [p for p in s.train if p.id not in found]
        outputs[s.name] = {part: _relative(write_problems(out / s.name / f"{part}.jsonl", rows), out)
                           for part, rows in (("train", s.train), ("holdout", s.holdout))}
    manifest = build_manifest(sets, outputs, reports, args, argv)
    atomic_write_text(out / "MANIFEST.json", json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(out / "MANIFEST.md", manifest_markdown(manifest))
    report = {**manifest["contamination_check"], "normalisation": contamination.__doc__.split("\n\n")[1],
              "check_seconds": round(check_s, 3),
              "pairs": [r.to_json(args.examples) for r in reports]}
    atomic_write_text(out / "CONTAMINATION.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(out / "CONTAMINATION.md", "# Contamination: training sets × evaluation benchmarks\n\n"
                      f"exact = normalised exact match; n-gram = word {args.ngram}-grams, {_rule_text(args)}; "
                      "any shared n-gram = the plain >= 1 rule, answer-format boilerplate included "
                      f"(p2o_hpc/data/contamination.py says why). Counts are training rows"
                      f"{' before --drop-contaminated' if args.drop_contaminated else ''}.\n\n"
                      + contamination.markdown_table(reports, examples=args.examples))
    show(console, sets, reports, out, check_s)

    remaining = [r for r in reports if r.hits and not (args.drop_contaminated and r.train_set in reported)]
    return EXIT_CONTAMINATED if args.fail_on_contamination and remaining else 0


def _rule_text(args: argparse.Namespace) -> str:
    return (f">= {args.min_shared} shared and covering >= {args.min_overlap:g} of the benchmark problem's "
            f"{args.ngram}-grams")


def _relative(info: dict, root: Path) -> dict:
    return {**info, "path": str(Path(info["path"]).relative_to(root))}


def show(console: Console, sets: list[PreparedSet], reports, out: Path, check_s: float) -> None:
    table = Table(title=f"prepared sets in {out}")
    for column in ("set", "source rows", "train", "holdout", "unanswered dropped (train + holdout)",
                   "dropped contaminated"):
        table.add_column(column, justify="left" if column == "set" else "right", no_wrap=column == "set")
    for s in sets:
        table.add_row(s.name, str(s.source_rows), str(len(s.train)), str(len(s.holdout)),
                      f"{s.unanswered_train} + {s.unanswered_holdout}",
                      str(len(s.dropped)))
    console.print(table)
    hits = Table(title=f"contamination (checked in {check_s:.2f} s)")
    hits.caption = "bench: benchmark problems hit; any: rows sharing >= 1 n-gram (boilerplate included)"
    for column in ("training set", "benchmark", "exact", "n-gram", "hits", "bench", "any"):
        named = column in ("training set", "benchmark")
        hits.add_column(column, justify="left" if named else "right", no_wrap=named)
    for r in reports:
        hits.add_row(escape(r.train_set), r.benchmark, str(r.exact), str(r.ngram), str(len(r.hits)),
                     str(r.benchmark_problems_hit), str(r.any_ngram))
    console.print(hits)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog="\n".join(__doc__.splitlines()[2:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", help="output folder (default: <cache dir>/prepared)")
    p.add_argument("--recipes", nargs="+", choices=RECIPES, default=list(RECIPES))
    p.add_argument("--full", action="store_true",
                   help="the full Hugging Face sets (deepscaler, deepmath) instead of the partial local copies")
    p.add_argument("--source", action="append", default=[], metavar="RECIPE=SOURCE",
                   help="a recipe's source: a registered name, a .json/.jsonl file or hf:owner/name")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--holdout", type=int, default=500)
    p.add_argument("--take", type=int, default=PAPER_TAKE)
    p.add_argument("--min-difficulty", type=float, default=7.0, help="deepmath only")
    p.add_argument("--no-balance", action="store_true", help="deepmath: skip the answer-type balancing")
    p.add_argument("--benchmarks", nargs="+", default=list(BENCHMARKS), help="names or .json/.jsonl files")
    p.add_argument("--train", action="append", default=[], metavar="SOURCE",
                   help="another training set to check (reported only, never rewritten)")
    p.add_argument("--ngram", type=int, default=contamination.DEFAULT_NGRAM, help="words per n-gram")
    p.add_argument("--min-shared", type=int, default=1, help="shared n-grams an n-gram hit needs at least")
    p.add_argument("--min-overlap", type=float, default=contamination.Rule.min_overlap,
                   help="share of the benchmark problem's n-grams an n-gram hit needs at least (0: any shared)")
    p.add_argument("--examples", type=int, default=3, help="example pairs per (training set, benchmark)")
    p.add_argument("--drop-contaminated", action="store_true", help="leave the hits out of the written train files")
    p.add_argument("--fail-on-contamination", action="store_true",
                   help="exit 1 when a written train file or a --train set still holds a hit")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser().parse_args(argv)
    console = Console()
    if args.ngram < 1 or args.min_shared < 1 or args.examples < 0 or not 0 <= args.min_overlap <= 1:
        console.print("[red]error:[/red] --ngram and --min-shared must be >= 1, --examples >= 0, "
                      "--min-overlap in [0, 1]")
        return EXIT_ERROR
    try:
        return run(args, argv, console)
    except (DatasetError, OSError) as exc:  # OSError: the shared data folder missing, --out not writable
        Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {escape(str(exc))}")
        return EXIT_ERROR


if __name__ == "__main__":
    raise SystemExit(main())
