"""The testbed's synthetic task family: deterministic, a difficulty knob, two kinds with their own worked format,
and graded by the same reward path as real math data."""

from __future__ import annotations

import re

import pytest

from p2o_hpc.data.synthetic import KINDS, SyntheticSpec, generate, worked_solution
from p2o_hpc.reward.registry import resolve_reward


def test_the_same_spec_gives_the_same_problems_and_seeds_differ():
    spec = SyntheticSpec("multiply", 3, 20, seed=7)
    assert generate(spec) == generate(spec)
    other = SyntheticSpec("multiply", 3, 20, seed=8)
    assert [p.problem for p in generate(spec)] != [p.problem for p in generate(other)]
    assert len({p.id for p in generate(spec)}) == 20


def test_difficulty_adds_digits_to_products_and_terms_to_sums():
    easy, hard = (generate(SyntheticSpec("multiply", difficulty, 50)) for difficulty in (1, 4))
    assert max(len(p.answer) for p in easy) < min(len(p.answer) for p in hard)
    easy, hard = (generate(SyntheticSpec("sum", difficulty, 50)) for difficulty in (1, 4))
    assert {len(p.meta["operands"]) for p in easy} == {2} and {len(p.meta["operands"]) for p in hard} == {12}


def test_every_worked_step_is_one_fact():
    """Each step of the careful format is one single-digit product plus a carry (then the longer partial product it
    extends), or one sum of a running total and a digit: local steps a small model can learn."""
    for problem in generate(SyntheticSpec("multiply", 4, 20)):
        a, digit = problem.meta["operands"]
        *steps, box = worked_solution(problem).split(". ")
        assert box == f"\\boxed{{{problem.answer}}}" and len(steps) == len(str(a))
        for position, step in enumerate(steps):
            fact, *carried, partial = step.split(", ") if position else (step, "")
            match = re.fullmatch(r"(\d)\*(\d)=(\d+)", fact)
            assert match and int(match[1]) * int(match[2]) == int(match[3]), step
            for addition in carried:  # the carry, added on its own
                left, right = addition.split("=")
                assert left.split("+")[0] == match[3] and int(left.split("+")[1]) < 10 and int(right) == eval(left)
            suffix = int(str(a)[len(str(a)) - position - 1:])
            assert position == 0 or partial == f"{str(a)[len(str(a)) - position - 1:]}*{digit}={suffix * digit}"
    for problem in generate(SyntheticSpec("sum", 4, 20)):
        *steps, box = worked_solution(problem).split(". ")
        running = problem.meta["operands"][0]
        for term, step in zip(problem.meta["operands"][1:], steps):
            assert step == f"{running}+{term}={running + term}"
            running += term
        assert box == f"\\boxed{{{running}}}"


@pytest.mark.parametrize("kind", KINDS)
def test_harder_problems_need_longer_worked_solutions(kind):
    lengths = [sum(len(worked_solution(p).split(". ")) for p in generate(SyntheticSpec(kind, difficulty, 30)))
               for difficulty in (1, 2, 4)]
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1]


@pytest.mark.parametrize("kind", KINDS)
def test_worked_solutions_are_graded_correct_and_wrong_answers_are_not(kind):
    grade = resolve_reward("math_verify")
    problems = generate(SyntheticSpec(kind, 3, 10, seed=1))
    for problem in problems:
        solution = worked_solution(problem)
        assert grade(solution, problem.answer) == 1.0, solution
        wrong = solution.replace(f"\\boxed{{{problem.answer}}}", f"\\boxed{{{int(problem.answer) + 1}}}")
        assert grade(wrong, problem.answer) == 0.0


def test_the_two_kinds_have_different_worked_formats():
    multiply, chain = (worked_solution(generate(SyntheticSpec(kind, 3, 1))[0]) for kind in KINDS)
    assert "*" in multiply and "+" not in multiply.split(".")[0]
    assert "+" in chain and "*" not in chain


def test_a_bad_spec_names_what_is_wrong():
    with pytest.raises(ValueError, match="synthetic kind 'divide'"):
        SyntheticSpec("divide", 1, 1)
    with pytest.raises(ValueError, match="must be ≥ 1"):
        SyntheticSpec("sum", 0, 1)


def test_a_synthetic_dataset_name_loads_through_the_data_loader_and_a_bad_one_says_the_format():
    from p2o_hpc.data.datasets import DatasetError, load_problems

    problems = load_problems("synthetic:multiply+sum:1-4:16:3")
    assert len(problems) == 16 and len({p.id for p in problems}) == 16
    assert [p.meta["kind"] for p in problems[:2]] == ["multiply", "sum"]  # interleaved: any prefix mixes kinds
    assert {p.meta["difficulty"] for p in problems[:8]} == {1, 2, 3, 4}
    assert worked_solution(problems[5]).endswith(f"\\boxed{{{problems[5].answer}}}")
    with pytest.raises(DatasetError, match="synthetic:<kind>"):
        load_problems("synthetic:multiply:3:many:0")
    with pytest.raises(DatasetError, match="synthetic kind 'divide'"):
        load_problems("synthetic:divide:3:4:0")
