"""A small, thread-safe client for the reflection LLM behind any OpenAI-compatible endpoint.

Retries are our own loop (the openai client runs with max_retries=0): its built-in loop has a fixed 0.5 s
initial / 8 s maximum backoff, an unseeded jitter source, and does not report how many retries it took,
which the cost/latency tally needs. A 2xx reply that is not a chat completion (what a proxy or gateway sends
when it hiccups) is retried like a 5xx, and the reply text is cleaned of lone surrogates (io_utils.clean_text)
before a tokenizer sees it. The API key is only handed to `openai.OpenAI`; it never appears in
`repr`, log records or error messages (any echo of it in a server's error body is redacted).
"""

from __future__ import annotations

import email.utils
import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import openai
from openai.types.chat import ChatCompletion

from p2o_hpc.io_utils import clean_text

log = logging.getLogger(__name__)

DUMMY_KEY = "EMPTY"  # local vLLM servers accept any key
_MAX_ERROR_CHARS = 500
_BODY_CHARS = 200


class ReflectionError(RuntimeError):
    """A reflection request failed for good (non-retryable error, or the retry budget was spent)."""

    def __init__(self, message: str, *, status_code: Optional[int] = None, attempts: int = 0):
        super().__init__(message)
        self.status_code = status_code
        self.attempts = attempts


class ReflectionClient:
    """Chat completions with one user message, bounded concurrency, backoff retries and a usage tally."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key_env: Optional[str] = "OPENAI_API_KEY",
        *,
        require_key: bool = True,
        max_concurrency: int = 8,
        timeout_s: float = 300.0,
        max_retries: int = 5,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 60.0,
        temperature: float = 0.6,
        max_tokens: int = 2048,
        chat_template_kwargs: Optional[dict] = None,
        price_per_million_input: float = 0.0,
        price_per_million_output: float = 0.0,
        seed: Optional[int] = None,
    ):
        key = os.environ.get(api_key_env) if api_key_env else None
        if not key:
            if require_key:
                where = f"the environment variable {api_key_env!r}" if api_key_env else "api_key_env"
                raise ReflectionError(f"reflection endpoint {base_url} (model {model}) needs an API key: set {where}")
            key = DUMMY_KEY
        self.base_url, self.model = base_url, model
        self.api_key_env = api_key_env
        self.max_concurrency = max(1, int(max_concurrency))
        self.max_retries = max(0, int(max_retries))
        self.backoff_initial_s, self.backoff_max_s = backoff_initial_s, backoff_max_s
        self.temperature, self.max_tokens = temperature, max_tokens
        # vLLM's request field for the chat template's variables (e.g. enable_thinking=False for Qwen3); sent only
        # when non-empty, since a strict remote API may refuse an unknown field.
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.price_in, self.price_out = price_per_million_input, price_per_million_output
        self._secret = key if key != DUMMY_KEY else None  # only for redaction
        self._openai = openai.OpenAI(base_url=base_url, api_key=key, timeout=timeout_s, max_retries=0)
        self._slots = threading.BoundedSemaphore(self.max_concurrency)
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._tally = dict.fromkeys(
            ("requests", "successes", "failures", "retries", "prompt_tokens", "completion_tokens"), 0
        )

    @classmethod
    def from_config(cls, cfg, *, base_url: Optional[str] = None, model: Optional[str] = None, **kw):
        """From a ReflectionConfig; for kind=self pass the local server's base_url and served model name."""
        if cfg.kind not in ("self", "teacher"):
            raise ValueError(f"reflection kind {cfg.kind!r} has no client (expected 'self' or 'teacher')")
        base_url, model = base_url or cfg.base_url, model or cfg.model
        if not base_url or not model:
            raise ValueError(f"reflection kind {cfg.kind!r} needs base_url and model (got {base_url!r}, {model!r})")
        return cls(
            base_url, model, cfg.api_key_env, require_key=cfg.kind == "teacher",
            max_concurrency=cfg.max_concurrency, timeout_s=cfg.timeout_s, max_retries=cfg.max_retries,
            backoff_initial_s=cfg.backoff_initial_s, backoff_max_s=cfg.backoff_max_s,
            temperature=cfg.temperature, max_tokens=cfg.max_tokens,
            chat_template_kwargs=dict(cfg.chat_template_kwargs or {}),
            price_per_million_input=cfg.price_per_million_input,
            price_per_million_output=cfg.price_per_million_output, **kw,
        )

    def __repr__(self) -> str:
        return (f"ReflectionClient(base_url={self.base_url!r}, model={self.model!r}, "
                f"api_key_env={self.api_key_env!r}, max_concurrency={self.max_concurrency})")

    # -- requests -------------------------------------------------------------------------------------------

    @property
    def _extra_body(self) -> Optional[dict]:
        return {"chat_template_kwargs": self.chat_template_kwargs} if self.chat_template_kwargs else None

    def complete(self, prompt: str) -> str:
        """One prompt → the reply text; raises ReflectionError when it fails for good."""
        self._add(requests=1)
        succeeded = False
        try:  # whatever ends this call (ours or not), it counts once: requests == successes + failures
            text, usage = self._attempts(prompt)
            succeeded = True
        finally:
            if not succeeded:
                self._add(failures=1)
        self._add(successes=1, prompt_tokens=_tokens(usage, "prompt_tokens"),
                  completion_tokens=_tokens(usage, "completion_tokens"))
        return text

    def _attempts(self, prompt: str) -> tuple[str, object]:
        attempts = 0
        while True:
            attempts += 1
            try:
                with self._slots:
                    raw = self._openai.chat.completions.with_raw_response.create(
                        model=self.model,
                        messages=[{"role": "user", "content": prompt}],
                        temperature=self.temperature,
                        max_tokens=self.max_tokens,
                        extra_body=self._extra_body,
                    )
                return _reply(raw)
            except openai.APIStatusError as err:  # the server answered with an error status
                status, error = err.status_code, err
                retryable = status in (408, 429) or status >= 500
                hint = _retry_after(err.response.headers)
            except openai.APIConnectionError as err:  # includes APITimeoutError
                status, error, retryable, hint = None, err, True, None
            except MalformedReply as err:  # a proxy/gateway hiccup, like a 5xx
                status, error, retryable, hint = None, err, True, None
            except openai.OpenAIError as err:
                status, error, retryable, hint = None, err, False, None
            if not retryable or attempts > self.max_retries:
                why = "non-retryable error" if not retryable else "retries exhausted"
                raise ReflectionError(
                    f"reflection request to {self.base_url} (model {self.model}) failed after {attempts} "
                    f"attempt(s), {why}; last error: {self._describe(error)}",
                    status_code=status, attempts=attempts,
                ) from None  # the openai exception holds the request (with its auth header): don't chain it
            delay = self._delay(attempts, hint)
            log.warning("reflection request to %s (model %s) failed (%s), retry %d/%d in %.2f s",
                        self.base_url, self.model, status or type(error).__name__, attempts,
                        self.max_retries, delay)
            self._add(retries=1)
            time.sleep(delay)

    def complete_many(self, prompts: list[str]) -> list[str | ReflectionError]:
        """Replies in input order; a failed prompt yields its ReflectionError instead of losing the others."""

        def one(prompt: str) -> str | ReflectionError:
            try:
                return self.complete(prompt)
            except ReflectionError as err:
                return err

        if not prompts:
            return []
        with ThreadPoolExecutor(min(len(prompts), self.max_concurrency), "reflection") as pool:
            return list(pool.map(one, prompts))

    # -- tally ----------------------------------------------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        """The running tally under `reflection/...` keys, with the estimated cost in USD."""
        with self._lock:
            tally = dict(self._tally)
        cost = (tally["prompt_tokens"] * self.price_in + tally["completion_tokens"] * self.price_out) / 1e6
        return {**{f"reflection/{k}": v for k, v in tally.items()}, "reflection/cost_usd": cost}

    def close(self) -> None:
        self._openai.close()

    def __enter__(self) -> "ReflectionClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- helpers --------------------------------------------------------------------------------------------

    def _add(self, **counts: int) -> None:
        with self._lock:
            for key, value in counts.items():
                self._tally[key] += value

    def _delay(self, attempt: int, hint: Optional[float]) -> float:
        """Retry-After when the server gave one, else exponential backoff with jitter; capped either way."""
        if hint is not None:
            return min(max(hint, 0.0), self.backoff_max_s)
        base = min(self.backoff_initial_s * 2 ** (attempt - 1), self.backoff_max_s)
        with self._lock:
            return base * (0.5 + 0.5 * self._rng.random())

    def _describe(self, error: Exception) -> str:
        text = f"{type(error).__name__}: {error}"
        if self._secret:
            text = text.replace(self._secret, "***")
        return text[:_MAX_ERROR_CHARS]


class MalformedReply(ValueError):
    """A 2xx reply that is not a chat completion (bad or no JSON, a text or HTML page, no choices): typically a
    proxy or gateway hiccup, so it is retried like a 5xx."""


def _reply(raw) -> tuple[str, object]:
    """(text, usage) of a raw chat-completion reply; MalformedReply for anything else. The SDK does not check the
    shape: it raises on bad JSON, returns a str for a non-JSON body and lets `choices` be null or empty."""
    body = raw.http_response.text
    where = f"HTTP {raw.status_code}, {raw.headers.get('content-type') or 'no content-type'}"

    def malformed(why: str) -> MalformedReply:
        return MalformedReply(f"reply is not a chat completion ({where}): {why}")

    if not body.strip():
        raise malformed("empty body")
    try:
        response = raw.parse()
    except (ValueError, TypeError, AttributeError, openai.APIResponseValidationError) as err:
        raise malformed(f"body is not JSON ({type(err).__name__}: {err}), starts {body[:_BODY_CHARS]!r}") from None
    if not isinstance(response, ChatCompletion):
        raise malformed(f"body is not a JSON object, starts {body[:_BODY_CHARS]!r}")
    choices = getattr(response, "choices", None)
    if choices is None:
        raise malformed("choices null or missing")
    if not isinstance(choices, list):
        raise malformed(f"choices is a {type(choices).__name__}, not a list")
    if not choices:
        raise malformed("choices empty")
    message = getattr(choices[0], "message", None)
    if message is None:
        raise malformed("choices[0] has no message")
    content = getattr(message, "content", None)
    if content is not None and not isinstance(content, str):
        raise malformed(f"message content is a {type(content).__name__}, not a string")
    return clean_text(content or ""), getattr(response, "usage", None)


def _tokens(usage, name: str) -> int:
    count = getattr(usage, name, None)
    return count if isinstance(count, int) and not isinstance(count, bool) and count >= 0 else 0


def _retry_after(headers) -> Optional[float]:
    """Seconds from `retry-after-ms` / `Retry-After` (seconds or an HTTP date), None when absent or bad."""
    if headers is None:
        return None
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return float(ms) / 1000
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        parsed = email.utils.parsedate_tz(value)
        return None if parsed is None else float(email.utils.mktime_tz(parsed) - time.time())
