"""The GRPO loop, run by every rank (SPMD, like megatron): one step is

  weight sync → rollout (vLLM) → reward (math-verify) → advantage → old log-probs → PPO updates → metrics,

with hard-sample mining per epoch and checkpoints that resume exactly. Engine-host ranks (local rank 0) run the
generator and grader and share the rollouts with every rank; every rank then builds the same batch and takes
its data-parallel share.
"""

from __future__ import annotations

import os
import random
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state, tensor_parallel
from rich.console import Console

from p2o_hpc.algo.context_distillation import cd_token_weights
from p2o_hpc.algo.core_algos import get_advantage_estimator
from p2o_hpc.algo.policy_loss import PolicyLossSettings, make_policy_loss_fn
from p2o_hpc.config import RunConfig, to_run_config
from p2o_hpc.data import Problem, PromptLoader, recipe_split
from p2o_hpc.cluster.preemption import StopSignal
from p2o_hpc.megatron.checkpointing import latest_checkpoint, load_checkpoint, load_rank_state, save_checkpoint
from p2o_hpc.megatron.distributed import init_megatron
from p2o_hpc.megatron.forward import forward_collect, next_token_logprobs
from p2o_hpc.io_utils import atomic_write_text
from p2o_hpc.lease import LEARNER_LEASE, Lease
from p2o_hpc.megatron.hf_weights import export_hf_weights, load_hf_weights, save_hf_folder
from p2o_hpc.megatron.model_provider import build_gpt_model, build_transformer_config, read_hf_architecture
from p2o_hpc.megatron.training import OptimSettings, build_learner, train_step
from p2o_hpc.trainer.hard_mining import HardSampleMiner
from p2o_hpc.trainer.metrics import MetricsSink, PhaseTimer
from p2o_hpc.p2o.template_exchange import TemplateExchange
from p2o_hpc.p2o.templates import rollout_templates
from p2o_hpc.trainer.rollout_batch import (
    Rollout,
    generation_micro_batch,
    group_ids,
    mini_batch_indices,
    rank_micro_batches,
    response_slice,
    rewards_tensor,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Padding sits after each sequence's end and is masked out of the loss, so causal attention never lets it touch a
# trained position; any in-vocabulary id works.
PAD_ID = 0


class RefitCheckError(RuntimeError):
    """The generator's log-probs disagree with the learner's on the same tokens: weights are out of sync."""


def training_problems(data_cfg) -> list[Problem]:
    """The configured training set as the authors' recipe selects it (and an optional limit for smoke runs)."""
    problems = recipe_split(data_cfg.train, data_cfg.recipe, seed=data_cfg.recipe_seed, holdout=data_cfg.holdout,
                            take=data_cfg.take).train
    return problems[: data_cfg.limit] if data_cfg.limit else problems


def rng_state() -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def rank_placement(local_rank: int) -> dict:
    """Where this rank runs and which megatron groups it is in (logged; checked by the multi-node test)."""
    groups = {
        "tp": parallel_state.get_tensor_model_parallel_group(),
        "pp": parallel_state.get_pipeline_model_parallel_group(),
        "dp": parallel_state.get_data_parallel_group(),
    }
    return {"rank": dist.get_rank(), "local_rank": local_rank, "host": socket.gethostname(),
            **{f"{name}_group": dist.get_process_group_ranks(group) for name, group in groups.items()}}


def warmup_optimizer_steps(algo, run_steps: int, mini_batches_per_step: int) -> int:
    """Linear LR warm-up length in optimizer steps: algorithm.warmup_steps, else the authors' verl rule
    int(warmup_ratio × the run's trainer steps), counted in trainer steps there (one scheduler step per trainer
    step) and so multiplied by the mini-batches of a step here (megatron's scheduler steps per optimizer step).
    run_steps is the run's length, algorithm.max_steps included, like the LR schedule's horizon."""
    optimizer_steps = run_steps * mini_batches_per_step
    if algo.warmup_steps >= max(optimizer_steps, 1):
        raise ValueError(f"algorithm.warmup_steps={algo.warmup_steps} must be shorter than the run's "
                         f"{optimizer_steps} optimizer steps ({run_steps} steps × {mini_batches_per_step} mini-batches)")
    if algo.warmup_steps:
        return algo.warmup_steps
    return int(algo.warmup_ratio * run_steps) * mini_batches_per_step


class GRPOTrainer:
    def __init__(self, cfg: RunConfig, run_dir: Path, model_dir: str):
        self.cfg, self.run_dir, self.model_dir = cfg, run_dir, model_dir
        self.stop_signal = StopSignal().install()  # first: every helper process inherits its signal mask
        algo = cfg.algorithm
        init_megatron(cfg.parallel.tensor, cfg.parallel.pipeline, seed=cfg.trainer.seed,
                      timeout_s=cfg.trainer.collective_timeout_s, init_timeout_s=cfg.parallel.init_timeout_s)
        self.rank = dist.get_rank()
        # Two jobs never train into one run dir; a requeued job waits out its dead predecessor's heartbeat.
        self.lease = Lease(run_dir / LEARNER_LEASE, role="learner").acquire(wait_s=90.0) if self.rank == 0 else None
        self.console = Console(stderr=False) if self.rank == 0 else None
        self.arch = read_hf_architecture(model_dir)
        self.problems = training_problems(cfg.data)
        self.loader = PromptLoader(self.problems, algo.prompts_per_step, seed=cfg.trainer.seed)
        steps = algo.epochs * self.loader.steps_per_epoch
        self.total_steps = min(steps, algo.max_steps) if algo.max_steps else steps
        self.mini_batches_per_step = algo.prompts_per_step // algo.mini_batch_prompts
        dtype = DTYPES[cfg.model.params_dtype]
        self.learner = build_learner(self.arch, model_dir, OptimSettings(
            lr=algo.lr, weight_decay=algo.weight_decay, clip_grad=algo.clip_grad,
            warmup_steps=warmup_optimizer_steps(algo, self.total_steps, self.mini_batches_per_step),
            decay_style=algo.lr_decay_style, total_steps=self.total_steps * self.mini_batches_per_step,
        ), dtype)
        self.reference = self._build_reference(dtype) if algo.kl_coef > 0 else None
        self.loss_fn = make_policy_loss_fn(self.arch.vocab_size, PolicyLossSettings(
            policy_loss=algo.policy_loss, clip_low=algo.clip_low, clip_high=algo.clip_high,
            dual_clip_c=algo.dual_clip_c, loss_agg=algo.loss_agg,
            kl_coef=algo.kl_coef, kl_penalty=algo.kl_penalty,
        ))
        self.advantage_fn = get_advantage_estimator(algo.advantage)
        self.miner = HardSampleMiner(tau=algo.tau,
                                     failed_responses=algo.hard.failed_responses,
                                     max_response_chars=algo.hard.max_response_chars)
        self.step = 0
        self.saved_step, self.last_save_s = 0, 0.0
        self.interrupted = False  # stopped by a signal before the run's last step (the SLURM task requeues)
        self.stop_step = self.total_steps  # this job's last step (trainer.stop_after_steps), set once resumed
        self.pending: dict | None = None  # one-step off-policy: the next step's rollouts, generated ahead
        self.worker = None
        self.exchange = TemplateExchange(
            cfg, run_dir, rank=self.rank, console=self.console, sync_weights=self._sync_weights,
            export_policy=lambda path: save_hf_folder(self.learner.model, self.arch, self.model_dir, path,
                                                      write=self.rank == 0,
                                                      bucket_bytes=cfg.rollout.weight_sync_bucket_mb * 1024**2),
            worker=lambda: self.worker,
        )
        self._resume()
        if cfg.trainer.stop_after_steps is not None:
            self.stop_step = min(self.total_steps, self.step + cfg.trainer.stop_after_steps)

        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.placement = rank_placement(local_rank)
        flags = [None] * dist.get_world_size()
        dist.all_gather_object(flags, local_rank == 0)
        self.host_ranks = [rank for rank, is_host in enumerate(flags) if is_host]
        self.prefetch, self.sink = None, None
        try:
            self.worker = self._start_rollout_worker() if local_rank == 0 else None
            self.prefetch = ThreadPoolExecutor(1) if algo.one_step_off_policy and self.worker else None
            if self.rank == 0:
                wandb_cfg = cfg.logging.wandb
                self.sink = MetricsSink(run_dir, wandb_mode=wandb_cfg.mode, project=wandb_cfg.project,
                                        entity=wandb_cfg.entity, name=wandb_cfg.name or run_dir.name,
                                        group=wandb_cfg.group, config=asdict(cfg))
                self.sink.truncate_after(self.step)
        except BaseException:
            self.close()  # a half-built trainer must not leave its vLLM child behind
            raise

    # ------------------------------------------------------------------------------------------------ setup

    def _build_reference(self, dtype):
        """The frozen initial policy for the (optional) KL term."""
        config = build_transformer_config(self.arch, params_dtype=dtype)
        model = build_gpt_model(self.arch, config)
        load_hf_weights(model, self.model_dir, self.arch)
        model.requires_grad_(False)
        return model

    def _start_rollout_worker(self):
        from p2o_hpc.rollout.rollout_worker import RolloutWorker

        return RolloutWorker.from_config(self.cfg, self.model_dir)

    @property
    def checkpoint_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def _resume(self) -> None:
        checkpoint = latest_checkpoint(self.checkpoint_root) if self.cfg.trainer.resume else None
        if checkpoint is None:
            return
        load_checkpoint(self.learner, checkpoint)
        state = load_rank_state(checkpoint)
        if state is None:
            raise FileNotFoundError(f"{checkpoint}: no rank_{self.rank}.pt trainer state (not a trainer checkpoint)")
        self.step = self.saved_step = state["step"]
        self.loader.load_state_dict(state["loader"])
        self.miner.load_state_dict(state["miner"])
        self.pending = state["pending"]
        self.exchange.load_state_dict(state.get("p2o", {}))
        set_rng_state(state["rng"])
        if self.rank == 0:
            self.console.print(f"resumed from {checkpoint} at step {self.step}")

    def _save(self) -> None:
        started = time.perf_counter()
        state = {"step": self.step, "loader": self.loader.state_dict(), "miner": self.miner.state_dict(),
                 "pending": self.pending, "p2o": self.exchange.state_dict(), "rng": rng_state()}
        save_checkpoint(self.learner, self.checkpoint_root, rank_state=state, keep=self.cfg.trainer.keep_checkpoints)
        self.saved_step, self.last_save_s = self.step, time.perf_counter() - started

    # ------------------------------------------------------------------------------------------ rollout side

    def _sampling(self, step: int, first_prompt: int):
        """Seeds depend only on (step, prompt, sample), so a resumed run regenerates exactly what it would have."""
        from p2o_hpc.rollout.generator import SamplingSettings

        rollout, algo = self.cfg.rollout, self.cfg.algorithm
        seed = rollout.seed * 1_000_003 + (step * algo.prompts_per_step + first_prompt) * algo.n_samples
        return SamplingSettings(n=algo.n_samples, temperature=rollout.temperature, top_p=rollout.top_p,
                                max_tokens=rollout.max_response_tokens, seed=seed, logprobs=True)

    def _sync_weights(self) -> None:
        """Collective: every rank takes part in the export; hosts hand the buckets to their generator."""
        buckets = export_hf_weights(self.learner.model, self.arch,
                                    bucket_bytes=self.cfg.rollout.weight_sync_bucket_mb * 1024**2)
        if self.worker is not None and self.cfg.rollout.sync_weights:
            self.worker.update_weights(buckets)
        else:
            for _ in buckets:
                pass

    def _host_rollouts(self, problems: list[Problem], step: int) -> dict:
        """On a host: generate and grade this host's share of the prompts (timed)."""
        share = len(problems) / len(self.host_ranks)
        index = self.host_ranks.index(self.rank)
        start, stop = round(index * share), round((index + 1) * share)
        started = time.perf_counter()
        templates, rejected = self._rollout_templates(problems[start:stop])
        rollouts = self.worker.generate(problems[start:stop], start, self._sampling(step, start), templates,
                                        distill=self.cfg.algorithm.p2o.context_distillation)
        generated = time.perf_counter()
        self.worker.score(rollouts, [problems[r.prompt_index].answer for r in rollouts])
        return {"rollouts": rollouts, "generate_s": generated - started, "reward_s": time.perf_counter() - generated,
                "templates_rejected": rejected}

    def _rollout_templates(self, problems: list[Problem]) -> tuple[list[list[str]] | None, int]:
        """Per problem, the P²O templates of its K rollouts (checked; a rejected one falls back to the plain
        prompt); None when no problem of this share has an assignment."""
        p2o = self.cfg.algorithm.p2o
        assignments = self.exchange.assignments
        if not (p2o.enabled and any(problem.id in assignments for problem in problems)):
            return None, 0
        templates = [
            rollout_templates(assignments.get(problem.id), self.cfg.algorithm.n_samples,
                              same_template_in_group=p2o.same_template_in_group,
                              keep_one_plain_rollout=p2o.keep_one_plain_rollout)
            for problem in problems
        ]
        return self.worker.checked_templates(templates)

    def _release_generator(self) -> None:
        """Colocated on a GPU, vLLM sleeps while the learner computes log-probs and updates (no-op on CPU).

        Not with one-step off-policy: there the generator is busy with the next batch during the update.
        """
        if self.worker is not None and self.cfg.rollout.enable_sleep_mode and not self.cfg.algorithm.one_step_off_policy:
            self.worker.sleep()

    def _gather_rollouts(self, host_result: dict | None) -> dict:
        """Collective: every rank receives all hosts' rollouts, prompt-major."""
        results = [None] * dist.get_world_size()
        dist.all_gather_object(results, host_result)
        parts = [results[rank] for rank in self.host_ranks]
        return {
            "rollouts": [rollout for part in parts for rollout in part["rollouts"]],
            "generate_s": max(part["generate_s"] for part in parts),
            "reward_s": max(part["reward_s"] for part in parts),
            "templates_rejected": sum(part["templates_rejected"] for part in parts),
        }

    def _next_problems(self) -> dict:
        """Collective (the overlap schedule may wait here for templates): the next batch of prompts."""
        gate = self.exchange.before_batch(self.loader)
        problems = self.loader.next_batch()
        gate.update(self.exchange.batch_metrics(problems))
        return {"problems": problems, "epoch_finished": self.loader.epoch_finished, "gate": gate,
                "epoch": self.loader.epoch - 1 if self.loader.epoch_finished else self.loader.epoch}

    # ------------------------------------------------------------------------------------------ learner side

    def _collect_logprobs(self, model, micro_batches: list[dict], key: str) -> None:
        """Attach `key` = the model's next-token log-probs to each micro-batch (on the last pipeline stage)."""
        results = forward_collect(
            model, micro_batches,
            lambda batch, logits: {"logprobs": next_token_logprobs(logits, batch["input_ids"], self.arch.vocab_size)},
        )
        for batch, result in zip(micro_batches, results):
            batch[key] = result["logprobs"]

    def _context_distillation(self, rollouts: list[Rollout], micro_batches: list[dict]) -> dict:
        """Collective: for templated rollouts, log π(y|x̃) next to the old log π(y|x), and the CD token weights.

        The PPO ratio and gradient use the original prompt x (micro-batch input_ids); tokens whose
        π(y|x)/π(y|x̃) leaves the configured bounds get weight 0 (hard) or less (soft) in the loss.
        """
        p2o = self.cfg.algorithm.p2o
        if not (p2o.enabled and p2o.context_distillation and any(r.distilled for r in rollouts)):
            return {}
        pairs = [(batch, generation_micro_batch(rollouts, batch, PAD_ID)) for batch in micro_batches]
        pairs = [(batch, templated) for batch, templated in pairs if templated is not None]
        if pairs:  # the same on every rank of a model-parallel group (they hold the same micro-batches)
            self._collect_logprobs(self.learner.model, [templated for _, templated in pairs], "templated_logprobs")
        ratios, weights = [], []
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            for batch, templated in pairs:
                batch["cd_weight"] = torch.ones_like(batch["old_logprobs"])
                for row, index in enumerate(batch["rollout_index"].tolist()):
                    rollout = rollouts[index]
                    if not rollout.distilled:
                        continue
                    plain, seen = response_slice(rollout), response_slice(rollout, generation=True)
                    weight, ratio = cd_token_weights(batch["old_logprobs"][row, plain],
                                                     templated["templated_logprobs"][row, seen],
                                                     low=p2o.cd_clip_low, high=p2o.cd_clip_high, mode=p2o.cd_mask)
                    batch["cd_weight"][row, plain] = weight
                    ratios.append(ratio)
                    weights.append(weight)
        mine = None
        if ratios and parallel_state.get_tensor_model_parallel_rank() == 0:
            ratio, weight = torch.cat(ratios).double(), torch.cat(weights).double()
            mine = [float((weight < 1).sum()), float(ratio.numel()), float(ratio.sum()), float(ratio.min()),
                    float(ratio.max())]
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mine)
        parts = [part for part in parts if part is not None]
        if not parts or not sum(part[1] for part in parts):
            return {}
        tokens = sum(part[1] for part in parts)
        return {"p2o/cd_masked_frac": sum(part[0] for part in parts) / tokens,
                "p2o/cd_ratio_mean": sum(part[2] for part in parts) / tokens,
                "p2o/cd_ratio_min": min(part[3] for part in parts),
                "p2o/cd_ratio_max": max(part[4] for part in parts)}

    def _p2o_metrics(self, batch: dict, rollouts: list[Rollout], advantages: torch.Tensor) -> dict:
        """Reward under templates vs on the plain prompt, and whether hard prompts got their gradient back."""
        if not self.cfg.algorithm.p2o.enabled:
            return {}
        templated = [r.reward for r in rollouts if r.template]
        plain = [r.reward for r in rollouts if not r.template]
        k = self.cfg.algorithm.n_samples
        assignments = self.exchange.assignments
        hard_groups = [i for i, problem in enumerate(batch["problems"]) if problem.id in assignments]
        metrics = {"p2o/templated_frac": len(templated) / max(1, len(rollouts)),
                   "p2o/templates_rejected": batch.get("templates_rejected", 0),
                   "p2o/assigned_prompts": len(assignments)}
        if templated:
            metrics["p2o/reward_templated"] = float(np.mean(templated))
        if plain:
            metrics["p2o/reward_plain"] = float(np.mean(plain))
        if hard_groups:
            zero = [bool((advantages[i * k : (i + 1) * k] == 0).all()) for i in hard_groups]
            metrics["p2o/hard_zero_adv_frac"] = float(np.mean(zero))
        return metrics

    def _refit_check(self, rollouts: list[Rollout], micro_batches: list[dict]) -> dict:
        """Collective: the generator's and the learner's log-probs of the same response tokens, which must agree."""
        count = min(self.cfg.rollout.refit_check_sequences, len(rollouts))
        mine = {}
        if parallel_state.is_pipeline_last_stage(ignore_virtual=True) and parallel_state.get_tensor_model_parallel_rank() == 0:
            for batch in micro_batches:
                for row, index in enumerate(batch["rollout_index"].tolist()):
                    if index < count:
                        mine[index] = batch["old_logprobs"][row, response_slice(rollouts[index])].tolist()
        learner_parts = [None] * dist.get_world_size()
        dist.all_gather_object(learner_parts, mine)
        verdict = [None]
        if self.rank == 0:
            learner = {index: values for part in learner_parts for index, values in part.items()}
            engine = self.worker.prompt_logprobs([rollouts[i].sequence for i in range(count)])
            gaps = []
            for index in range(count):
                prompt_len = len(rollouts[index].prompt_ids)
                engine_response = engine[index][prompt_len:]
                gaps.extend(abs(a - b) for a, b in zip(engine_response, learner[index]))
            verdict[0] = {"rollout/logprob_gap_mean": float(np.mean(gaps)) if gaps else 0.0,
                          "rollout/logprob_gap_max": float(np.max(gaps)) if gaps else 0.0}
        dist.broadcast_object_list(verdict, src=0)
        gap = verdict[0]["rollout/logprob_gap_max"]
        if not gap <= self.cfg.rollout.refit_tolerance:  # NaN fails too
            raise RefitCheckError(
                f"step {self.step}: max |generator − learner| log-prob gap {gap:.4g} > rollout.refit_tolerance="
                f"{self.cfg.rollout.refit_tolerance}: the generator is not running the learner's weights"
            )
        return verdict[0]

    # ------------------------------------------------------------------------------------------------ loop

    def fit(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        progress = Progress(TextColumn("[bold]GRPO"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TextColumn("{task.description}"), console=self.console,
                            disable=self.rank != 0 or not self.cfg.logging.progress)
        try:
            with progress:
                task = progress.add_task("", total=self.total_steps, completed=self.step)
                while self.step < self.stop_step:
                    metrics = self.train_one_step()
                    progress.update(task, advance=1, description=(
                        f"reward {metrics['reward/mean']:.3f} loss {metrics['actor/loss']:+.4f} "
                        f"{metrics['time/step']:.1f}s/step"))
                    if self._stop_for_signal_or_deadline(metrics["time/step"]):
                        break
            if self.rank == 0 and self.sink is not None:
                if self.step >= self.total_steps:
                    atomic_write_text(self.run_dir / "FINISHED", "")  # the GEPA service ends with the run
                self._report()
        finally:
            self.close()

    def _stop_for_signal_or_deadline(self, step_s: float) -> bool:
        """At a step boundary: checkpoint early when the walltime would end before the next regular checkpoint;
        on SIGUSR2/SIGTERM checkpoint and stop (the SLURM task then requeues). True → leave the loop."""
        every = self.cfg.trainer.save_every
        stop, early = self.stop_signal.poll(step_s=step_s, steps_to_next_save=every - self.step % every,
                                            margin_s=2 * self.last_save_s + 30.0)
        if (stop or early) and self.saved_step != self.step:
            if self.rank == 0:
                self.console.print(f"step {self.step}: checkpoint "
                                   f"{'before stopping (signal)' if stop else 'early: the walltime ends before the next one'}")
            self._save()
        if stop and self.step < self.total_steps:
            self.interrupted = True
        return stop

    def _report(self) -> None:
        """Curves (plots/training.png) and a summary table; a plotting problem must not fail a finished run."""
        from p2o_hpc.trainer.report import write_report

        try:
            write_report(self.run_dir, self.console)
        except Exception as error:  # noqa: BLE001 - the run's results are already on disk
            self.console.print(f"[yellow]warning:[/yellow] no training report: {type(error).__name__}: {error}")

    def train_one_step(self) -> dict:
        cfg, algo = self.cfg, self.cfg.algorithm
        timer = PhaseTimer()
        step_started = time.perf_counter()
        with timer.phase("weight_sync"):
            self._sync_weights()

        if self.pending is None:  # on-policy, or the first off-policy step
            batch = self._next_problems()
            host = self._host_rollouts(batch["problems"], self.step) if self.worker else None
            self._release_generator()
            with timer.phase("rollout_wait"):
                gathered = self._gather_rollouts(host)
            batch.update(gathered)
        else:
            batch, self.pending = self.pending, None
        rollouts: list[Rollout] = batch["rollouts"]
        problems: list[Problem] = batch["problems"]

        advantages = self.advantage_fn(rewards_tensor(rollouts), group_ids(rollouts), eps=algo.adv_eps)
        dp_size = parallel_state.get_data_parallel_world_size()
        dp_rank = parallel_state.get_data_parallel_rank()
        mini_batches = [
            rank_micro_batches(rollouts, advantages, indices, dp_rank=dp_rank, dp_size=dp_size,
                               micro_batch_size=algo.micro_batch_size, pad_id=PAD_ID)
            for indices in mini_batch_indices(len(problems), algo.n_samples, algo.mini_batch_prompts)
        ]
        all_micro_batches = [mb for mini in mini_batches for mb in mini]
        with timer.phase("logprob"):
            self._collect_logprobs(self.learner.model, all_micro_batches, "old_logprobs")
            if self.reference is not None:
                self._collect_logprobs(self.reference, all_micro_batches, "ref_logprobs")
            distillation = self._context_distillation(rollouts, all_micro_batches)
        refit = {}
        every = cfg.rollout.refit_check_every
        if every and self.step % every == 0:
            with timer.phase("refit_check"):
                refit = self._refit_check(rollouts, all_micro_batches)
        self._release_generator()

        future: Future | None = None
        if algo.one_step_off_policy and self.step + 1 < self.total_steps:
            upcoming = self._next_problems()  # generated with this step's weights while the learner updates
            if self.prefetch is not None:
                future = self.prefetch.submit(self._host_rollouts, upcoming["problems"], self.step + 1)

        update_metrics = []
        with timer.phase("update"):
            for micro_batches in mini_batches:
                update_metrics.append(train_step(self.learner, micro_batches, self.loss_fn))

        if algo.one_step_off_policy and self.step + 1 < self.total_steps:
            with timer.phase("rollout_wait"):
                upcoming.update(self._gather_rollouts(future.result() if future else None))
            self.pending = upcoming

        metrics = self._step_metrics(batch, rollouts, advantages, update_metrics, timer, refit)
        metrics.update(distillation)
        metrics.update(self._p2o_metrics(batch, rollouts, advantages))
        metrics.update(batch.get("gate", {}))
        metrics["time/step"] = time.perf_counter() - step_started
        self.step += 1
        self._mine(batch, rollouts)
        if batch["epoch_finished"]:
            metrics.update(self._end_epoch(batch["epoch"]))
        if self.sink is not None:
            self.sink.log(metrics, self.step)
        if self.step % cfg.trainer.save_every == 0 or batch["epoch_finished"] or self.step == self.stop_step:
            self._save()
        return metrics

    def _mine(self, batch: dict, rollouts: list[Rollout]) -> None:
        k = self.cfg.algorithm.n_samples
        for i, problem in enumerate(batch["problems"]):
            group = rollouts[i * k : (i + 1) * k]
            self.miner.add(problem.id, problem.problem, problem.answer, [r.reward for r in group],
                           [r.text for r in group])

    def _end_epoch(self, epoch: int) -> dict:
        hard_ids = [row["prompt_id"] for row in self.miner.hard_set()]
        size = len(hard_ids)
        if self.rank == 0:
            path, size = self.miner.write(self.run_dir, epoch)
            self.console.print(f"epoch {epoch}: {size} hard prompts → {path}")
        self.miner.reset()
        metrics = {"epoch": epoch, "hard/size": size, "hard/fraction": size / max(1, len(self.problems))}
        if self.cfg.algorithm.p2o.enabled and self.step < self.total_steps:
            metrics.update(self.exchange.end_epoch(epoch, hard_ids, self.loader))
        return metrics

    def _step_metrics(self, batch, rollouts, advantages, update_metrics, timer, refit) -> dict:
        k = self.cfg.algorithm.n_samples
        rewards = rewards_tensor(rollouts)
        grouped = rewards.view(-1, k)
        constant = (grouped.max(dim=1).values == grouped.min(dim=1).values).float()
        lengths = torch.tensor([len(r.response_ids) for r in rollouts], dtype=torch.float32)
        generated_tokens = float(lengths.sum())
        train_tokens = float(sum(len(r.sequence) for r in rollouts))
        seconds = dict(timer.seconds)
        seconds["generate"] = batch["generate_s"]
        seconds["reward"] = batch["reward_s"]
        metrics = {
            "epoch": batch["epoch"],
            "reward/mean": float(rewards.mean()),
            "reward/all_fail_frac": float((grouped.max(dim=1).values <= 0).float().mean()),
            "advantage/zero_group_frac": float(constant.mean()),
            "advantage/abs_mean": float(advantages.abs().mean()),
            "response/length_mean": float(lengths.mean()),
            "response/length_max": float(lengths.max()),
            "response/truncated_frac": float(np.mean([r.finish_reason == "length" for r in rollouts])),
            "actor/loss": float(np.mean([m["loss"] for m in update_metrics])),
            "actor/clip_frac": float(np.mean([m.get("clip_frac", 0.0) for m in update_metrics])),
            "actor/grad_norm": float(np.mean([m["grad_norm"] for m in update_metrics])),
            "actor/lr": update_metrics[-1]["lr"],
            "actor/updates_skipped": sum(not m["update_ok"] for m in update_metrics),
            "perf/gen_tokens_per_s": generated_tokens / max(batch["generate_s"], 1e-9),
            "perf/train_tokens_per_s": train_tokens / max(seconds["update"], 1e-9),
            **{f"time/{name}": value for name, value in seconds.items()},
            **refit,
        }
        if self.cfg.algorithm.kl_coef > 0:
            metrics["actor/kl"] = float(np.mean([m["kl"] for m in update_metrics]))
        return metrics

    def close(self) -> None:
        if self.lease is not None:
            self.lease.release()
            self.lease = None
        self.exchange.close()
        if self.prefetch is not None:
            self.prefetch.shutdown(wait=True)
        if self.worker is not None:
            self.worker.close()
        if self.sink is not None:
            self.sink.close()


def run_worker(cfg_dict: dict, run_dir: str, model_dir: str, prepare_stop=None) -> GRPOTrainer:
    """Entry point of one learner rank (spawned locally by `launch`, or a SLURM task); returns the finished
    trainer, whose `interrupted` says whether a signal stopped it before the run's end."""
    trainer = GRPOTrainer(to_run_config(cfg_dict), Path(run_dir), model_dir)
    if prepare_stop is not None:
        prepare_stop(trainer.stop_signal)
    trainer.fit()
    return trainer
