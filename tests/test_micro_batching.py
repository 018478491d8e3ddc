"""Token-budget micro-batches and THD packing change how sequences are grouped, never the numbers: the same
old log-probs, loss and updated weights as fixed-size micro-batches (to 1e-6)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import mp_workers
from p2o_hpc.algo.rollout_batch import balance_by_tokens, collate, pack_by_length, padding_fraction, \
    rank_micro_batches
from p2o_hpc.megatron import device_check
from p2o_hpc.megatron.distributed import launch_local
from p2o_hpc.records import Rollout


def test_pack_by_length_keeps_similar_lengths_under_the_budget():
    lengths = [10, 50, 12, 48, 11, 200]
    batches = pack_by_length(lengths, 100)
    assert batches == [[5], [1, 3], [2, 4, 0]]  # the over-long row alone; similar lengths together
    assert all(len(batch) * max(lengths[i] for i in batch) <= 100 for batch in batches[1:])


def test_balance_by_tokens_splits_evenly_and_deterministically():
    lengths = {i: length for i, length in enumerate([90, 10, 10, 40, 50, 30, 20, 70])}
    parts = balance_by_tokens(list(lengths), lengths, 2)
    assert sorted(i for part in parts for i in part) == list(lengths)
    totals = [sum(lengths[i] for i in part) for part in parts]
    assert totals == [160, 160] and parts == balance_by_tokens(list(lengths), lengths, 2)


def _rollouts(lengths):
    return [Rollout(i, [3, 4], [5] * (length - 2), None, "stop", "", reward=0.0) for i, length in enumerate(lengths)]


def test_token_budget_cuts_padding_on_a_long_tailed_mix():
    normal = torch.randn(64, generator=torch.Generator().manual_seed(0))
    lengths = (5.0 + 0.9 * normal).exp().clamp(8, 2048).long().tolist()  # log-normal response lengths
    rollouts, advantages = _rollouts(lengths), torch.zeros(64)
    fixed = rank_micro_batches(rollouts, advantages, list(range(64)), dp_rank=0, dp_size=1, micro_batch_size=4,
                               pad_id=0)
    budget = rank_micro_batches(rollouts, advantages, list(range(64)), dp_rank=0, dp_size=1, micro_batch_size=4,
                                pad_id=0, micro_batch_tokens=4096)
    assert sorted(i for mb in budget for i in mb["rollout_index"].tolist()) == list(range(64))
    assert all(mb["input_ids"].numel() <= 4096 for mb in budget)
    assert padding_fraction(budget) < padding_fraction(fixed) / 2
    assert padding_fraction(budget, packed=True) == 0.0
    one = collate(rollouts, [0, 1], advantages, 0)
    assert one["seq_lengths"].tolist() == lengths[:2]
    assert padding_fraction([one]) == pytest.approx(1 - sum(lengths[:2]) / (2 * max(lengths[:2])))


@pytest.mark.multiproc
@pytest.mark.parametrize("tp,pp,sp", [(2, 2, True), pytest.param(1, 2, False, marks=pytest.mark.long)],
                         ids=["tp2-pp2-sp", "pp2-dp2"])
def test_token_budget_and_packing_match_fixed_micro_batches(tiny_model_dir, tmp_path, monkeypatch, tp, pp, sp):
    monkeypatch.setenv(device_check.ENV_VAR, "1")  # packing builds index tensors: they must be on the device
    launch_local(mp_workers.micro_batching_worker, 4, str(tiny_model_dir), str(tmp_path), tp, pp, sp)
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(4)]
    for mode in ("token_budget", "packed"):
        rows = [result[mode]["rows"] for result in results]
        assert rows != [result["fixed"]["rows"] for result in results]  # the grouping did change
        for result in results:
            assert result[mode]["updates"][0]["loss"] == pytest.approx(result["fixed"]["updates"][0]["loss"], abs=1e-6)
            assert result[mode]["updates"][0]["grad_norm"] == pytest.approx(
                result["fixed"]["updates"][0]["grad_norm"], rel=1e-6)
        merged = {mode_: {} for mode_ in ("fixed", mode)}
        for result in results:
            for mode_ in merged:
                merged[mode_].update(result[mode_]["logprobs"])
        assert merged["fixed"].keys() == merged[mode].keys() and len(merged[mode]) == 8
        for index, values in merged["fixed"].items():
            assert torch.allclose(torch.tensor(merged[mode][index]), torch.tensor(values), atol=1e-6), (mode, index)
        for rank in range(4):
            fixed, grads = (load_file(tmp_path / f"rank{rank}_{name}.safetensors") for name in ("fixed", mode))
            assert fixed.keys() == grads.keys()
            for name, grad in fixed.items():
                assert torch.allclose(grads[name], grad, atol=1e-6, rtol=1e-5), (mode, rank, name)
