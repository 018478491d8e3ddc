"""The learner's half of P²O's per-epoch exchange with GEPA (the protocol itself: p2o_hpc.run_dir).

At the end of epoch t the hard set is on disk; this hands GEPA the policy (service: a HF folder + READY; inline:
the learner's own engine), waits for ``templates.json`` + ``DONE`` (blocking) or lets epoch t+1 start with the
prompts that need no template (overlap), and holds the assignments the next epoch's rollouts use. Every method
that talks to the other ranks is called by all of them at the same point of the loop, over the control group (gloo):
a wait for the service is polled together (`wait_together`), so no collective waits on GEPA.
"""

from __future__ import annotations

import time

import torch.distributed as dist

from p2o_hpc.algo.hooks import Policy
from p2o_hpc.megatron.distributed import control_group, wait_together
from p2o_hpc.run_dir import RunDir


class TemplateExchange:
    def __init__(self, cfg, run_dir: RunDir, *, rank: int, console):
        self.cfg, self.run_dir, self.rank, self.console = cfg, run_dir, rank, console
        self.assignments: dict[str, list[str]] = {}  # this epoch's templates for last epoch's hard prompts
        self.best_template: str | None = None  # the same round's best-on-dev template (in-training validation)
        self.awaiting: int | None = None  # overlap: the epoch whose templates are still being evolved
        self.deferred_ids: list[str] = []  # ... and its hard prompts, served last
        self.reflection = None  # inline mode: the reflection model, started on first use

    # -- checkpoint ---------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"assignments": self.assignments, "awaiting": self.awaiting, "deferred_ids": self.deferred_ids,
                "best_template": self.best_template}

    def load_state_dict(self, state: dict) -> None:
        self.assignments = state.get("assignments", {})
        self.awaiting, self.deferred_ids = state.get("awaiting"), state.get("deferred_ids", [])
        self.best_template = state.get("best_template")

    # -- epoch boundary -----------------------------------------------------------------------------------

    def end_epoch(self, epoch: int, hard_ids: list[str], loader, policy: Policy) -> dict:
        """Collective: GEPA gets epoch `epoch`'s hard set; returns the metrics of the exchange. Safe to repeat (a
        resumed run whose checkpoint was taken at this epoch's end does it again): the policy is exported and READY
        written once, a finished round is only read."""
        gepa = self.cfg.gepa
        if gepa.schedule == "overlap" and not self._settled(epoch):
            self._hand_over(epoch, policy)
            self.assignments, self.awaiting, self.deferred_ids = {}, epoch, sorted(hard_ids)
            self.best_template = None
            return {"p2o/deferred_prompts": loader.defer(hard_ids)}
        metrics = {}
        if gepa.mode != "off" and not self._settled(epoch):  # off: only templates already on disk are used
            started = time.perf_counter()
            self._evolve_blocking(epoch, policy)
            metrics["p2o/learner_idle_s"] = time.perf_counter() - started
        metrics.update(self._take(epoch, loader))
        metrics["p2o/next_epoch_assigned_prompts"] = len(self.assignments)
        return metrics

    def before_batch(self, loader) -> dict:
        """Collective, before each batch: under overlap, take the templates once they landed, and wait only when the
        next batch holds a prompt that is waiting for its template. Returns idle time and the round's numbers."""
        if self.awaiting is None:
            return {}
        epoch = self.awaiting
        needs = any(problem.id in set(self.deferred_ids) for problem in loader.peek_batch())
        started = time.perf_counter()
        if needs:
            self._wait(epoch)
            settled = True
        else:
            settled = wait_together(lambda: self._settled(epoch), self.cfg.gepa.poll_s)
        metrics = {"p2o/learner_idle_s": time.perf_counter() - started} if needs else {}
        if settled:
            metrics.update(self._take(epoch, loader))
            self.awaiting = None
            metrics["p2o/templates_landed_epoch"] = epoch
        return metrics

    def batch_metrics(self, problems) -> dict:
        if not self.deferred_ids:
            return {}
        deferred = set(self.deferred_ids)
        return {"p2o/deferred_in_batch": sum(problem.id in deferred for problem in problems)}

    # -- the two ways of running a round ------------------------------------------------------------------

    def _settled(self, epoch: int) -> bool:
        """The round is over: published (DONE) or given up (SKIPPED)."""
        return self.run_dir.done(epoch) or self.run_dir.skipped(epoch)

    def _evolve_blocking(self, epoch: int, policy: Policy) -> None:
        """service: export the policy, READY, wait for DONE. inline: the engine host runs the round on its own
        engine (the authors' single-box layout)."""
        if self.cfg.gepa.mode == "service":
            self._hand_over(epoch, policy)
            if self.rank == 0:
                self.console.print(f"epoch {epoch}: waiting for the GEPA service's templates")
            self._wait(epoch)
        else:
            policy.sync_engine()  # the engine must hold the policy the epoch ended with
            if self.rank == 0:
                self._inline_round(epoch, policy.engine)
            dist.barrier(group=control_group())  # the round's length: trainer.control_timeout_s bounds it

    def _hand_over(self, epoch: int, policy: Policy) -> None:
        """Collective: the epoch's policy as a HF folder next to its hard set, then READY for the service. Once
        READY exists the folder is the service's to read: a repeated hand-over leaves it alone."""
        ready = [self.run_dir.ready(epoch)]
        dist.broadcast_object_list(ready, src=0, group=control_group())
        if ready[0]:
            return
        policy.export_hf(self.run_dir.policy(epoch))
        if self.rank == 0:
            self.run_dir.mark_ready(epoch)

    def _wait(self, epoch: int) -> None:
        """Collective: until DONE, or until the round is given up because no live service held its lease for
        gepa.service_lost_s; a failed service or gepa.wait_timeout_s stops the run with the cause (on every rank).
        Rank 0 looks every gepa.poll_s and tells the others after each look."""
        gepa = self.cfg.gepa
        look = (self.run_dir.template_wait(epoch, timeout_s=gepa.wait_timeout_s, service_lost_s=gepa.service_lost_s)
                if self.rank == 0 else None)
        if not wait_together(look, gepa.poll_s) and self.rank == 0:
            self.console.print(f"[yellow]warning:[/yellow] epoch {epoch}: no live GEPA service for "
                               f"gepa.service_lost_s={gepa.service_lost_s:g} s: the round is skipped, the next "
                               "epoch runs on plain prompts")

    def _inline_round(self, epoch: int, engine) -> dict:
        from p2o_hpc.gepa.runner import Reflection, configured_round

        if self.reflection is None:
            self.reflection = Reflection.for_run(self.cfg, self.run_dir.logs)
        return configured_round(self.cfg, self.run_dir, epoch, engine, self.reflection)

    def _take(self, epoch: int, loader) -> dict:
        """Collective: rank 0 reads the finished round (a bad templates.json is set aside: RunDir.take_round) and
        every rank gets the same templates, for the prompts this run trains on."""
        box = [None]
        if self.rank == 0:
            assignments, metrics = self._read_round(epoch, loader.problem_ids)
            box[0] = assignments, metrics, self.run_dir.best_template(epoch) if assignments else None
        dist.broadcast_object_list(box, src=0, group=control_group())
        self.assignments, metrics, self.best_template = box[0]
        return metrics

    def _read_round(self, epoch: int, known_ids) -> tuple[dict[str, list[str]], dict]:
        """Rank 0: (assignments, metrics) of a settled round; what went wrong is said once and counted."""
        if not self.run_dir.done(epoch):
            skipped = self.run_dir.skipped(epoch)
            why = "the round was skipped" if skipped else f"epochs/{epoch}/DONE missing"
            self.console.print(f"epoch {epoch}: no templates ({why}): next epoch is plain GRPO")
            return {}, ({"p2o/round_skipped": 1} if skipped else {})
        round_ = self.run_dir.take_round(epoch)
        if round_.rejected is not None:
            self.console.print(f"[yellow]warning:[/yellow] epoch {epoch}: {self.run_dir.templates(epoch).name} set "
                               f"aside ({round_.rejected}): next epoch is plain GRPO")
            return {}, {"p2o/templates_file_rejected": 1}
        interned: dict[str, str] = {}  # one object per distinct template: the broadcast pickles each once
        assignments = {pid: [interned.setdefault(t, t) for t in templates]
                       for pid, templates in round_.assignments.items() if pid in known_ids}
        metrics = dict(round_.metrics)
        unknown = len(round_.assignments) - len(assignments)
        if unknown:
            self.console.print(f"[yellow]warning:[/yellow] epoch {epoch}: {unknown} prompt ids in "
                               f"{self.run_dir.templates(epoch).name} are not in the training set: ignored")
            metrics["p2o/unknown_prompt_ids"] = unknown
        return assignments, metrics

    def close(self) -> None:
        if self.reflection is not None:
            self.reflection.close()
