"""The CPU compat layer: device rewriting, CUDA type names, per-name RNG streams, and staying off with CUDA."""

import torch

from p2o_hpc.megatron import cpu_compat


def test_cuda_device_arguments_land_on_cpu():
    with cpu_compat.CpuDeviceMode():
        assert torch.empty(3, device="cuda").device.type == "cpu"
        assert torch.zeros(2, device=0).device.type == "cpu"
        assert torch.ones(2, device=torch.device("cuda", 1)).device.type == "cpu"
        t = torch.arange(4)
        assert t.cuda() is t
        assert t.to("cuda:0").device.type == "cpu"
        assert t.to(torch.float64).dtype == torch.float64  # a dtype positional is not a device
        assert torch.randn(2).type() == "torch.cuda.FloatTensor"
        assert torch.randn(2, dtype=torch.bfloat16).type() == "torch.cuda.BFloat16Tensor"
    assert torch.randn(2).type() == "torch.FloatTensor"  # outside the mode nothing changes


def test_rng_tracker_keeps_independent_named_streams():
    tracker = cpu_compat.CpuRNGStatesTracker()
    tracker.add("model-parallel-rng", 10)
    tracker.add("data-parallel-rng", 11)
    torch.manual_seed(0)
    outer_before = torch.get_rng_state()
    with tracker.fork("model-parallel-rng"):
        first = torch.rand(3)
    with tracker.fork("data-parallel-rng"):
        other = torch.rand(3)
    with tracker.fork("model-parallel-rng"):
        second = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), outer_before), "forking must not disturb the default stream"
    torch.manual_seed(10)
    expected = torch.rand(6)
    assert torch.equal(torch.cat([first, second]), expected), "a named stream continues where it stopped"
    assert not torch.equal(other, expected[:3])


def test_enable_is_a_no_op_when_cuda_is_available(monkeypatch):
    monkeypatch.setattr(cpu_compat, "_enabled", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    before = torch.cuda.current_device
    assert cpu_compat.enable() is False
    assert torch.cuda.current_device is before
    assert cpu_compat.is_enabled() is False
    assert cpu_compat.distributed_backend() == "nccl"
