"""A run dir: the one place that names its files, and the protocol between the learner and GEPA service jobs.

The two jobs of a P²O run share nothing but this folder (on a cluster, shared storage). Every write is atomic
(a reader sees a whole file or none), and a marker is written only after what it announces is complete:

    config.yaml  overrides.yaml   launcher, before any job starts: the resolved config (both jobs read it)
    learner.lease                 learner rank 0 while it runs (host, pid, heartbeat): one learner per run dir
    gepa_service.lease            the GEPA service while it runs: one service per run dir
    checkpoints/  metrics.jsonl  wandb_run_id  plots/  logs/    the learner's own files
    jobs.json  error.txt  <cluster.submitit_folder>/            the launcher's: job ids, its error, submitit's files

    epochs/<e>/hard_set.jsonl     learner, end of epoch e: the prompts whose K rollouts (almost) all failed
    epochs/<e>/policy/            learner: the policy at the end of epoch e, as a Hugging Face folder
    epochs/<e>/READY              learner: both above are complete → the service may start round e
    epochs/<e>/gepa_state.json    service: the round's resumable state (a restarted service continues it)
    epochs/<e>/templates.json     service: pool, cover set, per-prompt template draws and the round's metrics
    epochs/<e>/DONE               service: templates.json is final → the learner assigns templates for epoch e+1
    gepa_service.failed           service: it stopped on an error; the learner stops with that cause
    FINISHED                      learner: the run's last step is done; the service ends when it sees this

Inline GEPA (gepa.mode=inline) writes the same epoch files from inside the learner.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from omegaconf import OmegaConf

from p2o_hpc.config import RunConfig, to_run_config
from p2o_hpc.io_utils import atomic_write_jsonl, atomic_write_text
from p2o_hpc.lease import Lease


class GEPAServiceFailed(RuntimeError):
    """The GEPA service wrote its failure file: the learner stops with that cause instead of waiting."""


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
            document = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: no templates for epoch {epoch}") from None
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not JSON ({error})") from error
        if not isinstance(document, dict):
            raise ValueError(f"{path}: not a JSON object")
        return document

    def load_assignments(self, epoch: int) -> dict[str, list[str]]:
        """prompt id → the template texts drawn for its rollouts, from a finished templates.json."""
        path = self.templates(epoch)
        assignments = self.read_templates(epoch).get("assignments")
        if not isinstance(assignments, dict):
            raise ValueError(f"{path}: missing the 'assignments' object (prompt id → list of templates)")
        for prompt_id, templates in assignments.items():
            if not isinstance(templates, list) or not templates or not all(isinstance(t, str) for t in templates):
                raise ValueError(f"{path}: assignments[{prompt_id!r}] must be a non-empty list of template strings")
        return assignments

    def round_metrics(self, epoch: int) -> dict:
        """The round's numbers, which travel inside templates.json."""
        return dict(self.read_templates(epoch).get("metrics", {}))

    def wait_for_templates(self, epoch: int, *, timeout_s: float, poll_s: float) -> None:
        """Learner: until epoch `epoch`'s DONE; a failed service or the timeout stops the run with the cause."""
        deadline = time.monotonic() + timeout_s
        while not self.done(epoch):
            failure = self.service_failure()
            if failure is not None:
                raise GEPAServiceFailed(f"the GEPA service failed ({self.service_failure_file}): {failure}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {self.epoch(epoch) / 'DONE'} after gepa.wait_timeout_s={timeout_s}: "
                                   "is the GEPA service running?")
            time.sleep(poll_s)
