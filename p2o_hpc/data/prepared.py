"""Prepared training sets: a recipe's (train, holdout) written as JSONL that `data.train` reads back, with a manifest.

A row is {"id", "problem", "answer", **meta}: load_problems reads it into the same Problem (given the same label),
so `data.train=<dir>/train.jsonl data.recipe=null` trains on exactly what recipe_split selected. Files are written
atomically and their sha256 is taken from the very bytes written, so the manifest can be checked with sha256sum.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from p2o_hpc.data.datasets import ANSWER_FIELDS, ID_FIELDS, PROBLEM_FIELDS, DatasetError
from p2o_hpc.io_utils import atomic_write_bytes, clean_text
from p2o_hpc.records import Problem

# Meta keys that load_problems would read as the problem, answer or id (or drop) instead of meta: never written.
_RESERVED = frozenset({*PROBLEM_FIELDS, *ANSWER_FIELDS, *ID_FIELDS, "solution"})


def problem_row(problem: Problem) -> dict:
    """The JSON row load_problems turns back into `problem` (meta keys it would misread are left out)."""
    return {"id": problem.id, "problem": problem.problem, "answer": problem.answer,
            **{k: v for k, v in problem.meta.items() if k not in _RESERVED}}


def jsonl_bytes(problems: Iterable[Problem], where: str) -> bytes:
    """The JSONL file of these problems; a meta value JSON cannot hold is an error naming the problem."""
    lines = []
    for problem in problems:
        try:
            lines.append(json.dumps(problem_row(problem), ensure_ascii=False))
        except (TypeError, ValueError) as exc:
            raise DatasetError(f"{where}: problem {problem.id!r} has meta that is not JSON: {exc}") from exc
    return clean_text("".join(line + "\n" for line in lines)).encode("utf-8")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_problems(path: Path, problems: Sequence[Problem]) -> dict:
    """Write the JSONL atomically; {"path", "rows", "sha256"} of what was written."""
    data = jsonl_bytes(problems, str(path))
    atomic_write_bytes(path, data)
    return {"path": str(path), "rows": len(problems), "sha256": sha256_bytes(data)}


def manifest_markdown(manifest: dict) -> str:
    """MANIFEST.md: one table row per prepared set, the notes, and how to train on a set."""
    lines = [
        "# Prepared training sets", "",
        f"Written by `{manifest['command']}` at {manifest['created_utc']}. Full details and sha256 values: "
        "MANIFEST.json; contamination: CONTAMINATION.md.", "",
        "| set | recipe | source | seed | holdout | take | min difficulty | balance | source rows | selected "
        "(train / holdout) | dropped unanswered | dropped contaminated | train | holdout | train sha256 |",
        "|---|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s in manifest["sets"]:
        p, c = s["recipe_params"], s["counts"]
        deepmath = s["recipe"] == "deepmath"
        lines.append(
            f"| {s['name']} | {s['recipe']} | {s['source']['name']} | {p['seed']} | {p['holdout']} | {p['take']} "
            f"| {p['min_difficulty'] if deepmath else '–'} | {p['balance'] if deepmath else '–'} | {c['source_rows']} "
            f"| {c['selected_train']} / {c['selected_holdout']} | {c['dropped_unanswered']} "
            f"| {c['dropped_contaminated']} | {c['train']} | {c['holdout']} | {s['outputs']['train']['sha256'][:12]} |")
    lines += ["", "Notes", *[f"- {note}" for note in manifest["notes"]], "",
              "Train on a set: `data.train=<this dir>/<set>/train.jsonl data.recipe=null` (the recipe already ran).",
              ""]
    return "\n".join(lines)
