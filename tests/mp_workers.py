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
