"""Worker bodies for the multi-process tests (module level, because ranks are spawned, not forked)."""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from safetensors.torch import save_file

from p2o_hpc.megatron.checkpointing import latest_checkpoint, load_checkpoint, save_checkpoint
from p2o_hpc.megatron.conversion_check import learner_logits, make_batch
from p2o_hpc.megatron.distributed import init_megatron
from p2o_hpc.megatron.hf_weights import export_hf_weights
from p2o_hpc.megatron.model_provider import read_hf_architecture
from p2o_hpc.config import AlgorithmConfig
from p2o_hpc.megatron.training import LRSchedule, build_learner, token_nll_loss, train_step

GLOBAL_BATCH, SEQ, MICRO_BATCHES = 8, 24, 2
FIRST_ORDINARY_TOKEN = 3  # the tiny tokenizer's special tokens are ids 0-2
TEST_OPTIM = AlgorithmConfig(lr=1e-3, weight_decay=0.1, clip_grad=1.0)  # constant LR
TEST_SCHEDULE = LRSchedule(warmup_steps=0, total_steps=1000)


def global_batch(vocab_size: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Data depends only on the step, so a resumed run sees what an uninterrupted one saw. Loss masks are
    ragged on purpose: the loss is a mean over the global batch's tokens, not over per-rank means."""
    generator = torch.Generator().manual_seed(100 + step)
    # Ordinary tokens only: HF's nn.Embedding(padding_idx=pad) never updates the pad row, megatron has no
    # padding_idx; the two agree wherever the pad token is not an unmasked input (as in real batches).
    input_ids = torch.randint(FIRST_ORDINARY_TOKEN, vocab_size, (GLOBAL_BATCH, SEQ), generator=generator)
    loss_mask = torch.ones(GLOBAL_BATCH, SEQ)
    for row in range(GLOBAL_BATCH):
        loss_mask[row, : 1 + 2 * row] = 0
    return input_ids, loss_mask


def rank_micro_batches(vocab_size: int, step: int) -> list[dict[str, torch.Tensor]]:
    input_ids, loss_mask = global_batch(vocab_size, step)
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    ids, mask = input_ids.chunk(dp)[dp_rank], loss_mask.chunk(dp)[dp_rank]
    return [{"input_ids": i, "loss_mask": m} for i, m in zip(ids.chunk(MICRO_BATCHES), mask.chunk(MICRO_BATCHES))]


def export_to_file(model, arch, path: str, bucket_bytes: int) -> None:
    tensors, bucket_sizes = {}, []
    for bucket in export_hf_weights(model, arch, bucket_bytes=bucket_bytes):
        bucket_sizes.append([t.numel() * t.element_size() for _, t in bucket])
        for name, tensor in bucket:
            assert name not in tensors, f"{name} exported twice"
            tensors[name] = tensor.clone()
    if dist.get_rank() == 0:
        save_file(tensors, path)
        Path(path + ".buckets.json").write_text(json.dumps(bucket_sizes))


def learner_worker(hf_dir: str, tp: int, pp: int, actions: list[tuple], out_dir: str) -> None:
    """Runs ('train', n) / ('save',) / ('load', with_optimizer) / ('export', file, bucket_bytes) / ('logits', file)
    in order; 'logits' saves the learner's full logits of conversion_check.make_batch (the last stage's TP rank 0)."""
    init_megatron(tp, pp)
    arch = read_hf_architecture(hf_dir)
    learner = build_learner(arch, hf_dir, TEST_OPTIM, TEST_SCHEDULE)
    metrics = []
    for action in actions:
        if action[0] == "train":
            for _ in range(action[1]):
                step_metrics = train_step(learner, rank_micro_batches(arch.vocab_size, learner.step), token_nll_loss(arch))
                metrics.append({"step": learner.step, **step_metrics})
        elif action[0] == "save":
            save_checkpoint(learner, Path(out_dir) / "checkpoints")
            # What a save leaves running beside the rank (a kill -9 of the rank would orphan it).
            children = [child.cmdline() for child in psutil.Process().children(recursive=True)]
            (Path(out_dir) / f"children_after_save_rank{dist.get_rank()}.json").write_text(json.dumps(children))
        elif action[0] == "load":
            load_checkpoint(learner, latest_checkpoint(Path(out_dir) / "checkpoints"), with_optimizer=action[1])
        elif action[0] == "export":
            export_to_file(learner.model, arch, str(Path(out_dir) / action[1]), action[2])
        elif action[0] == "logits":
            input_ids, attention_mask = make_batch(arch.vocab_size, batch=2, seq=32, seed=0)
            outputs = learner_logits(learner.model, arch, input_ids)
            if outputs is not None and parallel_state.get_tensor_model_parallel_rank() == 0:
                torch.save({"input_ids": input_ids, "attention_mask": attention_mask, **outputs},
                           Path(out_dir) / action[1])
    if dist.get_rank() == 0:
        (Path(out_dir) / f"metrics_tp{tp}_pp{pp}.json").write_text(json.dumps(metrics))


def import_export_worker(hf_dir: str, tp: int, pp: int, out_path: str, bucket_bytes: int) -> None:
    """HF → megatron (this layout) → HF, no training."""
    from p2o_hpc.megatron.hf_weights import load_hf_weights
    from p2o_hpc.megatron.model_provider import build_gpt_model, build_transformer_config

    init_megatron(tp, pp)
    arch = read_hf_architecture(hf_dir)
    model = build_gpt_model(arch, build_transformer_config(arch))
    load_hf_weights(model, hf_dir, arch)
    export_to_file(model, arch, out_path, bucket_bytes)


EXPORT_RECEIVERS = (0, 3)  # at TP2/PP2: the first stage's TP rank 0 and the last stage's TP rank 1


def device_discipline_worker(hf_dir: str, out_dir: str) -> None:
    """The learner's hot path at TP2/PP2 under the device check (P2O_DEVICE_CHECK=1 in the environment): rollouts
    → advantages → micro-batches → old log-probs → P²O CD weights → a policy-loss update → an export to every rank,
    then one to EXPORT_RECEIVERS only. Writes what it saw to rank<N>.json."""
    from types import SimpleNamespace

    from p2o_hpc.choices import ParamsDtype
    from p2o_hpc.config import P2OConfig, RunConfig
    from p2o_hpc.megatron import device_check
    from p2o_hpc.p2o.hooks import P2OHooks
    from p2o_hpc.records import Problem, Rollout, StepBatch
    from p2o_hpc.trainer.learner_side import LearnerSide

    init_megatron(2, 2)
    rank = dist.get_rank()
    cfg = RunConfig()
    cfg.model.params_dtype = ParamsDtype.fp32
    cfg.algorithm = AlgorithmConfig(n_samples=2, prompts_per_step=2, mini_batch_prompts=2, micro_batch_size=4,
                                    lr=1e-3, warmup_ratio=0.0, p2o=P2OConfig(enabled=True))
    side = LearnerSide(cfg, hf_dir, total_steps=1)

    prompts, template = ([5, 6, 7, 8], [9, 10, 11, 12, 13]), [20, 21, 22]
    responses = ([30, 31, 32], [33, 34, 35, 36, 37], [38, 39], [40, 41, 42, 43, 44])  # a nonzero first loss
    rollouts = [Rollout(i // 2, list(prompts[i // 2]), list(responses[i]), None, "stop", "", reward=float(i in (0, 3)))
                for i in range(4)]
    rollouts[1].template, rollouts[1].generation_prompt_ids = "hint", template + list(prompts[0])
    batch = StepBatch([Problem(str(i), "", "", "test") for i in range(2)], epoch=0, epoch_finished=False,
                      rollouts=rollouts)
    batch.advantages = side.advantages(batch)
    mini_batches = side.micro_batches(batch)
    micro_batches = [mb for mini in mini_batches for mb in mini]
    places = sorted({str(device_check.placement(t)) for mb in micro_batches for t in mb.values()})
    side.old_logprobs(micro_batches)
    cd_metrics = P2OHooks.token_weights(SimpleNamespace(distill=True, p2o=cfg.algorithm.p2o), batch, micro_batches,
                                        side.logprobs)
    updates = side.update(mini_batches)

    def exported(receive: bool) -> dict[str, torch.Tensor]:
        return {name: tensor.clone() for bucket in export_hf_weights(side.learner.model, side.arch, 300_000,
                                                                      receive=receive)
                for name, tensor in bucket}

    everywhere, some = exported(True), exported(rank in EXPORT_RECEIVERS)
    result = {"micro_batch_placements": places, "cd_metrics": cd_metrics, "updates": updates,
              "micro_batches_with_cd_weight": sum("cd_weight" in mb for mb in micro_batches),
              "exported_everywhere": len(everywhere), "exported_some": sorted(some),
              "some_equal_everywhere": all(torch.equal(some[name], everywhere[name]) for name in some),
              "export_placements": sorted({str(device_check.placement(t)) for t in some.values()})}
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))


MICRO_BATCHING_MODES = {"fixed": (0, False), "token_budget": (96, False), "packed": (96, True)}


def micro_batching_worker(hf_dir: str, out_dir: str, tp: int, pp: int, sequence_parallel: bool) -> None:
    """One GRPO update of the same rollouts (log-normal response lengths) with fixed-size micro-batches, token-budget
    micro-batches, and token-budget packed (THD) ones, each from the same initial weights. Writes, per mode, the
    old log-probs this rank computed (by rollout index), the update's metrics and this rank's gradients (the
    weights after Adam's first step are no comparison: it divides each gradient by its own magnitude, so float
    noise on a near-zero gradient moves a weight by a share of the learning rate)."""
    from p2o_hpc.choices import ParamsDtype
    from p2o_hpc.config import RunConfig
    from p2o_hpc.records import Problem, Rollout, StepBatch
    from p2o_hpc.trainer.learner_side import LearnerSide

    init_megatron(tp, pp)
    rank = dist.get_rank()
    generator = torch.Generator().manual_seed(7)
    lengths = (2.5 + 0.8 * torch.randn(8, generator=generator)).exp().clamp(2, 60).long().tolist()  # log-normal
    prompt = lambda p: [FIRST_ORDINARY_TOKEN + p + i for i in range(5 + 3 * p)]  # noqa: E731
    rollouts = [Rollout(i // 4, prompt(i // 4), torch.randint(FIRST_ORDINARY_TOKEN, 200, (lengths[i],),
                                                              generator=generator).tolist(),
                        None, "stop", "", reward=float(i % 3 == 0)) for i in range(8)]
    result = {"lengths": lengths}
    for mode, (budget, packed) in MICRO_BATCHING_MODES.items():
        cfg = RunConfig()
        cfg.model.params_dtype = ParamsDtype.fp32
        cfg.algorithm = AlgorithmConfig(n_samples=4, prompts_per_step=2, mini_batch_prompts=2, micro_batch_size=2,
                                        micro_batch_tokens=budget, lr=1e-3, warmup_ratio=0.0)
        cfg.parallel.pack_sequences, cfg.parallel.sequence_parallel = packed, sequence_parallel
        side = LearnerSide(cfg, hf_dir, total_steps=1)
        batch = StepBatch([Problem(str(i), "", "", "test") for i in range(2)], epoch=0, epoch_finished=False,
                          rollouts=rollouts)
        batch.advantages = side.advantages(batch)
        mini_batches = side.micro_batches(batch)
        micro_batches = [mb for mini in mini_batches for mb in mini]
        side.old_logprobs(micro_batches)
        logprobs = {}
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            for mb in micro_batches:
                for row, index in enumerate(mb["rollout_index"].tolist()):
                    logprobs[index] = mb["old_logprobs"][row, : len(rollouts[index].sequence) - 1].tolist()
        updates = side.update(mini_batches)
        grads = {name: param.main_grad.clone() for name, param in side.learner.model.named_parameters()}
        save_file(grads, str(Path(out_dir) / f"rank{rank}_{mode}.safetensors"))
        result[mode] = {"logprobs": logprobs, "updates": updates, "rows": [len(mb["rollout_index"]) for mb in
                                                                            micro_batches]}
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(result))
