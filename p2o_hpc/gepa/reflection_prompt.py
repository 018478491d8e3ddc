"""The reflection request (GEPA's meta-prompt filled with a template's minibatch results) and parsing its answer.

The meta-prompt text and the side-info formatter come from the installed `gepa` package, so we follow upstream
GEPA instead of carrying a copy that drifts. The feedback text and the fitting of the examples into the reflection
model's context are the P²O authors' (`_build_feedback_text`, `_truncate_examples_to_fit`,
`_build_reflection_prompt` in verl/trainer/ppo/ray_trainer_gepa_wo_additional_grpo_in_distribution.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

from gepa.strategies.instruction_proposal import InstructionProposalSignature

from p2o_hpc.io_utils import clean_text

EMPTY_TEMPLATE_SHOWN = "(no instructions: the assistant was given the question alone)"
FORMAT_ERROR_MARK = "\n\n[... middle truncated, format error ...]\n\n"
TRUNCATION_MARK = "\n\n[... middle truncated ...]\n\n"
PROMPT_MARGIN_TOKENS = 500  # the authors' safety margin under the reflection context
COST_FACTOR = 1.2  # the authors over-estimate each example's tokens by 20 % (markdown headers, joins)
FORMAT_ERROR_KEEP_TOKENS = 100  # a format-error response keeps this many tokens at each end


class Tokenizer(Protocol):  # a Hugging Face tokenizer fits
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...

    def decode(self, ids: list[int], skip_special_tokens: bool = ...) -> str: ...


@dataclass
class FeedbackRecord:
    question: str
    response: str
    ground_truth: str
    score: float  # the reward of this rollout (the authors' answer_score)
    format_ok: bool = True  # False: the response breaks the reward's answer format (reward.registry.format_ok)


def feedback_text(record: FeedbackRecord) -> str:
    """The authors' feedback: a format-error message (with the correct answer), or whether the final answer is
    right, then the reward line."""
    answer = str(record.ground_truth).strip()
    if not record.format_ok:
        text = (
            "You have to provide final answer, without detailed explanations.\n"
            "It is possible that you failed to output in the required format, either omitting the specified tag "
            "or including multiple ones.\n"
            f"The correct answer is '{answer}'."
            "\n\nPlease analyze your reasoning trajectory with the correct answer, and check your output format."
        )
    elif record.score >= 1.0 - 1e-9:
        text = f"Your final answer is correct. The correct answer is '{answer}'."
    else:
        text = f"Your final answer is incorrect. The correct answer is '{answer}'."
    return text + f"\n\nReward (answer_score) = {record.score:.2f}"


def _sample(record: FeedbackRecord, response: str) -> dict[str, str]:
    return {"Inputs": record.question, "Generated Outputs": response, "Feedback": feedback_text(record)}


def _render(current_template: str, samples: list[dict[str, str]]) -> str:
    shown = current_template if current_template.strip() else EMPTY_TEMPLATE_SHOWN
    prompt = InstructionProposalSignature.prompt_renderer(
        {"current_instruction_doc": shown, "dataset_with_feedback": samples}
    )
    assert isinstance(prompt, str)  # a list only comes back for image inputs
    return prompt


def _count(tokenizer: Tokenizer, text: str) -> int:
    return len(tokenizer.encode(text, add_special_tokens=False))


def cut_head_tail(text: str, keep: int, tokenizer: Tokenizer) -> str:
    """A format-error response: its first and last `keep` tokens around a marker (unchanged if ≤ 2·keep)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) <= 2 * keep:
        return text
    head = tokenizer.decode(ids[:keep], skip_special_tokens=False).rstrip()
    tail = tokenizer.decode(ids[-keep:], skip_special_tokens=False).lstrip()
    return head + FORMAT_ERROR_MARK + tail


def cut_middle(text: str, max_tokens: int, tokenizer: Tokenizer) -> str:
    """Fit `text` into about `max_tokens`: 40 % of the room from its start, 40 % from its end, a marker between
    (re-cut 200 tokens shorter while the result is over 1.1 × max_tokens; no room at all → first 100 chars)."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) <= max_tokens:
        return text
    room = max_tokens - _count(tokenizer, TRUNCATION_MARK)
    if room <= 0:
        return text[:100] + "..."
    keep = room * 40 // 100
    head = tokenizer.decode(ids[:keep], skip_special_tokens=False).rstrip()
    tail = tokenizer.decode(ids[len(ids) - keep :], skip_special_tokens=False).lstrip() if keep else ""
    cut = head + TRUNCATION_MARK + tail
    if _count(tokenizer, cut) > max_tokens * 1.1:
        return cut_middle(text, max_tokens - 200, tokenizer)
    return cut


def fit_responses(records: Sequence[FeedbackRecord], available: int, tokenizer: Tokenizer) -> list[str]:
    """The responses to show, cut so that the examples fit in `available` tokens (the authors' rule).

    Each example costs 1.2 × the tokens of "input\\nresponse\\nfeedback". Examples within an equal share of the
    room are kept whole; if the others do not fit in what is left, format-error responses keep their first and
    last 100 tokens, and the remaining ones share what is left after that (at least 100 tokens an example, at
    least 50 for the response) and keep 40 % of their share from each end.
    """
    responses = [record.response for record in records]
    if not records:
        return responses

    def cost(record: FeedbackRecord, response: str) -> int:
        return int(_count(tokenizer, f"{record.question}\n{response}\n{feedback_text(record)}") * COST_FACTOR)

    costs = [cost(record, record.response) for record in records]
    threshold = max(1, available // len(records))
    expensive = [i for i, c in enumerate(costs) if c > threshold]
    remaining = available - sum(c for c in costs if c <= threshold)
    if remaining >= sum(costs[i] for i in expensive):
        return responses
    normal = []
    for i in expensive:
        if records[i].format_ok:
            normal.append(i)
        else:
            responses[i] = cut_head_tail(records[i].response, FORMAT_ERROR_KEEP_TOKENS, tokenizer)
            remaining -= cost(records[i], responses[i])
    if not normal or remaining >= sum(costs[i] for i in normal):
        return responses
    share = max(100, remaining // len(normal)) if remaining > 0 else 100
    for i in normal:
        record = records[i]
        other = int(_count(tokenizer, f"{record.question}\n{feedback_text(record)}") * COST_FACTOR)
        responses[i] = cut_middle(record.response, max(50, share - other), tokenizer)
    return responses


def build_reflection_prompt(
    current_template: str,
    records: list[FeedbackRecord],
    *,
    tokenizer: Tokenizer | None = None,
    token_budget: int | None = None,
) -> str:
    """GEPA's default meta-prompt with <curr_param> = the template and <side_info> = the records (gepa's formatter).

    token_budget: the tokens the prompt may take (reflection context − reflection max_tokens). With a tokenizer,
    the examples are fitted into token_budget − the meta-prompt's own tokens − a 500-token margin, and if the
    prompt is still longer than token_budget, examples are dropped from the end (at least one stays). Without
    either, every response is shown whole.
    """
    if tokenizer is None or token_budget is None:
        return _render(current_template, [_sample(r, r.response) for r in records])
    available = token_budget - _count(tokenizer, _render(current_template, [])) - PROMPT_MARGIN_TOKENS
    if available <= 0:  # the meta-prompt alone (a huge template) fills the context: one example, as the authors
        records = records[:1]
        samples = [_sample(r, r.response) for r in records]
    else:
        samples = [_sample(r, response) for r, response in zip(records, fit_responses(records, available, tokenizer))]
    prompt = _render(current_template, samples)
    while len(samples) > 1 and _count(tokenizer, prompt) > token_budget:
        samples = samples[:-1]
        prompt = _render(current_template, samples)
    return prompt


def parse_proposal(text: str) -> str | None:
    """The new template from the reflection model's answer, by gepa's own extractor (the text between the first
    and the last ``` fence, language tag dropped; the whole answer when it has no fences, as the authors' DSPy/GEPA
    stack does); None when nothing is left. Whether the text may be used is checked later (templates.py). Lone
    surrogates are replaced (io_utils.clean_text), whatever the propose callable gave: a tokenizer raises on them."""
    extracted = InstructionProposalSignature.output_extractor(clean_text(str(text)))["new_instruction"].strip()
    return extracted or None
