"""A verifiable synthetic task family for the CPU testbed: arithmetic whose direct answer a small model cannot
reach at high difficulty, but whose worked solution makes every step a single local fact.

Two problem types, each with its own worked format, so that one instruction does not solve every hard sample:

    multiply    a * d: a with `difficulty` digits, d one digit (2-9). Worked right to left, one digit of a at a
                time: its product, the carry added, the partial product extended:
                    7*6=42. 4*6=24, 24+4=28, 47*6=282. 3*6=18, 18+2=20, 347*6=2082. \\boxed{2082}
    sum         one-digit terms, 2 at difficulty 1, 3 * `difficulty` above. Worked as a running total:
                    3+8=11. 11+5=16. 16+9=25. \\boxed{25}

`difficulty` is the knob: 1 is one fact (easy, answered directly), more digits or terms make the direct answer
out of reach for a small model while every worked step stays one fact. Problems, gold answers and worked solutions
are deterministic functions of (kind, difficulty, seed, index). Answers are integers graded like every math answer
(the last \\boxed{} through math-verify), and problems are ordinary `Problem` records, so they are rendered through
the same prompt and chat-template path as real data.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from p2o_hpc.records import Problem

KINDS = ("multiply", "sum")


@dataclass(frozen=True)
class SyntheticSpec:
    """One slice of the family: `count` problems of one kind at one difficulty, from `seed`."""

    kind: str
    difficulty: int
    count: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"synthetic kind {self.kind!r}: expected one of {', '.join(KINDS)}")
        if self.difficulty < 1 or self.count < 1:
            raise ValueError(f"synthetic {self.kind}: difficulty and count must be ≥ 1, got {self.difficulty}, "
                             f"{self.count}")


def _operands(kind: str, difficulty: int, rng: random.Random) -> list[int]:
    if kind == "multiply":
        low = 10 ** (difficulty - 1) if difficulty > 1 else 2
        return [rng.randint(low, 10 ** difficulty - 1), rng.randint(2, 9)]
    return [rng.randint(1, 9) for _ in range(2 if difficulty == 1 else 3 * difficulty)]


def problem_text(kind: str, operands: list[int]) -> str:
    symbol = "*" if kind == "multiply" else "+"
    return f"What is {symbol.join(str(o) for o in operands)}?"


def answer(kind: str, operands: list[int]) -> int:
    return operands[0] * operands[1] if kind == "multiply" else sum(operands)


def generate(spec: SyntheticSpec) -> list[Problem]:
    """`spec.count` problems; the same spec always gives the same problems (ids: synthetic/<kind>-d<k>-s<seed>:<i>)."""
    problems = []
    for index in range(spec.count):
        rng = random.Random(f"{spec.kind}/{spec.difficulty}/{spec.seed}/{index}")
        operands = _operands(spec.kind, spec.difficulty, rng)
        problems.append(Problem(
            id=f"synthetic/{spec.kind}-d{spec.difficulty}-s{spec.seed}:{index}",
            problem=problem_text(spec.kind, operands), answer=str(answer(spec.kind, operands)),
            source=f"synthetic_{spec.kind}",
            meta={"kind": spec.kind, "difficulty": spec.difficulty, "operands": operands}))
    return problems


def direct_solution(problem: Problem) -> str:
    """The answer alone, as the base model gives it without a fitting instruction."""
    return f"\\boxed{{{problem.answer}}}"


def worked_solution(problem: Problem) -> str:
    """The careful format for `problem` (from `generate`): every step one fact, ending in \\boxed{answer}."""
    kind, operands = problem.meta["kind"], problem.meta["operands"]
    steps: list[str] = []
    if kind == "multiply":
        a, digit = operands
        carry, low = 0, ""
        for position, char in enumerate(reversed(str(a))):
            product = int(char) * digit
            fact = f"{char}*{digit}={product}" + (f", {product}+{carry}={product + carry}" if carry else "")
            product += carry
            carry, low = product // 10, str(product % 10) + low
            suffix = str(a)[len(str(a)) - position - 1:]
            partial = (str(carry) if carry else "") + low
            steps.append(fact if position == 0 else f"{fact}, {suffix}*{digit}={int(partial)}")
        total = int((str(carry) if carry else "") + low)
    else:
        total = operands[0]
        for term in operands[1:]:
            steps.append(f"{total}+{term}={total + term}")
            total += term
    if total != answer(kind, operands):
        raise AssertionError(f"{problem.id}: worked solution reached {total}, not {answer(kind, operands)}")
    return ". ".join(steps) + f". {direct_solution(problem)}"


# -- as a dataset: data.train=synthetic:<kinds>:<difficulties>:<count>:<seed> --------------------------------------

PREFIX = "synthetic:"
NAME_FORMAT = "synthetic:<kind>[+<kind>]:<difficulty>[-<difficulty>]:<count>:<seed>, e.g. synthetic:multiply+sum:3-4:200:1"


def parse_name(name: str) -> list[SyntheticSpec]:
    """The slices a dataset name asks for: `count` problems split evenly over every (kind, difficulty) pair."""
    parts = name[len(PREFIX):].split(":") if name.startswith(PREFIX) else []
    try:
        kinds_text, difficulties_text, count_text, seed_text = parts
        low, _, high = difficulties_text.partition("-")
        difficulties = list(range(int(low), int(high or low) + 1))
        kinds, count, seed = kinds_text.split("+"), int(count_text), int(seed_text)
    except ValueError:
        raise ValueError(f"synthetic dataset {name!r}: expected {NAME_FORMAT}") from None
    pairs = [(kind, difficulty) for difficulty in difficulties for kind in kinds]
    if not pairs or count < len(pairs):
        raise ValueError(f"synthetic dataset {name!r}: count {count} < {len(pairs)} (kind, difficulty) pairs")
    return [SyntheticSpec(kind, difficulty, count // len(pairs) + (index < count % len(pairs)), seed)
            for index, (kind, difficulty) in enumerate(pairs)]


def dataset_rows(name: str) -> list[dict]:
    """The named set as dataset rows (id, problem, answer, kind, difficulty, operands), slices interleaved so any
    prefix (data.limit, validation limits) mixes every kind and difficulty."""
    slices = [generate(spec) for spec in parse_name(name)]
    ordered = [problems[i] for i in range(max(map(len, slices))) for problems in slices if i < len(problems)]
    return [{"id": p.id, "problem": p.problem, "answer": p.answer, **p.meta} for p in ordered]
