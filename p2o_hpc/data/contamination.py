"""Training-set contamination against the evaluation benchmarks: normalised exact match and word n-gram overlap.

A benchmark problem that is also a training problem inflates the score the paper's table reports, so every training
set is checked against every benchmark before it is used. Two checks, both on a normalised text:

- exact: the problem's normalised key (`exact_key`) equals a benchmark problem's. The key ignores case, Unicode
  compatibility forms, LaTeX spacing/sizing macros, `\\dfrac`/`\\tfrac` against `\\frac`, whitespace and every
  character that is not a letter or a digit ("$x^{2}$ ,  Find" and "x^2, find" give the same key).
- n-gram: the training problem shares word n-grams (n = 13 by default, the GPT-3 / Qwen2.5-Math decontamination
  length) with one benchmark problem, at least `min_shared` of them and at least `min_overlap` (default 0.4) of that
  benchmark problem's distinct n-grams. Words are the runs of letters or of digits left by the same normalisation
  (`$\\frac{1}{2}$` gives "frac 1 2", `15a^2` "15 a 2"). A benchmark problem of fewer than n words (MATH500 has 51,
  e.g. "Simplify $\\sqrt{242}$.") contributes its whole word sequence as its one gram, so a training problem that
  contains it word for word is a hit; a training problem of fewer than n words can only be found by exact match.

Why the overlap threshold: on these datasets one shared 13-gram is mostly answer-format boilerplate ("... can be
written as $\\frac{m}{n}$, where $m$ and $n$ are relatively prime positive integers. Find $m+n$"): DeepScaleR's AIME
1983-2023 problems share a 13-gram with 7 of AIME24's 30 problems and none of them is the same problem. Measured on
the local copies, such boilerplate covers at most 0.29 of a benchmark problem's n-grams; a copy with small edits
(AIME 1994's "Let $F(z)=\\dfrac{z+i}{z-i}$ ..." against MATH500's intermediate_algebra/1063, `\\neq` for `\\not=` and
more) 0.41; MATH's same-exercise-other-numbers siblings ("Convert the point ... to polar coordinates") 0.4-0.75 and
are flagged as well. The plain ">= 1 shared n-gram" count is still reported (`any_ngram`); min_overlap=0 makes it
the hit rule.

The benchmark n-grams are indexed once in a dict, so a training set is checked in one pass over its own n-grams.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

from p2o_hpc.records import Problem

DEFAULT_NGRAM = 13

# Macros that change spacing, size or font only (matched on the lowercased text): removed before the text is split
# into words. Symbol macros (\, \; \: \! \> "\ ") match anywhere; word macros only as whole words, so \leftarrow
# and \rightarrow stay.
_SPACING_SYMBOLS = re.compile(r"\\[,;:!> ]")
_LAYOUT_WORDS = re.compile(
    r"\\(?:left|right|big|bigg|displaystyle|textstyle|quad|qquad|enspace|thinspace|medspace|thickspace"
    r"|text|textbf|textit|mathrm|mathbf|mathit|operatorname)(?![a-z])"
)
_FRAC_VARIANTS = re.compile(r"\\[dt]frac(?![a-z])")
# A run of letters (any script) or of digits: "15a^2" and "15 a^{2}" give the same words; "_" and symbols separate.
_WORD = re.compile(r"[^\W\d_]+|\d+")


def words(text: str) -> list[str]:
    """The normalised words of a problem: NFKC, lowercase, layout macros dropped, then runs of letters or digits."""
    text = unicodedata.normalize("NFKC", text).lower()  # first: an upper-cased copy's \LEFT( is still \left(
    text = _SPACING_SYMBOLS.sub(" ", text)
    text = _LAYOUT_WORDS.sub(" ", text)
    text = _FRAC_VARIANTS.sub(r"\\frac", text)
    return _WORD.findall(text)


def exact_key(text: str) -> str:
    """The text's exact-match key: its words joined with nothing, so spacing and punctuation never matter."""
    return "".join(words(text))


def ngrams(tokens: Sequence[str], n: int) -> set[tuple[str, ...]]:
    """Every run of n consecutive words (none when there are fewer than n)."""
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


@dataclass(frozen=True)
class Hit:
    """One training problem against one benchmark: the benchmark problem it matches best."""

    train_id: str
    benchmark_id: str
    exact: bool
    shared_ngrams: int  # distinct n-grams the two problems share
    overlap: float  # shared_ngrams / the benchmark problem's distinct n-grams (1.0 for a full copy)
    train_text: str = field(repr=False, default="")
    benchmark_text: str = field(repr=False, default="")


@dataclass(frozen=True)
class Rule:
    """When a shared-n-gram match counts as contamination (an exact match always does)."""

    min_shared: int = 1
    min_overlap: float = 0.4

    def __post_init__(self) -> None:
        if self.min_shared < 1 or not 0.0 <= self.min_overlap <= 1.0:
            raise ValueError(f"need min_shared >= 1 and 0 <= min_overlap <= 1, got {self.min_shared}, "
                             f"{self.min_overlap}")

    def ngram_hit(self, hit: Hit) -> bool:
        return hit.shared_ngrams >= self.min_shared and hit.overlap >= self.min_overlap

    def contaminated(self, hit: Hit) -> bool:
        return hit.exact or self.ngram_hit(hit)


@dataclass
class PairReport:
    """One (training set, benchmark) pair: every training row that matches a benchmark problem at all (exact or one
    shared n-gram), and the counts the rule makes of them."""

    train_set: str
    benchmark: str
    train_rows: int
    benchmark_rows: int
    matches: list[Hit]
    rule: Rule

    @property
    def hits(self) -> list[Hit]:
        """The matches that count as contamination."""
        return [hit for hit in self.matches if self.rule.contaminated(hit)]

    @property
    def exact(self) -> int:
        return sum(hit.exact for hit in self.matches)

    @property
    def ngram(self) -> int:
        return sum(self.rule.ngram_hit(hit) for hit in self.matches)

    @property
    def any_ngram(self) -> int:
        """Rows sharing at least one n-gram: the plain GPT-3-style count, boilerplate included."""
        return sum(hit.shared_ngrams >= 1 for hit in self.matches)

    @property
    def benchmark_problems_hit(self) -> int:
        return len({hit.benchmark_id for hit in self.hits})

    def examples(self, k: int) -> list[Hit]:
        """The k strongest matches: exact first, then by overlap (below the rule's threshold when nothing is a hit)."""
        return sorted(self.matches, key=lambda h: (not h.exact, -h.overlap, h.train_id))[:k]

    def to_json(self, examples: int) -> dict:
        return {"train_set": self.train_set, "benchmark": self.benchmark, "train_rows": self.train_rows,
                "benchmark_rows": self.benchmark_rows, "exact": self.exact, "ngram": self.ngram,
                "hits": len(self.hits), "any_ngram": self.any_ngram,
                "benchmark_problems_hit": self.benchmark_problems_hit,
                "contaminated_train_ids": sorted(hit.train_id for hit in self.hits),
                "examples": [_round(asdict(hit)) for hit in self.examples(examples)]}


def _round(hit: dict) -> dict:
    hit["overlap"] = round(hit["overlap"], 4)
    return hit


class BenchmarkIndex:
    """Every benchmark's exact keys and n-grams, indexed once for any number of training sets."""

    def __init__(self, benchmarks: dict[str, Sequence[Problem]], *, n: int = DEFAULT_NGRAM):
        if n < 1:
            raise ValueError(f"n-gram size must be >= 1, got {n}")
        self.n = n
        self.benchmarks = {name: list(problems) for name, problems in benchmarks.items()}
        self._exact: dict[str, list[tuple[str, int]]] = {}
        self._grams: dict[tuple[str, ...], list[tuple[str, int]]] = {}  # n-gram → [(benchmark, index)]
        # Problems shorter than n words: " w1 w2 … " → [(benchmark, index)], found by substring search.
        self._short: dict[str, list[tuple[str, int]]] = {}
        self._gram_counts: dict[tuple[str, int], int] = {}
        for name, problems in self.benchmarks.items():
            for index, problem in enumerate(problems):
                tokens = words(problem.problem)
                key = "".join(tokens)
                if key:
                    self._exact.setdefault(key, []).append((name, index))
                grams = ngrams(tokens, n)
                if not grams and tokens:
                    self._short.setdefault(f" {' '.join(tokens)} ", []).append((name, index))
                    self._gram_counts[(name, index)] = 1
                    continue
                self._gram_counts[(name, index)] = len(grams)
                for gram in grams:
                    self._grams.setdefault(gram, []).append((name, index))

    def hits_of(self, problem: Problem) -> dict[str, Hit]:
        """benchmark name → the best hit of this training problem there (benchmarks without one are absent)."""
        tokens = words(problem.problem)
        key = "".join(tokens)
        exact = {entry for entry in self._exact.get(key, ())} if key else set()
        shared: Counter[tuple[str, int]] = Counter()
        for gram in ngrams(tokens, self.n):
            shared.update(self._grams.get(gram, ()))
        if self._short:
            text = f" {' '.join(tokens)} "
            for sequence, entries in self._short.items():
                if sequence in text:
                    shared.update(entries)
        best: dict[str, tuple[tuple[bool, float, int], int]] = {}
        for entry in exact | set(shared):
            name, index = entry
            total = self._gram_counts[entry]
            score = (entry in exact, shared[entry] / total if total else 0.0, shared[entry])
            if name not in best or score > best[name][0]:
                best[name] = (score, index)
        out = {}
        for name, ((is_exact, overlap, count), index) in best.items():
            bench = self.benchmarks[name][index]
            out[name] = Hit(train_id=problem.id, benchmark_id=bench.id, exact=is_exact, shared_ngrams=count,
                            overlap=overlap, train_text=problem.problem, benchmark_text=bench.problem)
        return out


def check(
    train_sets: dict[str, Sequence[Problem]],
    index: BenchmarkIndex,
    *,
    rule: Rule = Rule(),
    advance: Callable[[int], None] | None = None,
) -> list[PairReport]:
    """A PairReport for every (training set, benchmark), in the order given; advance(1) after each training row."""
    reports = []
    for train_name, problems in train_sets.items():
        matches: dict[str, list[Hit]] = {name: [] for name in index.benchmarks}
        for problem in problems:
            for name, hit in index.hits_of(problem).items():
                matches[name].append(hit)
            if advance:
                advance(1)
        reports += [PairReport(train_name, name, len(problems), len(index.benchmarks[name]), matches[name], rule)
                    for name in index.benchmarks]
    return reports


def contaminated_ids(reports: Iterable[PairReport], train_set: str) -> dict[str, list[str]]:
    """train id → the benchmarks it is contaminated with, for one training set."""
    out: dict[str, list[str]] = {}
    for report in reports:
        if report.train_set == train_set:
            for hit in report.hits:
                out.setdefault(hit.train_id, []).append(report.benchmark)
    return out


def markdown_table(reports: Sequence[PairReport], *, examples: int = 3, clip: int = 90) -> str:
    """The report as Markdown: one row per pair, then the strongest matches of every pair that has any."""
    lines = ["| training set | benchmark | train rows | benchmark rows | exact | n-gram | hits (exact or n-gram) "
             "| benchmark problems hit | any shared n-gram |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in reports:
        lines.append(f"| {r.train_set} | {r.benchmark} | {r.train_rows} | {r.benchmark_rows} | {r.exact} | {r.ngram} "
                     f"| {len(r.hits)} | {r.benchmark_problems_hit} | {r.any_ngram} |")
    for r in reports:
        if not r.matches or not examples:
            continue
        lines += ["", f"**{r.train_set} × {r.benchmark}**: {len(r.hits)} hit(s), {len(r.matches)} match(es) in all; "
                  f"strongest {min(examples, len(r.matches))}:", ""]
        for hit in r.examples(examples):
            verdict = "hit" if r.rule.contaminated(hit) else "below threshold"
            kind = "exact" if hit.exact else f"{hit.shared_ngrams} shared n-grams, overlap {hit.overlap:.2f}"
            lines.append(f"- `{hit.train_id}` ↔ `{hit.benchmark_id}` ({kind}; {verdict})")
            lines.append(f"  - train: {_clip(hit.train_text, clip)}")
            lines.append(f"  - bench: {_clip(hit.benchmark_text, clip)}")
    return "\n".join(lines) + "\n"


def _clip(text: str, width: int) -> str:
    flat = " ".join(text.split()).replace("|", "\\|")
    return flat if len(flat) <= width else flat[: width - 1] + "…"
