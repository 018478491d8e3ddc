"""The learner's memory keys (parallel.*) change memory, not results; the estimator (p2o_hpc.megatron.memory_plan)
matches what the built learner holds; bad combinations name their key."""

from __future__ import annotations

import json
import math
import runpy
from pathlib import Path

import pytest
import torch

from p2o_hpc.config import RunConfig, validate
from p2o_hpc.megatron.memory_plan import read_model_shape
from p2o_hpc.paths import REPO_ROOT

# ------------------------------------------------------------------------------------ one TP2 launch, five setups

MEMORY_VARIANTS = {
    "plain": {},
    "recompute_full": {"recompute": "full", "recompute_num_layers": 2},
    "recompute_selective": {"recompute": "selective"},
    "sequence_parallel": {"sequence_parallel": True},
    "logprob_chunks": {"logprob_chunk_tokens": 7},
    "all": {"sequence_parallel": True, "recompute": "full", "recompute_num_layers": 1, "logprob_chunk_tokens": 5},
    # THD packing (every row full, so the loss matches): SDPAttention per sequence, logits scattered back.
    "packed": {"pack_sequences": True},
    "packed_sp_selective_chunks": {"pack_sequences": True, "sequence_parallel": True, "recompute": "selective",
                                   "logprob_chunk_tokens": 5},
}


BENCH = REPO_ROOT / "tools" / "bench_memory_plan.py"
MEASURED_SEQ = 24  # the measured micro-batch: 2 × 24 tokens (even, so sequence parallelism adds no padding)


def memory_variants_worker(hf_dir: str, out_dir: str) -> None:
    """One train step per variant from the same weights on the same micro-batches (odd lengths, so sequence
    parallelism pads), the chunked log-probs against the whole ones, and each learner's memory as
    tools/bench_memory_plan.py measures it (static tensors, what autograd saves for one micro-batch)."""
    import runpy

    import torch.distributed as dist

    from p2o_hpc.config import AlgorithmConfig
    from p2o_hpc.megatron.distributed import init_megatron
    from p2o_hpc.megatron.forward import forward_collect, next_token_logprobs
    from p2o_hpc.megatron.model_provider import read_hf_architecture
    from p2o_hpc.megatron.training import LRSchedule, build_learner, token_nll_loss, train_step

    init_megatron(2, 1)
    arch = read_hf_architecture(hf_dir)
    generator = torch.Generator().manual_seed(0)
    micro_batches = [{"input_ids": torch.randint(3, arch.vocab_size, (2, length), generator=generator),
                      "seq_lengths": torch.tensor([length, length])} for length in (23, 17)]
    measured_ids = torch.randint(3, arch.vocab_size, (2, MEASURED_SEQ), generator=generator)
    bench = runpy.run_path(str(BENCH))
    results = {}
    for name, settings in MEMORY_VARIANTS.items():
        chunk = settings.get("logprob_chunk_tokens", 0)  # the loss's, not the learner's
        learner = build_learner(arch, hf_dir, AlgorithmConfig(lr=1e-3), LRSchedule(0, 10),
                                **{key: value for key, value in settings.items() if key != "logprob_chunk_tokens"})
        metrics = train_step(learner, micro_batches, token_nll_loss(arch, chunk))
        memory = {**bench["measure_static"](learner),
                  "saved": bench["measure_saved"](learner, measured_ids, arch.vocab_size, chunk)}
        # The norms' gradients on their own: sequence parallelism leaves each TP rank a share of them to sum.
        norm_grads = [param.main_grad for param_name, param in learner.model.named_parameters()
                      if "layernorm" in param_name]
        results[name] = {"loss": metrics["loss"], "grad_norm": metrics["grad_norm"],
                         "norm_grad_norm": torch.cat([grad.flatten() for grad in norm_grads]).norm().item(),
                         "memory": memory}
        if name == "plain":  # the updated weights: log-probs whole and in chunks of 1, 5, 64 tokens
            whole = forward_collect(learner.model, micro_batches, lambda batch, logits: {
                str(chunk): next_token_logprobs(logits, batch["input_ids"], arch.vocab_size, chunk)
                for chunk in (0, 1, 5, 64)})
            results["logprob_chunk_max_diff"] = max(
                (item[str(chunk)] - item["0"]).abs().max().item() for item in whole for chunk in (1, 5, 64))
    if dist.get_rank() == 0:
        (Path(out_dir) / "variants.json").write_text(json.dumps(results))


@pytest.mark.multiproc
def test_memory_keys_leave_the_train_step_unchanged_at_tp2(tiny_model_dir, tmp_path):
    from p2o_hpc.megatron.distributed import launch_local

    launch_local(memory_variants_worker, 2, str(tiny_model_dir), str(tmp_path))
    results = json.loads((tmp_path / "variants.json").read_text())
    plain = results["plain"]
    assert plain["loss"] > 0 and plain["grad_norm"] > 0
    for name in MEMORY_VARIANTS:
        assert results[name]["loss"] == pytest.approx(plain["loss"], rel=1e-5, abs=1e-6), name
        assert results[name]["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-5, abs=1e-6), name
        assert results[name]["norm_grad_norm"] == pytest.approx(plain["norm_grad_norm"], rel=1e-5), name
    assert results["logprob_chunk_max_diff"] <= 1e-6
    # The estimator against the built learners (fp32, local spec with SDPAttention, TP2, packed or not): the static
    # tensors exactly but for megatron's padding, what autograd saves within 2 % (tools/bench_memory_plan.py has
    # the wider table).
    bench = runpy.run_path(str(BENCH))
    shape = read_model_shape(tiny_model_dir)
    for name, settings in MEMORY_VARIANTS.items():
        case = {"tp": 2, "dtype": "fp32", "settings": settings, **results[name]["memory"]}
        estimate = bench["estimated"](shape, case, 2, MEASURED_SEQ)
        for key in ("parameters", "gradients", "optimizer"):
            assert case[key] == pytest.approx(estimate[key], rel=0.01), (name, key)
        assert case["saved"] == pytest.approx(estimate["saved"], rel=0.02), name
    assert results["recompute_full"]["memory"]["saved"] < 0.3 * results["plain"]["memory"]["saved"]
    # Packed, SDPAttention keeps each sequence's output beside their concatenation (linear_proj's input) and
    # RoPE's cos/sin per token: a little more than right-padded rows of the same tokens, not less.
    assert results["packed"]["memory"]["saved"] > results["plain"]["memory"]["saved"]


# ----------------------------------------------------------------------------------- the estimate and the presets


def _compose(*overrides: str) -> RunConfig:
    from hydra import compose, initialize_config_dir

    from p2o_hpc.config import register_configs, to_run_config

    register_configs()
    with initialize_config_dir(str(REPO_ROOT / "conf"), version_base="1.3"):
        return to_run_config(compose("config", overrides=list(overrides)))


def test_config_json_reading_matches_the_providers(tiny_model_dir):
    """preflight reads config.json without transformers; it must see the architecture the learner builds."""
    from p2o_hpc.megatron.memory_plan import KNOWN_SHAPES, model_shape
    from p2o_hpc.megatron.model_provider import read_hf_architecture

    assert read_model_shape(tiny_model_dir) == model_shape(read_hf_architecture(tiny_model_dir))
    assert KNOWN_SHAPES["Qwen/Qwen3-4B"].parameters == pytest.approx(4.02e9, rel=1e-3)  # Qwen3-4B's 4.0 B


def test_the_paper_preset_fits_8x80gb_and_the_tp1_layout_does_not():
    from p2o_hpc.megatron.memory_plan import GiB, KNOWN_SHAPES, estimate, host_memory_gb_per_node

    shape = KNOWN_SHAPES["Qwen/Qwen3-4B"]
    preset = _compose("experiment=paper_p2o")
    validate(preset)  # the mini-batch splits over DP × micro-batches
    assert (preset.parallel.tensor * preset.parallel.data, preset.parallel.gpu_memory_gb) == (8, 80)
    plan = estimate(shape, preset)
    assert plan.fits and plan.worst.engine
    old = _compose("experiment=paper_p2o", "parallel=tp1", "parallel.data=8")
    old_plan = estimate(shape, old)
    assert not old_plan.fits
    assert old_plan.worst.static > 60 * GiB  # bf16 weights + fp32 grads + Adam and masters, unsharded
    assert old_plan.worst.lines["activations"] > 4 * old_plan.gpu_memory  # 4 × 16k tokens, no recompute
    # One-step off-policy keeps the engine awake during the update: the preset still fits.
    preset.algorithm.one_step_off_policy = True
    assert estimate(shape, preset).fits
    assert 100 < host_memory_gb_per_node(shape, preset) < 400  # 8 engines' offloaded weights and processes


def test_a_token_budget_sizes_the_worst_micro_batch_and_the_1f1b_bound():
    """algorithm.micro_batch_tokens: the worst case is rows × longest ≤ budget; a budget of one longest sequence
    is micro_batch_size=1's peak; packing counts the layers' logits and their padded scatter together."""
    from p2o_hpc.megatron.memory_plan import KNOWN_SHAPES, Layout, activation_bytes, describe, estimate, suggestions

    shape = KNOWN_SHAPES["Qwen/Qwen3-4B"]
    one = _compose("experiment=paper_p2o", "algorithm.micro_batch_tokens=0")  # one sequence per micro-batch
    longest = one.data.max_prompt_tokens + one.rollout.max_response_tokens
    budget = _compose("experiment=paper_p2o")  # the preset's budget: one longest sequence
    assert budget.algorithm.micro_batch_tokens == longest
    validate(budget)
    assert Layout.of(budget).padded_shape == (1, longest) == Layout.of(one).padded_shape
    assert estimate(shape, budget).worst.peak == estimate(shape, one).worst.peak
    assert f"micro_batch_tokens={longest}" in describe(estimate(shape, budget))
    # Twice the budget: two rows of the longest, activations and logits twice one row's.
    double = Layout.of(_compose("experiment=paper_p2o", f"algorithm.micro_batch_tokens={2 * longest}"))
    assert double.padded_shape == (2, longest)
    single = activation_bytes(shape, Layout.of(budget), "te", 0)
    assert activation_bytes(shape, double, "te", 0)["layers"] == pytest.approx(2 * single["layers"], rel=0.01)
    # Not a multiple of the longest: the rows shrink so that rows × longest stays within the budget.
    odd = Layout.of(_compose("experiment=paper_p2o", f"algorithm.micro_batch_tokens={longest * 3 // 2}"))
    rows, length = odd.padded_shape
    assert rows == 2 and rows * length <= longest * 3 // 2 and length < longest
    # 1F1B's in-flight bound: budget-sized micro-batches of a DP rank's worst-case tokens (every sequence the
    # longest, one above the mean), never more than its sequences; the fixed count stays exact.
    sequences = one.algorithm.mini_batch_prompts * one.algorithm.n_samples
    assert Layout.of(one).micro_batches == sequences // one.parallel.data
    assert Layout.of(budget).micro_batches == math.ceil((sequences - 1) / one.parallel.data + 1)
    assert double.micro_batches == math.ceil(((sequences - 1) / one.parallel.data + 1) / 2)
    # Packed vs right-padded (the same worst case, chunked log-probs): the layers see the same tokens, the
    # logits' peak is the packed logits, the zeros and the scatter at once (3 copies), not 2 copies and a chunk.
    padded = Layout.of(_compose("experiment=paper_p2o", "algorithm.micro_batch_tokens=0",
                                "parallel.pack_sequences=false"))
    packed_parts = activation_bytes(shape, Layout.of(one), "te", 0)
    padded_parts = activation_bytes(shape, padded, "te", 0)
    assert packed_parts["layers"] == padded_parts["layers"]
    logits = 2 * longest * shape.padded_vocab_size(2) // 2
    assert packed_parts["logits_peak"] == 3 * logits > padded_parts["logits_peak"] > 2 * logits
    # Too big a budget: the hint is a smaller budget, not micro_batch_size=1.
    big = _compose("experiment=paper_p2o", f"algorithm.micro_batch_tokens={16 * longest}", "parallel.recompute=none")
    hints = suggestions(estimate(shape, big))
    assert any(hint.startswith("algorithm.micro_batch_tokens smaller") for hint in hints)
    assert not any("micro_batch_size" in hint for hint in hints)


def test_plan_memory_tool_exits_by_the_verdict(capsys):
    tool = runpy.run_path(str(REPO_ROOT / "tools" / "plan_memory.py"))
    assert tool["main"](["experiment=paper_p2o"]) == 0
    assert "fits" in capsys.readouterr().out
    assert tool["main"](["experiment=paper_p2o", "parallel=tp1", "parallel.data=8"]) == 1
    assert "parallel.use_distributed_optimizer=true" in capsys.readouterr().out


@pytest.mark.parametrize("overrides, message", [
    ({"sequence_parallel": True}, "parallel.sequence_parallel=true needs parallel.tensor > 1"),
    ({"recompute_num_layers": 0}, "parallel.recompute_num_layers=0 must be ≥ 1"),
    ({"logprob_chunk_tokens": -1}, "parallel.logprob_chunk_tokens=-1 must be ≥ 0"),
    ({"gpu_memory_gb": 0}, "parallel.gpu_memory_gb=0 must be > 0"),
])
def test_bad_memory_keys_are_named(overrides, message):
    cfg = RunConfig()
    for key, value in overrides.items():
        setattr(cfg.parallel, key, value)
    with pytest.raises(ValueError, match=message):
        validate(cfg)


def test_distributed_optimizer_on_cpu_slurm_jobs_is_refused_at_config_time():
    cfg = RunConfig()
    cfg.cluster.kind, cfg.parallel.use_distributed_optimizer = "slurm", True
    with pytest.raises(ValueError, match="parallel.use_distributed_optimizer=true needs GPUs"):
        validate(cfg)
    cfg.cluster.gpus = True
    validate(cfg)


def test_preflight_names_recompute_layers_and_warns_about_memory_only_on_gpus(tiny_model_dir, capsys):
    from p2o_hpc.cluster.runs import preflight

    cfg = _compose("experiment=smoke")
    cfg.parallel.recompute, cfg.parallel.recompute_num_layers = "full", 5  # the tiny model has 4 layers
    with pytest.raises(ValueError, match="parallel.recompute_num_layers=5 must be at most the 4 layers"):
        preflight(cfg, str(tiny_model_dir))
    cfg.parallel.recompute_num_layers = 2
    cfg.parallel.gpu_memory_gb = 0.5  # less than the engine's share and the assumed CUDA context
    preflight(cfg, str(tiny_model_dir))
    assert "memory plan" not in capsys.readouterr().err  # cluster.gpus=false: a CPU run has no GPU budget
    cfg.cluster.gpus = True
    preflight(cfg, str(tiny_model_dir))
    warning = " ".join(capsys.readouterr().err.split())
    assert "warning:" in warning and "parallel.gpu_memory_gb=0.5" in warning
    assert "rollout.gpu_memory_utilization" in warning


def test_a_gpu_learner_job_asks_for_the_host_memory_its_sleeping_engines_need(tiny_model_dir):
    from p2o_hpc.cluster.slurm_jobs import learner_mem_gb
    from p2o_hpc.megatron.memory_plan import host_memory_gb_per_node, read_model_shape

    cfg = _compose("experiment=paper_p2o")
    assert learner_mem_gb(cfg, str(tiny_model_dir)) is None  # cluster.gpus=false: the partition's default
    cfg.cluster.gpus = True
    needed = learner_mem_gb(cfg, str(tiny_model_dir))
    assert needed == host_memory_gb_per_node(read_model_shape(tiny_model_dir), cfg) > 0
    cfg.rollout.engines_per_node = 1
    assert learner_mem_gb(cfg, str(tiny_model_dir)) < needed  # one engine's weights offloaded instead of eight
    cfg.cluster.mem_gb = 500
    assert learner_mem_gb(cfg, str(tiny_model_dir)) == 500  # the site's number wins
    assert learner_mem_gb(_compose("experiment=paper_p2o", "cluster.gpus=true"), "/no/such/model") is None
