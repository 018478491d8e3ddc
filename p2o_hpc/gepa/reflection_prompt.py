"""The reflection request (GEPA's meta-prompt filled with a template's minibatch results) and parsing its answer.

The meta-prompt text and the side-info formatter come from the installed `gepa` package, so we follow upstream
GEPA instead of carrying a copy that drifts.
"""

from __future__ import annotations

from dataclasses import dataclass

from gepa.strategies.instruction_proposal import InstructionProposalSignature

EMPTY_TEMPLATE_SHOWN = "(no instructions: the assistant was given the question alone)"
TRUNCATION_MARK = "[... truncated] "


@dataclass
class FeedbackRecord:
    question: str
    response: str
    ground_truth: str
    score: float


def truncate_response(response: str, max_chars: int) -> str:
    """Keep the END of a long response: that is where the final answer (and usually the mistake) is."""
    if max_chars <= 0 or len(response) <= max_chars:
        return response
    return TRUNCATION_MARK + response[-max_chars:]


def feedback_text(record: FeedbackRecord) -> str:
    verdict = "correct" if record.score >= 1.0 - 1e-9 else "incorrect"
    return f"The response is {verdict} (score {record.score:g}). The correct answer is: {record.ground_truth}"


def build_reflection_prompt(current_template: str, records: list[FeedbackRecord], max_response_chars: int) -> str:
    """GEPA's default meta-prompt with <curr_param> = the template and <side_info> = the records (gepa's formatter)."""
    samples = [
        {
            "Inputs": record.question,
            "Generated Outputs": truncate_response(record.response, max_response_chars),
            "Feedback": feedback_text(record),
        }
        for record in records
    ]
    shown = current_template if current_template.strip() else EMPTY_TEMPLATE_SHOWN
    prompt = InstructionProposalSignature.prompt_renderer(
        {"current_instruction_doc": shown, "dataset_with_feedback": samples}
    )
    assert isinstance(prompt, str)  # a list only comes back for image inputs
    return prompt


def parse_proposal(text: str) -> str | None:
    """The new template from the reflection model's answer, by gepa's own extractor (the text between the first
    and the last ``` fence, language tag dropped; the whole answer when it has no fences, as the authors' DSPy/GEPA
    stack does); None when nothing is left. Whether the text may be used is checked later (templates.py)."""
    extracted = InstructionProposalSignature.output_extractor(str(text))["new_instruction"].strip()
    return extracted or None
