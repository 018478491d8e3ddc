"""`reflection=edit`: an offline, GrIPS-style mutation operator for GEPA's Algorithm 3, and its phrase bank.

**Not the paper's method.** P²O mutates a template by reflective mutation: an LLM reads the parent's minibatch
results and writes a better template (`reflection=self`, the reference model; `reflection=teacher`, an endpoint).
`edit` is a stand-in for machines without a reflection LLM (a CPU box, a toy policy): it edits the parent's
phrases blindly, as GrIPS does (Prasad et al. 2022, "GrIPS: Gradient-free, Edit-based Instruction Search"), and
leaves the search to GEPA's own machinery: the child is kept only if it strictly beats its parent on the minibatch
(then it is scored on dev and joins the Pareto pool), with the same budget, dedupe, counters and cover as a
reflective round. It ignores the feedback records: the operator is never told which phrases work.

Edits, on the template split into phrases at sentence boundaries (and line breaks): add (a bank phrase inserted
at a random position), delete (one phrase; never the last one), swap (two phrases), replace (one phrase by a bank
phrase). From the empty template ε only `add` applies. Unlike GrIPS, phrases are whole sentences rather than
parser constituents, and new text comes from a fixed bank rather than a paraphrase model or earlier deletions.

Every draw comes from the rng the engine passes, which is the engine's checkpointed RNG, so a resumed round
proposes the same children as an uninterrupted one.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from random import Random
from typing import Any, Sequence

from p2o_hpc.data.evolved_templates import rejection_reason

EDIT_KINDS = ("add", "delete", "swap", "replace")
MAX_TRIES = 10  # edit attempts per proposal before it is given up as invalid

# Generic instructions a prompt engineer would list for math word / arithmetic problems. Written from general
# prompting practice, not from any training corpus.
PHRASE_BANK: tuple[str, ...] = (
    "Let's think step by step.",
    "Show your work.",
    "Break the problem into smaller steps.",
    "Work through it digit by digit.",
    "Keep a running total.",
    "Double-check each calculation.",
    "Be concise.",
    "Write the final answer in \\boxed{}.",
    "Carry carefully.",
    "Start from the rightmost digit.",
    "Consider each term in order.",
    "Read the problem carefully before you start.",
    "Identify what the question is asking for.",
    "List the given quantities first.",
    "Write down the relevant formula.",
    "Define a variable for each unknown.",
    "Translate the words into an equation.",
    "Solve the equation one step at a time.",
    "Simplify expressions before substituting numbers.",
    "Keep track of the units.",
    "Check that the answer is reasonable.",
    "Verify the result by substituting it back.",
    "Estimate the answer first, then compute it exactly.",
    "Use exact fractions instead of decimals.",
    "Reduce fractions to lowest terms.",
    "Pay attention to negative signs.",
    "Follow the order of operations.",
    "Write each intermediate result on its own line.",
    "Avoid skipping steps.",
    "Think about special cases.",
    "Draw a diagram if it helps.",
    "Look for a pattern.",
    "Try small cases first.",
    "Work backwards from the goal.",
    "Consider an alternative method to confirm the result.",
    "Count carefully and avoid double counting.",
    "Recompute any step that looks suspicious.",
    "State any assumptions you make.",
    "Keep the numbers aligned by place value.",
    "Borrow carefully when subtracting.",
    "Multiply one digit at a time.",
    "Add the partial products carefully.",
    "Group like terms together.",
    "Factor where possible.",
    "Check the conditions given in the problem.",
    "Make sure every part of the question is answered.",
    "Give the answer in the form the question asks for.",
    "Do not round until the final step.",
    "Express the final answer as a simplified number.",
    "Put only the final answer inside the box.",
    "Explain briefly why each step follows.",
    "Focus on the key information and ignore distractions.",
    "Organize the information in a table.",
    "Compare your answer with the original question.",
    "If you get stuck, restate the problem in your own words.",
    "Be careful with arithmetic.",
    "Take your time.",
    "Write clear and precise reasoning.",
    "Use the simplest method that works.",
    "Check your answer before writing it down.",
    "Convert all quantities to the same units.",
    "Split the problem into cases if needed.",
)

_BOUNDARY = re.compile(r"(?<=[.!?])\s+|\s*\n\s*")
_WORD_OR_MARK = re.compile(r"\w+|[^\w\s]")


def split_phrases(template: str) -> list[str]:
    """The template's phrases: its sentences (split after . ! ? and at line breaks), stripped, none empty."""
    return [phrase for phrase in (part.strip() for part in _BOUNDARY.split(template.strip())) if phrase]


def join_phrases(phrases: Sequence[str]) -> str:
    return " ".join(phrases)


def estimated_tokens(text: str) -> int:
    """A conservative token count without a tokenizer: two tokens per word and per punctuation mark (real
    subword tokenizers give about 1.3 per English word)."""
    return 2 * len(_WORD_OR_MARK.findall(text))


def load_phrase_bank(path: str | None) -> tuple[str, ...]:
    """reflection.edit_phrase_bank: null → the built-in bank; else one phrase a line, blank lines and # comments
    skipped, duplicates dropped (order kept, so the draws do not depend on how the file was read)."""
    if path is None:
        return PHRASE_BANK
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise FileNotFoundError(f"reflection.edit_phrase_bank={path}: cannot read it ({error})") from error
    phrases = tuple(dict.fromkeys(line.strip() for line in lines if line.strip() and not line.strip().startswith("#")))
    if not phrases:
        raise ValueError(f"reflection.edit_phrase_bank={path}: no phrases (one a line; # starts a comment)")
    return phrases


class EditMutation:
    """The mutation operator (parent template, feedback records, rng) → child template or None (invalid).

    tokenizer / max_tokens: the policy's tokenizer and the template budget (algorithm.p2o.template_max_tokens), so
    a proposal passes the same check the rollouts apply (data.evolved_templates.rejection_reason); without a
    tokenizer, a conservative word count and a refusal of anything like `<|...|>`. tally: counts of the edits in
    the proposals returned (and of invalid ones), shared by the caller across rounds for its metrics.
    """

    def __init__(self, phrases: Sequence[str] = PHRASE_BANK, *, max_tokens: int, num_edits: int = 1,
                 tokenizer: Any = None, tally: Counter | None = None):
        if num_edits < 1:
            raise ValueError(f"num_edits={num_edits} must be ≥ 1")
        self.phrases = tuple(dict.fromkeys(p.strip() for p in phrases if p.strip()))
        if not self.phrases:
            raise ValueError("the phrase bank is empty")
        self.max_tokens, self.num_edits, self.tokenizer = max_tokens, num_edits, tokenizer
        self.tally = Counter() if tally is None else tally

    def __call__(self, parent: str, records: Sequence[Any], rng: Random) -> str | None:
        """A well-formed child of `parent`, or None after MAX_TRIES attempts; `records` are ignored (GrIPS is
        score-driven: the engine's minibatch test decides)."""
        start = split_phrases(parent)
        for _ in range(MAX_TRIES):
            phrases, kinds = list(start), []
            for _ in range(self.num_edits):
                kind = self._edit(phrases, rng)
                if kind is None:
                    break
                kinds.append(kind)
            child = join_phrases(phrases)
            if kinds and self.problem(child, parent) is None:
                self.tally.update(kinds)
                return child
        self.tally["invalid"] += 1
        return None

    def problem(self, child: str, parent: str) -> str | None:
        """Why `child` may not be proposed for `parent` (None: it may)."""
        if not child.strip():
            return "empty"
        if child in (parent, join_phrases(split_phrases(parent))):
            return "the parent itself"
        if self.tokenizer is not None:
            return rejection_reason(child, self.tokenizer, self.max_tokens)
        if "<|" in child or "|>" in child:
            return "looks like a chat template special token"
        if estimated_tokens(child) > self.max_tokens:
            return f"about {estimated_tokens(child)} tokens > the template budget of {self.max_tokens}"
        return None

    def _edit(self, phrases: list[str], rng: Random) -> str | None:
        """Apply one random applicable edit to `phrases` in place; its kind, or None when none applies."""
        new = [p for p in self.phrases if p not in phrases]
        distinct = len(set(phrases))
        applicable = [kind for kind, ok in (("add", bool(new)), ("delete", len(phrases) >= 2),
                                            ("swap", distinct >= 2), ("replace", bool(phrases) and bool(new)))
                      if ok]
        if not applicable:
            return None
        kind = rng.choice(applicable)
        if kind == "add":
            phrases.insert(rng.randrange(len(phrases) + 1), rng.choice(new))
        elif kind == "delete":
            del phrases[rng.randrange(len(phrases))]
        elif kind == "swap":
            i, j = rng.sample(range(len(phrases)), 2)
            while phrases[i] == phrases[j]:  # distinct ≥ 2, so some pair differs
                i, j = rng.sample(range(len(phrases)), 2)
            phrases[i], phrases[j] = phrases[j], phrases[i]
        else:
            phrases[rng.randrange(len(phrases))] = rng.choice(new)
        return kind


def edit_metrics(tally: Counter) -> dict:
    """edit/<kind>: the edits in the proposals an EditMutation returned; edit/invalid: proposals it gave up."""
    return {f"edit/{kind}": tally.get(kind, 0) for kind in (*EDIT_KINDS, "invalid")}
