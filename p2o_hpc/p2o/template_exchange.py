"""The learner's half of P²O's per-epoch exchange with GEPA (the protocol itself: p2o_hpc.run_dir).

At the end of epoch t the hard set is on disk; this hands GEPA the policy (service: a HF folder + READY; inline:
the learner's own engine), waits for ``templates.json`` + ``DONE`` (blocking) or lets epoch t+1 start with the
prompts that need no template (overlap), and holds the assignments the next epoch's rollouts use. Every method
that talks to the other ranks is called by all of them at the same point of the loop.
"""

from __future__ import annotations

import time

import torch.distributed as dist

from p2o_hpc.algo.hooks import Policy
from p2o_hpc.run_dir import RunDir


class TemplateExchange:
    def __init__(self, cfg, run_dir: RunDir, *, rank: int, console):
        self.cfg, self.run_dir, self.rank, self.console = cfg, run_dir, rank, console
        self.assignments: dict[str, list[str]] = {}  # this epoch's templates for last epoch's hard prompts
        self.awaiting: int | None = None  # overlap: the epoch whose templates are still being evolved
        self.deferred_ids: list[str] = []  # ... and its hard prompts, served last
        self.reflection = None  # inline mode: the reflection model, started on first use

    # -- checkpoint ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"assignments": self.assignments, "awaiting": self.awaiting, "deferred_ids": self.deferred_ids}

    def load_state_dict(self, state: dict) -> None:
        self.assignments = state.get("assignments", {})
        self.awaiting, self.deferred_ids = state.get("awaiting"), state.get("deferred_ids", [])

    # -- epoch boundary -----------------------------------------------------------------------------------

    def end_epoch(self, epoch: int, hard_ids: list[str], loader, policy: Policy) -> dict:
        """Collective: GEPA gets epoch `epoch`'s hard set; returns the metrics of the exchange."""
        if self.cfg.gepa.schedule == "overlap" and not self.run_dir.done(epoch):
            self._hand_over(epoch, policy)
            self.assignments, self.awaiting, self.deferred_ids = {}, epoch, sorted(hard_ids)
            return {"p2o/deferred_prompts": loader.defer(hard_ids)}
        metrics = self._evolve_blocking(epoch, policy)
        self.assignments = self._finished_assignments(epoch)
        metrics["p2o/next_epoch_assigned_prompts"] = len(self.assignments)
        return metrics

    def before_batch(self, loader) -> dict:
        """Collective, before each batch: under overlap, take the templates once they landed, and wait only when the
        next batch holds a prompt that is waiting for its template. Returns idle time and the round's numbers."""
        if self.awaiting is None:
            return {}
        epoch = self.awaiting
        needs = any(problem.id in set(self.deferred_ids) for problem in loader.peek_batch())
        verdict = [None]
        if self.rank == 0:
            started = time.perf_counter()
            if needs:
                self._wait(epoch)
            verdict[0] = (self.run_dir.done(epoch), time.perf_counter() - started)
        dist.broadcast_object_list(verdict, src=0)
        done, idle = verdict[0]
        metrics = {"p2o/learner_idle_s": idle} if needs else {}
        if done:
            self.assignments, self.awaiting = self.run_dir.load_assignments(epoch), None
            metrics.update(self.run_dir.round_metrics(epoch))
            metrics["p2o/templates_landed_epoch"] = epoch
        return metrics

    def batch_metrics(self, problems) -> dict:
        if not self.deferred_ids:
            return {}
        deferred = set(self.deferred_ids)
        return {"p2o/deferred_in_batch": sum(problem.id in deferred for problem in problems)}

    # -- the two ways of running a round ------------------------------------------------------------------

    def _evolve_blocking(self, epoch: int, policy: Policy) -> dict:
        """service: export the policy, READY, wait for DONE. inline: the engine host runs the round on its own
        engine (the authors' single-box layout)."""
        gepa = self.cfg.gepa
        if gepa.mode == "off" or self.run_dir.done(epoch):
            return {}
        started = time.perf_counter()
        metrics: dict = {}
        if gepa.mode == "service":
            self._hand_over(epoch, policy)
            if self.rank == 0:
                self.console.print(f"epoch {epoch}: waiting for the GEPA service's templates")
                self._wait(epoch)
        else:
            policy.sync_engine()  # the engine must hold the policy the epoch ended with
            if self.rank == 0:
                metrics = self._inline_round(epoch, policy.engine)
        dist.barrier()
        if not metrics and self.run_dir.done(epoch):
            metrics = self.run_dir.round_metrics(epoch)
        metrics["p2o/learner_idle_s"] = time.perf_counter() - started
        return metrics

    def _hand_over(self, epoch: int, policy: Policy) -> None:
        """Collective: the epoch's policy as a HF folder next to its hard set, then READY for the service."""
        policy.export_hf(self.run_dir.policy(epoch))
        if self.rank == 0:
            self.run_dir.mark_ready(epoch)

    def _wait(self, epoch: int) -> None:
        """Rank 0: until DONE; a failed service or gepa.wait_timeout_s stops the run with the cause."""
        self.run_dir.wait_for_templates(epoch, timeout_s=self.cfg.gepa.wait_timeout_s, poll_s=self.cfg.gepa.poll_s)

    def _inline_round(self, epoch: int, engine) -> dict:
        from p2o_hpc.gepa.runner import Reflection, configured_round
        from p2o_hpc.model_dir import resolve_model_dir

        if self.reflection is None:
            self.reflection = Reflection(self.cfg.reflection, resolve_model_dir(self.cfg.model.path), self.run_dir.logs)
        return configured_round(self.cfg, self.run_dir, epoch, engine, self.reflection)

    def _finished_assignments(self, epoch: int) -> dict[str, list[str]]:
        """The templates GEPA evolved on this epoch's hard set, for the next epoch ({} when there are none)."""
        if not self.run_dir.done(epoch):
            if self.rank == 0:
                self.console.print(f"epoch {epoch}: no templates (epochs/{epoch}/DONE missing): next epoch is plain GRPO")
            return {}
        return self.run_dir.load_assignments(epoch)

    def close(self) -> None:
        if self.reflection is not None:
            self.reflection.close()
