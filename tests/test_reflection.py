"""Reflection client against real local HTTP servers (scripted), and one real `vllm serve` of the tiny model."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from p2o_hpc.gepa.reflection_prompt import parse_proposal
from p2o_hpc.reflection import ReferenceServer, ReflectionClient, ReflectionConfig, ReflectionError

KEY_ENV = "P2O_TEST_REFLECTION_KEY"
FAKE_KEY = "sk-test-SECRET-0123456789abcdef"
CONF_DIR = Path(__file__).resolve().parents[1] / "conf" / "reflection"


def completion(text: str, prompt_tokens: int = 7, completion_tokens: int = 3) -> dict:
    return {
        "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }


class FakeEndpoint:
    """A real HTTP server on 127.0.0.1; `respond(body) -> (status, headers, json)` decides each reply (bytes in
    place of the json are sent as they are, as application/json unless the headers name a Content-Type)."""

    def __init__(self, respond, delay_s: float = 0.0):
        self.respond, self.delay_s = respond, delay_s
        self.requests: list[dict] = []
        self.auth_headers: list[str] = []
        self.in_flight = self.max_in_flight = 0
        self.release = threading.Event()  # set at teardown so sleeping handlers end
        self.lock = threading.Lock()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with endpoint.lock:
                    endpoint.requests.append(body)
                    endpoint.auth_headers.append(self.headers.get("Authorization", ""))
                    endpoint.in_flight += 1
                    endpoint.max_in_flight = max(endpoint.max_in_flight, endpoint.in_flight)
                try:
                    if endpoint.delay_s:
                        endpoint.release.wait(endpoint.delay_s)
                    status, headers, payload = endpoint.respond(body)
                finally:
                    with endpoint.lock:
                        endpoint.in_flight -= 1
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    for name, value in {"Content-Type": "application/json", **headers}.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client gave up (timeout test)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.block_on_close = False
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def endpoint():
    made = []

    def make(respond, delay_s=0.0):
        made.append(FakeEndpoint(respond, delay_s))
        return made[-1]

    yield make
    for e in made:
        e.close()


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, FAKE_KEY)
    return FAKE_KEY


def client_for(url: str, **kw) -> ReflectionClient:
    kw = {"backoff_initial_s": 0.01, "backoff_max_s": 0.05, "seed": 0, **kw}
    return ReflectionClient(url, "teacher-model", KEY_ENV, **kw)


def err(status, message="nope"):
    return status, {}, {"error": {"message": message, "type": "invalid_request_error", "code": None}}


def test_retries_429_then_500_then_succeeds(endpoint, key):
    script = iter([(429, {"Retry-After": "0"}, {"error": {"message": "slow down"}}), err(500),
                   (200, {}, completion("better prompt", 11, 5))])
    server = endpoint(lambda body: next(script))
    client = client_for(server.url, price_per_million_input=2.0, price_per_million_output=8.0)
    assert client.complete("improve this") == "better prompt"
    assert len(server.requests) == 3
    assert server.requests[0]["messages"] == [{"role": "user", "content": "improve this"}]
    assert server.auth_headers[0] == f"Bearer {FAKE_KEY}"  # the key from the env var is what is sent
    m = client.metrics()
    assert (m["reflection/requests"], m["reflection/successes"], m["reflection/failures"]) == (1, 1, 0)
    assert m["reflection/retries"] == 2
    assert (m["reflection/prompt_tokens"], m["reflection/completion_tokens"]) == (11, 5)
    assert m["reflection/cost_usd"] == pytest.approx((11 * 2.0 + 5 * 8.0) / 1e6)


def test_retry_after_is_honoured_and_capped(endpoint, key):
    script = iter([(429, {"Retry-After": "0.4"}, {}), (429, {"Retry-After": "3600"}, {}), (200, {}, completion("ok"))])
    server = endpoint(lambda body: next(script))
    client = client_for(server.url, backoff_max_s=0.6)
    start = time.monotonic()
    assert client.complete("p") == "ok"
    elapsed = time.monotonic() - start
    assert 0.95 <= elapsed < 3.0  # 0.4 s as asked, then 3600 s capped to 0.6 s
    assert len(server.requests) == 3


def test_retry_budget_exhausted_names_endpoint(endpoint, key):
    server = endpoint(lambda body: err(503, "overloaded"))
    client = client_for(server.url, max_retries=2)
    with pytest.raises(ReflectionError) as info:
        client.complete("p")
    message = str(info.value)
    assert server.url in message and "teacher-model" in message and "3 attempt" in message
    assert "503" in message and "retries exhausted" in message
    assert len(server.requests) == 3 and client.metrics()["reflection/failures"] == 1


def test_unresponsive_server_times_out_in_bounded_time(endpoint, key):
    server = endpoint(lambda body: (200, {}, completion("too late")), delay_s=30)
    client = client_for(server.url, timeout_s=0.5, max_retries=1)
    start = time.monotonic()
    with pytest.raises(ReflectionError, match="Timeout") as info:
        client.complete("p")
    assert time.monotonic() - start < 5
    assert info.value.attempts == 2 and client.metrics()["reflection/retries"] == 1


@pytest.mark.parametrize("status", [400, 401, 404])
def test_client_errors_fail_at_once_without_leaking_the_key(endpoint, key, caplog, status):
    # A server that echoes the key (as some do in 401 bodies) must not get it into our message either.
    server = endpoint(lambda body: err(status, f"Incorrect API key provided: {FAKE_KEY}"))
    caplog.set_level(logging.DEBUG)
    client = client_for(server.url, max_retries=5)
    start = time.monotonic()
    with pytest.raises(ReflectionError) as info:
        client.complete("p")
    assert time.monotonic() - start < 2
    assert len(server.requests) == 1 and client.metrics()["reflection/retries"] == 0
    message = str(info.value)
    assert server.url in message and "teacher-model" in message and str(status) in message
    assert info.value.status_code == status and info.value.__cause__ is None
    assert FAKE_KEY not in message and FAKE_KEY not in repr(client)
    assert caplog.records, "expected openai/httpx debug records to check"
    for record in caplog.records:
        assert FAKE_KEY not in record.getMessage() and FAKE_KEY not in str(record.args)


# 2xx replies that are not chat completions (what a proxy or gateway sends when it hiccups), and what the error says.
MALFORMED = {
    "malformed JSON": ((200, {}, b'{"choices": [{"index": 0, "message": '), "body is not JSON"),
    "text/plain": ((200, {"Content-Type": "text/plain"}, f"bad gateway (key {FAKE_KEY})".encode()),
                   "body is not a JSON object"),
    "empty body": ((200, {}, b""), "empty body"),
    "JSON null": ((200, {}, b"null"), "body is not a JSON object"),
    "choices empty": ((200, {}, {**completion("x"), "choices": []}), "choices empty"),
    "choices null": ((200, {}, {**completion("x"), "choices": None}), "choices null"),
    "no message": ((200, {}, {**completion("x"), "choices": [{"index": 0, "message": None}]}), "no message"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_reply_is_retried_like_a_5xx(endpoint, key, case):
    bad, _ = MALFORMED[case]
    script = iter([bad, (200, {}, completion("good", 11, 5))])
    server = endpoint(lambda body: next(script))
    client = client_for(server.url)
    assert client.complete("p") == "good"
    assert len(server.requests) == 2
    m = client.metrics()
    assert (m["reflection/requests"], m["reflection/successes"], m["reflection/failures"]) == (1, 1, 0)
    assert m["reflection/retries"] == 1
    assert (m["reflection/prompt_tokens"], m["reflection/completion_tokens"]) == (11, 5)


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_reply_fails_for_good_when_retries_run_out(endpoint, key, case):
    bad, what = MALFORMED[case]
    server = endpoint(lambda body: bad)
    client = client_for(server.url, max_retries=2)
    with pytest.raises(ReflectionError) as info:
        client.complete("p")
    message = str(info.value)
    assert server.url in message and "teacher-model" in message and "retries exhausted" in message
    assert "reply is not a chat completion" in message and what in message
    assert FAKE_KEY not in message and info.value.__cause__ is None
    assert len(server.requests) == 3 and info.value.attempts == 3
    m = client.metrics()
    assert (m["reflection/requests"], m["reflection/successes"], m["reflection/failures"]) == (1, 0, 1)
    assert m["reflection/retries"] == 2 and m["reflection/prompt_tokens"] == 0
    assert client.complete_many(["p", "q"])[1].attempts == 3  # complete_many isolates it as well
    m = client.metrics()
    assert (m["reflection/requests"], m["reflection/successes"], m["reflection/failures"]) == (3, 0, 3)


def test_lone_surrogate_in_reply_is_replaced(endpoint, key):
    """JSON may escape a lone surrogate; Python decodes it, and a tokenizer or a UTF-8 encoder then raises."""
    answer = "Better:\n```\nThink \ud800 step by step.\n```"
    server = endpoint(lambda body: (200, {}, completion(answer)))
    assert b"\\ud800" in json.dumps(completion(answer)).encode()  # on the wire as the JSON escape
    reply = client_for(server.url).complete("p")
    assert reply == answer.replace("\ud800", "\ufffd")
    reply.encode("utf-8")
    assert parse_proposal(reply) == parse_proposal(answer) == "Think \ufffd step by step."


def test_missing_key_for_teacher_names_the_variable(monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(ReflectionError, match=KEY_ENV):
        ReflectionClient("http://127.0.0.1:9/v1", "m", KEY_ENV)
    cfg = ReflectionConfig(kind="teacher", base_url="http://127.0.0.1:9/v1", model="m", api_key_env=KEY_ENV)
    with pytest.raises(ReflectionError, match=KEY_ENV):
        ReflectionClient.from_config(cfg)
    # A local `self` server needs no key: a dummy one is used.
    ReflectionClient.from_config(ReflectionConfig(kind="self", api_key_env=KEY_ENV), base_url=cfg.base_url, model="m")


def test_complete_many_bounded_ordered_and_isolates_failures(endpoint, key):
    def respond(body):
        prompt = body["messages"][0]["content"]
        return err(400, "bad prompt") if prompt == "FAIL" else (200, {}, completion(f"re:{prompt}", 4, 2))

    server = endpoint(respond, delay_s=0.2)
    client = client_for(server.url, max_concurrency=3)
    prompts = [f"p{i}" for i in range(10)]
    prompts[4] = "FAIL"
    results = client.complete_many(prompts)
    assert isinstance(results[4], ReflectionError) and "400" in str(results[4])
    assert [r for i, r in enumerate(results) if i != 4] == [f"re:{p}" for i, p in enumerate(prompts) if i != 4]
    assert 2 <= server.max_in_flight <= 3  # concurrent, but never above max_concurrency
    m = client.metrics()
    assert (m["reflection/requests"], m["reflection/successes"], m["reflection/failures"]) == (10, 9, 1)
    assert m["reflection/prompt_tokens"] == 36 and m["reflection/completion_tokens"] == 18


def test_chat_template_kwargs_travel_in_the_request_body(endpoint, key):
    """vLLM reads `chat_template_kwargs` from the request body; an empty dict sends no such field."""
    server = endpoint(lambda body: (200, {}, completion("ok")))
    client_for(server.url, chat_template_kwargs={"enable_thinking": False}).complete("p")
    client_for(server.url).complete("p")
    with_kwargs, without = server.requests
    assert with_kwargs["chat_template_kwargs"] == {"enable_thinking": False}
    assert "chat_template_kwargs" not in without and "enable_thinking" not in without
    assert with_kwargs["temperature"] == without["temperature"] == 0.6 and with_kwargs["max_tokens"] == 2048
    cfg = ReflectionConfig(kind="self", chat_template_kwargs={"enable_thinking": False})
    client = ReflectionClient.from_config(cfg, base_url=server.url, model="reference")
    client.complete("p")
    assert server.requests[-1]["chat_template_kwargs"] == {"enable_thinking": False}


def test_presets_compose_with_the_papers_reflection_settings(monkeypatch):
    from hydra import compose, initialize_config_dir

    from p2o_hpc.config import register_configs, to_run_config
    from p2o_hpc.config import reflection_prompt_budget

    monkeypatch.delenv("P2O_TEACHER_MODEL", raising=False)
    register_configs()
    with initialize_config_dir(str(CONF_DIR.parent), version_base="1.3"):
        own = to_run_config(compose("config", overrides=["reflection=self"]))
        teacher = to_run_config(compose("config", overrides=["reflection=teacher"]))
        smoke = to_run_config(compose("config", overrides=["reflection=self", "experiment=smoke"]))
    assert own.reflection.chat_template_kwargs == own.data.chat_template_kwargs == {"enable_thinking": False}
    assert teacher.reflection.chat_template_kwargs == {}
    assert teacher.reflection.model == "moonshotai/Kimi-K2-Instruct-0905"
    for cfg in (own, teacher):
        assert (cfg.reflection.temperature, cfg.reflection.max_tokens) == (0.6, 2048)
        assert reflection_prompt_budget(cfg.reflection) == 32768 - 2048  # the authors' ~30k
    assert own.reflection.serve_max_model_len == 32768
    assert reflection_prompt_budget(smoke.reflection) == 2048 - smoke.reflection.max_tokens  # the tiny model's


@pytest.mark.parametrize("name", ["self", "teacher", "none"])
def test_each_yaml_group_names_its_kind(name):
    """The groups state only what differs from the schema (tests/test_config_schema.py); each picks its kind."""
    merged = OmegaConf.merge(OmegaConf.structured(ReflectionConfig), OmegaConf.load(CONF_DIR / f"{name}.yaml"))
    assert merged.kind == name


def _port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) == 0


# Qwen3's non-thinking switch, for a tiny model whose chat template lacks it (the real server test below).
NON_THINKING_CLAUSE = (
    "{%- if add_generation_prompt and enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
)


@pytest.mark.vllm
def test_real_vllm_serve_reference_model(tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.delenv(KEY_ENV, raising=False)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = "Rewrite this instruction: think step by step."
    messages = [{"role": "user", "content": prompt}]
    chat_template, extra_args = tokenizer.chat_template, []
    if tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) == \
            tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, enable_thinking=False):
        chat_template += NON_THINKING_CLAUSE  # a template without Qwen3's switch: add it, and serve with it
        (tmp_path / "chat_template.jinja").write_text(chat_template)
        extra_args = ["--chat-template", str(tmp_path / "chat_template.jinja")]
    server = ReferenceServer(tiny_model_dir, log_dir=tmp_path, served_model_name="reference", start_timeout_s=300,
                             extra_args=extra_args)
    try:
        server.start()
        pgid, port = server.pgid, server.port
        assert server.base_url == f"http://127.0.0.1:{port}/v1"
        client = ReflectionClient(server.base_url, "reference", KEY_ENV, require_key=False,
                                  max_tokens=16, timeout_s=120, max_retries=1)
        reply = client.complete(prompt)
        assert isinstance(reply, str) and reply
        m = client.metrics()
        assert m["reflection/successes"] == 1 and m["reflection/prompt_tokens"] > 0
        assert 0 < m["reflection/completion_tokens"] <= 16
        # `self` reflection as configured: vLLM renders the prompt in Qwen3's non-thinking form
        cfg = ReflectionConfig(kind="self", api_key_env=KEY_ENV, max_tokens=16,
                               chat_template_kwargs={"enable_thinking": False})
        non_thinking = ReflectionClient.from_config(cfg, base_url=server.base_url, model="reference")
        non_thinking.complete(prompt)
        expected = tokenizer.apply_chat_template(messages, chat_template=chat_template, add_generation_prompt=True,
                                                 tokenize=False, enable_thinking=False)
        assert expected.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        rendered_tokens = non_thinking.metrics()["reflection/prompt_tokens"]
        assert rendered_tokens == len(tokenizer.encode(expected, add_special_tokens=False))
        assert rendered_tokens > m["reflection/prompt_tokens"]  # the plain request has no empty think block
    finally:
        server.stop()
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)
    assert not _port_open(port)
    server.stop()  # idempotent
    assert (tmp_path / "vllm_serve.log").stat().st_size > 0
