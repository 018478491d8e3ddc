"""The GRPO loop, run by every rank (SPMD, like megatron). One step, top to bottom:

  sync weights → generate (vLLM; + the engine's half of the refit check) → reward (math-verify) → advantages
  → old log-probs (+ P²O token weights) → refit check → update (PPO clip) → log → save,

over three roles: the rollout side (engine hosts generate and grade, every rank receives the rollouts), the
learner side (megatron) and the trainer state (what a checkpoint resumes). Colocated on GPUs (one engine per GPU by
default, rollout.engines_per_node), an on-policy engine sleeps from the end of its generation to the next step's
weight sync: nothing wakes it while the learner computes log-probs and updates. Algorithms on top of GRPO plug in
through `AlgorithmHooks` (P²O: templates for a batch, context-distillation token weights, the GEPA exchange at
the end of an epoch). Hard prompts are mined every epoch, for GRPO too.

Where this differs from textbook GRPO (Shao et al. 2024):
- the loss is PPO clip with dual clip (c = 3) and token-mean aggregation over the mini-batch, no KL by default,
  as the authors' verl runs (algorithm.*);
- one optimizer step per mini-batch, several per step (prompts_per_step / mini_batch_prompts);
- optional one-step off-policy generation (algorithm.one_step_off_policy): batch t+1 is sampled with step t's
  weights while step t updates;
- every rollout.refit_check_every steps the engine's log-probs of the first rollout.refit_check_sequences
  rollouts are checked against the learner's old log-probs by NeMo-RL's token multiplicative probability error,
  mean(exp|Δ log p|) over their response tokens: the run stops above 1 + rollout.refit_tolerance
  (rollout/token_prob_error; the max gap, rollout/logprob_gap_max, is only logged: it trips on bf16 noise).
  The engine computes its half while awake with the learner's weights: on-policy right after generating,
  off-policy (the batch was generated with the previous weights) after the step's weight sync.
"""

from __future__ import annotations

import os
import socket
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from rich.console import Console

from p2o_hpc.algo.hard_mining import HardSampleMiner
from p2o_hpc.config import RunConfig, to_run_config
from p2o_hpc.data import PromptLoader, training_problems
from p2o_hpc.megatron.checkpointing import latest_checkpoint, load_checkpoint, load_rank_state, save_checkpoint
from p2o_hpc.megatron.distributed import control_group, init_megatron
from p2o_hpc.records import StepBatch
from p2o_hpc.run_dir import RunDir
from p2o_hpc.trainer.hooks import algorithm_hooks
from p2o_hpc.trainer.learner_side import LearnerSide
from p2o_hpc.trainer.metrics import MetricsSink, PhaseTimer
from p2o_hpc.trainer.preemption import StopSignal
from p2o_hpc.trainer.profiling import StepProfiler
from p2o_hpc.trainer.rollout_side import OffPolicySchedule, RolloutSide, engines_per_node, hosts_engine
from p2o_hpc.trainer.state import TrainerState
from p2o_hpc.trainer.step_metrics import step_metrics
from p2o_hpc.trainer.validation import Validator, validated_steps


def rank_placement(local_rank: int) -> dict:
    """Where this rank runs and which megatron groups it is in (logged; checked by the multi-node test)."""
    groups = {"tp": parallel_state.get_tensor_model_parallel_group(),
              "pp": parallel_state.get_pipeline_model_parallel_group(),
              "dp": parallel_state.get_data_parallel_group()}
    return {"rank": dist.get_rank(), "local_rank": local_rank, "host": socket.gethostname(),
            **{f"{name}_group": dist.get_process_group_ranks(group) for name, group in groups.items()}}


class GRPODriver:
    def __init__(self, cfg: RunConfig, run_dir: RunDir, model_dir: str):
        self.cfg, self.run_dir, algo = cfg, run_dir, cfg.algorithm
        self.stop_signal = StopSignal().install()  # first: every helper process inherits its signal mask
        init_megatron(cfg.parallel.tensor, cfg.parallel.pipeline, seed=cfg.trainer.seed,
                      timeout_s=cfg.trainer.collective_timeout_s, init_timeout_s=cfg.parallel.init_timeout_s,
                      control_timeout_s=cfg.trainer.control_timeout_s or 24 * 3600.0)
        self.rank = dist.get_rank()
        self.saved_step, self.last_save_s = 0, 0.0
        self.interrupted = False  # stopped by a signal before the run's last step (the SLURM task requeues)
        self.lease = self.hooks = self.rollouts = self.sink = None  # what close() releases, on a half-built driver too
        try:
            # Two jobs never train into one run dir; a requeued job waits out its dead predecessor's heartbeat.
            self.lease = run_dir.learner_lease().acquire(wait_s=90.0) if self.rank == 0 else None
            self.console = Console(stderr=False) if self.rank == 0 else None
            self.problems = training_problems(cfg.data)
            loader = PromptLoader(self.problems, algo.prompts_per_step, seed=cfg.trainer.seed)
            steps = algo.epochs * loader.steps_per_epoch
            self.total_steps = min(steps, algo.max_steps) if algo.max_steps else steps
            self.hooks = algorithm_hooks(cfg, run_dir, rank=self.rank, console=self.console)
            # Engines before the learner: vLLM refuses to start unless its gpu_memory_utilization share of the GPU
            # is free, so it starts first and sleeps, and the learner takes the memory it hands back. The engine
            # holds model_dir's weights until the first sync pushes the learner's (a resumed checkpoint's too).
            self.rollouts = self._start_rollouts(model_dir)
            self.learner = LearnerSide(cfg, model_dir, self.total_steps)
            self.validator = Validator(cfg, self.total_steps, console=self.console)
            self.state = TrainerState(loader, HardSampleMiner(tau=algo.tau, failed_responses=algo.hard.failed_responses,
                                                              max_response_chars=algo.hard.max_response_chars),
                                      self.hooks)
            self._resume()
            self.profiler = StepProfiler(cfg.trainer.profile_steps, run_dir, rank=self.rank, console=self.console)
            self.stop_step = self.total_steps  # this job's last step (trainer.stop_after_steps)
            if cfg.trainer.stop_after_steps is not None:
                self.stop_step = min(self.total_steps, self.state.step + cfg.trainer.stop_after_steps)
            if self.rank == 0:
                wandb = cfg.logging.wandb
                self.sink = MetricsSink(run_dir, wandb_mode=str(wandb.mode), project=wandb.project,
                                        entity=wandb.entity, name=wandb.name or run_dir.name, group=wandb.group,
                                        config=asdict(cfg))
                # A pending epoch end (see TrainerState.epoch_end) writes its step's line again.
                torn = self.sink.truncate_after(self.state.step - (self.state.epoch_end is not None))
                if torn:
                    self.console.print(f"[yellow]warning:[/yellow] {run_dir.metrics}: dropped {torn} torn line(s)")
            if self.validator.enabled:  # a resumed run does not log a validation twice
                logged = [validated_steps(run_dir.metrics) if self.rank == 0 else None]
                dist.broadcast_object_list(logged, src=0, group=control_group())
                self.validator.logged.update(logged[0])
        except BaseException:
            self.close()  # a half-built driver must not leave its vLLM child behind
            raise

    def _start_rollouts(self, model_dir: str) -> RolloutSide:
        """Collective: this node's engines (rollout.engines_per_node; each on its host rank's own GPU), started and
        put to sleep, and the rollout side over every node's hosts."""
        cfg, local_rank = self.cfg, int(os.environ.get("LOCAL_RANK", "0"))
        self.placement = rank_placement(local_rank)
        # CUDA in this rank decides where the learner and vLLM run (cluster.gpus only asks SLURM for GPUs).
        engines = engines_per_node(cfg.rollout, cfg.parallel.ranks_per_node, torch.cuda.is_available())
        host = hosts_engine(local_rank, cfg.parallel.ranks_per_node, engines)
        flags = [None] * dist.get_world_size()
        dist.all_gather_object(flags, host, group=control_group())
        engine = self._start_engine(model_dir) if host else None
        return RolloutSide(cfg, engine, [rank for rank, hosts in enumerate(flags) if hosts], self.hooks,
                           OffPolicySchedule(cfg.algorithm.one_step_off_policy, self.total_steps))

    def _start_engine(self, model_dir: str):
        from p2o_hpc.rollout.rollout_worker import RolloutWorker

        engine = RolloutWorker.from_config(self.cfg, model_dir)
        try:
            engine.sleep()  # its GPU memory to the learner built next (no-op on CPU or without sleep mode)
        except BaseException:
            engine.close()
            raise
        return engine

    # ------------------------------------------------------------------------------------------------ the step

    def train_step(self) -> dict:
        algo, state, timer, started = self.cfg.algorithm, self.state, PhaseTimer(), time.perf_counter()
        with timer.phase("weight_sync"):
            self.sync_engine()
        checked, engine_logprobs = self._refit_sequences(), {}
        batch, state.pending = state.pending, None
        if batch is None:  # on-policy, or the first off-policy step: the engine checks itself before it sleeps
            batch, engine_logprobs = self.rollouts.generate(self._next_batch(timer), state.step, timer, checked)
        elif checked:  # generated ahead with the previous weights; since the sync the engine holds the learner's
            with timer.phase("refit_check"):
                engine_logprobs = self.rollouts.engine_logprobs(batch, checked)
        batch.advantages = self.learner.advantages(batch)
        mini_batches = self.learner.micro_batches(batch)
        micro_batches = [mb for mini in mini_batches for mb in mini]
        with timer.phase("logprob"):
            self.learner.old_logprobs(micro_batches)
        # P²O's CD pass (log π(y|x̃) of the templated rollouts, then the token weights): a phase of its own.
        with timer.phase("cd_logprob") if self.hooks.distill else nullcontext():
            distillation = self.hooks.token_weights(batch, micro_batches, self.learner.logprobs)
        refit = {}
        if checked:
            with timer.phase("refit_check"):
                refit = self.learner.refit_check(state.step, batch.rollouts, micro_batches, engine_logprobs)
        # One-step off-policy: the next batch is sampled with this step's weights during the update.
        upcoming = self._next_batch(timer) if self.rollouts.schedule.generate_ahead(state.step) else None
        ahead = self.rollouts.start_ahead(upcoming, state.step + 1) if upcoming is not None else None
        with timer.phase("update"):
            updates = self.learner.update(mini_batches)
        if upcoming is not None:
            with timer.phase("rollout_wait"):
                state.pending = self.rollouts.finish_ahead(upcoming, ahead)

        metrics = step_metrics(batch, updates, timer.seconds, k=algo.n_samples, kl=algo.kl_coef > 0)
        metrics.update({**refit, **distillation, **self.hooks.step_metrics(batch), **batch.gate_metrics,
                        **self.learner.batching_metrics(micro_batches)})
        metrics["time/step"] = time.perf_counter() - started
        state.step += 1
        state.miner.add_batch(batch)
        if batch.epoch_finished:  # checkpoint before the epoch's end: a failure there loses no step
            state.epoch_end = {"epoch": batch.epoch, "metrics": metrics}
            self.save()
        return self._finish_step(metrics, timer)

    def _finish_step(self, metrics: dict, timer: PhaseTimer | None = None) -> dict:
        """The epoch's end when the step finished one (hard set, GEPA exchange), the metrics line, the regular
        checkpoint. A resumed run whose checkpoint holds a pending epoch end starts here."""
        state = self.state
        if state.epoch_end is not None:
            end = self._end_epoch(state.epoch_end["epoch"], timer or PhaseTimer())
            metrics = {**state.epoch_end["metrics"], **end}
            state.epoch_end = None
        metrics.update(self._validate(state.step))  # after the epoch's end: P²O's templates are the next epoch's
        if self.sink is not None:
            self.sink.log(metrics, state.step)
        due = state.step % self.cfg.trainer.save_every == 0 or state.step == self.stop_step
        if due and self.saved_step != state.step:
            self.save()
        return metrics

    def _next_batch(self, timer: PhaseTimer) -> StepBatch:
        """Collective (P²O's overlap schedule may wait here for templates: phase gepa_wait): the next prompts."""
        loader = self.state.loader
        with timer.phase("gepa_wait") if self.cfg.algorithm.p2o.enabled else nullcontext():
            problems, gate = self.hooks.next_problems(loader)
        return StepBatch(problems, epoch=loader.epoch - 1 if loader.epoch_finished else loader.epoch,
                         epoch_finished=loader.epoch_finished, gate_metrics=gate)

    def _validate(self, step: int) -> dict:
        """Collective: val/* of the policy after `step` steps when validation.* asks for it. The engine is loaded
        with that policy first (a step's own weight sync comes at the next step's start), then sleeps again."""
        if not self.validator.due(step):
            return {}
        self.sync_engine()
        metrics = self.validator.run(step, self.rollouts, self.hooks.validation_template())
        self.rollouts.release_engine()
        return metrics

    def _refit_sequences(self) -> int:
        """How many of this step's rollouts the refit check compares; 0: no check this step."""
        rollout = self.cfg.rollout
        due = rollout.refit_check_every and self.state.step % rollout.refit_check_every == 0
        return rollout.refit_check_sequences if due else 0

    def _end_epoch(self, epoch: int, timer: PhaseTimer) -> dict:
        miner = self.state.miner
        hard_ids = [row["prompt_id"] for row in miner.hard_set()]
        size = len(hard_ids)
        if self.rank == 0:
            path, size = miner.write(self.run_dir, epoch)
            self.console.print(f"epoch {epoch}: {size} hard prompts → {path}")
        miner.reset()
        metrics = {"epoch": epoch, "hard/size": size, "hard/fraction": size / max(1, len(self.problems))}
        # P²O's exchange (the blocking schedule's wait: p2o/learner_idle_s; this step's time/* are already taken).
        with timer.phase("gepa_wait") if self.cfg.algorithm.p2o.enabled else nullcontext():
            metrics.update(self.hooks.end_epoch(epoch, hard_ids, self.state.loader, self,
                                                last=self.state.step >= self.total_steps))
        return metrics

    # -------------------------------------------------------------- the policy, as hooks see it (algo.hooks.Policy)

    @property
    def engine(self):
        return self.rollouts.engine

    def sync_engine(self) -> None:
        """Collective: every rank takes part in the export; only engine hosts receive the buckets and load them."""
        receive = self.engine is not None and self.cfg.rollout.sync_weights
        buckets = self.learner.weight_buckets(receive=receive)
        if receive:
            self.engine.update_weights(buckets)
        else:
            for _ in buckets:
                pass

    def export_hf(self, folder: Path) -> None:
        self.learner.save_hf(folder)

    # ------------------------------------------------------------------------------------ run, save, resume

    def fit(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        progress = Progress(TextColumn("[bold]GRPO"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            TextColumn("{task.description}"), console=self.console,
                            disable=self.rank != 0 or not self.cfg.logging.progress)
        try:
            with progress:
                task = progress.add_task("", total=self.total_steps, completed=self.state.step)
                if self.state.epoch_end is not None:  # resumed from the checkpoint taken at an epoch's end
                    self._finish_step({})
                if self.state.step == 0:  # validation.before_training: its own line, step 0
                    before = self._validate(0)
                    if before and self.sink is not None:
                        self.sink.log(before, 0)
                while self.state.step < self.stop_step:
                    with self.profiler.step(self.state.step + 1):  # trainer.profile_steps count from 1
                        metrics = self.train_step()
                    progress.update(task, advance=1, description=(
                        f"reward {metrics['reward/mean']:.3f} loss {metrics['actor/loss']:+.4f} "
                        f"{metrics['time/step']:.1f}s/step"))
                    if self._stop_for_signal_or_deadline(metrics["time/step"]):
                        break
            if self.rank == 0:
                if self.state.step >= self.total_steps:
                    self.run_dir.mark_finished()  # the GEPA service ends with the run
                self._report()
        finally:
            self.close()

    def _stop_for_signal_or_deadline(self, step_s: float) -> bool:
        """At a step boundary: checkpoint early when the walltime would end before the next regular checkpoint;
        on SIGUSR2/SIGTERM checkpoint and stop (the SLURM task then requeues). True → leave the loop."""
        every, step = self.cfg.trainer.save_every, self.state.step
        stop, early = self.stop_signal.poll(step_s=step_s, steps_to_next_save=every - step % every,
                                            margin_s=2 * self.last_save_s + 30.0)
        if (stop or early) and self.saved_step != step:
            if self.rank == 0:
                self.console.print(f"step {step}: checkpoint "
                                   f"{'before stopping (signal)' if stop else 'early: the walltime ends before the next one'}")
            self.save()
        if stop and step < self.total_steps:
            self.interrupted = True
        return stop

    def save(self) -> None:
        started = time.perf_counter()
        save_checkpoint(self.learner.learner, self.run_dir.checkpoints, rank_state=self.state.state_dict(),
                        keep=self.cfg.trainer.keep_checkpoints)
        self.saved_step, self.last_save_s = self.state.step, time.perf_counter() - started

    def _resume(self) -> None:
        checkpoint = latest_checkpoint(self.run_dir.checkpoints) if self.cfg.trainer.resume else None
        if checkpoint is None:
            return
        load_checkpoint(self.learner.learner, checkpoint)
        state = load_rank_state(checkpoint)
        if state is None:
            raise FileNotFoundError(f"{checkpoint}: no rank_{self.rank}.pt trainer state (not a trainer checkpoint)")
        self.state.load_state_dict(state)
        self.saved_step = self.state.step
        if self.rank == 0:
            self.console.print(f"resumed from {checkpoint} at step {self.state.step}")

    def _report(self) -> None:
        """Curves (plots/training.png) and a summary table; a plotting problem must not fail a finished run."""
        from p2o_hpc.trainer.report import write_report

        try:
            write_report(self.run_dir, self.console)
        except Exception as error:  # noqa: BLE001 - the run's results are already on disk
            self.console.print(f"[yellow]warning:[/yellow] no training report: {type(error).__name__}: {error}")

    @property
    def step(self) -> int:
        return self.state.step

    def close(self) -> None:
        if self.lease is not None:
            self.lease.release()
            self.lease = None
        if self.hooks is not None:
            self.hooks.close()
        if self.rollouts is not None:
            self.rollouts.close()
            self.rollouts = None
        if self.sink is not None:
            self.sink.close()
            self.sink = None


def run_worker(cfg_dict: dict, run_dir: str, model_dir: str, prepare_stop=None) -> GRPODriver:
    """Entry point of one learner rank (spawned locally, or a SLURM task); returns the finished driver, whose
    `interrupted` says whether a signal stopped it before the run's end."""
    driver = GRPODriver(to_run_config(cfg_dict), RunDir(run_dir), model_dir)
    if prepare_stop is not None:
        prepare_stop(driver.stop_signal)
    driver.fit()
    return driver
