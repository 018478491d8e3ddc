"""Does the Megatron model at a TP/PP layout compute what the HF model computes? The conversion check.

Loads the HF folder into megatron at the given layout, runs the same right-padded batch through both, and
compares logits and per-token log-probs (megatron's via vocab-parallel cross entropy) on the valid positions.
Negative controls load deliberately wrong variants (the classic conversion bugs) to prove the check can fail.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from p2o_hpc.megatron.distributed import init_megatron, launch_local
from p2o_hpc.megatron.forward import forward_collect, next_token_logprobs
from p2o_hpc.megatron.hf_weights import SafetensorsFolder, load_hf_weights, parameter_mappings
from p2o_hpc.megatron.model_provider import build_gpt_model, build_transformer_config, read_hf_architecture

NEGATIVE_CONTROLS = ("none", "naive_qkv", "interleaved_rope")


def make_batch(vocab_size: int, batch: int, seq: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens, right-padded: row i loses i*seq//(2*batch) trailing tokens (masked out of the comparison)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (batch, seq), generator=generator)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    for row in range(batch):
        pad = row * seq // (2 * batch)
        if pad:
            attention_mask[row, seq - pad :] = 0
            input_ids[row, seq - pad :] = 0
    return input_ids, attention_mask


@torch.no_grad()
def _break_qkv_layout(model, hf_dir, arch) -> None:
    """Negative control: q, k, v concatenated plainly instead of per KV group."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    with SafetensorsFolder(hf_dir) as source:
        for param, mapping in parameter_mappings(model, arch):
            if mapping.megatron_name.endswith("linear_qkv.weight"):
                naive = torch.cat([source.tensor(name) for name in mapping.hf_names])
                param.copy_(naive.chunk(tp_size, dim=0)[tp_rank])


def hf_reference(hf_dir: str | Path, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' fp32 logits and next-token log-probs of the folder on a right-padded batch (on the CPU)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    logprobs = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return logits, logprobs


def _worker(hf_dir: str, tp: int, pp: int, batch: int, seq: int, seed: int, negative_control: str, result_path: str):
    init_megatron(tp, pp, seed=seed)
    arch = read_hf_architecture(hf_dir)
    overrides = {"rotary_interleaved": True} if negative_control == "interleaved_rope" else {}
    model = build_gpt_model(arch, build_transformer_config(arch, **overrides))
    load_hf_weights(model, hf_dir, arch)
    if negative_control == "naive_qkv":
        _break_qkv_layout(model, hf_dir, arch)

    input_ids, attention_mask = make_batch(arch.vocab_size, batch, seq, seed)
    diffs = hf_parity(model, arch, hf_dir, input_ids, attention_mask)
    if dist.get_rank() == 0:
        Path(result_path).write_text(json.dumps(diffs))


def learner_logits(model, arch, input_ids: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """Collective: the megatron `model`'s full-vocabulary logits and next-token log-probs of one batch, on the CPU;
    None except on the last pipeline stage."""

    def collect(micro_batch, logits_shard):
        full_logits = gather_from_tensor_model_parallel_region(logits_shard)[..., : arch.vocab_size]
        return {"logits": full_logits, "logprobs": next_token_logprobs(logits_shard, micro_batch["input_ids"], arch.vocab_size)}

    outputs = forward_collect(model, [{"input_ids": input_ids.to(torch.cuda.current_device())}], collect)
    return {key: value.cpu() for key, value in outputs[0].items()} if outputs else None


def hf_parity(model, arch, hf_dir: str | Path, input_ids: torch.Tensor,
              attention_mask: torch.Tensor) -> dict[str, float]:
    """Collective: max |megatron − transformers| of the logits and log-probs on the valid positions of a
    right-padded batch, for the megatron `model` as it is now against the HF folder `hf_dir` (the import check,
    and a trained model against its export). The same numbers come back on every rank."""
    outputs = learner_logits(model, arch, input_ids)
    diffs = torch.zeros(2, dtype=torch.float64, device=torch.cuda.current_device())
    if outputs is not None and parallel_state.get_tensor_model_parallel_rank() == 0:
        ref_logits, ref_logprobs = hf_reference(hf_dir, input_ids.cpu(), attention_mask.cpu())
        valid = attention_mask.cpu().bool()
        diffs[0] = (outputs["logits"] - ref_logits)[valid].abs().max()
        diffs[1] = (outputs["logprobs"] - ref_logprobs)[valid[:, 1:]].abs().max()
    dist.all_reduce(diffs, op=dist.ReduceOp.MAX)
    return {"max_abs_logit_diff": diffs[0].item(), "max_abs_logprob_diff": diffs[1].item()}


def compare_with_hf(
    hf_dir: str | Path,
    tp: int = 1,
    pp: int = 1,
    *,
    batch: int = 2,
    seq: int = 32,
    seed: int = 0,
    negative_control: str = "none",
    workdir: str | Path,
) -> dict[str, float]:
    """Spawns tp×pp processes; returns {'max_abs_logit_diff': x, 'max_abs_logprob_diff': y}."""
    if negative_control not in NEGATIVE_CONTROLS:
        raise ValueError(f"negative_control must be one of {NEGATIVE_CONTROLS}, got {negative_control!r}")
    result_path = Path(workdir) / f"conversion_tp{tp}_pp{pp}_{negative_control}.json"
    launch_local(_worker, tp * pp, str(hf_dir), tp, pp, batch, seq, seed, negative_control, str(result_path))
    return json.loads(result_path.read_text())
