"""Supervised fine-tuning (SFT) by the RL learner itself: warm-start a model, then export it as an HF folder.

The model math is the learner's, unchanged: `build_learner` (the HF→megatron import, megatron optimizer, LR
schedule) and `train_step` (forward, vocab-parallel log-probs, loss, backward, grad sync, clip, step; any
TP/PP/DP layout), with the registered policy loss ``sft`` (:func:`p2o_hpc.algo.core_algos.sft_loss`): the
negative log-likelihood of each response token, −log π_θ(y_t | x, y_<t), aggregated by ``loss_agg`` over the
response mask (token-mean: summed over the global batch's response tokens, divided by their count). Prompt tokens
and padding are never targets; prompt tokens act only as context. Only the data side here is SFT's own.

Rows are ``(prompt_text, response_text)`` pairs: the prompt already rendered by the caller through the model's
chat template (:func:`p2o_hpc.data.prompts.render_prompt`, ending with the assistant header), the response the
assistant's text. Prompt and response are tokenized separately, as the generator sees them, and the response ends
with the tokenizer's eos (``<|im_end|>`` for Qwen3) so the model learns to stop.

Which rows form a step does not depend on their length (epochs are seeded permutations); inside a step the rows
are sorted by length and packed into micro-batches of at most ``micro_batch_tokens`` padded tokens, so similar
lengths share a micro-batch. The loss is a sum over the whole step divided by its token count, so packing changes
the speed (tiny models on CPU are padding-bound), not the gradient.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from p2o_hpc.algo.policy_loss import make_policy_loss_fn
from p2o_hpc.algo.rollout_batch import PAD_ID, pack_by_length
from p2o_hpc.choices import LossAgg, LRDecayStyle, ParamsDtype, PolicyLoss
from p2o_hpc.config import AlgorithmConfig
from p2o_hpc.io_utils import fsync_dir
from p2o_hpc.megatron.conversion_check import hf_parity
from p2o_hpc.megatron.distributed import init_megatron, launch_local
from p2o_hpc.megatron.forward import forward_collect
from p2o_hpc.megatron.hf_weights import save_hf_folder
from p2o_hpc.megatron.model_provider import read_hf_architecture
from p2o_hpc.megatron.training import Learner, LRSchedule, build_learner, train_step
from p2o_hpc.trainer.learner_side import DTYPES

SFTRow = tuple[str, str]  # (rendered prompt text, response text)
LOG_NAME = "sft_log.json"  # written into the exported folder: settings, per-step metrics, the export check
PROBE_MAX_TOKENS = 256  # the export check's rows are cut to this length (full-vocab logits of a big model are large)


class ExportCheckError(RuntimeError):
    """The exported HF folder does not compute what the trained megatron model computes."""


@dataclasses.dataclass(frozen=True)
class SFTSettings:
    """One SFT stage. `steps` (optimizer steps), when set, wins over `epochs` (passes over the rows)."""

    steps: int | None = None
    epochs: float = 1.0
    global_batch_rows: int = 32  # rows per optimizer step, all DP ranks together
    # Padded tokens (rows × longest row) per forward/backward; a longer row goes alone. On the tiny CPU model 1-2k
    # was fastest (less padding, cache-sized activations); GPUs want more.
    micro_batch_tokens: int = 2048
    max_tokens: int | None = None  # longest row (prompt + response + eos) allowed; None → max_position_embeddings
    lr: float = 1e-5
    warmup_steps: int = 0  # linear warm-up from lr 0, in optimizer steps (megatron's: the first runs at lr 0)
    lr_decay_style: LRDecayStyle = LRDecayStyle.cosine  # to 0 at the last step (megatron's scheduler, no floor)
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    loss_agg: LossAgg = LossAgg["token-mean"]
    seed: int = 0  # data order and megatron's RNG
    params_dtype: ParamsDtype = ParamsDtype.fp32
    check_export: bool = True  # load the export in transformers and compare its logits with the trained model's
    export_tolerance: float = 1e-4  # max |logit diff| allowed at fp32 (bf16/fp16 runs record the diff only)
    probe_rows: int = 2  # rows (the first ones given) for the export check and the recorded final loss
    progress: bool = True

    def total_steps(self, num_rows: int) -> int:
        if self.steps is not None:
            return self.steps
        return math.ceil(self.epochs * num_rows / self.global_batch_rows)

    def check(self, num_rows: int, dp_size: int) -> None:
        """Errors that would otherwise surface as a megatron assert or an empty micro-batch list."""
        steps = self.total_steps(num_rows) if num_rows else 0
        for ok, message in (
            (num_rows >= 1, "no SFT rows"),
            (self.global_batch_rows >= dp_size, f"global_batch_rows={self.global_batch_rows} must be ≥ the "
                                                f"data-parallel size {dp_size} (every rank needs a row)"),
            (self.micro_batch_tokens >= 1, f"micro_batch_tokens={self.micro_batch_tokens} must be ≥ 1"),
            (steps >= 1, f"the stage has {steps} optimizer steps (steps={self.steps}, epochs={self.epochs})"),
            (0 <= self.warmup_steps < max(steps, 1), f"warmup_steps={self.warmup_steps} must be shorter than the "
                                                     f"{steps} optimizer steps"),
        ):
            if not ok:
                raise ValueError(f"SFT settings: {message}")

    def algorithm(self) -> AlgorithmConfig:
        """The learner's optimizer and loss settings: the registered `sft` policy loss, no KL term."""
        return AlgorithmConfig(policy_loss=PolicyLoss.sft, loss_agg=self.loss_agg, kl_coef=0.0, lr=self.lr,
                               weight_decay=self.weight_decay, clip_grad=self.clip_grad,
                               lr_decay_style=self.lr_decay_style, warmup_steps=self.warmup_steps)


@dataclasses.dataclass(frozen=True)
class TokenizedRow:
    ids: list[int]  # prompt ids + response ids (+ eos)
    prompt_len: int

    @property
    def response_len(self) -> int:
        return len(self.ids) - self.prompt_len


# ------------------------------------------------------------------------------------------------- data


def check_rows(rows: Sequence[SFTRow]) -> list[SFTRow]:
    """Rows as (prompt, response) string pairs; a malformed one is named before any process starts."""
    checked = []
    for index, row in enumerate(rows):
        if not (isinstance(row, (tuple, list)) and len(row) == 2 and all(isinstance(text, str) for text in row)):
            raise TypeError(f"SFT row {index}: expected (prompt_text, response_text), got {str(row)[:200]!r}")
        checked.append((row[0], row[1]))
    return checked


def tokenize_rows(tokenizer, rows: Sequence[SFTRow], max_tokens: int) -> list[TokenizedRow]:
    """Prompt and response tokenized apart (as the generator sees them: prompt ids, then generated ids) and the
    response closed with the tokenizer's eos. add_special_tokens=False: the chat template already wrote them."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos token: SFT responses could not end")
    prompts = tokenizer([prompt for prompt, _ in rows], add_special_tokens=False)["input_ids"]
    responses = tokenizer([response for _, response in rows], add_special_tokens=False)["input_ids"]
    tokenized = []
    for index, (prompt_ids, response_ids) in enumerate(zip(prompts, responses)):
        if not response_ids or response_ids[-1] != eos:
            response_ids = [*response_ids, eos]
        if not prompt_ids:
            raise ValueError(f"SFT row {index}: empty prompt (the first response token would have no context)")
        total = len(prompt_ids) + len(response_ids)
        if total > max_tokens:
            raise ValueError(f"SFT row {index}: {total} tokens (prompt {len(prompt_ids)} + response "
                             f"{len(response_ids)}) > max_tokens={max_tokens}")
        tokenized.append(TokenizedRow(list(prompt_ids) + list(response_ids), len(prompt_ids)))
    return tokenized


def step_row_indices(num_rows: int, global_batch_rows: int, steps: int, seed: int) -> list[list[int]]:
    """The rows of every optimizer step: epochs are seeded permutations read in consecutive global batches (a batch
    may straddle two epochs), so every step has the same number of rows and `steps` need not fill whole epochs."""
    generator = torch.Generator().manual_seed(seed)
    stream: list[int] = []
    while len(stream) < steps * global_batch_rows:
        stream.extend(torch.randperm(num_rows, generator=generator).tolist())
    return [stream[step * global_batch_rows:(step + 1) * global_batch_rows] for step in range(steps)]


def padded(rows: Sequence[TokenizedRow]) -> dict[str, torch.Tensor]:
    """Right-padded rows (built on the host): input_ids, response_mask (the loss's targets), attention_mask."""
    length = max(len(row.ids) for row in rows)
    batch = {"input_ids": torch.full((len(rows), length), PAD_ID, dtype=torch.long),
             "response_mask": torch.zeros((len(rows), length), dtype=torch.float32),
             "attention_mask": torch.zeros((len(rows), length), dtype=torch.long)}
    for index, row in enumerate(rows):
        batch["input_ids"][index, :len(row.ids)] = torch.tensor(row.ids)
        batch["response_mask"][index, row.prompt_len:len(row.ids)] = 1.0
        batch["attention_mask"][index, :len(row.ids)] = 1
    return batch


def collate(rows: Sequence[TokenizedRow], device) -> dict[str, torch.Tensor]:
    """An SFT micro-batch on the learner's device: input_ids and response_mask, the keys the policy loss reads
    (no advantages, no old log-probs: the sft loss has none)."""
    batch = padded(rows)
    return {key: batch[key].to(device) for key in ("input_ids", "response_mask")}


def rank_rows(rows: Sequence[TokenizedRow], *, dp_rank: int, dp_size: int) -> list[TokenizedRow]:
    """This DP rank's rows of a step: sorted by length and dealt round-robin, so ranks get similar token counts.
    Every TP/PP rank of the DP group takes the same rows."""
    return sorted(rows, key=lambda row: -len(row.ids))[dp_rank::dp_size]


def micro_batches_by_length(rows: Sequence[TokenizedRow], micro_batch_tokens: int, device) -> list[dict]:
    return [collate([rows[i] for i in batch], device)
            for batch in pack_by_length([len(row.ids) for row in rows], micro_batch_tokens)]


# --------------------------------------------------------------------------------------------- training


def evaluate_loss(learner: Learner, micro_batches: list[dict], loss_fn) -> float:
    """Collective: the loss of the model as it is now on `micro_batches` (the same on every DP rank), no update."""
    results = forward_collect(learner.model, micro_batches,
                              lambda batch, logits: dict(zip(("summed", "count"), loss_fn(batch, logits)[:2])))
    totals = torch.zeros(2, dtype=torch.float64, device=torch.cuda.current_device())
    for result in results:
        totals += torch.stack([result["summed"].detach().double(), result["count"].double()])
    dist.broadcast(totals, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                   group=parallel_state.get_pipeline_model_parallel_group())
    return (totals[0] / totals[1].clamp(min=1)).item()


def _probe(rows: list[TokenizedRow], count: int) -> list[TokenizedRow]:
    """The first `count` rows, cut to PROBE_MAX_TOKENS (the prompt keeps at most all but one of them)."""
    probe = []
    for row in rows[:count]:
        ids = row.ids[:PROBE_MAX_TOKENS]
        probe.append(TokenizedRow(ids, min(row.prompt_len, len(ids) - 1)))
    return probe


def train_sft(model_dir: str | Path, rows: Sequence[SFTRow], out_dir: str | Path, settings: SFTSettings) -> dict:
    """Collective, in processes where megatron is initialised (init_megatron, any TP/PP/DP layout): train
    `settings.total_steps` optimizer steps on `rows` from the HF folder `model_dir`, then write the trained model
    as a complete HF folder at `out_dir` (weights, config, generation config, tokenizer; the SFT log in
    sft_log.json). The folder appears whole (built beside `out_dir`, then renamed over it) after the export
    check passed, or not at all. Returns the log (on every rank)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from transformers import AutoTokenizer

    started = time.perf_counter()
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    rows = check_rows(rows)
    arch = read_hf_architecture(model_dir)
    tokenized = tokenize_rows(AutoTokenizer.from_pretrained(model_dir), rows,
                              settings.max_tokens or arch.max_position_embeddings)
    dp_size, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    settings.check(len(tokenized), dp_size)
    steps = settings.total_steps(len(tokenized))
    algo = settings.algorithm()
    learner = build_learner(arch, str(model_dir), algo, LRSchedule(warmup_steps=settings.warmup_steps,
                                                                   total_steps=steps),
                            DTYPES[str(settings.params_dtype)])
    loss_fn = make_policy_loss_fn(arch.vocab_size, algo)
    device = torch.cuda.current_device()
    is_writer = dist.get_rank() == 0
    console = Console() if is_writer else None
    progress = Progress(TextColumn("[bold]SFT"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        TextColumn("{task.description}"), console=console,
                        disable=not (is_writer and settings.progress))
    report_every = max(1, steps // 10)
    history = []
    setup_s = time.perf_counter() - started
    with progress:
        task = progress.add_task("", total=steps)
        for step, indices in enumerate(step_row_indices(len(tokenized), settings.global_batch_rows, steps,
                                                        settings.seed), start=1):
            step_rows = [tokenized[i] for i in indices]
            start = time.perf_counter()
            mine = rank_rows(step_rows, dp_rank=dp_rank, dp_size=dp_size)
            micro_batches = micro_batches_by_length(mine, settings.micro_batch_tokens, device)
            metrics = train_step(learner, micro_batches, loss_fn)  # ends with .item(): the step is done
            seconds = time.perf_counter() - start
            tokens = sum(len(row.ids) for row in step_rows)  # the whole step's (all DP ranks), padding excluded
            padded_tokens = sum(batch["input_ids"].numel() for batch in micro_batches)
            record = {"step": step, "loss": metrics["loss"], "grad_norm": metrics["grad_norm"], "lr": metrics["lr"],
                      "update_ok": metrics["update_ok"], "tokens": tokens,
                      "loss_tokens": sum(row.response_len for row in step_rows), "micro_batches": len(micro_batches),
                      "pad_frac": 1.0 - sum(len(row.ids) for row in mine) / padded_tokens,  # this rank's
                      "seconds": seconds, "tokens_per_s": tokens / seconds}
            history.append(record)
            description = f"loss {record['loss']:.4f} lr {record['lr']:.2e} {record['tokens_per_s']:,.0f} tok/s"
            progress.update(task, advance=1, description=description)
            if is_writer and (step % report_every == 0 or step == steps):
                progress.console.print(f"step {step}/{steps}: {description}, padding {record['pad_frac']:.1%}")

    train_s = time.perf_counter() - started - setup_s
    probe = _probe(tokenized, settings.probe_rows)
    log = {
        "source": str(model_dir),
        "settings": json.loads(json.dumps(dataclasses.asdict(settings), default=str)),
        "rows": len(tokenized),
        "steps": history,
        "tokens_per_s": sum(r["tokens"] for r in history) / sum(r["seconds"] for r in history),
        "seconds": {"setup": setup_s, "train": train_s},  # export and its check: wall time of the stage minus these
        "probe": {"rows": len(probe), "ids": [row.ids for row in probe],
                  "prompt_lens": [row.prompt_len for row in probe],
                  "loss": evaluate_loss(learner, [collate(probe, device)], loss_fn)},
    }
    _export(learner, arch, model_dir, out_dir, settings, padded(probe), log, is_writer)
    if console is not None:
        check = log.get("export_check") or {}
        console.print(f"SFT: {steps} steps, loss {history[0]['loss']:.4f} → {history[-1]['loss']:.4f}, "
                      f"{log['tokens_per_s']:,.0f} tok/s → {out_dir}"
                      + (f" (export max |Δlogit| {check['max_abs_logit_diff']:.2e})" if check else ""))
    return log


def _export(learner: Learner, arch, model_dir: Path, out_dir: Path, settings: SFTSettings, probe: dict,
            log: dict, is_writer: bool) -> None:
    """Collective: save into a staging folder beside out_dir, check it against the megatron model, rename it in."""
    holder = [None]
    if is_writer:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        holder[0] = tempfile.mkdtemp(prefix=f".{out_dir.name}.sft-", dir=out_dir.parent)
    dist.broadcast_object_list(holder, src=0)
    staging_root = Path(holder[0])
    try:
        staged = save_hf_folder(learner.model, arch, model_dir, staging_root / "model", write=is_writer)
        dist.barrier()  # the folder is complete before any rank reads it
        failure = None
        if settings.check_export:
            check = hf_parity(learner.model, arch, staged, probe["input_ids"], probe["attention_mask"])
            log["export_check"] = {**check, "tolerance": settings.export_tolerance,
                                   "dtype": str(settings.params_dtype)}
            if (settings.params_dtype == ParamsDtype.fp32
                    and not check["max_abs_logit_diff"] <= settings.export_tolerance):
                failure = (f"{out_dir}: the exported folder's logits differ from the trained megatron model's by "
                           f"{check['max_abs_logit_diff']:.3g} > {settings.export_tolerance:g}; not published")
    except BaseException:
        if is_writer:
            shutil.rmtree(staging_root, ignore_errors=True)
        raise
    if is_writer:
        if failure is None:
            (staged / LOG_NAME).write_text(json.dumps(log, indent=1))
            _publish(staged, out_dir, staging_root)
        else:
            shutil.rmtree(staging_root, ignore_errors=True)
    dist.barrier()
    if failure is not None:
        raise ExportCheckError(failure)


def _publish(staged: Path, out_dir: Path, staging_root: Path) -> None:
    """Rename the finished folder to out_dir; an existing out_dir is moved into the staging area first (rename
    cannot replace a non-empty folder), so readers see the old or the new complete folder, never a partial one."""
    if out_dir.exists():
        os.replace(out_dir, staging_root / "previous")
    os.replace(staged, out_dir)
    fsync_dir(out_dir.parent)
    shutil.rmtree(staging_root, ignore_errors=True)


def _sft_worker(model_dir: str, rows: list[SFTRow], out_dir: str, settings: SFTSettings) -> None:
    init_megatron(1, 1, seed=settings.seed)
    train_sft(model_dir, rows, out_dir, settings)


def run_sft(model_dir: str | Path, rows: Sequence[SFTRow], out_dir: str | Path,
            settings: SFTSettings = SFTSettings()) -> Path:
    """Supervised fine-tuning of the HF model at `model_dir` on `rows` ((prompt_text, response_text) pairs, the
    prompt rendered through the chat template) by a one-process megatron learner (world size 1; spawned, so this
    process keeps its own torch state and no process group); returns `out_dir`, a complete HF folder with the
    trained weights and the SFT log (:data:`LOG_NAME`, read back with :func:`read_sft_log`)."""
    rows = check_rows(rows)
    launch_local(_sft_worker, 1, str(model_dir), rows, str(out_dir), settings)
    return Path(out_dir)


def read_sft_log(folder: str | Path) -> dict:
    return json.loads((Path(folder) / LOG_NAME).read_text())
