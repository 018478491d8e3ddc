"""The six benchmarks of the paper's Table 1, their gold answers and their decoding protocol.

Gold answers follow the Qwen2.5-Math evaluation suite (evaluation/parser.py, `parse_ground_truth`), not the
training loader's normalisation: OlympiadBench is `final_answer[0].strip("$")` (p2o_hpc.data joins every list
entry with ", "), Minerva and MATH500 the last `\\boxed{}` of the worked solution as the suite's `extract_answer`
finds it (split on "boxed", count braces), AIME/AMC the answer field as written ("023", AMC's float 27.0 as
"27.0"; math-verify compares numbers by value). The suite's `strip_string` is not applied: it is the text
normaliser of the suite's own string grader, and here math-verify parses the LaTeX itself.

The protocol is decided by a benchmark's full size, never by the slice evaluated: fewer than
`sample_below` (100) problems → mean over n samples at temperature T (avg@16, AIME24/25 and AMC23), otherwise one
greedy sample (MATH500, Minerva, OlympiadBench), as the suite is run for Qwen3-style reports.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from p2o_hpc.data.datasets import DATASETS, DatasetError, row_id, source_rows
from p2o_hpc.io_utils import clean_text
from p2o_hpc.paths import shared_data_dir


@dataclass(frozen=True)
class BenchmarkSource:
    column: str  # the Table-1 column
    local: str  # under shared_data_dir() (../shared/data/MANIFEST.md): the training loader's DATASETS entry
    hub: str  # "hf:owner/name" for machines with a network
    hub_split: str


# Table-1 order. Hub copies carry the same fields as the suite's files (problem/question, answer / solution /
# final_answer); they are used when the local copy is absent or data_source=hub.
BENCHMARKS: dict[str, BenchmarkSource] = {
    "aime24": BenchmarkSource("AIME24", DATASETS["aime24"], "hf:HuggingFaceH4/aime_2024", "train"),
    "aime25": BenchmarkSource("AIME25", DATASETS["aime25"], "hf:math-ai/aime25", "test"),
    "amc23": BenchmarkSource("AMC23", DATASETS["amc23"], "hf:math-ai/amc23", "test"),
    "math500": BenchmarkSource("MATH500", DATASETS["math500"], "hf:HuggingFaceH4/MATH-500", "test"),
    "minerva_math": BenchmarkSource("Minerva", DATASETS["minerva_math"], "hf:math-ai/minervamath", "test"),
    "olympiadbench": BenchmarkSource("OlympiadBench", DATASETS["olympiadbench"],
                                     "hf:math-ai/olympiadbench", "test"),
}

# The suite's question field order (parser.py: parse_question), then the training loader's.
QUESTION_FIELDS = ("question", "problem", "Question", "input", "prompt")


_INNER_DOLLAR = re.compile(r"(?<!\\)\$")


class BenchmarkError(ValueError):
    """An unknown benchmark name, or a row whose question or gold answer cannot be read (file and line named)."""


@dataclass(frozen=True)
class BenchmarkProblem:
    id: str
    index: int  # position in the full benchmark (seeds and order depend on it, not on the slice)
    problem: str
    gold: str


@dataclass(frozen=True)
class Protocol:
    """How a benchmark is decoded: n samples at temperature (n = 1, T = 0: greedy)."""

    n_samples: int
    temperature: float
    top_p: float

    @property
    def name(self) -> str:
        return "greedy" if self.n_samples == 1 and self.temperature == 0 else f"avg@{self.n_samples}"


@dataclass(frozen=True)
class Benchmark:
    name: str
    column: str
    size: int  # problems in the full set: decides the protocol
    problems: list[BenchmarkProblem]  # the first `limit` of them


def check_names(names: list[str]) -> list[str]:
    """The names as given, or a BenchmarkError naming the unknown one and the known ones."""
    for name in names:
        if name not in BENCHMARKS:
            raise BenchmarkError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    if len(set(names)) != len(names):
        raise BenchmarkError(f"benchmarks lists a name twice: {names}")
    return list(names)


def protocol_for(size: int, *, sample_below: int, n_samples: int, temperature: float, top_p: float) -> Protocol:
    """avg@n at `temperature` for a benchmark of fewer than `sample_below` problems, else greedy (top_p 1)."""
    if size < sample_below:
        return Protocol(n_samples, temperature, top_p)
    return Protocol(1, 0.0, 1.0)


def load_benchmark(name: str, *, limit: int | None = None, data_source: str = "auto") -> Benchmark:
    """Every row of the benchmark read (so its size is the full set's), the first `limit` kept."""
    check_names([name])
    if limit is not None and limit < 1:
        raise BenchmarkError(f"limit={limit} must be ≥ 1 (or null: every problem)")
    spec = BENCHMARKS[name]
    source, split = _source_of(spec, data_source)
    try:
        rows = source_rows(source, split)
    except DatasetError as error:
        raise BenchmarkError(f"benchmark {name}: {error}") from error
    kept = rows if limit is None else rows[:limit]
    problems = [_problem(name, index, raw.row, raw.where, raw.default_id) for index, raw in enumerate(kept)]
    return Benchmark(name=name, column=spec.column, size=len(rows), problems=problems)


def _source_of(spec: BenchmarkSource, data_source: str) -> tuple[str, str]:
    if data_source not in ("auto", "local", "hub"):
        raise BenchmarkError(f"data_source={data_source!r}: expected auto, local or hub")
    if data_source != "hub":
        try:
            local = shared_data_dir() / spec.local
        except FileNotFoundError:
            local = None
        if local is not None and local.is_file():
            return str(local), "test"
        if data_source == "local":
            raise BenchmarkError(f"no local copy {spec.local} under the shared data folder (P2O_SHARED_DATA)")
    return spec.hub, spec.hub_split


def _problem(name: str, index: int, row: Any, where: str, default_id: str) -> BenchmarkProblem:
    if not isinstance(row, Mapping):
        raise BenchmarkError(f"{where}: expected a JSON object, got {type(row).__name__}")
    field = next((f for f in QUESTION_FIELDS if isinstance(row.get(f), str) and row[f].strip()), None)
    if field is None:
        raise BenchmarkError(f"{where}: no question (one of {', '.join(QUESTION_FIELDS)})")
    gold = gold_answer(name, row, where)
    question = row[field].strip()
    # parse_question: a yes/no or true/false gold makes the question say so.
    if gold.lower() in ("true", "false"):
        question += " (True or False)"
    elif gold.lower() in ("yes", "no"):
        question += " (Yes or No)"
    return BenchmarkProblem(id=clean_text(row_id(row, default_id)), index=index, problem=clean_text(question),
                            gold=clean_text(gold))


def gold_answer(name: str, row: Mapping, where: str = "row") -> str:
    """The gold answer of `row` of benchmark `name` as the suite's parse_ground_truth selects it."""
    if name in ("minerva_math", "math500"):  # the suite's "math"/"minerva_math" branch: from the solution
        solution = row.get("solution")
        if isinstance(solution, str) and "boxed" in solution:
            gold = suite_boxed_answer(solution)
        elif name == "math500" and row.get("answer") is not None:  # hub copies without a boxed solution
            gold = _text(row["answer"])
        else:
            raise BenchmarkError(f"{where}: field 'solution' has no \\boxed{{}} answer")
    elif name == "olympiadbench":
        final = row.get("final_answer")
        if not isinstance(final, list) or not final or not isinstance(final[0], str):
            raise BenchmarkError(f"{where}: field 'final_answer' must be a non-empty list of strings, "
                                 f"got {final!r:.80}")
        # The suite: final_answer[0].strip("$"), then strip_string drops the "$" left between the parts of a
        # multi-answer entry ("$69$,$84$" → "69,84"); an escaped "\\$" (money) is kept.
        gold = _INNER_DOLLAR.sub("", final[0].strip("$"))
    else:
        if row.get("answer") is None:
            raise BenchmarkError(f"{where}: missing field 'answer'")
        gold = _text(row["answer"])
    gold = gold.strip()
    if not gold:
        raise BenchmarkError(f"{where}: the gold answer is empty")
    return gold


def _text(value: Any) -> str:
    """str() as the suite's strip_string applies it: 27.0 → "27.0", "023" stays "023"."""
    return value if isinstance(value, str) else str(value)


def suite_boxed_answer(text: str) -> str:
    """The suite's extract_answer on a \\boxed solution: what follows the last "boxed", to its matching brace
    (nested braces counted, no escapes) or, without a brace, up to the next "$"; newlines and a trailing "." or
    "/" removed, a leading ":" too."""
    tail = text.split("boxed")[-1]
    if tail.startswith("{"):
        depth, chars = 1, []
        for char in tail[1:]:
            if char == "{":
                depth += 1
            elif char == "}":
                depth -= 1
                if depth == 0:
                    break
            chars.append(char)
        answer = "".join(chars)
    else:
        answer = tail.split("$")[0].strip()
    answer = re.sub(r"\n\s*", "", answer)
    if answer.startswith(":"):
        answer = answer[1:]
    if answer.endswith("."):
        answer = answer[:-1]
    if answer.endswith("/"):
        answer = answer[:-1]
    return answer


def benchmark_file(name: str) -> Path:
    """The local copy of a benchmark (for messages and tests)."""
    return shared_data_dir() / BENCHMARKS[name].local
