"""The GPU path on one lent GPU: what a first cluster run would execute at step 0, checked on CUDA with NCCL, bf16.

Run by tools/gpu_check.sh (which installs the carried wheels); one process, world size 1 (NCCL refuses two ranks on
one GPU, so TP/PP > 1 stay with the CPU device-discipline test). Each check prints one line and goes into
`<out>/gpu_check.json`; the exit status is 1 when any check failed.

1. learner: LearnerSide (bf16, the run's own code) on rollouts of random tokens: micro-batches on the device, old
   log-probs, P²O context-distillation weights, one update (PPO clip) — all on CUDA;
2. export + parity: export_hf_weights → transformers' Qwen3 in bf16 on the GPU; the refit statistic (mean
   exp|Δ log p| − 1) of the learner against transformers, against rollout.refit_tolerance;
3. IPC: the handles the ipc weight sync sends, rebuilt in another process on the same GPU (bit-identical);
4. memory: the estimator (p2o_hpc.megatron.memory_plan) against torch.cuda.max_memory_allocated for a learner step
   of a larger random Qwen3.

`--random-model DIR` only writes that larger random Qwen3 (bf16) to DIR and exits: gpu_check.sh then runs the
speed benchmarks on it (tools/bench_learner.py, tools/bench_micro_batching.py), each in its own process.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

RESULTS: dict[str, dict] = {}


def check(name: str):
    """Run one check; its result (or its traceback) goes into RESULTS, and the script goes on."""

    def wrap(fn):
        def run(*args, **kwargs):
            started = time.perf_counter()
            try:
                result = fn(*args, **kwargs) or {}
                result = {"ok": bool(result.pop("ok", True)), **result}
            except Exception as error:  # noqa: BLE001 - every check reports, one failure does not hide the rest
                result = {"ok": False, "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
            result["seconds"] = round(time.perf_counter() - started, 2)
            RESULTS[name] = result
            print(f"[gpu_check] {name}: {'OK' if result['ok'] else 'FAILED'} "
                  f"{json.dumps({k: v for k, v in result.items() if k != 'traceback'})}", flush=True)
            if not result["ok"] and "traceback" in result:
                print(result["traceback"], flush=True)
            return result
        return run

    return wrap


def run_config(model_dir: str, **parallel):
    from p2o_hpc.config import RunConfig, to_run_config

    cfg = to_run_config({"model": {"path": model_dir, "params_dtype": "bf16"},
                         "algorithm": {"n_samples": 4, "prompts_per_step": 4, "mini_batch_prompts": 2,
                                       "micro_batch_size": 2, "lr": 1e-5},
                         "parallel": parallel})
    return cfg


def random_batch(vocab: int, prompts: int, k: int, *, seed: int, prompt_len: int, response_len: int):
    """A step's rollouts of random tokens, ragged lengths, rewards 0/1 per sample; every 4th distilled (P²O)."""
    from p2o_hpc.records import Problem, Rollout, StepBatch

    generator = torch.Generator().manual_seed(seed)

    def tokens(n):
        return torch.randint(3, vocab, (n,), generator=generator).tolist()

    rollouts = []
    for prompt in range(prompts):
        prompt_ids = tokens(prompt_len - prompt)
        for sample in range(k):
            template = "Think in small steps." if sample % 4 == 3 else ""
            rollouts.append(Rollout(
                prompt_index=prompt, prompt_ids=prompt_ids, response_ids=tokens(response_len - 3 * sample),
                rollout_logprobs=None, finish_reason="stop", text="", reward=float((prompt + sample) % 2),
                template=template, generation_prompt_ids=tokens(4) + prompt_ids if template else None))
    problems = [Problem(id=f"p{i}", problem="", answer="", source="gpu_check") for i in range(prompts)]
    return StepBatch(problems, epoch=0, epoch_finished=False, rollouts=rollouts)


@check("learner_step")
def learner_step(model_dir: str, state: dict) -> dict:
    import tempfile

    from p2o_hpc.p2o.hooks import P2OHooks
    from p2o_hpc.run_dir import RunDir
    from p2o_hpc.trainer.learner_side import LearnerSide

    cfg = run_config(model_dir)
    cfg = replace(cfg, algorithm=replace(cfg.algorithm, p2o=replace(cfg.algorithm.p2o, enabled=True)))
    learner = LearnerSide(cfg, model_dir, total_steps=10)
    batch = random_batch(learner.arch.vocab_size, cfg.algorithm.prompts_per_step, cfg.algorithm.n_samples,
                         seed=0, prompt_len=40, response_len=60)
    batch.advantages = learner.advantages(batch)
    mini_batches = learner.micro_batches(batch)
    micro_batches = [mb for mini in mini_batches for mb in mini]
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    placed = {key: str(value.device) for key, value in micro_batches[0].items() if torch.is_tensor(value)}
    learner.old_logprobs(micro_batches)
    hooks = P2OHooks(cfg, RunDir(tempfile.mkdtemp(prefix="gpu_check_run_")), rank=0, console=None)
    distillation = hooks.token_weights(batch, micro_batches, learner.logprobs)  # log π(y|x̃) and the CD weights
    updates = learner.update(mini_batches)
    state.update(learner=learner, batch=batch, micro_batches=micro_batches)
    finite = all(math.isfinite(update["loss"]) and math.isfinite(update["grad_norm"]) for update in updates)
    on_device = all(value.device == device for mb in micro_batches for value in mb.values() if torch.is_tensor(value))
    weighted = all(mb["cd_weight"].device == device for mb in micro_batches if "cd_weight" in mb)
    return {"ok": finite and on_device and weighted and bool(distillation) and all(u["update_ok"] for u in updates),
            "micro_batch_devices": placed,
            "updates": [{k: u[k] for k in ("loss", "grad_norm", "update_ok")} for u in updates], **distillation}


@check("export_and_refit_parity")
def export_and_refit_parity(state: dict, tolerance: float) -> dict:
    """The exported weights in transformers (bf16, GPU) against the learner's own log-probs on the same tokens."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from p2o_hpc.algo.rollout_batch import response_slice

    learner, batch, micro_batches = state["learner"], state["batch"], state["micro_batches"]
    device = micro_batches[0]["input_ids"].device
    buckets = list(learner.weight_buckets())
    weights = {name: tensor for bucket in buckets for name, tensor in bucket}
    devices = sorted({str(tensor.device) for tensor in weights.values()})
    config = AutoConfig.from_pretrained(learner.model_dir)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).to(device).eval()
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [name for name in missing if not (name == "lm_head.weight" and config.tie_word_embeddings)]
    learner.old_logprobs(micro_batches)  # the updated policy's log-probs, as the next step's check sees them
    gaps = []
    with torch.no_grad():
        for mb in micro_batches:
            logits = model(mb["input_ids"]).logits.float()
            hf = torch.log_softmax(logits[:, :-1], -1).gather(-1, mb["input_ids"][:, 1:, None])[..., 0]
            for row, index in enumerate(mb["rollout_index"].tolist()):
                span = response_slice(batch.rollouts[index])
                gap = (hf[row, span] - mb["old_logprobs"][row, span]).abs()
                gaps.append(gap)
    gap = torch.cat(gaps)
    prob_error = float(gap.exp().mean() - 1)
    errors = missing + list(unexpected)
    return {"ok": not errors and prob_error <= tolerance, "tensors": len(weights), "devices": devices,
            "missing_or_unexpected": errors[:5], "token_prob_error": prob_error,
            "max_abs_gap": float(gap.max()), "mean_abs_gap": float(gap.mean()), "tolerance": tolerance,
            "tokens": gap.numel()}


def _rebuild_and_sum(handles, queue) -> None:
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    uuid = str(torch.cuda.get_device_properties(0).uuid)
    sums = [float(rebuild_cuda_tensor(*handle[uuid]).double().sum()) for handle in handles]
    queue.put(sums)


@check("ipc_handles")
def ipc_handles(state: dict) -> dict:
    """The weight sync's handle format ({GPU UUID: reduce_tensor args}) rebuilt by another process on this GPU."""
    import torch.multiprocessing as mp
    from torch.multiprocessing.reductions import reduce_tensor

    tensors = [tensor.detach().contiguous() for bucket in state["learner"].weight_buckets() for _, tensor in bucket][:8]
    uuid = str(torch.cuda.get_device_properties(tensors[0].device).uuid)
    handles = [{uuid: reduce_tensor(tensor)[1]} for tensor in tensors]
    torch.cuda.synchronize()
    context = mp.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_rebuild_and_sum, args=(handles, queue))
    child.start()
    sums = queue.get(timeout=300)
    child.join(timeout=60)
    expected = [float(tensor.double().sum()) for tensor in tensors]
    return {"ok": sums == expected, "tensors": len(tensors), "uuid": uuid}


MEMORY_MODEL = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=8, num_attention_heads=16,
                    num_key_value_heads=8, head_dim=64, vocab_size=32000, max_position_embeddings=8192,
                    layer_types=["full_attention"] * 8)
MEMORY_CASES = {"plain": {}, "recompute full + chunked log-probs": {"recompute": "full", "logprob_chunk_tokens": 1024}}
MEMORY_TOLERANCE = 0.25  # |measured / estimated − 1| allowed for the static state and for a step's peak on top


def random_model(base_dir: str, folder: Path) -> str:
    """A random Qwen3 of MEMORY_MODEL's shape with base_dir's tokenizer files (the ids are random anyway)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from p2o_hpc.megatron.hf_weights import copy_model_files

    config = AutoConfig.from_pretrained(base_dir, **MEMORY_MODEL, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    copy_model_files(base_dir, folder)
    model.save_pretrained(folder)
    return str(folder)


@check("memory_estimate")
def memory_estimate(base_dir: str) -> dict:
    """The estimator (local spec: no TE here) against torch.cuda's allocator for a bf16 learner at TP1 on sequences
    of the worst-case length: the static state after a step, and the next step's peak on top of it."""
    from p2o_hpc.megatron.memory_plan import Layout, activation_bytes, in_flight_micro_batches, read_model_shape, \
        static_bytes
    from p2o_hpc.megatron.model_provider import read_hf_architecture
    from p2o_hpc.megatron.training import LRSchedule, build_learner, memory_settings, token_nll_loss, train_step

    import tempfile

    model_dir = random_model(base_dir, Path(tempfile.mkdtemp(prefix="gpu_check_model_")))
    shape, arch = read_model_shape(model_dir), read_hf_architecture(model_dir)
    rows, ok = {}, True
    for name, settings in MEMORY_CASES.items():
        cfg = run_config(model_dir, **settings)
        cfg.data.max_prompt_tokens, cfg.rollout.max_response_tokens = 512, 1536
        layout = Layout.of(cfg)
        learner = build_learner(arch, model_dir, cfg.algorithm, LRSchedule(0, 10), torch.bfloat16,
                                **memory_settings(cfg.parallel))
        ids = torch.randint(3, arch.vocab_size, (layout.micro_batch_size, layout.seq_len),
                            device=torch.cuda.current_device())
        loss = token_nll_loss(arch, cfg.parallel.logprob_chunk_tokens)
        train_step(learner, [{"input_ids": ids}], loss)  # the optimizer state exists after the first step
        torch.cuda.synchronize()
        static = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        train_step(learner, [{"input_ids": ids}], loss)
        torch.cuda.synchronize()
        step_peak = torch.cuda.max_memory_allocated() - static
        parts = activation_bytes(shape, layout, "local", stage=0)
        held = in_flight_micro_batches(layout, 0) * (parts["layers"] + parts["embedding"] + parts["final_norm"])
        estimated_static = sum(static_bytes(shape, layout, 0).values())
        estimated_peak = held + max(parts["logits_peak"], parts["backward"])
        ratios = {"static": static / estimated_static, "step_peak": step_peak / estimated_peak}
        ok &= all(abs(ratio - 1) <= MEMORY_TOLERANCE for ratio in ratios.values())
        rows[name] = {"measured_static_gib": static / 2**30, "estimated_static_gib": estimated_static / 2**30,
                      "measured_step_peak_gib": step_peak / 2**30, "estimated_step_peak_gib": estimated_peak / 2**30,
                      **{f"ratio_{key}": round(value, 3) for key, value in ratios.items()}}
        del learner
        torch.cuda.empty_cache()
    return {"ok": ok, "tokens_per_micro_batch": layout.micro_batch_size * layout.seq_len, "cases": rows,
            "tolerance": MEMORY_TOLERANCE}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="assets/testbed_model")
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="check this script itself on a CPU machine: the learner and parity checks only")
    parser.add_argument("--random-model", metavar="DIR", help="only write the larger random Qwen3 to DIR")
    args = parser.parse_args()
    if args.random_model:
        print(f"[gpu_check] random Qwen3 {MEMORY_MODEL} → {random_model(args.model, Path(args.random_model))}")
        return 0
    if not torch.cuda.is_available() and not args.cpu_dry_run:
        print("[gpu_check] no CUDA device: this script is for the lent GPU machine", file=sys.stderr)
        return 2
    from p2o_hpc.config import RolloutConfig
    from p2o_hpc.megatron.distributed import init_megatron, shutdown
    from p2o_hpc.trainer import learner_side  # noqa: F401 - megatron's models load before the CPU compat layer (dry run)

    if not args.cpu_dry_run:
        print(f"[gpu_check] torch {torch.__version__}, {torch.cuda.get_device_name()}, "
              f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB", flush=True)
    init_megatron(1, 1)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    state: dict = {}
    try:
        learner_step(args.model, state)
        if "learner" in state:
            export_and_refit_parity(state, RolloutConfig().refit_tolerance)
            if not args.cpu_dry_run:
                ipc_handles(state)
            state.clear()
            torch.cuda.empty_cache()
        if not args.cpu_dry_run:
            memory_estimate(args.model)
    finally:
        shutdown()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(RESULTS, indent=1, default=str))
    failed = [name for name, result in RESULTS.items() if not result["ok"]]
    print(f"[gpu_check] {len(RESULTS) - len(failed)}/{len(RESULTS)} checks passed"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
