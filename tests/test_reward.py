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


# --- per-dataset graders (the authors' DeepScaleR / DeepMath rules) and the registry -------------------------------

from p2o_hpc.reward.dataset_graders import deepmath_reward, deepscaler_reward, plain_number  # noqa: E402
from p2o_hpc.reward.registry import REWARDS, format_ok, resolve_reward  # noqa: E402


def _real_gold(dataset: str, key: int | str) -> str:
    """A gold answer as stored in shared/data: DeepScaleR MATH by math.json index, DeepMath by its id."""
    root = shared_data_dir() / "train"
    if dataset == "deepscaler":
        return json.loads((root / "deepscaler_partial" / "math.json").read_text())[key]["answer"]
    for line in (root / "deepmath_partial" / "math_deepmath_deal.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["id"] == key:
            return row["ground_truth"]
    raise KeyError(key)


# (dataset, row, gold as stored, final answer, strict, deepscaler, deepmath), checked by hand against the authors'
# graders (verl/utils/reward_score/deepscaler.py:compute_score, deepmath.py:compute_score).
REAL_ROW_TABLE = [
    # percentages: math-verify cannot parse \% (only the identical string matches)
    ("deepscaler", 992, "17\\%", "17\\%", 1, 1, 1),
    ("deepscaler", 992, "17\\%", "17", 0, 1, 1),  # both of the authors' graders drop \%
    ("deepscaler", 992, "17\\%", "17 \\%", 0, 1, 1),
    ("deepscaler", 992, "17\\%", "17%", 0, 1, 1),
    ("deepscaler", 992, "17\\%", "0.17", 0, 0, 1),  # OMI's include_percentage: gold/100
    ("deepscaler", 992, "17\\%", "\\frac{17}{100}", 0, 0, 0),  # a LaTeX fraction is no plain number for OMI
    ("deepscaler", 992, "17\\%", "18\\%", 0, 0, 0),
    ("deepscaler", 992, "17\\%", "0.18", 0, 0, 0),
    ("deepscaler", 1011, "20 \\%", "20\\%", 0, 1, 1),
    ("deepscaler", 6432, "237.5\\%", "237.5", 0, 1, 1),
    ("deepscaler", 6432, "237.5\\%", "2.375", 0, 0, 1),
    ("deepscaler", 6432, "237.5\\%", "\\frac{475}{2}\\%", 0, 1, 1),  # % dropped, then math-verify
    ("deepmath", "3049", "25\\%", "25", 0, 1, 1),
    ("deepmath", "3049", "25\\%", "0.25", 0, 0, 1),
    ("deepmath", "3049", "25\\%", "0.24", 0, 0, 0),
    ("deepmath", "4829", "70.37\\%", "0.7037", 0, 0, 1),
    ("deepmath", "4829", "70.37\\%", "70.37", 0, 1, 1),
    ("deepmath", "4930", "20\\%", "20\\%", 1, 1, 1),
    # intervals: an inequality with exactly the gold solution set is right for DeepMath only (math-verify's
    # allow_set_relation_comp, which the authors' verify_ray call switches on)
    ("deepmath", "1689", "(2, \\infty)", "x > 2", 0, 0, 1),
    ("deepmath", "1689", "(2, \\infty)", "x \\geq 2", 0, 0, 0),
    ("deepmath", "1689", "(2, \\infty)", "x < 2", 0, 0, 0),
    ("deepmath", "1689", "(2, \\infty)", "(2, \\infty)", 1, 1, 1),
    ("deepmath", "1689", "(2, \\infty)", "x \\in (2, \\infty)", 1, 1, 1),  # math-verify already accepts this
    ("deepmath", "2351", "[0, \\infty)", "x \\ge 0", 0, 0, 1),
    ("deepmath", "3663", "[1, +\\infty)", "x \\geq 1", 0, 0, 1),
    ("deepmath", "3753", "(-\\infty, 0]", "x \\leq 0", 0, 0, 1),
    ("deepmath", "3753", "(-\\infty, 0]", "x < 0", 0, 0, 0),
    ("deepmath", "2876", "[-7, 3)", "-7 \\le x < 3", 0, 0, 1),  # two-sided
    ("deepmath", "2876", "[-7, 3)", "-7 < x < 3", 0, 0, 0),
    ("deepmath", "964", "(-8, 15]", "-8 < x \\leq 15", 0, 0, 1),
    ("deepmath", "4385", "[\\ln 2, \\ln 3]", "\\ln 2 \\le x \\le \\ln 3", 0, 0, 1),
    ("deepscaler", 1050, "[2,\\infty)", "x \\geq 2", 0, 0, 1),  # the authors' DeepScaleR grader rejects it
    ("deepscaler", 7040, "\\left[ 0, \\frac{9}{8} \\right]", "0 \\le y \\le \\frac{9}{8}", 0, 0, 1),
]


@pytest.fixture(scope="module")
def dataset_pools():
    with RewardPool(1, grader=deepscaler_reward) as scaler, RewardPool(1, grader=deepmath_reward) as math:
        yield scaler, math


def test_dataset_graders_on_real_rows(pool, dataset_pools):
    """Percentage and interval equivalences, graded in the spawned workers the trainer uses."""
    for dataset, key, gold, _, *_ in REAL_ROW_TABLE:
        assert _real_gold(dataset, key) == gold, (dataset, key)
    responses = [boxed(answer) for *_, answer, _, _, _ in REAL_ROW_TABLE]
    golds = [row[2] for row in REAL_ROW_TABLE]
    got = list(zip(pool.score(responses, golds), *(p.score(responses, golds) for p in dataset_pools)))
    expected = [tuple(float(x) for x in row[4:]) for row in REAL_ROW_TABLE]
    wrong = [(row[2], row[3], g, e) for row, g, e in zip(REAL_ROW_TABLE, got, expected) if g != e]
    assert not wrong, wrong


def test_authors_numeric_rule_quirks_are_kept_and_bounded():
    # deepmath.py:math_equal compares plain numbers against g/100, g, 100·g within rel. 1e-4, percent sign or not
    assert deepmath_reward(boxed("100"), "1") == 1.0 and deepscaler_reward(boxed("100"), "1") == 0.0
    assert deepmath_reward(boxed("3.1416"), "3.14159") == 1.0 and deepscaler_reward(boxed("3.1416"), "3.14159") == 0.0
    assert deepmath_reward(boxed("3.15"), "3.14159") == 0.0
    # ... but not OMI's comma bug (is_digit drops every comma): a list is no number
    assert deepmath_reward(boxed("1,2"), "12") == 0.0
    assert deepmath_reward(boxed("12,000"), "12000") == 1.0
    assert deepmath_reward(boxed("9" * 5000), "1") == 0.0  # over MAX_BOXED_CHARS
    assert deepmath_reward(boxed("1e2"), "100") == 0.0  # float() syntax is no plain number
    assert [plain_number(t) for t in ("inf", "nan", "1_000", "\\frac{1}{2}", "-.5\\%", "\\$1{,}234.5")] == [
        None, None, None, None, -0.5, 1234.5]


ONE_BOX_TABLE = [  # (response, gold, deepscaler, deepmath): DeepMath's reward demands exactly one \boxed
    ("So the answer is \\boxed{25\\%}.", "25\\%", 1, 1),
    ("First guess \\boxed{20\\%}, no: \\boxed{25\\%}.", "25\\%", 1, 0),  # last box right, but two boxes
    ("\\boxed{25\\%} and again \\boxed{25\\%}", "25\\%", 1, 0),
    ("I put the answer in \\boxed, here: \\boxed{25}", "25\\%", 1, 0),  # the word counts, as count("\\boxed")
    ("$\\boxed{\\boxed{x > 2}}$", "(2, \\infty)", 0, 0),
    ("The answer is 25\\%.", "25\\%", 0, 0),
    ("\\boxed{25\\%", "25\\%", 0, 0),
    ("\\boxed {x > 2}", "(2, \\infty)", 0, 1),
    ("\\fbox{25}", "25\\%", 0, 0),
]


@pytest.mark.parametrize(("response", "gold", "scaler", "math"), ONE_BOX_TABLE)
def test_deepmath_one_box_rule(response, gold, scaler, math):
    assert (deepscaler_reward(response, gold), deepmath_reward(response, gold)) == (scaler, math)


@pytest.mark.parametrize("grader", [deepscaler_reward, deepmath_reward])
def test_dataset_graders_never_raise(grader):
    for response, gold in [(None, "1"), ("\\boxed{1}", None), (3, 3), ("\\boxed{1}", ""), ("\\boxed{}", "1"),
                           ("\\boxed{%}", "5\\%"), ("\\boxed{\\%}", "5\\%"), ("\\boxed{x>}", "(2,\\infty)"),
                           ("\\boxed{3\ud800}", "3"), ("\\boxed{" + "\\frac{" * 300 + "}", "1")]:
        assert grader(response, gold) == 0.0, (response, gold)


FORMAT_TABLE = [  # (response, math_verify / deepscaler, deepmath)
    ("\\boxed{3}", True, True),
    ("\\boxed{2} no, \\boxed{3}", True, False),
    ("the box \\boxed then \\boxed{3}", True, False),
    ("\\boxed{3", False, False),
    ("\\boxed{3} and \\boxed{4", False, False),
    ("\\boxed{}", False, False),
    ("\\boxed{" + "1" * (MAX_BOXED_CHARS + 1) + "}", False, False),
    ("no box: 3", False, False),
    ("\\fbox{3}", False, False),
]


@pytest.mark.parametrize(("response", "last_box", "one_box"), FORMAT_TABLE)
def test_format_ok(response, last_box, one_box):
    assert format_ok("math_verify", response) is last_box
    assert format_ok("deepscaler", response) is last_box
    assert format_ok("deepmath", response) is one_box
    assert format_ok("early_substring", response) is True
    assert format_ok("tests.test_reward:faulty_grader", response) is True


def test_format_ok_agrees_with_the_graders_and_names_unknown_rewards():
    # No reward without the format; the format alone earns nothing.
    for response, *_ in FORMAT_TABLE + [(r, 0, 0) for r, *_ in ONE_BOX_TABLE]:
        if not format_ok("deepmath", response):
            assert deepmath_reward(response, "3") == 0.0
        if not format_ok("deepscaler", response):
            assert deepscaler_reward(response, "3") == 0.0 and strict_boxed_reward(response, "3") == 0.0
    assert format_ok("deepmath", None) is False
    with pytest.raises(KeyError, match="unknown reward 'nope'"):
        format_ok("nope", "\\boxed{3}")


def test_registry_names():
    assert {"math_verify", "deepscaler", "deepmath"} <= set(REWARDS)
    assert resolve_reward("deepscaler") is deepscaler_reward
    assert resolve_reward("deepmath") is deepmath_reward
    assert resolve_reward("math_verify") is strict_boxed_reward
    assert resolve_reward(f"{faulty_grader.__module__}:faulty_grader") is faulty_grader
    for name in REWARDS:
        pickle.dumps(resolve_reward(name))  # RewardPool ships graders to spawned workers by reference
    with pytest.raises(KeyError, match="unknown reward"):
        resolve_reward("nope")
    with pytest.raises(KeyError, match="cannot import"):
        resolve_reward("p2o_hpc.reward.dataset_graders:nope")
