"""Hard-sample mining: prompts whose K rollouts (almost) all failed give GRPO no gradient; P²O optimises
templates for them. Each epoch's hard set goes to the run dir (RunDir.hard_set) for the GEPA service; plain GRPO
runs mine too, so both report how many prompts gave no gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from p2o_hpc.records import StepBatch
from p2o_hpc.run_dir import RunDir


@dataclass
class PromptRecord:
    prompt_id: str
    problem: str
    ground_truth: str
    rewards: list[float] = field(default_factory=list)
    failed_responses: list[str] = field(default_factory=list)


def is_hard(rewards: list[float], *, tau: float) -> bool:
    """Success rate ≤ tau: tau=0 is "all K failed" (the paper); 0.17 at K=6 admits one success (authors' code)."""
    successes = sum(1 for reward in rewards if reward > 0)
    return successes / len(rewards) <= tau + 1e-9


class HardSampleMiner:
    """Collects every prompt's rewards over an epoch (a prompt seen twice pools its rollouts)."""

    def __init__(self, *, tau: float, failed_responses: int, max_response_chars: int):
        self.tau = tau
        self.failed_responses = failed_responses
        self.max_response_chars = max_response_chars
        self.records: dict[str, PromptRecord] = {}

    def add(self, prompt_id: str, problem: str, ground_truth: str, rewards: list[float], responses: list[str]) -> None:
        record = self.records.setdefault(prompt_id, PromptRecord(prompt_id, problem, ground_truth))
        record.rewards.extend(float(r) for r in rewards)
        for reward, response in zip(rewards, responses):
            if reward <= 0 and len(record.failed_responses) < self.failed_responses:
                record.failed_responses.append(response[: self.max_response_chars])

    def add_batch(self, batch: StepBatch) -> None:
        """Every prompt of a step with its K rollouts (prompt-major)."""
        k = len(batch.rollouts) // len(batch.problems)
        for i, problem in enumerate(batch.problems):
            group = batch.rollouts[i * k: (i + 1) * k]
            self.add(problem.id, problem.problem, problem.answer, [r.reward for r in group], [r.text for r in group])

    def hard_set(self) -> list[dict]:
        return [
            {
                "prompt_id": record.prompt_id,
                "prompt": record.problem,
                "ground_truth": record.ground_truth,
                "rewards": record.rewards,
                "success_rate": sum(r > 0 for r in record.rewards) / len(record.rewards),
                "failed_responses": record.failed_responses,
            }
            for record in self.records.values()
            if is_hard(record.rewards, tau=self.tau)
        ]

    def write(self, run_dir: RunDir, epoch: int) -> tuple[Path, int]:
        """Atomically writes the epoch's hard set; returns (path, size)."""
        rows = self.hard_set()
        return run_dir.write_hard_set(epoch, rows), len(rows)

    def reset(self) -> None:
        self.records = {}

    def state_dict(self) -> dict:
        return {prompt_id: vars(record) for prompt_id, record in self.records.items()}

    def load_state_dict(self, state: dict) -> None:
        self.records = {prompt_id: PromptRecord(**record) for prompt_id, record in state.items()}
