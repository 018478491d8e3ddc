"""Evolved templates in prompts: T(x, z) = z + "\\n\\n" + x inside the user turn (as the authors' code does).

The empty template ε is the original prompt. A template comes from an LLM's reflection, so it is checked before
it reaches the policy: an empty one, one over the token budget, or one carrying the chat template's special
tokens (which would forge turns or end the prompt early) is refused with the reason.
"""

from __future__ import annotations

from typing import Any

SEPARATOR = "\n\n"


class TemplateRejected(ValueError):
    """An evolved template that must not be sent to the model; the message says why."""


def apply_template(user_turn: str, template: str) -> str:
    """The user message with `template` in front of it; ε ("") leaves it as it is."""
    return template + SEPARATOR + user_turn if template else user_turn


def special_token_texts(tokenizer: Any) -> list[str]:
    """Texts of the tokenizer's special tokens (<|im_start|>, <|im_end|>, ...), which no template may contain."""
    texts = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for token in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values():
        if getattr(token, "special", False):
            texts.add(token.content)
    return sorted(text for text in texts if text)


def rejection_reason(template: str, tokenizer: Any, max_tokens: int) -> str | None:
    """None when `template` may be used (ε always may), else why not."""
    if template == "":
        return None
    if not isinstance(template, str):
        return f"not a string ({type(template).__name__})"
    if not template.strip():
        return "empty (whitespace only)"
    forged = [text for text in special_token_texts(tokenizer) if text in template]
    if forged:
        return f"contains the chat template's special tokens {forged}"
    try:
        length = len(tokenizer(template, add_special_tokens=False)["input_ids"])
    except (TypeError, ValueError, UnicodeError) as error:  # e.g. a lone surrogate the exchange did not clean
        return f"not tokenizable ({type(error).__name__}: {str(error)[:80]})"
    if length > max_tokens:
        return f"{length} tokens > the template budget of {max_tokens}"
    return None


def check_template(template: str, tokenizer: Any, max_tokens: int) -> str:
    """`template` itself, or TemplateRejected naming the reason and the template's start."""
    reason = rejection_reason(template, tokenizer, max_tokens)
    if reason is not None:
        raise TemplateRejected(f"template rejected: {reason}: {str(template)[:120]!r}")
    return template
