"""The supervised warm-start corpus of the CPU testbed: a base policy whose careful skill is latent and elicited by
what an instruction says.

Each row is (instruction, problem, response). Easy problems are answered directly whatever the instruction. On a
hard problem the worked format (p2o_hpc.data.synthetic.worked_solution) follows only an instruction of its kind —
`digits` phrasings for products, `running_total` phrasings for sums, many phrasings per kind built from varied
words, so the model keys on what the instruction says, not on one string. No instruction, a neutral one, one of
the other kind, or two conflicting ones get the direct answer, which a small model cannot compute at that
difficulty (so no single template solves both kinds, and the cover and per-sample assignment of Algorithm 2
matter).

A small share of uninstructed hard rows keeps the worked format (`latent_share`), so the format has a small, non-zero
probability without an instruction: the CD ratio mask (π(y|x)/π(y|x̃) < 0.01 → masked) would otherwise drop exactly
the tokens that start it, and plain GRPO could never find it (the paper's comparison needs it to find it slowly).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import product

from p2o_hpc.data.synthetic import KINDS, SyntheticSpec, direct_solution, generate, worked_solution

# Which instruction kind elicits which problem kind's worked format.
ELICITS = {"digits": "multiply", "running_total": "sum"}


def _phrasings(openers: tuple[str, ...], bodies: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(f"{opener}{body}" if opener else body[0].upper() + body[1:] for opener, body in product(openers, bodies))


PHRASINGS: dict[str, tuple[str, ...]] = {
    "digits": _phrasings(
        ("", "Please ", "Carefully ", "Step by step, "),
        ("multiply one digit at a time.", "work digit by digit, carrying as you go.",
         "go from the last digit to the first, with carries.", "use long multiplication, one digit per step.",
         "handle each digit separately and track the carry.", "split the number into its digits.",
         "multiply each digit on its own, then add the carry.", "do the product digit by digit.",
         "take the digits one by one, starting from the right.", "write every digit's product and carry.",
         "work through the digits of the number in turn.", "compute the product one place at a time.")),
    "running_total": _phrasings(
        ("", "Please ", "Carefully ", "Step by step, "),
        ("keep a running total.", "add the numbers one at a time.", "update the sum after each number.",
         "go through the terms in order, tracking the total.", "accumulate the total term by term.",
         "add one number at a time and write each partial sum.", "keep a tally as you add each term.",
         "sum the terms one after another.", "track the running sum.", "add each number to the total so far.",
         "write the partial sum after every addition.", "total them up one by one.")),
    "neutral": (
        "Answer the question.", "Be concise.", "Give the final answer.", "Please solve this.",
        "Respond with the result.", "Read the question carefully.", "Do your best.", "Here is a question.",
        "Answer quickly.", "No explanation needed.", "Solve it.", "Think about it.",
    ),
}


# Never in the corpus: the latent-skill report asks with these, so a high score shows the model keys on what an
# instruction says rather than on strings it was trained on.
HELD_OUT_PHRASINGS = {
    "digits": "Do the multiplication digit by digit, minding each carry.",
    "running_total": "Sum the numbers one after another, keeping a running tally.",
}


@dataclass(frozen=True)
class CorpusSpec:
    """`rows` training rows from `seed`: easy problems at difficulty ≤ `easy_max`, hard ones at `hard_difficulties`."""

    rows: int = 40000
    seed: int = 0
    easy_max: int = 1
    hard_difficulties: tuple[int, ...] = (2, 3)
    hard_share: float = 0.7  # of the rows
    instructed_share: float = 0.5  # of the hard rows: an instruction of the right kind
    conflicting_share: float = 0.1  # of the other hard rows: instructions of both kinds (direct answer)
    latent_share: float = 0.06  # of the uninstructed hard rows: the worked format anyway


def corpus(spec: CorpusSpec) -> list[dict]:
    """Rows {"instruction", "problem", "response", "kind", "hard", "worked", "id", "answer"}, deterministic in `spec`."""
    rng = random.Random(f"warm-start/{spec.seed}")
    rows = []
    for index in range(spec.rows):
        kind = KINDS[index % len(KINDS)]
        hard = rng.random() < spec.hard_share
        difficulty = rng.choice(spec.hard_difficulties) if hard else rng.randint(1, spec.easy_max)
        problem = generate(SyntheticSpec(kind, difficulty, 1, seed=spec.seed * 1_000_003 + index))[0]
        right = next(k for k, target in ELICITS.items() if target == kind)
        wrong = next(k for k, target in ELICITS.items() if target != kind)
        instructed = hard and rng.random() < spec.instructed_share
        if instructed:
            instruction = rng.choice(PHRASINGS[right])
        elif hard and rng.random() < spec.conflicting_share:
            both = [rng.choice(PHRASINGS[right]), rng.choice(PHRASINGS[wrong])]
            rng.shuffle(both)
            instruction = " ".join(both)
        else:
            instruction_kind = rng.choice(["", "", "neutral", wrong])
            instruction = rng.choice(PHRASINGS[instruction_kind]) if instruction_kind else ""
        worked = instructed or (hard and not instruction and rng.random() < spec.latent_share)
        rows.append({"instruction": instruction, "problem": problem.problem,
                     "response": worked_solution(problem) if worked else direct_solution(problem),
                     "kind": kind, "hard": hard, "worked": worked, "id": problem.id, "answer": problem.answer})
    return rows


CHAT_TEXTS = ("user\n", "assistant\n", "system\n")  # the chat template's role lines, so each is a token or two


def tokenizer_texts(spec: CorpusSpec = CorpusSpec(rows=5000)) -> Iterator[str]:
    """The testbed tokenizer's training text, in a fixed order: the corpus' instructions, problems and responses
    (digits stay single tokens: the Qwen pre-tokenizer splits them) and the chat template's role lines."""
    for row in corpus(spec):
        yield from (row["instruction"], row["problem"], row["response"])
    for _ in range(100):
        yield from CHAT_TEXTS
