"""Strict binary verifiable reward for math answers, graded by math-verify in worker processes.

Why strict: P²O (like its GRPO baseline) trains on a 0/1 reward: 1.0 only when the response's final
``\\boxed{...}`` answer is mathematically equal to the ground truth. Only the content of the LAST box is graded,
so numbers or partial answers elsewhere in the text never earn reward, and a response without a complete final
box earns 0.

Why processes: math-verify bounds its sympy work with ``signal.alarm``, which only works in a process's main
thread, and some inputs (huge powers, pathological LaTeX) can still stall in C code where no alarm fires.
So grading runs in long-lived worker processes (spawned, never forked: the caller may hold torch threads or
distributed state); the parent enforces a per-item deadline, and a worker that misses it or dies is killed and
replaced while the item scores 0.0. The caller never hangs and never sees an exception from bad responses.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import math
import multiprocessing
import pickle
import re
import signal
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait

MAX_BOXED_CHARS = 1000  # longer final answers are treated as garbage: 0.0 without calling math-verify
PARSE_TIMEOUT_S = 2  # math-verify's own (alarm-based, whole seconds) limits inside a worker
VERIFY_TIMEOUT_S = 2

_BOXED_OPENERS = ("\\boxed{", "\\boxed {")
_BRACE_TOKEN_RE = re.compile(r"\\.|[{}]", re.DOTALL)  # an escaped character (\{, \}, \\, ...) or a brace


def extract_last_boxed(text: str, max_chars: int | None = None) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\boxed {...}``) in ``text``, or None.

    None when there is no box, when the last box is not closed by a balanced ``}``, or when its content is longer
    than ``max_chars``. Escaped braces (``\\{``, ``\\}``) are literal characters and do not count for balance.
    """
    if not isinstance(text, str):
        return None
    start = -1
    for opener in _BOXED_OPENERS:
        position = text.rfind(opener)
        if position >= 0:
            start = max(start, position + len(opener))
    if start < 0:
        return None
    end_limit = len(text) if max_chars is None else min(len(text), start + max_chars + 1)
    depth = 1
    for token in _BRACE_TOKEN_RE.finditer(text, start, end_limit):
        brace = token.group()
        if brace == "{":
            depth += 1
        elif brace == "}":
            depth -= 1
            if depth == 0:
                return text[start : token.start()]
    return None


@functools.cache
def _latex_config() -> list:
    from math_verify import LatexExtractionConfig

    return [LatexExtractionConfig(boxed_match_priority=0)]


@functools.lru_cache(maxsize=4096)
def _parse_ground_truth(ground_truth: str) -> list:
    """Ground truths repeat across a batch (several samples per prompt), so each worker parses each once."""
    from math_verify import parse

    return parse("\\boxed{" + ground_truth + "}", extraction_config=_latex_config(), parsing_timeout=PARSE_TIMEOUT_S)


def strict_boxed_reward(response: str, ground_truth: str) -> float:
    """1.0 iff the last ``\\boxed{...}`` of ``response`` is math-verify-equal to ``ground_truth``; else 0.0.

    Uses math-verify's alarm-based timeouts, so call it in a process's main thread (RewardPool workers do).
    """
    from math_verify import parse, verify

    if not isinstance(response, str) or not isinstance(ground_truth, str) or not ground_truth.strip():
        return 0.0
    answer = extract_last_boxed(response, max_chars=MAX_BOXED_CHARS)
    if answer is None or not answer.strip():
        return 0.0
    gold = _parse_ground_truth(ground_truth)
    if not gold:
        return 0.0
    predicted = parse("\\boxed{" + answer + "}", extraction_config=_latex_config(), parsing_timeout=PARSE_TIMEOUT_S)
    if not predicted:
        return 0.0
    return 1.0 if verify(gold, predicted, timeout_seconds=VERIFY_TIMEOUT_S) else 0.0


def _worker_main(connection: Connection, grader: Callable[[str, str], float]) -> None:
    """Worker loop: receive pickled (index, response, ground_truth), reply (index, reward); None means stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it closes the pool
    for noisy in ("math_verify", "latex2sympy2_extended"):
        logging.getLogger(noisy).setLevel(logging.ERROR)  # timeouts would log whole (possibly huge) inputs
    # Pay math-verify's import and lazy set-up (regexes, LaTeX parser: ~1 s) before "ready", not against the
    # first item's deadline. Custom graders usually wrap the default one, so this is done for them too.
    strict_boxed_reward("\\boxed{1}", "1")
    try:
        connection.send(("ready",))
    except OSError:
        return
    while True:
        try:
            message = connection.recv_bytes()
        except (EOFError, OSError):
            return  # parent is gone
        task = pickle.loads(message)
        if task is None:
            return
        index, response, ground_truth = task
        try:
            reward = float(grader(response, ground_truth))
            if not math.isfinite(reward):
                reward = 0.0
        except Exception:
            reward = 0.0
        try:
            connection.send((index, reward))
        except OSError:
            return


@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    connection: Connection
    started_at: float
    ready: bool = False
    in_flight: collections.deque = field(default_factory=collections.deque)  # (index, message bytes), oldest first
    head_started_at: float = 0.0  # when the oldest in-flight item began (previous reply or dispatch)
    exitcode: int | None = None  # set once killed and reaped

    @property
    def in_flight_bytes(self) -> int:
        return sum(size for _, size in self.in_flight)


def _kill_workers(workers: list[_Worker]) -> None:
    for worker in workers:
        with contextlib.suppress(ValueError):  # ValueError: this process object was already closed
            if worker.process.is_alive():
                worker.process.kill()
    for worker in workers:
        with contextlib.suppress(ValueError):
            worker.process.join(timeout=5)
            worker.exitcode = worker.process.exitcode
            if worker.exitcode is not None:
                worker.process.close()  # frees its sentinel fd now, not at garbage collection
        worker.connection.close()


class RewardPool:
    """Long-lived grading processes with a per-item timeout; ``score`` never hangs and never raises on bad input.

    Items are sent one per message but pipelined (up to ``MAX_IN_FLIGHT`` per worker, and only as many bytes as
    the socket buffer holds without blocking), so workers never wait for the parent. An item's clock starts when
    its worker reaches it: at the previous item's reply, or at dispatch to an idle worker. An item that exceeds
    ``timeout_s`` or whose worker dies scores 0.0; the worker is killed and replaced and its queued items are
    dispatched again.
    """

    MAX_IN_FLIGHT = 4
    PIPELINE_BYTES = 32 * 1024  # unread bytes kept below this so send() never blocks on a busy worker
    STARTUP_TIMEOUT_S = 120.0
    MAX_STARTUP_FAILURES = 3

    def __init__(
        self,
        num_workers: int,
        timeout_s: float = 5.0,
        grader: Callable[[str, str], float] = strict_boxed_reward,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        pickle.dumps(grader)  # fail here, not in a worker, when the grader is not a module-level callable
        self.timeout_s = float(timeout_s)
        self.grader = grader
        self._context = multiprocessing.get_context("spawn")
        self._startup_failures = 0
        self.workers_replaced = 0  # workers killed after a timeout or found dead (for logs and tests)
        self._workers: list[_Worker] = [self._start_worker() for _ in range(num_workers)]
        self._finalizer = weakref.finalize(self, _kill_workers, self._workers)

    def _start_worker(self) -> _Worker:
        parent_end, child_end = self._context.Pipe(duplex=True)
        process = self._context.Process(
            target=_worker_main, args=(child_end, self.grader), name="p2o-reward-worker", daemon=True
        )
        process.start()
        child_end.close()  # so the parent sees EOF when the worker dies
        return _Worker(process=process, connection=parent_end, started_at=time.monotonic())

    def _replace(self, slot: int, pending: collections.deque | None, rewards: list | None) -> None:
        """Kill worker ``slot``; its running item scores 0.0, its queued items go back to the front of pending."""
        worker = self._workers[slot]
        _kill_workers([worker])
        if worker.in_flight and rewards is not None and pending is not None:
            running_index, _ = worker.in_flight.popleft()
            rewards[running_index] = 0.0
            pending.extendleft(reversed([index for index, _ in worker.in_flight]))
        if not worker.ready:
            self._startup_failures += 1
            if self._startup_failures >= self.MAX_STARTUP_FAILURES:
                self._finalizer()  # kill the rest; the pool is closed
                raise RuntimeError(
                    f"reward workers failed to start {self._startup_failures} times in a row "
                    f"(last exit code {worker.exitcode}); their stderr says why"
                )
        else:
            self.workers_replaced += 1
        self._workers[slot] = self._start_worker()

    def score(self, responses: Sequence[str], ground_truths: Sequence[str]) -> list[float]:
        """Rewards in input order; 0.0 for timeouts, worker crashes, non-str items and anything the grader rejects."""
        if len(responses) != len(ground_truths):
            raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
        if not self._finalizer.alive:
            raise RuntimeError("RewardPool is closed")
        for slot, worker in enumerate(self._workers):
            if worker.in_flight:  # left over from a call that was interrupted (e.g. KeyboardInterrupt)
                self._replace(slot, pending=None, rewards=None)
        rewards: list[float | None] = [None] * len(responses)
        messages: dict[int, bytes] = {}
        pending: collections.deque[int] = collections.deque()
        for index, (response, ground_truth) in enumerate(zip(responses, ground_truths)):
            if isinstance(response, str) and isinstance(ground_truth, str):
                messages[index] = pickle.dumps((index, response, ground_truth), protocol=pickle.HIGHEST_PROTOCOL)
                pending.append(index)
            else:
                rewards[index] = 0.0
        remaining = len(pending)

        while remaining:
            now = time.monotonic()
            for slot, worker in enumerate(self._workers):
                while worker.ready and pending and len(worker.in_flight) < self.MAX_IN_FLIGHT:
                    index = pending[0]
                    size = len(messages[index])
                    if worker.in_flight and worker.in_flight_bytes + size > self.PIPELINE_BYTES:
                        break
                    try:
                        worker.connection.send_bytes(messages[index])
                    except OSError:  # died since the last look; the wait below reports it
                        break
                    pending.popleft()
                    if not worker.in_flight:
                        worker.head_started_at = time.monotonic()
                    worker.in_flight.append((index, size))

            deadlines = [
                (w.head_started_at + self.timeout_s) if w.ready else (w.started_at + self.STARTUP_TIMEOUT_S)
                for w in self._workers
                if w.in_flight or not w.ready
            ]
            wait_s = max(0.0, min(deadlines) - now) if deadlines else None
            watched = [w.connection for w in self._workers] + [w.process.sentinel for w in self._workers]
            signalled = set(wait(watched, timeout=wait_s))

            for slot, worker in enumerate(self._workers):
                died = False
                if worker.connection in signalled or worker.process.sentinel in signalled:
                    try:
                        while worker.connection.poll():
                            reply = worker.connection.recv()
                            if reply == ("ready",):
                                worker.ready, self._startup_failures = True, 0
                                continue
                            index, reward = reply
                            if not worker.in_flight or worker.in_flight[0][0] != index:
                                raise EOFError(f"out-of-order reply {index}")  # cannot happen; treat as death
                            worker.in_flight.popleft()
                            worker.head_started_at = time.monotonic()
                            rewards[index] = reward
                            remaining -= 1
                    except (EOFError, OSError):
                        died = True
                    died = died or not worker.process.is_alive()
                now = time.monotonic()
                timed_out = (worker.ready and worker.in_flight and now > worker.head_started_at + self.timeout_s) or (
                    not worker.ready and now > worker.started_at + self.STARTUP_TIMEOUT_S
                )
                if timed_out and not died and worker.connection.poll():
                    continue  # a reply (or EOF) arrived since wait() returned: read it before judging
                if died or timed_out:
                    if worker.ready and worker.in_flight:
                        remaining -= 1  # its running item is settled as 0.0
                    self._replace(slot, pending, rewards)

        return [float(reward) for reward in rewards]

    def close(self) -> None:
        """Stop the workers (politely, then by force). Idempotent."""
        if not self._finalizer.alive:
            return
        stop = pickle.dumps(None)
        for worker in self._workers:
            try:
                if not worker.in_flight:
                    worker.connection.send_bytes(stop)
            except OSError:
                pass
        deadline = time.monotonic() + 2.0
        for worker in self._workers:
            worker.process.join(timeout=max(0.0, deadline - time.monotonic()))
        self._finalizer()  # kills whatever is left and closes the pipes

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
