"""Math problem datasets: one loader for local JSON/JSONL copies and Hugging Face names, plus the paper's subsets.

Every source is normalised into `Problem(id, problem, answer, source, meta)` so the rollout, reward and
evaluation code never branch on a dataset's field names. Rows are validated as they are read: a bad row
fails with the file and line (or array index) and the field, because a silently dropped or mangled gold
answer only shows up much later as a wrong reward.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from p2o_hpc.paths import shared_data_dir

log = logging.getLogger(__name__)

HF_PREFIX = "hf:"
_GENERIC_STEMS = frozenset({"test", "train", "validation", "dev", "data"})

# Field names, in order of preference, across the formats in MANIFEST.md and the Hugging Face originals.
PROBLEM_FIELDS = ("problem", "question", "prompt")
ANSWER_FIELDS = ("answer", "final_answer", "ground_truth")
ID_FIELDS = ("id", "unique_id", "idx")
# Not copied into meta: consumed above, or bulky text that would multiply memory (DeepMath's three R1 traces).
_META_DROP = frozenset(
    {*PROBLEM_FIELDS, *ANSWER_FIELDS, *ID_FIELDS, "solution", "messages", "test_cases", "test_case_function",
     "case_type", "r1_solution_1", "r1_solution_2", "r1_solution_3"}
)

# Local copies under shared_data_dir(); a list is concatenated in order.
DATASETS: dict[str, str | tuple[str, ...]] = {
    "math500": "benchmarks/math500/test.jsonl",
    "aime24": "benchmarks/aime24/test.jsonl",
    "aime25": "benchmarks/aime25/test.jsonl",
    "amc23": "benchmarks/amc23/test.jsonl",
    "minerva_math": "benchmarks/minerva_math/test.jsonl",
    "olympiadbench": "benchmarks/olympiadbench/test.jsonl",
    "deepscaler_partial": ("train/deepscaler_partial/aime.json", "train/deepscaler_partial/math.json"),
    "deepmath_partial": "train/deepmath_partial/math_deepmath_deal.jsonl",
}

# Full training/eval sets by Hugging Face name, for machines with a network and `datasets` installed.
HF_DATASETS: dict[str, str] = {
    "deepscaler": "hf:agentica-org/DeepScaleR-Preview-Dataset",
    "deepmath": "hf:zwhe99/DeepMath-103K",
    "math500_hf": "hf:HuggingFaceH4/MATH-500",
}
HF_SPLITS: dict[str, str] = {"math500_hf": "test"}

# Training sets contain a few rows whose gold answer is null or "" (DeepScaleR's MATH part has 4); those
# are unusable for a verifiable reward, so they are skipped (and logged). Benchmarks stay strict.
TRAINING_SETS = frozenset({"deepscaler_partial", "deepmath_partial", "deepscaler", "deepmath"})


class DatasetError(ValueError):
    """A dataset file, row or name that cannot be turned into Problems."""


@dataclass(frozen=True)
class Problem:
    """One math problem with its gold answer as text (AIME's "023" stays "023"; graders compare, not us)."""

    id: str
    problem: str
    answer: str
    source: str
    meta: dict = field(default_factory=dict)


class RecipeSplit(NamedTuple):
    """(train, holdout) of a recipe; a plain tuple for unpacking, named so the order is never guessed."""

    train: list[Problem]
    holdout: list[Problem]


# ---------------------------------------------------------------------------------------------- loading


def load_problems(
    source: str | Path,
    *,
    split: str = "train",
    limit: int | None = None,
    skip_unanswered: bool = False,
    label: str | None = None,
) -> list[Problem]:
    """Problems from a local .json/.jsonl file or an `hf:owner/name` dataset (split applies to hf: only).

    skip_unanswered drops rows whose answer field is present but null/empty (logged), instead of raising;
    a missing field, bad JSON or empty problem always raises. label becomes Problem.source (default: source).
    Zero rows in the end is an error, never an empty list.
    """
    if limit is not None and limit < 1:
        raise DatasetError(f"limit must be a positive integer or None, got {limit!r}")
    source_str = str(source)
    label = label or source_str
    if source_str.startswith(HF_PREFIX):
        rows = _hf_rows(source_str[len(HF_PREFIX):], split)
        where = lambda pos: f"{source_str} (split {split!r}) row {pos}"  # noqa: E731
        stem = source_str[len(HF_PREFIX):].rsplit("/", 1)[-1]
    else:
        path = Path(source_str)
        rows = _file_rows(path)
        unit = "line" if path.suffix == ".jsonl" else "index"
        where = lambda pos: f"{path} {unit} {pos}"  # noqa: E731
        # "test:3" says nothing in an eval log; benchmarks/aime25/test.jsonl gives "aime25/test:3".
        stem = f"{path.parent.name}/{path.stem}" if path.stem in _GENERIC_STEMS and path.parent.name else path.stem
    problems = list(_problems_from_rows(rows, where, stem, label, limit, skip_unanswered))
    if not problems:
        raise DatasetError(f"dataset {source_str} has no usable rows")
    return problems


def load_named(name: str, *, limit: int | None = None) -> list[Problem]:
    """A dataset by short name: local copies in DATASETS (under shared_data_dir()) or HF_DATASETS."""
    skip = name in TRAINING_SETS
    if name in DATASETS:
        entry = DATASETS[name]
        rel_paths = (entry,) if isinstance(entry, str) else entry
        root = shared_data_dir()
        problems: list[Problem] = []
        for rel in rel_paths:
            remaining = None if limit is None else limit - len(problems)
            if remaining == 0:
                break
            problems += load_problems(root / rel, limit=remaining, skip_unanswered=skip, label=name)
        return problems
    if name in HF_DATASETS:
        return load_problems(HF_DATASETS[name], split=HF_SPLITS.get(name, "train"), limit=limit,
                             skip_unanswered=skip, label=name)
    raise DatasetError(f"unknown dataset {name!r}; known: {sorted(DATASETS) + sorted(HF_DATASETS)}")


def _file_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number or index, parsed row); JSON errors carry their location."""
    if path.suffix not in (".json", ".jsonl"):
        raise DatasetError(f"{path}: unsupported file type {path.suffix!r} (expected .json or .jsonl)")
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
        if not isinstance(data, list):
            raise DatasetError(f"{path}: expected a JSON array of objects, got {type(data).__name__}")
        return iter(enumerate(data))
    return _jsonl_rows(path)


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path} line {lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from exc


def _hf_rows(name: str, split: str) -> Iterator[tuple[int, Any]]:
    try:
        import datasets  # lazy: heavy, and absent on machines that only use the local copies
    except ImportError as exc:
        raise DatasetError(
            f"loading hf:{name} needs the Hugging Face `datasets` package (pip install datasets); "
            "or use a local .json/.jsonl copy"
        ) from exc
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:  # network, unknown name, unknown split: say which dataset
        raise DatasetError(f"could not load hf:{name} split {split!r}: {exc}") from exc
    return iter(enumerate(dataset))


def _problems_from_rows(
    rows: Iterable[tuple[int, Any]],
    where_of: Callable[[int], str],
    stem: str,
    label: str,
    limit: int | None,
    skip_unanswered: bool,
) -> Iterator[Problem]:
    count = 0
    skipped: list[str] = []
    for row_index, (position, row) in enumerate(rows):
        where = where_of(position)
        problem = _row_to_problem(row, where, default_id=f"{stem}:{row_index}", label=label,
                                  skip_unanswered=skip_unanswered)
        if problem is None:
            skipped.append(where)
            continue
        yield problem
        count += 1
        if limit is not None and count >= limit:
            break
    if skipped:
        log.warning("skipped %d row(s) with a null/empty answer: %s", len(skipped), "; ".join(skipped[:5]))


def _row_to_problem(row: Any, where: str, *, default_id: str, label: str, skip_unanswered: bool) -> Problem | None:
    if not isinstance(row, Mapping):
        raise DatasetError(f"{where}: expected a JSON object, got {type(row).__name__}")
    text_field = next((f for f in PROBLEM_FIELDS if f in row), None)
    if text_field is None:
        raise DatasetError(f"{where}: missing problem field (one of {', '.join(PROBLEM_FIELDS)})")
    text = row[text_field]
    if not isinstance(text, str) or not text.strip():
        raise DatasetError(f"{where}: field {text_field!r} must be a non-empty string, got {text!r:.60}")

    answer_field = next((f for f in ANSWER_FIELDS if f in row), None)
    if answer_field is not None:
        answer = _normalise_answer(row[answer_field], where, answer_field)
    elif isinstance(row.get("solution"), str):
        # minerva_math: the gold answer is the last \boxed{} of the worked solution.
        answer_field = "solution"
        boxed = last_boxed(row["solution"])
        if boxed is None:
            raise DatasetError(f"{where}: no answer field and no \\boxed{{}} in field 'solution'")
        answer = _normalise_answer(boxed, where, answer_field)
    else:
        raise DatasetError(
            f"{where}: missing answer field (one of {', '.join(ANSWER_FIELDS)}, or a \\boxed{{}} solution)"
        )
    if not answer:
        if skip_unanswered:
            return None
        raise DatasetError(f"{where}: field {answer_field!r} is empty or null")

    id_field = next((f for f in ID_FIELDS if row.get(f) is not None), None)
    problem_id = str(row[id_field]) if id_field else default_id
    meta = {k: v for k, v in row.items() if k not in _META_DROP}
    return Problem(id=problem_id, problem=text.strip(), answer=answer, source=label, meta=meta)


_UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")


def _normalise_answer(value: Any, where: str, field_name: str) -> str:
    """Gold answer as stripped text without $...$ delimiters ("" for null, for the caller to judge).

    Lists (OlympiadBench's final_answer) are joined with ", "; integral floats (AMC23 stores 27.0) become "27";
    escaped "\\$" (money) is kept.
    """
    if value is None:
        return ""
    if isinstance(value, list):
        return ", ".join(p for p in (_normalise_answer(v, where, field_name) for v in value) if p)
    if isinstance(value, bool):
        raise DatasetError(f"{where}: field {field_name!r} must be text or a number, got a boolean")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    if not isinstance(value, str):
        raise DatasetError(f"{where}: field {field_name!r} must be text or a number, got {type(value).__name__}")
    return _UNESCAPED_DOLLAR.sub("", value).strip()


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}) with balanced braces; None when there is none."""
    best = None
    for match in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, i = 1, match.end()
        while i < len(text):
            ch = text[i]
            if ch == "\\":  # skip the escaped char: \{ \} are literal braces, \\ is a line break
                i += 2
                continue
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
                if depth == 0:
                    best = text[match.end():i]
                    break
            i += 1
    return best


# ---------------------------------------------------------------------------------------------- recipes


def deepscaler_recipe(
    problems: Sequence[Problem], *, seed: int = 42, holdout: int = 500, take: int = 5000
) -> RecipeSplit:
    """The paper's DeepScaleR subset: shuffle with random.Random(seed), first `holdout` held out, next `take` train.

    Returns RecipeSplit(train, holdout). On the partial local copy train is smaller than `take`; an empty
    train split is an error.
    """
    if holdout < 0 or take < 1:
        raise DatasetError(f"recipe needs holdout >= 0 and take >= 1, got holdout={holdout}, take={take}")
    rows = list(problems)
    random.Random(seed).shuffle(rows)
    held, train = rows[:holdout], rows[holdout:holdout + take]
    if not train:
        raise DatasetError(f"recipe left no training rows: {len(rows)} problems, holdout {holdout}")
    if len(train) < take:
        log.info("recipe: only %d training rows (asked for %d) from %d problems", len(train), take, len(rows))
    return RecipeSplit(train, held)


def deepmath_recipe(
    problems: Sequence[Problem], *, min_difficulty: float = 7.0, seed: int = 42, holdout: int = 500, take: int = 5000
) -> RecipeSplit:
    """The paper's DeepMath subset: keep meta["difficulty"] >= min_difficulty (text like "4.5" or a number),
    then the DeepScaleR split. A missing or non-numeric difficulty names the row."""
    kept = [p for p in problems if difficulty_of(p) >= min_difficulty]
    if not kept:
        raise DatasetError(f"no problems with difficulty >= {min_difficulty} among {len(problems)}")
    return deepscaler_recipe(kept, seed=seed, holdout=holdout, take=take)


def difficulty_of(problem: Problem) -> float:
    """meta["difficulty"] as a float, or a DatasetError naming the problem."""
    raw = problem.meta.get("difficulty")
    if isinstance(raw, bool) or raw is None:
        raise DatasetError(f"problem {problem.id!r} ({problem.source}) has no numeric difficulty: {raw!r}")
    try:
        return float(raw)
    except (TypeError, ValueError):
        raise DatasetError(f"problem {problem.id!r} ({problem.source}) has a non-numeric difficulty: {raw!r}") from None
