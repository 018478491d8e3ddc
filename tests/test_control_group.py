"""The loop's coordination never waits inside one collective for longer than that collective's timeout: a wait for
the GEPA service is a poll (one short broadcast per look), and every rank leaves it with the same outcome."""

from __future__ import annotations

import json
import os

import pytest

from p2o_hpc.megatron import distributed
from p2o_hpc.megatron.distributed import launch_local, local_device_index, pin_socket_interface
from p2o_hpc.run_dir import RunDir
from tests import control_workers


def test_ranks_wait_together_past_every_collective_timeout(tmp_path):
    run_dir = RunDir(tmp_path / "run")
    run_dir.epoch(0).mkdir(parents=True)
    launch_local(control_workers.wait_for_the_service, 2, str(run_dir.path), str(tmp_path))
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    for result in results:
        assert result["settled"] is True
        assert result["waited_s"] > 2.5 * control_workers.TIMEOUT_S  # longer than any one collective may take
        assert "rank 0" in result["failure"] or "out of memory" in result["failure"]
    assert "out of memory" in results[1]["failure"]  # the other ranks learn rank 0's cause
    # The control: the same group's plain barrier behind a rank busy for that long does time out.
    assert results[1]["plain_barrier"] != "completed"


def test_socket_interface_is_pinned_by_name_or_route(monkeypatch):
    for variable in distributed.SOCKET_IFNAME_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    assert pin_socket_interface(None, "127.0.0.1") is None  # one node on loopback: nothing to pin
    assert not any(variable in os.environ for variable in distributed.SOCKET_IFNAME_VARIABLES)
    with pytest.raises(ValueError, match="cluster.network_interface='no-such-nic'"):
        pin_socket_interface("no-such-nic", "127.0.0.1")
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "site-choice")
    assert pin_socket_interface("lo", "127.0.0.1") == "lo"
    assert os.environ["NCCL_SOCKET_IFNAME"] == "lo"
    assert os.environ["GLOO_SOCKET_IFNAME"] == "site-choice"  # what the site exported wins


@pytest.mark.parametrize("visible, local_rank, expected", [(8, 3, 3), (1, 3, 0), (4, 0, 0)])
def test_local_device_follows_slurm_gpu_binding(monkeypatch, visible, local_rank, expected):
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: visible)
    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    assert local_device_index() == expected


def test_fewer_visible_gpus_than_ranks_is_named(monkeypatch):
    monkeypatch.setattr(distributed.torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "5")
    with pytest.raises(RuntimeError, match="parallel.gpus_per_node"):
        local_device_index()
