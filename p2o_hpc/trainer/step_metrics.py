"""The numbers logged for every step: reward, advantage, response lengths, the update, throughput and timings."""

from __future__ import annotations

import numpy as np
import torch

from p2o_hpc.algo.rollout_batch import rewards_tensor
from p2o_hpc.records import StepBatch


def step_metrics(batch: StepBatch, updates: list[dict], seconds: dict[str, float], *, k: int, kl: bool) -> dict:
    rollouts = batch.rollouts
    grouped = rewards_tensor(rollouts).view(-1, k)
    constant = (grouped.max(dim=1).values == grouped.min(dim=1).values).float()
    lengths = torch.tensor([len(r.response_ids) for r in rollouts], dtype=torch.float32)
    seconds = {**seconds, "generate": batch.generate_s, "reward": batch.reward_s}
    metrics = {
        "epoch": batch.epoch,
        "reward/mean": float(grouped.mean()),
        "reward/all_fail_frac": float((grouped.max(dim=1).values <= 0).float().mean()),
        "advantage/zero_group_frac": float(constant.mean()),
        "advantage/abs_mean": float(batch.advantages.abs().mean()),
        "response/length_mean": float(lengths.mean()),
        "response/length_max": float(lengths.max()),
        "response/truncated_frac": float(np.mean([r.finish_reason == "length" for r in rollouts])),
        "actor/loss": float(np.mean([m["loss"] for m in updates])),
        "actor/clip_frac": float(np.mean([m.get("clip_frac", 0.0) for m in updates])),
        "actor/grad_norm": float(np.mean([m["grad_norm"] for m in updates])),
        "actor/lr": updates[-1]["lr"],
        "actor/updates_skipped": sum(not m["update_ok"] for m in updates),
        "perf/gen_tokens_per_s": float(lengths.sum()) / max(batch.generate_s, 1e-9),
        "perf/train_tokens_per_s": float(sum(len(r.sequence) for r in rollouts)) / max(seconds["update"], 1e-9),
        **{f"time/{name}": value for name, value in seconds.items()},
    }
    if kl:
        metrics["actor/kl"] = float(np.mean([m["kl"] for m in updates]))
    return metrics
