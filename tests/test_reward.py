"""Strict boxed reward: extraction, math-verify grading on real MATH500 answers, and the worker pool's robustness
(timeouts, crashes, adversarial input) with real math-verify (no mocks)."""

from __future__ import annotations

import json
import os
import pickle
import time

import pytest

from p2o_hpc.paths import shared_data_dir
from p2o_hpc.reward import RewardPool, extract_last_boxed, strict_boxed_reward
from p2o_hpc.reward.math_verify_reward import MAX_BOXED_CHARS

SLEEP_MARKER, CRASH_MARKER, RAISE_MARKER = "<<sleep>>", "<<crash>>", "<<raise>>"
FAULT_TIMEOUT_S = 1.0


def faulty_grader(response: str, ground_truth: str) -> float:
    """Module-level (picklable) grader that misbehaves on request, otherwise grades for real."""
    if SLEEP_MARKER in response:
        time.sleep(120)
    if CRASH_MARKER in response:
        os._exit(7)
    if RAISE_MARKER in response:
        raise ValueError("grader bug")
    return strict_boxed_reward(response, ground_truth)


def boxed(answer: str) -> str:
    return f"Some reasoning with 17 and 4 along the way, so the answer is \\boxed{{{answer}}}."


@pytest.fixture(scope="module")
def math500_rows() -> list[dict]:
    path = shared_data_dir() / "benchmarks" / "math500" / "test.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def pool():
    with RewardPool(num_workers=2, timeout_s=5.0) as reward_pool:
        yield reward_pool


@pytest.fixture(scope="module")
def faulty_pool():
    with RewardPool(num_workers=2, timeout_s=FAULT_TIMEOUT_S, grader=faulty_grader) as reward_pool:
        yield reward_pool


# --- extraction -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("first \\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed {\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\{1, 2\\}} done", "\\{1, 2\\}"),  # escaped braces are not grouping braces
        ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("\\boxed{\\boxed{5}}", "5"),  # nested: the innermost box starts last
        ("\\boxed{}", ""),
        ("\\boxed{3} and later \\boxed{4", None),  # the final box is unclosed: no final answer
        ("\\boxed{\\}", None),
        ("no box, answer 3", None),
        ("\\fbox{3}", None),
        ("\\boxedx{3}", None),
    ],
)
def test_extract_last_boxed(text, expected):
    assert extract_last_boxed(text) == expected


def test_extract_last_boxed_max_chars():
    assert extract_last_boxed("\\boxed{" + "1" * 10 + "}", max_chars=10) == "1" * 10
    assert extract_last_boxed("\\boxed{" + "1" * 11 + "}", max_chars=10) is None


# --- grading ----------------------------------------------------------------------------------------------------


def test_math500_gold_answers_graded_correct(pool, math500_rows):
    """Every MATH500 gold answer, boxed, must score 1.0 against itself (fractions, tuples, intervals, matrices,
    text, degrees, dollars ...); a wrong box must score 0.0 for each of them."""
    answers = [row["answer"] for row in math500_rows]
    assert len(answers) == 500
    rewards = pool.score([boxed(answer) for answer in answers], answers)
    failed = [answer for answer, reward in zip(answers, rewards) if reward != 1.0]
    assert not failed, f"math-verify rejects gold-vs-itself for {failed}"
    # The next row's answer is wrong, except where neighbouring rows share an answer, and "x=5" for gold "5"
    # (math-verify reads an assignment to a single variable as its value).
    shifted = answers[1:] + answers[:1]
    rewards = pool.score([boxed(other) for other in shifted], answers)
    accepted = [(gold, other) for gold, other, reward in zip(answers, shifted, rewards) if reward]
    assert sorted(accepted) == [("3", "3"), ("5", "x=5"), ("7", "7")]


EQUIVALENT = [  # (ground truth, predicted final answer) that math-verify accepts
    ("\\frac{1}{2}", "\\dfrac{1}{2}"),
    ("\\frac{1}{2}", "0.5"),
    ("\\frac{14}{3}", "14/3"),
    ("023", "23"),
    ("27.0", "27"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\pi/2)"),
    ("2\\sqrt{2}", "\\sqrt{8}"),
    ("[-2,7]", "[-2, 7]"),
    ("x \\in [-2,7]", "[-2,7]"),
    ("1,-2", "-2, 1"),
    ("10,\\!080", "10080"),
    ("90^\\circ", "90"),
    ("\\$18.90", "18.90"),
    ("\\text{(C)}", "C"),
    ("\\frac{270}7\\text{ degrees}", "\\frac{270}{7}"),
    ("\\begin{pmatrix} -1/3 \\\\ 2/3 \\end{pmatrix}", "\\begin{pmatrix} -\\frac13 \\\\ \\frac23 \\end{pmatrix}"),
]
WRONG = [
    ("\\frac{14}{3}", "4.67"),
    ("[-2,7]", "(-2,7)"),
    ("\\left( 3, \\frac{\\pi}{2} \\right)", "\\left( \\frac{\\pi}{2}, 3 \\right)"),
    ("(6,31,-1)", "(6,31,1)"),
    ("\\text{Evelyn}", "\\text{Bob}"),
    ("2\\sqrt{2}", "2.83"),
    ("1 \\pm \\sqrt{19}", "1+\\sqrt{19}"),
    ("x^2+2x+1", "(y+1)^2"),
    ("10\\%", "10"),  # math-verify cannot parse a percent gold to sympy; only the identical string matches
    ("5", "\\text{five}"),
]


def test_equivalent_and_wrong_answers(pool):
    golds = [gold for gold, _ in EQUIVALENT + WRONG]
    rewards = pool.score([boxed(answer) for _, answer in EQUIVALENT + WRONG], golds)
    assert rewards == [1.0] * len(EQUIVALENT) + [0.0] * len(WRONG)


def test_only_the_last_complete_box_counts(pool):
    cases = [
        ("The answer is 3, i.e. $3$. Final answer: 3", "3", 0.0),  # right number, no box
        ("\\fbox{3}", "3", 0.0),
        ("\\boxed{2} no wait, \\boxed{3}", "3", 1.0),
        ("\\boxed{3} no wait, \\boxed{2}", "3", 0.0),
        ("\\boxed{3} no wait, \\boxed{3", "3", 0.0),  # the final box is broken; an earlier one does not count
        ("\\boxed {\\frac{1}{2}}", "0.5", 1.0),
        ("$\\boxed{\\frac{14}{3}}$ and 5 apples", "\\frac{14}{3}", 1.0),
        ("3 \\boxed{}", "3", 0.0),
        ("\\boxed{3}", "", 0.0),
    ]
    assert pool.score([r for r, _, _ in cases], [g for _, g, _ in cases]) == [e for _, _, e in cases]


def test_adversarial_inputs_score_zero_quickly(pool):
    adversarial = [
        "",
        "\\boxed{",
        "\\boxed{" * 10_000,
        "\\boxed{" + "\\frac{" * 10_000,
        "\\boxed{" + "\\frac{" * 5_000 + "}" * 5_000 + "}",
        "\\boxed{" + "{" * 400 + "3" + "}" * 400 + "}",  # short enough for math-verify; its parse alarm fires
        "\\boxed{9^{9^{9}}}",  # its verify alarm fires
        "\\boxed{3\x00}",
        "\\boxed{3\ud800}",
        "\ud800\udfff\x00" * 1000,
        "x" * 2_000_000 + "\\boxed{" + "3" * (MAX_BOXED_CHARS + 1) + "}",
        "\\boxed{" + "3+" * 1_000_000 + "3}",
        "}" * 1000 + "{" * 1000,
    ]
    start = time.monotonic()
    rewards = pool.score(adversarial, ["3"] * len(adversarial))
    assert rewards == [0.0] * len(adversarial)
    assert time.monotonic() - start < 30
    # An enormous response is fine when its final box is sane.
    assert pool.score(["x" * 2_000_000 + "\\boxed{3}"], ["3"]) == [1.0]


def test_non_string_items_and_length_mismatch(pool):
    assert pool.score([None, "\\boxed{3}", 3], ["3", None, "3"]) == [0.0, 0.0, 0.0]
    assert pool.score([], []) == []
    with pytest.raises(ValueError):
        pool.score(["\\boxed{3}"], [])


def test_grader_must_be_picklable():
    with pytest.raises((pickle.PicklingError, AttributeError)):
        RewardPool(num_workers=1, grader=lambda response, ground_truth: 1.0)


def _refuse_to_load():
    raise RuntimeError("this grader cannot be loaded in a worker")


class UnloadableGrader:
    """Pickles fine in the parent but fails to unpickle in the worker, so every worker dies before it is ready."""

    def __call__(self, response: str, ground_truth: str) -> float:
        return 1.0

    def __reduce__(self):
        return _refuse_to_load, ()


def test_workers_that_cannot_start_raise_instead_of_hanging():
    reward_pool = RewardPool(num_workers=2, grader=UnloadableGrader())
    with pytest.raises(RuntimeError, match="failed to start"):
        reward_pool.score(["\\boxed{1}"], ["1"])
    with pytest.raises(RuntimeError, match="closed"):
        reward_pool.score(["\\boxed{1}"], ["1"])


# --- faults -----------------------------------------------------------------------------------------------------


def test_stuck_grader_times_out_and_is_replaced(faulty_pool):
    replaced_before = faulty_pool.workers_replaced
    responses = [boxed("3"), SLEEP_MARKER, boxed("4"), boxed("3"), SLEEP_MARKER, boxed("3"), boxed("5")]
    start = time.monotonic()
    rewards = faulty_pool.score(responses, ["3"] * len(responses))
    elapsed = time.monotonic() - start
    assert rewards == [1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    assert faulty_pool.workers_replaced - replaced_before == 2
    # Both workers may stall at once; each stall costs one timeout plus a respawn, not the grader's 120 s.
    assert elapsed < 2 * FAULT_TIMEOUT_S + 15, elapsed
    assert faulty_pool.score([boxed("\\frac{1}{2}")] * 4, ["0.5"] * 4) == [1.0] * 4


def test_crashing_worker_scores_zero_and_pool_recovers(faulty_pool):
    replaced_before = faulty_pool.workers_replaced
    responses = [CRASH_MARKER, boxed("3"), CRASH_MARKER, boxed("7"), boxed("3")]
    assert faulty_pool.score(responses, ["3"] * len(responses)) == [0.0, 1.0, 0.0, 0.0, 1.0]
    assert faulty_pool.workers_replaced - replaced_before == 2
    assert faulty_pool.score([boxed("3"), boxed("2")], ["3", "3"]) == [1.0, 0.0]


def test_raising_grader_scores_zero_without_replacing_workers(faulty_pool):
    replaced_before = faulty_pool.workers_replaced
    assert faulty_pool.score([RAISE_MARKER, boxed("3")], ["3", "3"]) == [0.0, 1.0]
    assert faulty_pool.workers_replaced == replaced_before


def test_closed_pool_refuses_work():
    reward_pool = RewardPool(num_workers=1)
    assert reward_pool.score(["\\boxed{1}"], ["1"]) == [1.0]
    reward_pool.close()
    reward_pool.close()
    with pytest.raises(RuntimeError):
        reward_pool.score(["\\boxed{1}"], ["1"])
