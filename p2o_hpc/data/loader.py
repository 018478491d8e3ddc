"""Deterministic, resumable batches of problems for the RL loop.

A resumed run must see exactly the batches the interrupted run would have seen, or resume-vs-uninterrupted
comparisons and reported curves stop meaning anything. So the order is a pure function of (seed, epoch):
epoch e is the permutation produced by random.Random(seed + e), and the whole state is (epoch, position).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Sequence
from typing import Any

from p2o_hpc.data.datasets import Problem


class PromptLoader:
    """Endless batches over `problems`, one shuffled epoch after another.

    position counts batches already served in the current epoch. The epoch rolls over eagerly: after the
    batch that finishes epoch e, `epoch` is e + 1, `position` is 0 and `epoch_finished` is True (it says
    whether the *last* next_batch() call ended an epoch). drop_last=True drops the len % batch_size tail
    of each epoch (a different tail each epoch); drop_last=False serves it as a short final batch.
    """

    def __init__(self, problems: Sequence[Problem], batch_size: int, *, seed: int, drop_last: bool = True):
        if not problems:
            raise ValueError("PromptLoader needs at least one problem")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if batch_size > len(problems):
            raise ValueError(f"batch_size {batch_size} is larger than the dataset ({len(problems)} problems)")
        self._problems = tuple(problems)
        self._batch_size = batch_size
        self._seed = int(seed)
        self._drop_last = bool(drop_last)
        self._epoch = 0
        self._position = 0
        self._epoch_finished = False
        self._perm_epoch: int | None = None
        self._perm: list[int] = []
        self._fingerprint = _fingerprint(self._problems)
        self._deferred: dict | None = None  # {"epoch", "from_position", "ids"}: see defer()

    @property
    def epoch(self) -> int:
        """Epoch the next batch comes from."""
        return self._epoch

    @property
    def position(self) -> int:
        """Batches already served in the current epoch."""
        return self._position

    @property
    def steps_per_epoch(self) -> int:
        n, b = len(self._problems), self._batch_size
        return n // b if self._drop_last else -(-n // b)

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def problem_ids(self) -> frozenset[str]:
        return frozenset(problem.id for problem in self._problems)

    @property
    def epoch_finished(self) -> bool:
        """True when the last next_batch() returned the final batch of an epoch."""
        return self._epoch_finished

    def permutation(self, epoch: int) -> list[int]:
        """Problem indices in the order epoch `epoch` serves them (before dropping the tail)."""
        if self._perm_epoch != epoch:
            perm = list(range(len(self._problems)))
            random.Random(self._seed + epoch).shuffle(perm)
            deferred = self._deferred
            if deferred is not None and deferred["epoch"] == epoch:
                # Batches not served yet: the same order, with the deferred problems moved behind the others.
                cut = deferred["from_position"] * self._batch_size
                ids = set(deferred["ids"])
                rest = perm[cut:]
                perm = (perm[:cut] + [i for i in rest if self._problems[i].id not in ids]
                        + [i for i in rest if self._problems[i].id in ids])
            self._perm_epoch, self._perm = epoch, perm
        return self._perm

    def defer(self, ids) -> int:
        """Serve these problems last in the rest of the current epoch (P²O's overlap schedule: prompts that wait
        for their templates come after those that need none). Returns how many of them are still to come."""
        ids = sorted(set(ids))
        self._deferred = {"epoch": self._epoch, "from_position": self._position, "ids": ids}
        self._perm_epoch = None
        start = self._position * self._batch_size
        wanted = set(ids)
        return sum(self._problems[i].id in wanted for i in self.permutation(self._epoch)[start:])

    def peek_batch(self) -> list[Problem]:
        """The batch next_batch() will return, without taking it."""
        perm = self.permutation(self._epoch)
        start = self._position * self._batch_size
        return [self._problems[i] for i in perm[start:start + self._batch_size]]

    def next_batch(self) -> list[Problem]:
        batch = self.peek_batch()
        self._position += 1
        self._epoch_finished = self._position >= self.steps_per_epoch
        if self._epoch_finished:
            self._epoch += 1
            self._position = 0
        return batch

    def __iter__(self) -> Iterator[list[Problem]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """Plain-JSON state; the settings and a fingerprint of the problem ids are checked on load."""
        return {
            "epoch": self._epoch,
            "position": self._position,
            "epoch_finished": self._epoch_finished,
            "seed": self._seed,
            "batch_size": self._batch_size,
            "drop_last": self._drop_last,
            "num_problems": len(self._problems),
            "fingerprint": self._fingerprint,
            "deferred": self._deferred,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` left off; a loader built with other data or settings is refused, because it
        would silently serve different batches."""
        mine = self.state_dict()
        for key in ("seed", "batch_size", "drop_last", "num_problems", "fingerprint"):
            if key in state and state[key] != mine[key]:
                raise ValueError(
                    f"loader state does not match this loader: {key} is {state[key]!r}, here {mine[key]!r}"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.steps_per_epoch:
            raise ValueError(f"loader state out of range: epoch {epoch}, position {position} "
                             f"(steps_per_epoch {self.steps_per_epoch})")
        self._epoch, self._position = epoch, position
        self._epoch_finished = bool(state.get("epoch_finished", False))
        self._deferred = state.get("deferred")
        self._perm_epoch = None


def _fingerprint(problems: Sequence[Problem]) -> str:
    digest = hashlib.sha256()
    for problem in problems:
        digest.update(problem.id.encode("utf-8"))
        digest.update(b"\0")
    return digest.hexdigest()[:16]
