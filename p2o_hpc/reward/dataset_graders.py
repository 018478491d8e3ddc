"""Per-dataset graders: the strict boxed reward, or an equivalence the authors' grader for that dataset accepts.

The authors pick the grader by data_source (verl/utils/reward_score/__init__.py:default_compute_score):
DeepScaleR rows go to ``deepscaler.compute_score`` (Hendrycks-MATH normalisation + sympy), DeepMath rows to
``deepmath.compute_score`` (OMI/Qwen ``math_equal`` OR math-verify). Both score 1/0 on the same last box that
``strict_boxed_reward`` grades; each accepts some correct answers that plain math-verify rejects. Each grader here
is ``strict_boxed_reward``'s format rule AND (math-verify equality OR that dataset's extra equivalences):

deepscaler (format: a complete final ``\\boxed{}``; deepscaler.py:compute_score scores 0 without one)
  * percent signs are not part of the value: ``17\\%`` == ``17`` == ``17 \\%`` (deepscaler.py:_normalize and
    _strip_string drop ``\\%``/``%`` from both sides before comparing). No x100 scaling: ``0.17`` != ``17\\%``.

deepmath (format: ``\\boxed`` occurs exactly once; deepmath.py:reward_func ``solution_str.count("\\\\boxed") == 1``)
  * percent signs dropped as above (deepmath.py:normalize_answer_string).
  * a plain number equals g/100, g or 100·g of a plain-number gold g, relative tolerance 1e-4
    (deepmath.py:math_equal, include_percentage=True, tolerance=1e-4): ``0.17`` == ``17\\%``, ``50\\%`` == ``0.5``.
    As in the authors' code this needs no percent sign on either side (``100`` == ``1``) and also grants
    numeric near-misses within 1e-4 (``3.1416`` == ``3.14159``).
  * an inequality whose solution set is exactly the gold set: ``x > 2`` == ``(2, \\infty)``,
    ``1 < x \\le 2`` == ``(1, 2]``, ``|x| > 4`` == ``(-\\infty,-4) \\cup (4,\\infty)``. The authors call
    ``verify(gold, target, 6, 15, True, 3)`` (deepmath.py:verify_ray): with math-verify >= 0.8 the sixth
    positional parameter is ``allow_set_relation_comp``, so their 3 (meant as a timeout) turns that comparison on.

Deliberately not carried over: OMI's ``is_digit`` drops every comma (``1,2`` would equal ``12``); here only
thousands separators are dropped. A LaTeX fraction is not a "plain number" (``\\frac{1}{2}`` != ``50\\%``, as in
both of the authors' graders).

All graders are module-level, 0/1, never raise (0.0), and bound their work like strict_boxed_reward
(MAX_BOXED_CHARS, math-verify's alarm timeouts): run them in RewardPool's worker processes, never in threads.
"""

from __future__ import annotations

import math
import re

from p2o_hpc.reward.math_verify_reward import (
    MAX_BOXED_CHARS,
    PARSE_TIMEOUT_S,
    VERIFY_TIMEOUT_S,
    _latex_config,
    _parse_ground_truth,
    extract_last_boxed,
)

PERCENT_SCALES = (0.01, 1.0, 100.0)  # deepmath.py:math_equal, include_percentage: reference/100, reference, ·100
NUMERIC_REL_TOL = 1e-4  # deepmath.py:math_equal tolerance
MAX_NUMBER_CHARS = 64  # longer "numbers" are not plain numbers (bounded float parsing)

_PERCENT_RE = re.compile(r"\\?%")
_NUMBER_NOISE_RE = re.compile(r"\\[,!;: ]|\\\$|\$|\{,\}|\s+")  # LaTeX spacing, dollar signs, {,} separators
_THOUSANDS_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")
_PLAIN_NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")


def _math_verify_equal(answer: str, ground_truth: str, *, allow_set_relation_comp: bool = False) -> bool:
    """math-verify equality of a boxed answer's content and a gold answer, as strict_boxed_reward grades it."""
    from math_verify import parse, verify

    if not answer.strip() or not ground_truth.strip():
        return False
    gold = _parse_ground_truth(ground_truth)
    if not gold:
        return False
    predicted = parse("\\boxed{" + answer + "}", extraction_config=_latex_config(), parsing_timeout=PARSE_TIMEOUT_S)
    if not predicted:
        return False
    return bool(
        verify(gold, predicted, allow_set_relation_comp=allow_set_relation_comp, timeout_seconds=VERIFY_TIMEOUT_S)
    )


def percent_free_equal(answer: str, ground_truth: str, *, allow_set_relation_comp: bool = False) -> bool:
    """Equal once every ``\\%``/``%`` is dropped from both sides; only tried when either side has one."""
    if "%" not in answer and "%" not in ground_truth:
        return False
    return _math_verify_equal(
        _PERCENT_RE.sub("", answer), _PERCENT_RE.sub("", ground_truth), allow_set_relation_comp=allow_set_relation_comp
    )


def plain_number(text: str) -> float | None:
    """The value of a plain decimal numeral (sign, digits, point; ``%``, ``$``, LaTeX spaces and thousands
    separators ignored), or None for anything else (fractions, expressions, ``inf``, exponents)."""
    if len(text) > MAX_NUMBER_CHARS * 2:
        return None
    text = _NUMBER_NOISE_RE.sub("", _PERCENT_RE.sub("", text))
    if len(text) > MAX_NUMBER_CHARS:
        return None
    if _THOUSANDS_RE.fullmatch(text):
        text = text.replace(",", "")
    if not _PLAIN_NUMBER_RE.fullmatch(text):
        return None
    value = float(text)
    return value if math.isfinite(value) else None


def scaled_number_equal(answer: str, ground_truth: str) -> bool:
    """Both plain numbers and the answer is g/100, g or 100·g (relative tolerance 1e-4), as OMI's math_equal."""
    predicted, gold = plain_number(answer), plain_number(ground_truth)
    if predicted is None or gold is None:
        return False
    return any(math.isclose(gold * scale, predicted, rel_tol=NUMERIC_REL_TOL) for scale in PERCENT_SCALES)


def _strict_or(response: str, ground_truth: str, *, set_relations: bool, scaled_numbers: bool) -> float:
    if not isinstance(response, str) or not isinstance(ground_truth, str) or not ground_truth.strip():
        return 0.0
    answer = extract_last_boxed(response, max_chars=MAX_BOXED_CHARS)
    if answer is None or not answer.strip():
        return 0.0
    try:
        if _math_verify_equal(answer, ground_truth, allow_set_relation_comp=set_relations):
            return 1.0
        if scaled_numbers and scaled_number_equal(answer, ground_truth):
            return 1.0
        if percent_free_equal(answer, ground_truth, allow_set_relation_comp=set_relations):
            return 1.0
    except Exception:  # a grader never raises on bad input; RewardPool would score 0.0 anyway
        return 0.0
    return 0.0


def deepscaler_reward(response: str, ground_truth: str) -> float:
    """1.0 iff the final ``\\boxed{}`` equals the gold by math-verify or once percent signs are dropped.

    The authors' DeepScaleR grader: verl/utils/reward_score/deepscaler.py:compute_score (grade_answer_verl:
    grade_answer_mathd OR grade_answer_sympy on the last box; _normalize / _strip_string drop ``%``).
    """
    return _strict_or(response, ground_truth, set_relations=False, scaled_numbers=False)


def deepmath_reward(response: str, ground_truth: str) -> float:
    """1.0 iff ``\\boxed`` occurs exactly once and its answer equals the gold by math-verify (inequalities
    compared with intervals by their solution sets), by OMI's percentage rule (g/100, g, 100·g within 1e-4),
    or once percent signs are dropped; else 0.0.

    The authors' DeepMath grader: verl/utils/reward_score/deepmath.py:compute_score → reward_func
    (format_correct = one ``\\boxed``; math_equal_ray OR verify_ray).
    """
    if not isinstance(response, str) or response.count("\\boxed") != 1:
        return 0.0
    return _strict_or(response, ground_truth, set_relations=True, scaled_numbers=True)
