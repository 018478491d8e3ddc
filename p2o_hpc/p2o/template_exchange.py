"""The learner's half of P²O's per-epoch exchange with GEPA.

At the end of epoch t the hard set is on disk; this hands GEPA the policy (service: a HF folder + READY; inline:
the learner's own engine), waits for ``templates.json`` + ``DONE`` (blocking) or lets epoch t+1 start with the
prompts that need no template (overlap), and holds the assignments the next epoch's rollouts use. Every method
that talks to the other ranks is called by all of them at the same point of the loop.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch.distributed as dist

from p2o_hpc.io_utils import atomic_write_text
from p2o_hpc.p2o.templates import load_assignments, templates_done, templates_path
from p2o_hpc.trainer.hard_mining import epoch_dir


class TemplateExchange:
    def __init__(self, cfg, run_dir: Path, *, rank: int, console, export_policy: Callable[[Path], None],
                 sync_weights: Callable[[], None], worker: Callable[[], object]):
        self.cfg, self.run_dir, self.rank, self.console = cfg, run_dir, rank, console
        self.export_policy, self.sync_weights, self.worker = export_policy, sync_weights, worker
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

    def end_epoch(self, epoch: int, hard_ids: list[str], loader) -> dict:
        """Collective: GEPA gets epoch `epoch`'s hard set; returns the metrics of the exchange."""
        if self.cfg.gepa.schedule == "overlap" and not templates_done(self.run_dir, epoch):
            self._hand_over(epoch)
            self.assignments, self.awaiting, self.deferred_ids = {}, epoch, sorted(hard_ids)
            return {"p2o/deferred_prompts": loader.defer(hard_ids)}
        metrics = self._evolve_blocking(epoch)
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
            verdict[0] = (templates_done(self.run_dir, epoch), time.perf_counter() - started)
        dist.broadcast_object_list(verdict, src=0)
        done, idle = verdict[0]
        metrics = {"p2o/learner_idle_s": idle} if needs else {}
        if done:
            self.assignments, self.awaiting = load_assignments(self.run_dir, epoch), None
            metrics.update(self._round_metrics(epoch))
            metrics["p2o/templates_landed_epoch"] = epoch
        return metrics

    def batch_metrics(self, problems) -> dict:
        if not self.deferred_ids:
            return {}
        deferred = set(self.deferred_ids)
        return {"p2o/deferred_in_batch": sum(problem.id in deferred for problem in problems)}

    # -- the two ways of running a round ------------------------------------------------------------------

    def _evolve_blocking(self, epoch: int) -> dict:
        """service: export the policy, READY, wait for DONE. inline: the engine host runs the round on its own
        engine (the authors' single-box layout)."""
        gepa = self.cfg.gepa
        if gepa.mode == "off" or templates_done(self.run_dir, epoch):
            return {}
        started = time.perf_counter()
        metrics: dict = {}
        if gepa.mode == "service":
            self._hand_over(epoch)
            if self.rank == 0:
                self.console.print(f"epoch {epoch}: waiting for the GEPA service's templates")
                self._wait(epoch)
        else:
            self.sync_weights()  # the engine must hold the policy the epoch ended with
            if self.rank == 0:
                metrics = self._inline_round(epoch)
        dist.barrier()
        if not metrics and templates_done(self.run_dir, epoch):
            metrics = self._round_metrics(epoch)
        metrics["p2o/learner_idle_s"] = time.perf_counter() - started
        return metrics

    def _hand_over(self, epoch: int) -> None:
        """Collective: the epoch's policy as a HF folder next to its hard set, then READY for the service."""
        self.export_policy(epoch_dir(self.run_dir, epoch) / "policy")
        if self.rank == 0:
            atomic_write_text(epoch_dir(self.run_dir, epoch) / "READY", "")

    def _wait(self, epoch: int) -> None:
        """Rank 0: poll for DONE; a failed service or gepa.wait_timeout_s stops the run with the cause."""
        gepa = self.cfg.gepa
        deadline = time.monotonic() + gepa.wait_timeout_s
        while not templates_done(self.run_dir, epoch):
            failure = self.run_dir / "gepa_service.failed"
            if failure.exists():
                raise RuntimeError(f"the GEPA service failed ({failure}): {failure.read_text().strip()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {epoch_dir(self.run_dir, epoch) / 'DONE'} after gepa.wait_timeout_s="
                                   f"{gepa.wait_timeout_s}: is the GEPA service running?")
            time.sleep(gepa.poll_s)

    def _inline_round(self, epoch: int) -> dict:
        from p2o_hpc.gepa.runner import Reflection, configured_round
        from p2o_hpc.launch import resolve_model_dir

        if self.reflection is None:
            self.reflection = Reflection(self.cfg.reflection, resolve_model_dir(self.cfg.model.path),
                                         self.run_dir / "logs")
        return configured_round(self.cfg, self.run_dir, epoch, self.worker(), self.reflection)

    def _finished_assignments(self, epoch: int) -> dict[str, list[str]]:
        """The templates GEPA evolved on this epoch's hard set, for the next epoch ({} when there are none)."""
        if not templates_done(self.run_dir, epoch):
            if self.rank == 0:
                self.console.print(f"epoch {epoch}: no templates (epochs/{epoch}/DONE missing): next epoch is plain GRPO")
            return {}
        return load_assignments(self.run_dir, epoch)

    def _round_metrics(self, epoch: int) -> dict:
        """The service's round: its numbers travel in templates.json."""
        return dict(json.loads(templates_path(self.run_dir, epoch).read_text()).get("metrics", {}))

    def close(self) -> None:
        if self.reflection is not None:
            self.reflection.close()
