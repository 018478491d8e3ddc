"""Prompt templates: the paper's user turn, chat-template rendering and token ids for the generators.

Templates use a literal `{problem}` placeholder filled with `str.replace`, not `str.format`: math
templates contain real braces (`\\boxed{}`), and P²O evolves templates at run time, so any other brace
a mutation introduces must pass through untouched. The problem text is inserted once and never
re-scanned, so a problem that itself contains "{problem}" is left as written.
"""

from __future__ import annotations

from typing import Any

from p2o_hpc.data.evolved_templates import apply_template

PLACEHOLDER = "{problem}"

# The paper's user turn (no system message). The output contains a real "\boxed{}".
PAPER_TEMPLATE = "Let's think step by step and output the final answer within \\boxed{}.\nQuestion: {problem}"


class TemplateError(ValueError):
    """A prompt template that cannot be filled (e.g. an evolved template lost its placeholder)."""


def validate_template(template: str) -> str:
    """The template itself, or a TemplateError when it is not a string containing "{problem}"."""
    if not isinstance(template, str):
        raise TemplateError(f"prompt template must be a string, got {type(template).__name__}")
    if PLACEHOLDER not in template:
        raise TemplateError(f"prompt template has no {PLACEHOLDER} placeholder: {template[:200]!r}")
    return template


def render_user_turn(problem: str, template: str = PAPER_TEMPLATE) -> str:
    """The user message: every "{problem}" in the template replaced by the problem text."""
    return validate_template(template).replace(PLACEHOLDER, problem)


def render_prompt(
    tokenizer: Any,
    problem: str,
    template: str = PAPER_TEMPLATE,
    *,
    system: str | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
    p2o_template: str = "",
) -> str:
    """The full prompt text: one user message (optionally after a system message) through the tokenizer's
    chat template, ending with the assistant generation prompt. `p2o_template` is an evolved P²O template,
    put in front of the user turn (p2o_hpc.data.evolved_templates.apply_template); "" is the original prompt.

    chat_template_kwargs go to the template (e.g. {"enable_thinking": False} for Qwen3); templates that do
    not use a variable ignore it, so nothing is passed by default and the model's default behaviour holds.
    """
    messages = [{"role": "system", "content": system}] if system is not None else []
    messages.append({"role": "user", "content": apply_template(render_user_turn(problem, template), p2o_template)})
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(f"tokenizer {getattr(tokenizer, 'name_or_path', tokenizer)!r} has no chat template")
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, **(chat_template_kwargs or {})
    )


def encode_prompt(
    tokenizer: Any,
    problem: str,
    template: str = PAPER_TEMPLATE,
    *,
    system: str | None = None,
    chat_template_kwargs: dict[str, Any] | None = None,
    p2o_template: str = "",
) -> list[int]:
    """Token ids of render_prompt(...). add_special_tokens=False: the chat template already holds every
    special token, so a tokenizer that adds BOS would otherwise double it."""
    text = render_prompt(tokenizer, problem, template, system=system, chat_template_kwargs=chat_template_kwargs,
                         p2o_template=p2o_template)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
