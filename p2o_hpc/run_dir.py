"""A run dir: the one place that names its files, and the protocol between the learner and GEPA service jobs.

The two jobs of a P²O run share nothing but this folder (on a cluster, shared storage). Every write is atomic
(a reader sees a whole file or none), and a marker is written only after what it announces is complete:

    config.yaml  overrides.yaml   launcher, before any job starts: the resolved config (both jobs read it)
    learner.lease                 learner rank 0 while it runs (host, pid, heartbeat): one learner per run dir
    gepa_service.lease            the GEPA service while it runs: one service per run dir
    checkpoints/  metrics.jsonl  wandb_run_id  plots/  logs/    the learner's own files
    hf/step_<N>/  wandb_sync/      tools/convert_to_hf.py's HF exports; tools/sync_wandb.py's rebuilt wandb run
    profile/step_<N>.rank<R>.json  every learner rank: a torch-profiler chrome trace of step N (trainer.profile_steps)
    jobs.json  error.txt  <cluster.submitit_folder>/            the launcher's: job ids, its error, submitit's files

    epochs/<e>/hard_set.jsonl     learner, end of epoch e: the prompts whose K rollouts (almost) all failed
    epochs/<e>/policy/            learner: the policy at the end of epoch e, as a Hugging Face folder
    epochs/<e>/READY              learner: both above are complete → the service may start round e
    epochs/<e>/gepa_state.json    service: the round's resumable state (a restarted service continues it)
    epochs/<e>/templates.json     service: pool, cover set, per-prompt template draws and the round's metrics
    epochs/<e>/DONE               service: templates.json is final → the learner assigns templates for epoch e+1
    epochs/<e>/SKIPPED            learner: it gave the round up (no live service for gepa.service_lost_s); the
                                  service goes on with the next epoch
    epochs/<e>/templates.json.rejected[.reason]   learner: a templates.json that did not parse, set aside
    gepa_service.failed           service: it stopped on an error; the learner stops with that cause
    FINISHED                      learner: the run's last step is done; the service ends when it sees this

Inline GEPA (gepa.mode=inline) writes the same epoch files from inside the learner.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from p2o_hpc.config import RunConfig, to_run_config
from p2o_hpc.io_utils import atomic_write_jsonl, atomic_write_text, clean_text
from p2o_hpc.lease import Lease


class GEPAServiceFailed(RuntimeError):
    """The GEPA service wrote its failure file: the learner stops with that cause instead of waiting."""


@dataclass
class ExchangeRound:
    """What the learner takes from a finished round: templates per prompt id and the round's numbers. `rejected`:
    why templates.json was set aside instead (then both are empty and the next epoch runs on plain prompts)."""

    assignments: dict[str, list[str]] = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    rejected: str | None = None


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def name(self) -> str:
        return self.path.name

    # -- the run's own files ------------------------------------------------------------------------------

    @property
    def config(self) -> Path:
        return self.path / "config.yaml"

    @property
    def overrides(self) -> Path:
        return self.path / "overrides.yaml"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def jobs(self) -> Path:
        return self.path / "jobs.json"

    @property
    def error(self) -> Path:
        return self.path / "error.txt"

    @property
    def wandb_run_id(self) -> Path:
        return self.path / "wandb_run_id"

    @property
    def wandb_sync(self) -> Path:
        """The one wandb run rebuilt from metrics.jsonl (tools/sync_wandb.py), whatever number of jobs the run took."""
        return self.path / "wandb_sync"

    @property
    def profile(self) -> Path:
        return self.path / "profile"

    def profile_trace(self, step: int, rank: int) -> Path:
        """Learner rank `rank`'s torch-profiler chrome trace of step `step` (1-based, as metrics.jsonl counts)."""
        return self.profile / f"step_{step}.rank{rank}.json"

    def hf_export(self, step: int) -> Path:
        """The HF folder tools/convert_to_hf.py makes of checkpoints/step_<step>."""
        return self.path / "hf" / f"step_{step}"

    def submitit(self, folder: str) -> Path:
        """submitit's job scripts and logs (`folder`: cluster.submitit_folder, relative to the run dir)."""
        return self.path / folder

    def write_config(self, cfg: RunConfig, overrides: list[str] | None) -> None:
        """Launcher: the resolved config both jobs read, and the overrides that made it (None keeps the saved ones:
        a resume continues the original run)."""
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config, OmegaConf.to_yaml(OmegaConf.structured(cfg)))
        if overrides is not None:
            atomic_write_text(self.overrides, OmegaConf.to_yaml(OmegaConf.create(list(overrides))))

    def load_config(self) -> RunConfig:
        return to_run_config(OmegaConf.load(self.config))

    def learner_lease(self, **kwargs) -> Lease:
        return Lease(self.path / "learner.lease", role="learner", **kwargs)

    def service_lease(self, **kwargs) -> Lease:
        return Lease(self.path / "gepa_service.lease", role="GEPA service", **kwargs)

    # -- run-level markers --------------------------------------------------------------------------------

    @property
    def finished_marker(self) -> Path:
        return self.path / "FINISHED"

    def finished(self) -> bool:
        return self.finished_marker.exists()

    def mark_finished(self) -> None:
        atomic_write_text(self.finished_marker, "")

    def clear_finished(self) -> None:
        """A (re)launched run is not finished until its learner says so again."""
        self.finished_marker.unlink(missing_ok=True)

    @property
    def service_failure_file(self) -> Path:
        return self.path / "gepa_service.failed"

    def service_failure(self) -> str | None:
        """The service's last words when it stopped on an error, else None."""
        try:
            return self.service_failure_file.read_text().strip()
        except FileNotFoundError:
            return None

    def mark_service_failed(self, cause: str) -> None:
        atomic_write_text(self.service_failure_file, cause.rstrip() + "\n")

    def clear_service_failed(self) -> None:
        self.service_failure_file.unlink(missing_ok=True)

    def service_ended_on_purpose(self) -> bool:
        """The service ended by itself: the run finished, or it reported a failure (the learner stops with that
        cause). A supervisor restarts a service that died otherwise."""
        return self.finished() or self.service_failure() is not None

    # -- one epoch's exchange -----------------------------------------------------------------------------

    def epoch(self, epoch: int) -> Path:
        return self.path / "epochs" / str(epoch)

    def hard_set(self, epoch: int) -> Path:
        return self.epoch(epoch) / "hard_set.jsonl"

    def policy(self, epoch: int) -> Path:
        return self.epoch(epoch) / "policy"

    def gepa_state(self, epoch: int) -> Path:
        return self.epoch(epoch) / "gepa_state.json"

    def templates(self, epoch: int) -> Path:
        return self.epoch(epoch) / "templates.json"

    def write_hard_set(self, epoch: int, rows: list[dict]) -> Path:
        return atomic_write_jsonl(self.hard_set(epoch), rows)

    def read_hard_set(self, epoch: int) -> list[dict]:
        path = self.hard_set(epoch)
        rows = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: not JSON ({error})") from error
        return rows

    def mark_ready(self, epoch: int) -> None:
        """Learner: the epoch's hard set and policy folder are complete."""
        atomic_write_text(self.epoch(epoch) / "READY", "")

    def ready(self, epoch: int) -> bool:
        return (self.epoch(epoch) / "READY").exists()

    def publish_templates(self, epoch: int, document: dict) -> None:
        """Service: templates.json (atomically), then DONE; only then is it the epoch's final answer."""
        atomic_write_text(self.templates(epoch), json.dumps(document, ensure_ascii=False))
        atomic_write_text(self.epoch(epoch) / "DONE", "")

    def done(self, epoch: int) -> bool:
        return (self.epoch(epoch) / "DONE").exists()

    def read_templates(self, epoch: int) -> dict:
        path = self.templates(epoch)
        try:
            document = json.loads(path.read_bytes().decode("utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no templates for epoch {epoch}") from None
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}: not UTF-8 ({error})") from error
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not JSON ({error})") from error
        if not isinstance(document, dict):
            raise ValueError(f"{path}: not a JSON object")
        return document

    def load_assignments(self, epoch: int) -> dict[str, list[str]]:
        """prompt id → the template texts drawn for its rollouts, from a finished templates.json (text cleaned of
        lone surrogates, which no tokenizer takes); a file that breaks the format is a ValueError naming it."""
        return self._assignments(self.read_templates(epoch), self.templates(epoch))

    @staticmethod
    def _assignments(document: dict, path: Path) -> dict[str, list[str]]:
        assignments = document.get("assignments")
        if not isinstance(assignments, dict):
            raise ValueError(f"{path}: missing the 'assignments' object (prompt id → list of templates)")
        for prompt_id, templates in assignments.items():
            if not isinstance(templates, list) or not templates or not all(isinstance(t, str) for t in templates):
                raise ValueError(f"{path}: assignments[{prompt_id!r}] must be a non-empty list of template strings")
        return {clean_text(prompt_id): [clean_text(t) for t in templates]
                for prompt_id, templates in assignments.items()}

    @staticmethod
    def _round_metrics(document: dict, path: Path) -> dict:
        """The round's numbers, which travel inside templates.json (only numbers: they go to the metrics log)."""
        metrics = document.get("metrics", {})
        if not isinstance(metrics, dict):
            raise ValueError(f"{path}: 'metrics' is not an object")
        return {clean_text(str(k)): v for k, v in metrics.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool)}

    def take_round(self, epoch: int) -> ExchangeRound:
        """The learner's one reader of a finished round. A templates.json that does not parse or breaks the format
        is set aside (templates.json.rejected, the reason beside it) and the round counts as empty: a bad file
        costs one epoch's templates, never a crash (nor a crash loop on resume, which would read it again)."""
        path = self.templates(epoch)
        earlier = self.rejected_round(epoch)
        if earlier is not None and not path.exists():  # set aside before (a resumed run reads the round again)
            return ExchangeRound(rejected=earlier)
        try:
            document = self.read_templates(epoch)  # parsed once for both parts
            return ExchangeRound(self._assignments(document, path), self._round_metrics(document, path))
        except (OSError, ValueError) as error:
            reason = clean_text(f"{type(error).__name__}: {error}")
        aside = path.with_name(path.name + ".rejected")
        if path.exists():
            path.replace(aside)
        atomic_write_text(aside.with_name(aside.name + ".reason"), reason + "\n")
        return ExchangeRound(rejected=reason)

    def best_template(self, epoch: int) -> str | None:
        """The round's single best template on its dev set, for problems no template was assigned to (in-training
        validation): the pool candidate with the highest dev_mean (one greedy rollout per dev item), ties to the
        earlier one, so ε ("") when nothing beat the plain prompt; GEPA's gepa/dev_pass@k_best_template scores the
        same one. None when the round has no readable pool (skipped, set aside, a file written without one).
        Read apart from take_round, once per round: a round without it loses only this, never its assignments."""
        try:
            pool = self.read_templates(epoch).get("pool")
        except (OSError, ValueError):
            return None
        candidates = [candidate for candidate in (pool if isinstance(pool, list) else [])
                      if isinstance(candidate, dict) and isinstance(candidate.get("template"), str)
                      and isinstance(candidate.get("dev_mean"), (int, float))]
        if not candidates:
            return None
        return clean_text(max(candidates, key=lambda candidate: candidate["dev_mean"])["template"])

    def rejected_round(self, epoch: int) -> str | None:
        """Why epoch `epoch`'s templates.json was set aside, if it was."""
        try:
            return (self.epoch(epoch) / "templates.json.rejected.reason").read_text().strip()
        except FileNotFoundError:
            return None

    def mark_skipped(self, epoch: int, reason: str) -> None:
        """Learner: it went on without this round; a (restarted) service skips it too."""
        atomic_write_text(self.epoch(epoch) / "SKIPPED", reason.rstrip() + "\n")

    def skipped(self, epoch: int) -> bool:
        return (self.epoch(epoch) / "SKIPPED").exists()

    def wait_for_templates(self, epoch: int, *, timeout_s: float, poll_s: float, service_lost_s: float) -> bool:
        """Learner: until epoch `epoch`'s DONE (True). False when no live service held the service lease for
        `service_lost_s` (killed and not restarted in time, or never started): the round is marked SKIPPED and the
        learner goes on without it. A failed service or the timeout stops the run with the cause."""
        wait = self.template_wait(epoch, timeout_s=timeout_s, service_lost_s=service_lost_s)
        while (settled := wait()) is None:
            time.sleep(poll_s)
        return settled

    def template_wait(self, epoch: int, *, timeout_s: float, service_lost_s: float):
        """One look per call at the round of epoch `epoch`, for a caller that polls (the learner's ranks wait
        together, one short collective per look): True once DONE, False once given up (SKIPPED, as in
        wait_for_templates), None while the service works; raises on a failed service or after `timeout_s`."""
        lease = self.service_lease()
        deadline = time.monotonic() + timeout_s
        last_alive = time.monotonic()

        def look() -> bool | None:
            nonlocal last_alive
            if self.done(epoch):
                return True
            failure = self.service_failure()
            if failure is not None:
                raise GEPAServiceFailed(f"the GEPA service failed ({self.service_failure_file}): {failure}")
            now = time.monotonic()
            if lease.live_holder() is not None:
                last_alive = now
            elif now - last_alive > service_lost_s:
                holder = lease.holder()
                self.mark_skipped(epoch, f"no live GEPA service for gepa.service_lost_s={service_lost_s} s "
                                         f"(last holder of {lease.path.name}: {holder or 'none'})")
                return False
            if now > deadline:
                raise TimeoutError(f"no {self.epoch(epoch) / 'DONE'} after gepa.wait_timeout_s={timeout_s}: "
                                   "is the GEPA service running?")
            return None

        return look
