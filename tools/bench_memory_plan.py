"""The memory estimator (p2o_hpc/megatron/memory_plan.py) against learners built here, on CPU (megatron's local spec).

    .venv/bin/python tools/bench_memory_plan.py [--model tiny|testbed|DIR] [--batch 2] [--seq 96]

For each layout (TP1 and TP2, fp32 and bf16, recomputation, sequence parallelism, log-prob chunks, THD packing:
parallel.pack_sequences, every row full as in the estimate's worst case) it builds the
learner, runs one train step (so Adam has its state) and compares the estimate with exact sums over the built
objects: parameter bytes, the DDP grad buffers, the optimizer's tensors (fp32 master copies, Adam m and v). Then it
runs the forward of one micro-batch and its log-probs under `torch.autograd.graph.saved_tensors_hooks` and sums the
unique storages autograd keeps for backward (parameters excluded) against the estimate of what stays saved
(layers, embedding, final norm, log-probs; packed: the scatter back to the padded logits too). Ratios are
measured / estimated. The local spec's core attention is sdpa_attention.SDPAttention (torch's fused SDPA); the TE
spec (GPU) is not measured here.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

# (name, tp, params dtype, learner settings)
CASES = [
    ("fp32", 1, "fp32", {}),
    ("bf16", 1, "bf16", {}),
    ("bf16 selective", 1, "bf16", {"recompute": "selective"}),
    ("bf16 full/1", 1, "bf16", {"recompute": "full", "recompute_num_layers": 1}),
    ("bf16 full/2", 1, "bf16", {"recompute": "full", "recompute_num_layers": 2}),
    ("bf16 chunks of 64", 1, "bf16", {"logprob_chunk_tokens": 64}),
    ("bf16", 2, "bf16", {}),
    ("bf16 SP", 2, "bf16", {"sequence_parallel": True}),
    ("bf16 SP full/1 chunks of 64", 2, "bf16",
     {"sequence_parallel": True, "recompute": "full", "recompute_num_layers": 1, "logprob_chunk_tokens": 64}),
    ("bf16 packed", 1, "bf16", {"pack_sequences": True}),
    ("bf16 packed selective chunks of 64", 1, "bf16",
     {"pack_sequences": True, "recompute": "selective", "logprob_chunk_tokens": 64}),
    ("bf16 SP packed", 2, "bf16", {"sequence_parallel": True, "pack_sequences": True}),
]


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one buffer count once)."""
    seen = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def measure_static(learner) -> dict[str, int]:
    """Exact bytes of the built learner on this rank: parameters, DDP grad buffers, optimizer tensors."""
    import torch

    model, optimizer = learner.model, learner.optimizer
    params = sum(param.numel() * param.element_size() for param in model.parameters())
    grads = sum(buffer.grad_data.numel() * buffer.grad_data.element_size()
                for buffer in model.buffers + model.expert_parallel_buffers)
    state = []
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        for group in getattr(inner, "fp32_from_float16_groups", []):
            state.extend(group)  # fp32 master copies of bf16/fp16 parameters
        for values in inner.optimizer.state.values():
            state.extend(value for value in values.values() if torch.is_tensor(value) and value.dim() > 0)
    return {"parameters": params, "gradients": grads, "optimizer": storage_bytes(state)}


def measure_saved(learner, input_ids, vocab_size: int, chunk_tokens: int = 0) -> int:
    """Bytes of the unique storages autograd saves for backward during one micro-batch's forward and log-probs
    (training mode), parameters and their buffers left out. A learner with pack_sequences runs the micro-batch
    packed (THD, every row full) as forward.run_schedule does, logits scattered back to [batch, seq]."""
    import torch
    from megatron.core import parallel_state
    from megatron.core.utils import get_attr_wrapped_model

    from p2o_hpc.megatron.forward import next_token_logprobs, pack_micro_batch

    model = learner.model
    excluded = {param.untyped_storage().data_ptr() for param in model.parameters()}
    saved = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        if learner.pack_sequences:
            sp = get_attr_wrapped_model(model, "config").sequence_parallel
            multiple = parallel_state.get_tensor_model_parallel_world_size() if sp else 1
            lengths = torch.full((input_ids.shape[0],), input_ids.shape[1])
            packed = pack_micro_batch(input_ids, lengths, multiple)
            logits = packed.unpack(model(packed.input_ids, None, None, packed_seq_params=packed.params))
        else:
            logits = model(input_ids, None, None)
        loss = next_token_logprobs(logits, input_ids, vocab_size, chunk_tokens).sum()
    loss.backward()  # frees what was saved (and checks it was enough)
    model.zero_grad_buffer()
    return sum(saved.values())


def worker(hf_dir: str, tp: int, batch: int, seq: int, out_dir: str) -> None:
    """Every case of this TP size in one process group; rank 0 writes the measurements."""
    import torch
    import torch.distributed as dist

    from p2o_hpc.config import AlgorithmConfig
    from p2o_hpc.megatron.distributed import init_megatron
    from p2o_hpc.megatron.model_provider import read_hf_architecture
    from p2o_hpc.megatron.training import LRSchedule, build_learner, token_nll_loss, train_step

    init_megatron(tp, 1)
    arch = read_hf_architecture(hf_dir)
    input_ids = torch.randint(3, arch.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    results = []
    for name, case_tp, dtype, settings in CASES:
        if case_tp != tp:
            continue
        chunk = settings.get("logprob_chunk_tokens", 0)  # the loss's, not the learner's
        learner = build_learner(arch, hf_dir, AlgorithmConfig(), LRSchedule(0, 10), dtypes[dtype],
                                **{key: value for key, value in settings.items() if key != "logprob_chunk_tokens"})
        seq_lengths = torch.full((batch,), seq)
        train_step(learner, [{"input_ids": input_ids, "seq_lengths": seq_lengths}], token_nll_loss(arch, chunk))
        results.append({"name": name, "tp": tp, "dtype": dtype, "settings": settings,
                        **measure_static(learner), "saved": measure_saved(learner, input_ids, arch.vocab_size, chunk)})
    if dist.get_rank() == 0:
        (Path(out_dir) / f"tp{tp}.json").write_text(json.dumps(results))


def estimated(shape, case: dict, batch: int, seq: int) -> dict[str, int]:
    """The estimator's numbers for a measured case (the same keys)."""
    from p2o_hpc.choices import Recompute
    from p2o_hpc.megatron.memory_plan import DTYPE_BYTES, Layout, activation_bytes, static_bytes

    settings = case["settings"]
    layout = Layout(tp=case["tp"], pp=1, dp=1, sequence_parallel=settings.get("sequence_parallel", False),
                    recompute=Recompute(settings.get("recompute", "none")),
                    recompute_num_layers=settings.get("recompute_num_layers", 1), distributed_optimizer=False,
                    grad_reduce_in_fp32=True, logprob_chunk_tokens=settings.get("logprob_chunk_tokens", 0),
                    param_bytes=DTYPE_BYTES[case["dtype"]], micro_batch_size=batch, seq_len=seq, micro_batches=1,
                    pack_sequences=settings.get("pack_sequences", False))
    parts = activation_bytes(shape, layout, "local", stage=0)
    return {**static_bytes(shape, layout, 0),
            "saved": parts["layers"] + parts["embedding"] + parts["final_norm"] + parts["logprobs"]}


def compare(hf_dir: str, batch: int, seq: int) -> list[dict]:
    """Measured and estimated bytes of every case (spawns the TP1 and TP2 process groups)."""
    from p2o_hpc.megatron.distributed import launch_local
    from p2o_hpc.megatron.memory_plan import read_model_shape

    shape = read_model_shape(hf_dir)
    rows = []
    with tempfile.TemporaryDirectory() as out_dir:
        for tp in sorted({case[1] for case in CASES}):
            launch_local(worker, tp, hf_dir, tp, batch, seq, out_dir)
            for case in json.loads((Path(out_dir) / f"tp{tp}.json").read_text()):
                rows.append({"case": case, "estimate": estimated(shape, case, batch, seq)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny, testbed or an HF folder")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=96, help="tokens per sequence (even: TP2's sequence parallelism)")
    args = parser.parse_args(argv)
    from p2o_hpc.model_dir import resolve_model_dir

    rows = compare(resolve_model_dir(args.model), args.batch, args.seq)
    table = Table(title=f"{args.model}: estimated vs measured per GPU, one micro-batch {args.batch}×{args.seq}; "
                        "ratio = measured / estimated")
    for column in ("case", "TP", "static est KiB", "measured", "ratio", "worst part",
                   "activations est KiB", "measured", "ratio"):
        table.add_column(column, justify="left" if column == "case" else "right")
    worst = 0.0
    for row in rows:
        case, estimate = row["case"], row["estimate"]
        parts = ("parameters", "gradients", "optimizer")
        static_est, static_meas = sum(estimate[key] for key in parts), sum(case[key] for key in parts)
        part_ratios = {key: case[key] / estimate[key] for key in parts}
        worst_part = max(part_ratios, key=lambda key: abs(part_ratios[key] - 1))
        saved_ratio = case["saved"] / estimate["saved"]
        worst = max(worst, abs(saved_ratio - 1), *(abs(ratio - 1) for ratio in part_ratios.values()))
        table.add_row(case["name"], str(case["tp"]), f"{static_est / 1024:,.0f}", f"{static_meas / 1024:,.0f}",
                      f"{static_meas / static_est:.3f}", f"{worst_part} {part_ratios[worst_part]:.3f}",
                      f"{estimate['saved'] / 1024:,.0f}", f"{case['saved'] / 1024:,.0f}", f"{saved_ratio:.3f}")
    Console(width=160).print(table)
    print(f"max |ratio − 1| = {worst:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
