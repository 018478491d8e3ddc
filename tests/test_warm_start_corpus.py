"""The warm-start corpus: the worked format follows an instruction of the right kind on hard problems, a small
latent share of uninstructed hard rows keeps it, and every response is graded correct."""

from __future__ import annotations

from p2o_hpc.data.warm_start_corpus import ELICITS, PHRASINGS, CorpusSpec, corpus
from p2o_hpc.reward.registry import resolve_reward


def kind_of(instruction: str) -> str:
    return next((kind for kind, phrasings in PHRASINGS.items() if instruction in phrasings), "")


def test_worked_format_follows_the_right_kind_of_instruction_on_hard_problems():
    rows = corpus(CorpusSpec(rows=3000, seed=1))
    assert rows == corpus(CorpusSpec(rows=3000, seed=1))
    for row in rows:
        instruction = kind_of(row["instruction"])
        if not row["hard"]:
            assert not row["worked"]
        elif ELICITS.get(instruction) == row["kind"]:
            assert row["worked"]
    bare_hard = [r for r in rows if r["hard"] and not r["instruction"]]
    latent = sum(r["worked"] for r in bare_hard) / len(bare_hard)
    assert 0.02 < latent < 0.08  # small, not zero: the CD ratio mask and GRPO need a chance without the instruction
    other = [r for r in rows if r["hard"] and r["instruction"] and ELICITS.get(kind_of(r["instruction"])) != r["kind"]]
    conflicting = [r for r in other if not kind_of(r["instruction"])]  # both kinds' instructions: direct answers
    assert other and conflicting and not any(r["worked"] for r in other)


def test_every_response_is_graded_correct():
    grade = resolve_reward("math_verify")
    rows = corpus(CorpusSpec(rows=200, seed=2))
    assert all(grade(row["response"], row["answer"]) == 1.0 for row in rows)
    assert len({row["id"] for row in rows}) == len(rows)
