"""GPU device discipline, caught on the CPU: the device check fails where a GPU run would, and the learner's hot
path (micro-batches, log-probs, CD weights, the update, a PP export to some ranks) passes it at TP2/PP2."""

import json

import pytest
import torch
import torch.distributed as dist

import mp_workers
from p2o_hpc.algo.core_algos import grpo_advantages
from p2o_hpc.algo.rollout_batch import collate, generation_micro_batch
from p2o_hpc.megatron import cpu_compat, device_check
from p2o_hpc.megatron.device_check import DEVICE, HOST, DeviceMismatchError
from p2o_hpc.megatron.distributed import launch_local
from p2o_hpc.records import Rollout


@pytest.fixture
def check():
    with cpu_compat.CpuDeviceMode(), device_check.checking():
        yield


def test_host_and_device_tensors_in_one_op_raise_naming_the_op(check):
    on_device, on_host = torch.ones(2, 3, device="cuda"), torch.ones(2, 3)
    assert (device_check.placement(on_device), device_check.placement(on_host)) == (DEVICE, HOST)
    with pytest.raises(DeviceMismatchError, match=r"torch.Tensor.mul: host tensor\(s\) of shape \(2, 3\)"):
        on_device * on_host
    embedding = torch.ones(10, 4, device=0)  # megatron's device=torch.cuda.current_device()
    with pytest.raises(DeviceMismatchError, match="embedding"):
        torch.nn.functional.embedding(torch.tensor([[1, 2]]), embedding)


def test_what_cuda_allows_passes(check):
    on_device, on_host = torch.ones(2, 3, device="cuda"), torch.ones(2, 3)
    assert device_check.placement(on_device * torch.tensor(2.0)) == DEVICE  # a host 0-dim scalar
    moved = on_host.cuda()
    assert moved is not on_host and device_check.placement(on_host) == HOST  # a move copies, as on a GPU
    assert device_check.placement(on_device + moved) == DEVICE
    assert device_check.placement(on_device.cpu()) == HOST and device_check.placement(on_device) == DEVICE
    assert device_check.placement(torch.arange(3, device=on_device.device)) == DEVICE  # x.device places like x
    assert device_check.placement(torch.arange(3).to(on_device.device)) == DEVICE
    assert device_check.placement(on_device[torch.tensor([1, 0])]) == DEVICE  # host indices
    on_device[0:1] = on_host[0:1]  # basic indexing is a copy_
    on_device.copy_(on_host)
    with pytest.raises(DeviceMismatchError, match="index_put_"):
        on_device[torch.tensor([0])] = on_host[0:1]
    with pytest.raises(DeviceMismatchError, match="indexed by device tensors"):
        on_host[torch.tensor([0], device="cuda")]


def test_advantages_and_micro_batches_follow_the_device(check):
    rewards, groups = torch.tensor([1.0, 0.0, 0.0, 0.0], device="cuda"), torch.tensor([0, 0, 1, 1])
    advantages = grpo_advantages(rewards, groups)
    assert device_check.placement(advantages) == DEVICE
    assert advantages.tolist() == pytest.approx([0.7071, -0.7071, 0.0, 0.0], abs=1e-3)
    rollouts = [Rollout(0, [5, 6], [7, 8], None, "stop", "", template="t", generation_prompt_ids=[9, 5, 6]),
                Rollout(0, [5, 6], [7], None, "stop", "")]
    batch = collate(rollouts, [0, 1], torch.tensor([1.0, -1.0]), pad_id=0, device=torch.device("cuda"))
    assert {key: device_check.placement(value) for key, value in batch.items()} == dict.fromkeys(batch, DEVICE)
    assert batch["rollout_index"].tolist() == [0, 1]
    templated = generation_micro_batch(rollouts, batch, pad_id=0)
    assert device_check.placement(templated["input_ids"]) == DEVICE
    assert {device_check.placement(v) for v in collate(rollouts, [0], torch.zeros(2), 0).values()} == {HOST}


def test_host_tensors_over_nccl_groups_raise_and_gloo_groups_take_them(one_process_group, check):
    with pytest.raises(DeviceMismatchError, match=r"all_reduce: host tensor\(s\) of shape \(2,\) over the default"):
        dist.all_reduce(torch.ones(2))
    with pytest.raises(DeviceMismatchError, match="broadcast"):
        dist.broadcast(torch.zeros(()), src=0, group=dist.new_group())  # NCCL on a GPU: even a 0-dim tensor
    on_device = torch.ones(2, device="cuda")
    dist.all_reduce(on_device)
    control = dist.new_group(backend="gloo")  # as distributed.control_group() and megatron's *_gloo groups
    dist.all_reduce(torch.ones(2), group=control)
    dist.broadcast_object_list([{"any": "object"}], src=0)  # object collectives stage their own tensors
    send = dist.P2POp(dist.isend, torch.ones(2), 0)  # megatron passes the (wrapped) torch.distributed.isend
    with pytest.raises(DeviceMismatchError, match="batch_isend_irecv"):
        dist.batch_isend_irecv([send])


def test_off_by_default_and_restored_after_a_block():
    from torch.distributed import distributed_c10d

    if device_check.is_enabled():
        pytest.skip("P2O_DEVICE_CHECK=1 switched the check on for this whole process")
    assert dist.all_reduce is distributed_c10d.all_reduce
    with cpu_compat.CpuDeviceMode():
        assert torch.ones(2, device="cuda") + torch.ones(2) is not None
        with device_check.checking():
            assert dist.all_reduce is not distributed_c10d.all_reduce
        assert dist.all_reduce is distributed_c10d.all_reduce and dist.P2POp is distributed_c10d.P2POp
        assert torch.ones(2, device="cuda") + torch.ones(2) is not None


@pytest.mark.multiproc
def test_learner_hot_path_at_tp2_pp2_passes_the_check(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv(device_check.ENV_VAR, "1")  # the spawned ranks switch the check on in cpu_compat.enable()
    launch_local(mp_workers.device_discipline_worker, 4, str(tiny_model_dir), str(tmp_path))
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(4)]
    for rank, result in enumerate(results):
        assert result["micro_batch_placements"] == [DEVICE], rank
        assert {"p2o/cd_ratio_mean", "p2o/cd_masked_frac"} <= result["cd_metrics"].keys(), rank
        assert all(update["update_ok"] and update["loss"] != 0 and update["grad_norm"] > 0
                   for update in result["updates"]), rank
        assert result["exported_everywhere"] > 0
        if rank in mp_workers.EXPORT_RECEIVERS:
            assert len(result["exported_some"]) == result["exported_everywhere"], rank
            assert result["some_equal_everywhere"] and result["export_placements"] == [DEVICE], rank
        else:
            assert result["exported_some"] == [], rank
    last_stage = results[2:]  # ranks 2, 3: the CD weights sit where the loss runs
    assert all(result["micro_batches_with_cd_weight"] == 1 for result in last_stage)
