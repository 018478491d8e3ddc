"""Math problem datasets: one loader for local JSON/JSONL copies and Hugging Face names, plus the paper's subsets.

Every source is normalised into `Problem(id, problem, answer, source, meta)` so the rollout, reward and
evaluation code never branch on a dataset's field names. Rows are validated as they are read: a bad row
fails with the file and line (or array index) and the field, because a silently dropped or mangled gold
answer only shows up much later as a wrong reward.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import random
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from p2o_hpc.data.synthetic import NAME_FORMAT as SYNTHETIC_NAME_FORMAT
from p2o_hpc.data.synthetic import PREFIX as SYNTHETIC_PREFIX
from p2o_hpc.data.synthetic import dataset_rows as synthetic_rows
from p2o_hpc.io_utils import clean_text
from p2o_hpc.paths import shared_data_dir
from p2o_hpc.records import Problem

if TYPE_CHECKING:
    from p2o_hpc.config import DataConfig

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

# Columns an hf: dataset drops before its rows are read (never used; DeepMath-103K's R1 traces are gigabytes).
_BULKY_COLUMNS = frozenset({"messages", "r1_solution_1", "r1_solution_2", "r1_solution_3"})

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

# Full training/eval sets by Hugging Face name, for machines with a network.
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
    return _load_problems(source, split, limit, skip_unanswered, label, seen_ids={})


def _load_problems(source: str | Path, split: str, limit: int | None, skip_unanswered: bool, label: str | None,
                   seen_ids: dict[str, str]) -> list[Problem]:
    """load_problems, with the ids already taken by earlier files of the same dataset (id → where)."""
    if limit is not None and limit < 1:
        raise DatasetError(f"limit must be a positive integer or None, got {limit!r}")
    source_str = str(source)
    label = label or source_str
    rows, where, stem = _open_rows(source_str, split)
    problems = list(_problems_from_rows(rows, where, stem, label, limit, skip_unanswered, seen_ids))
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
        seen_ids: dict[str, str] = {}  # across the files: one dataset, one id space
        for rel in rel_paths:
            remaining = None if limit is None else limit - len(problems)
            if remaining == 0:
                break
            problems += _load_problems(root / rel, "train", remaining, skip, name, seen_ids)
        return problems
    if name in HF_DATASETS:
        return load_problems(HF_DATASETS[name], split=HF_SPLITS.get(name, "train"), limit=limit,
                             skip_unanswered=skip, label=name)
    raise _unknown_dataset(name)


def _unknown_dataset(name: str) -> DatasetError:
    """A bare word that is no registered name: most often a typo of one (math5000), so say which."""
    known = sorted(DATASETS) + sorted(HF_DATASETS)
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" (did you mean {' or '.join(map(repr, close))}?)" if close else ""
    return DatasetError(f"unknown dataset {name!r}{hint}; known: {', '.join(known)}, or a .json/.jsonl file, "
                        f"or hf:owner/name, or {SYNTHETIC_NAME_FORMAT}")


def training_problems(data_cfg: DataConfig) -> list[Problem]:
    """The configured training set (data.*) as the authors' recipe selects it, then data.limit (smoke runs).

    The learner's one way to read it, and the launcher's preflight reads it the same way, so a bad row, name or
    duplicate id fails before anything is submitted instead of in every rank after megatron's init.
    """
    problems = recipe_split(data_cfg.train, data_cfg.recipe, seed=data_cfg.recipe_seed, holdout=data_cfg.holdout,
                            take=data_cfg.take).train
    return problems[: data_cfg.limit] if data_cfg.limit else problems


def _file_rows(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number or index, parsed row); JSON errors carry their location."""
    if path.suffix not in (".json", ".jsonl"):
        raise DatasetError(f"{path}: unsupported file type {path.suffix!r} (expected .json or .jsonl)")
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    if path.suffix == ".json":
        raw = path.read_bytes()
        try:
            data = json.loads(_utf8(raw, path))
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
        if not isinstance(data, list):
            raise DatasetError(f"{path}: expected a JSON array of objects, got {type(data).__name__}")
        return iter(enumerate(data))
    return _jsonl_rows(path)


def _utf8(raw: bytes, path: Path, first_line: int = 1) -> str:
    """The text, or a DatasetError naming file and line (a bare UnicodeDecodeError names neither)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = first_line + raw.count(b"\n", 0, exc.start)
        raise DatasetError(f"{path} line {line}: invalid UTF-8 ({exc.reason}, byte {raw[exc.start]:#04x})") from exc


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            line = _utf8(raw, path, lineno)
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path} line {lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from exc


def _import_datasets(purpose: str) -> Any:
    """The Hugging Face `datasets` module, imported on first use (it takes over a second, and `import p2o_hpc.data`
    stays light); a declared dependency, so a failure here is a broken install, said with what needed it."""
    try:
        import datasets
    except ImportError as exc:
        raise DatasetError(f"{purpose} needs the Hugging Face `datasets` package (pip install datasets)") from exc
    return datasets


def _hf_rows(name: str, split: str) -> Iterator[tuple[int, Any]]:
    datasets = _import_datasets(f"loading hf:{name}")
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:  # network, unknown name, unknown split: say which dataset
        raise DatasetError(f"could not load hf:{name} split {split!r}: {exc}") from exc
    columns = getattr(dataset, "column_names", None) or []
    bulky = [c for c in columns if c in _BULKY_COLUMNS or (c == "solution" and any(f in columns for f in ANSWER_FIELDS))]
    if bulky:  # DeepMath's three R1 traces are most of its bytes; never turned into Python objects
        dataset = dataset.remove_columns(bulky)
    return iter(enumerate(dataset))


def _problems_from_rows(
    rows: Iterable[tuple[int, Any]],
    where_of: Callable[[int], str],
    stem: str,
    label: str,
    limit: int | None,
    skip_unanswered: bool,
    seen_ids: dict[str, str],
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
        _claim_id(seen_ids, problem.id, where)
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

    problem_id = row_id(row, default_id)
    meta = {k: v for k, v in row.items() if k not in _META_DROP}
    # A JSON "\ud800" escape parses into a lone surrogate, which a tokenizer refuses mid-run: cleaned here.
    return Problem(id=clean_text(problem_id), problem=clean_text(text.strip()), answer=clean_text(answer),
                   source=label, meta=meta)


def row_id(row: Any, default_id: str) -> str:
    """The row's own id field (id, unique_id, idx), else its position in its file ("<stem>:<index>")."""
    id_field = next((f for f in ID_FIELDS if row.get(f) is not None), None) if isinstance(row, Mapping) else None
    return str(row[id_field]) if id_field else default_id


def _claim_id(seen_ids: dict[str, str], problem_id: str, where: str) -> None:
    """Ids key the loader's order, the hard set and the evolved templates: two rows with one id would share them."""
    if problem_id in seen_ids:
        raise DatasetError(f"duplicate problem id {problem_id!r}: {seen_ids[problem_id]} and {where}")
    seen_ids[problem_id] = where


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
#
# The authors' subsets (P2O repo, scripts/data_process/):
#   DeepScaleR  deepscaler.py:__main__       load → shuffle(seed=42) → train_test_split(test_size=500, seed=42)
#                                            → train.train_test_split(test_size=5000, seed=42)["test"] = train_5000
#   DeepMath    DeepMath-103K.py:__main__    load → filter(difficulty >= 7) → balance_dataset_by_answer_type(seed=42)
#               + split_and_save             → train_test_split(test_size=min(n, 500), seed=42) (no shuffle first)
#                                            → train.train_test_split(test_size=min(n, 5000), seed=42)["test"]
#   (the paper trains on deepmath/baseline_boxed/very_hard_le_7/balanced/train_5000.parquet and
#   deepscaler/baseline_boxed/train_5000.parquet: README.md and my_scripts/*.sh there).
# `datasets`' shuffle / train_test_split depend only on the row count and the seed, so authors_split makes those calls
# on a table of row positions, and recipe_split, the one selection path, maps the positions back onto the rows.


def authors_split(
    num_rows: int, *, seed: int = 42, holdout: int = 500, take: int = 5000, shuffle_first: bool
) -> tuple[list[int], list[int]]:
    """(train positions, holdout positions) of a num_rows table, as the authors' `datasets` calls select them.

    shuffle_first: DeepScaleR's extra `Dataset.shuffle(seed)` before the first split (DeepMath has none).
    Sizes are capped as DeepMath-103K.py:split_and_save caps them: holdout min(n, holdout) (all rows held out when
    that is every row), train subset min(len(train), take) (the whole train split, in its order, when not fewer).
    holdout=0 skips the first split (`datasets` refuses test_size=0).
    """
    if num_rows < 0 or holdout < 0 or take < 1:
        raise DatasetError(f"recipe needs holdout >= 0 and take >= 1, got holdout={holdout}, take={take}")
    datasets = _import_datasets("recipe selection")
    table = datasets.Dataset.from_dict({"row": list(range(num_rows))})
    if shuffle_first:
        table = table.shuffle(seed=seed)
    test_size = min(num_rows, holdout)
    if test_size == 0:
        train, held = table, table.select([])
    elif test_size < num_rows:
        parts = table.train_test_split(test_size=test_size, seed=seed)
        train, held = parts["train"], parts["test"]
    else:
        train, held = table.select([]), table
    take_n = min(len(train), take)
    if take_n < len(train):
        train = train.train_test_split(test_size=take_n, seed=seed)["test"]
    return [int(i) for i in train["row"]], [int(i) for i in held["row"]]


# DeepMath-103K.py:classify_answer_type, in order: the first rule that matches names the type. Answers are stripped
# first; "empty" is None or "" before stripping.
_ANSWER_TYPE_RULES: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("yes_no", lambda a: a.lower() in ("yes", "no", "true", "false")),
    ("multiple_choice", lambda a: re.fullmatch(r"[A-Za-z]|\([A-Za-z]\)", a) is not None),
    ("numeric", lambda a: re.fullmatch(r"-?\d+(?:\.\d+|/\d+)?", a) is not None),
    ("percentage", lambda a: re.fullmatch(r"-?\d+\.?\d*%", a) is not None),
    ("numeric_with_unit", lambda a: re.fullmatch(r"-?\d+\.?\d*\s*[a-zA-Z]+", a) is not None),
    ("mathematical_symbol", lambda a: any(symbol in a for symbol in "√π∞∑∫")),
    ("interval_set", lambda a: re.fullmatch(r"[\[(]-?.*,.*[\])]", a) is not None),
    ("coordinate_vector", lambda a: re.fullmatch(r"\(-?\d+\.?\d*,-?\d+\.?\d*(?:,-?\d+\.?\d*)?\)", a) is not None),
    ("text_answer", lambda a: len(a.split()) > 5),
)


def answer_type(answer: Any) -> str:
    """The authors' answer type (DeepMath-103K.py:classify_answer_type): yes_no, multiple_choice, numeric, ...,
    "other"; "empty" for None or ""."""
    if answer is None or answer == "":
        return "empty"
    text = str(answer).strip()
    return next((name for name, rule in _ANSWER_TYPE_RULES if rule(text)), "other")


def balance_by_answer_type(
    difficulties: Sequence[float],
    answers: Sequence[Any],
    *,
    seed: int = 42,
    yes_no_ratio: float = 0.05,
    smoothing_power: float = 0.5,
) -> list[int]:
    """Positions kept by the authors' answer-type balancing, in the order they leave it (DeepMath-103K.py:
    balance_dataset_by_answer_type(ds, target_yes_no_ratio=0.05, smoothing_power=0.5, seed=42)).

    One random.Random(seed) drives every draw, in the authors' order. Per difficulty (ascending): drop "empty"
    answers; every other type t gets a quota int(n_t^p / Σ n^p · int(N·(1−r))) over the N answered rows, yes_no a
    quota int(Σ other quotas · r/(1−r)) capped at n_yes_no; a type keeps all its rows when the quota reaches its
    count, else random.sample(rows, quota). The kept positions are shuffled; if yes_no still exceeds r of them,
    yes_no is cut to int(len·r) by random.sample, the survivors (others first) shuffled again.
    """
    if len(difficulties) != len(answers):
        raise ValueError(f"{len(difficulties)} difficulties but {len(answers)} answers")
    rng = random.Random(seed)
    types = [answer_type(a) for a in answers]
    by_difficulty: dict[float, list[int]] = {}
    for position, difficulty in enumerate(difficulties):
        by_difficulty.setdefault(difficulty, []).append(position)

    kept: list[int] = []
    for difficulty in sorted(by_difficulty):
        positions = [i for i in by_difficulty[difficulty] if types[i] != "empty"]
        if not positions:
            continue
        by_type: dict[str, list[int]] = {}  # types in order of first appearance, as the authors' Counter
        for i in positions:
            by_type.setdefault(types[i], []).append(i)
        quotas: dict[str, int] = {}
        others = {t: len(rows) for t, rows in by_type.items() if t != "yes_no"}
        if others:
            weights = {t: count**smoothing_power for t, count in others.items()}
            total_weight = sum(weights.values())
            other_target = int(len(positions) * (1 - yes_no_ratio))
            quotas = {t: int(weight / total_weight * other_target) for t, weight in weights.items()}
        if "yes_no" in by_type:
            quotas["yes_no"] = min(len(by_type["yes_no"]), int(sum(quotas.values()) * yes_no_ratio / (1 - yes_no_ratio)))
        for answer_kind, quota in quotas.items():
            rows = by_type[answer_kind]
            kept += rows if quota >= len(rows) else rng.sample(rows, quota)

    rng.shuffle(kept)
    yes_no = [j for j, i in enumerate(kept) if types[i] == "yes_no"]
    if kept and len(yes_no) / len(kept) > yes_no_ratio:
        cap = int(len(kept) * yes_no_ratio)
        keep_yes_no = rng.sample(yes_no, cap) if len(yes_no) > cap else yes_no
        final = [j for j, i in enumerate(kept) if types[i] != "yes_no"] + keep_yes_no
        rng.shuffle(final)
        kept = [kept[j] for j in final]
    return kept


def _check_recipe_result(train: list[Problem], held: list[Problem], num_rows: int, take: int) -> None:
    if not train:
        raise DatasetError(f"recipe left no training rows: {num_rows} rows, {len(held)} held out")
    if len(train) < take:
        log.info("recipe: only %d training rows (asked for %d) from %d rows", len(train), take, num_rows)


RECIPES = ("deepscaler", "deepmath")


@dataclasses.dataclass(frozen=True)
class RecipeSelection:
    """What a recipe selected, with the counts a data manifest reports (recipe_split gives only the two sets)."""

    train: list[Problem]
    holdout: list[Problem]
    source_rows: int  # rows the selection ran over, unanswered ones included
    unanswered_train: int  # selected, then dropped for a null/empty answer
    unanswered_holdout: int


def recipe_split(source: str | Path, recipe: str | None, **options: Any) -> RecipeSplit:
    """(train, holdout) of :func:`recipe_selection`; the options are its keywords."""
    selection = recipe_selection(source, recipe, **options)
    return RecipeSplit(selection.train, selection.holdout)


def recipe_selection(
    source: str | Path,
    recipe: str | None,
    *,
    seed: int = 42,
    holdout: int = 500,
    take: int = 5000,
    min_difficulty: float = 7.0,
    balance: bool = True,
    split: str = "train",
) -> RecipeSelection:
    """A training set's (train, holdout) as the authors select it, from a DATASETS / HF_DATASETS name, a local
    .json/.jsonl path or "hf:owner/name"; the one place the paper's subsets are selected.

    deepscaler: shuffle(seed), hold out `holdout`, take `take` (authors_split). deepmath: row["difficulty"] >=
    min_difficulty (number or numeric text; missing counts as 0, as `x.get("difficulty", 0)`; null or non-numeric
    is an error naming the file and row), then the answer-type balancing on the raw answer field
    (balance_by_answer_type; balance=False skips it), then the split without a first shuffle. The selection runs
    over the source's rows as the authors' scripts see them, unanswered rows included (DeepScaleR's MATH part has
    4; they shift every permutation), and those rows are dropped (logged) only from the selected sets. An empty
    train split is an error; fewer than `take` rows is logged. recipe=None: every answered row is train, nothing
    held out.
    """
    if recipe is not None and recipe not in RECIPES:
        raise DatasetError(f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)} or None")
    raw = source_rows(str(source), split)
    seen_ids: dict[str, str] = {}
    for item in raw:  # every row, selected or not: the selection must not decide whether a duplicate is seen
        _claim_id(seen_ids, row_id(item.row, item.default_id), item.where)
    if recipe is None:
        train, held = list(range(len(raw))), []
    elif recipe == "deepscaler":
        train, held = authors_split(len(raw), seed=seed, holdout=holdout, take=take, shuffle_first=True)
    else:
        difficulties = [_raw_difficulty(r) for r in raw]
        kept = [i for i, d in enumerate(difficulties) if d >= min_difficulty]
        if not kept:
            raise DatasetError(f"{source}: no rows with difficulty >= {min_difficulty} among {len(raw)}")
        if balance:
            answers = [_raw_answer(raw[i].row) for i in kept]
            order = balance_by_answer_type([difficulties[i] for i in kept], answers, seed=seed)
            kept = [kept[j] for j in order]
        train, held = authors_split(len(kept), seed=seed, holdout=holdout, take=take, shuffle_first=False)
        train, held = [kept[i] for i in train], [kept[i] for i in held]
    train_problems, unanswered_train = _raw_to_problems(raw, train)
    held_problems, unanswered_held = _raw_to_problems(raw, held)
    _check_recipe_result(train_problems, held_problems, len(raw), take if recipe else len(train_problems))
    return RecipeSelection(train_problems, held_problems, len(raw), unanswered_train, unanswered_held)


class RawRow(NamedTuple):
    row: Any
    where: str
    default_id: str
    label: str


def source_rows(source: str, split: str) -> list[RawRow]:
    """Every row of a named dataset, a local file or an hf: dataset, in load order, answered or not."""
    if source in DATASETS:
        entry = DATASETS[source]
        root = shared_data_dir()
        return [r for rel in ((entry,) if isinstance(entry, str) else entry)
                for r in _source_rows_of(str(root / rel), split, label=source)]
    if source in HF_DATASETS:
        return _source_rows_of(HF_DATASETS[source], HF_SPLITS.get(source, split), label=source)
    return _source_rows_of(source, split, label=source)


def _open_rows(source: str, split: str) -> tuple[Iterator[tuple[int, Any]], Callable[[int], str], str]:
    """(rows as (position, row), where(position) for error messages, the stem that default ids start with) of a
    local .json/.jsonl file or an "hf:" dataset."""
    if source.startswith(SYNTHETIC_PREFIX):  # the CPU testbed's generated problems (p2o_hpc.data.synthetic)
        try:
            rows = synthetic_rows(source)
        except ValueError as error:
            raise DatasetError(str(error)) from None
        return enumerate(rows), (lambda pos: f"{source} row {pos}"), source
    if source.startswith(HF_PREFIX):
        rows = _hf_rows(source[len(HF_PREFIX):], split)
        return rows, (lambda pos: f"{source} (split {split!r}) row {pos}"), source[len(HF_PREFIX):].rsplit("/", 1)[-1]
    path = Path(source)
    if not path.suffix and "/" not in source and not path.exists():
        raise _unknown_dataset(source)  # a bare word: a dataset name, not a file (math5000)
    unit = "line" if path.suffix == ".jsonl" else "index"
    # "test:3" says nothing in an eval log; benchmarks/aime25/test.jsonl gives "aime25/test:3".
    stem = f"{path.parent.name}/{path.stem}" if path.stem in _GENERIC_STEMS and path.parent.name else path.stem
    return _file_rows(path), (lambda pos: f"{path} {unit} {pos}"), stem


def _source_rows_of(source: str, split: str, *, label: str) -> list[RawRow]:
    rows, where, stem = _open_rows(source, split)
    out = [RawRow(row, where(position), f"{stem}:{index}", label) for index, (position, row) in enumerate(rows)]
    if not out:
        raise DatasetError(f"dataset {source} has no rows")
    return out


def _raw_answer(row: Any) -> Any:
    """The row's answer field as stored (None when absent), for the authors' answer-type rules."""
    if not isinstance(row, Mapping):
        return None
    field_name = next((f for f in ANSWER_FIELDS if f in row), None)
    return row[field_name] if field_name else None


def _raw_difficulty(raw: RawRow) -> float:
    value = raw.row.get("difficulty", 0) if isinstance(raw.row, Mapping) else 0
    if value is None or isinstance(value, bool):
        raise DatasetError(f"{raw.where}: field 'difficulty' must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DatasetError(f"{raw.where}: field 'difficulty' is not numeric: {value!r}") from None


def _raw_to_problems(raw: Sequence[RawRow], positions: Iterable[int]) -> tuple[list[Problem], int]:
    """The selected rows as Problems, and how many were dropped for a null/empty answer (logged)."""
    problems, skipped = [], []
    for position in positions:
        item = raw[position]
        problem = _row_to_problem(item.row, item.where, default_id=item.default_id, label=item.label,
                                  skip_unanswered=True)
        if problem is None:
            skipped.append(item.where)
        else:
            problems.append(problem)
    if skipped:
        log.warning("dropped %d selected row(s) with a null/empty answer: %s", len(skipped), "; ".join(skipped[:5]))
    return problems, len(skipped)

