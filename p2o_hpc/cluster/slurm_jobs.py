"""What runs inside the SLURM jobs, and how they are submitted with submitit.

A run is two jobs: the learner (parallel.nodes × parallel.gpus_per_node tasks, one megatron rank each, the
rendezvous from SLURM's environment) and, for P²O with gepa.mode=service, the GEPA service on its own resources.
They talk only through the run dir. The learner is checkpointable: USR2 → checkpoint → requeue → resume.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import submitit

from p2o_hpc.config import RunConfig
from p2o_hpc.run_dir import RunDir
from p2o_hpc.trainer.preemption import DEADLINE_ENV, slurm_time_left_s


class SlurmLearnerTask(submitit.helpers.Checkpointable):
    """One learner rank per SLURM task. `checkpoint()` resubmits the same task: it resumes from the run dir."""

    def __init__(self, cfg_dict: dict, run_dir: str, model_dir: str):
        self.cfg_dict, self.run_dir, self.model_dir = cfg_dict, run_dir, model_dir

    def __call__(self) -> dict:
        from p2o_hpc.megatron.distributed import pin_socket_interface, shutdown
        from p2o_hpc.trainer.driver import run_worker

        env = submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        job = submitit.JobEnvironment()
        cluster = self.cfg_dict["cluster"]
        interface = pin_socket_interface(cluster.get("network_interface"), env.master_addr)
        print(f"[p2o] rank {env.rank}/{env.world_size} (local {env.local_rank}) on {socket.gethostname()}, "
              f"rendezvous {env.master_addr}:{env.master_port} via {interface or 'the default interface'}, "
              f"job {job.job_id}", flush=True)
        left = slurm_time_left_s(job.job_id)
        if left is not None:
            os.environ[DEADLINE_ENV] = str(time.time() + left)
        requeue = signal.getsignal(signal.SIGUSR2)  # submitit's handler: dumps checkpoint(), requeues, counts timeouts
        abandon_after = cluster["abandon_after_s"]
        if abandon_after is None:
            abandon_after = max(10.0, cluster["signal_delay_s"] - 30.0)
        can_requeue = env.rank == 0 and callable(requeue)

        def arm_abandon(stop) -> None:
            if can_requeue:
                stop.abandon_steps_after(abandon_after, lambda: requeue(signal.SIGUSR2, None))

        try:
            trainer = run_worker(self.cfg_dict, self.run_dir, self.model_dir, prepare_stop=arm_abandon)
        finally:
            shutdown()
        if not trainer.interrupted:
            return {**trainer.placement, "step": trainer.step}
        if not trainer.stop_signal.requeue:
            raise RuntimeError(f"stopped by SIGTERM at step {trainer.step} (checkpoint saved); not requeued")
        if can_requeue:
            requeue(signal.SIGUSR2, None)  # exits this process; SLURM restarts the job, which resumes
        time.sleep(300)  # the other ranks wait to be stopped by the requeue
        sys.exit(1)

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        """The state is in the run dir's checkpoints: the requeued job is the same call."""
        return submitit.helpers.DelayedSubmission(SlurmLearnerTask(self.cfg_dict, self.run_dir, self.model_dir))


class GEPAServiceTask(submitit.helpers.Checkpointable):
    """The GEPA service job: what `python -m p2o_hpc.gepa.service` runs, as a function; ends on the run's FINISHED.
    Checkpointable: at its walltime it is requeued as is (the round's state is saved after every parent step)."""

    LEASE_WAIT_S = 90.0  # a predecessor killed without releasing its lease: wait until its heartbeat is stale

    def __init__(self, run_dir: str):
        self.run_dir = run_dir

    def __call__(self) -> int:
        from rich.console import Console

        from p2o_hpc.gepa.service_loop import run_service

        # submitit ignores SIGTERM; scancel must unwind, so the engine and the reference server are stopped.
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
        console = Console(stderr=True)
        deadline = time.time() + self.LEASE_WAIT_S
        while True:
            code = run_service(RunDir(self.run_dir), console)
            if code != 3 or time.time() > deadline:  # 3: the lease is held
                break
            time.sleep(10)
        if code:
            raise RuntimeError(f"GEPA service for {self.run_dir} exited with status {code}")
        return code


def _executor(run_dir: RunDir, cfg: RunConfig, *, name: str) -> submitit.AutoExecutor:
    cluster = cfg.cluster
    executor = submitit.AutoExecutor(folder=run_dir.submitit(cluster.submitit_folder), cluster="slurm",
                                     slurm_max_num_timeout=cluster.max_num_timeout)
    params = dict(cluster.additional_parameters)
    executor.update_parameters(
        name=name,
        timeout_min=cluster.time_min,
        slurm_partition=cluster.partition,
        slurm_account=cluster.account,
        slurm_qos=cluster.qos,
        slurm_constraint=cluster.constraint,
        slurm_signal_delay_s=cluster.signal_delay_s,
        slurm_setup=list(cluster.setup),
        slurm_srun_args=list(cluster.srun_args),
        slurm_additional_parameters=params,
    )
    return executor


def submit_learner(cfg: RunConfig, run_dir: RunDir, model_dir: str) -> submitit.Job:
    executor = _executor(run_dir, cfg, name=f"p2o:{run_dir.name}")
    ranks = cfg.parallel.ranks_per_node
    executor.update_parameters(
        nodes=cfg.parallel.nodes,
        tasks_per_node=ranks,
        cpus_per_task=cfg.cluster.cpus_per_task,
        gpus_per_node=ranks if cfg.cluster.gpus else None,
        mem_gb=learner_mem_gb(cfg, model_dir),
    )
    return executor.submit(SlurmLearnerTask(asdict(cfg), str(run_dir.path), model_dir))


def learner_mem_gb(cfg: RunConfig, model_dir: str) -> Optional[int]:
    """Host RAM per learner node: cluster.mem_gb, else (GPU runs) what the colocated setup needs by the memory plan
    (each sleeping engine keeps its weights in host RAM), so a partition's small default does not kill the job at
    the first sleep; None (the partition's default) for CPU runs or when the model's config cannot be read."""
    if cfg.cluster.mem_gb is not None or not cfg.cluster.gpus:
        return cfg.cluster.mem_gb
    from p2o_hpc.megatron.memory_plan import host_memory_gb_per_node, read_model_shape

    try:
        shape = read_model_shape(model_dir)
    except (OSError, ValueError, KeyError):
        return None
    return int(host_memory_gb_per_node(shape, cfg))


def submit_gepa_service(cfg: RunConfig, run_dir: RunDir) -> submitit.Job:
    resources = cfg.gepa.resources
    executor = _executor(run_dir, cfg, name=f"p2o-gepa:{run_dir.name}")
    executor.update_parameters(
        nodes=1,
        tasks_per_node=1,
        cpus_per_task=resources.cpus,
        gpus_per_node=resources.gpus if cfg.cluster.gpus and resources.gpus else None,
        mem_gb=resources.mem_gb,
        timeout_min=resources.time_min or cfg.cluster.time_min,
        slurm_partition=resources.partition or cfg.cluster.partition,
    )
    return executor.submit(GEPAServiceTask(str(run_dir.path)))


class EvalTask(submitit.helpers.Checkpointable):
    """`python -m p2o_hpc.eval … cluster=slurm` as a job. Checkpointable: at its walltime it is requeued as is and
    resumes from the per-problem records."""

    def __init__(self, cfg_dict: dict, models: list):
        self.cfg_dict, self.models = cfg_dict, models

    def __call__(self) -> dict[str, str]:
        from rich.console import Console

        from p2o_hpc.evaluation.config import to_eval_config
        from p2o_hpc.evaluation.table1 import run_eval

        paths = run_eval(to_eval_config(self.cfg_dict), self.models, console=Console())
        return {kind: str(path) for kind, path in paths.items()}


def submit_eval(cfg, models: list) -> submitit.Job:
    """One eval job (1 node, 1 task, eval job.gpus GPUs; vLLM's TP = those GPUs) with the learner's cluster.*
    parameters; its submitit files under the eval's output dir. `cfg`: an evaluation.config.EvalConfig."""
    from dataclasses import replace

    from omegaconf import OmegaConf

    cluster, job = cfg.cluster, cfg.job
    output_dir = RunDir(Path(cfg.output_dir).resolve())
    executor = _executor(output_dir, RunConfig(cluster=cluster), name=f"p2o-eval:{output_dir.name}")
    executor.update_parameters(
        nodes=1,
        tasks_per_node=1,
        cpus_per_task=job.cpus_per_task or cluster.cpus_per_task,
        gpus_per_node=job.gpus if cluster.gpus and job.gpus else None,
        mem_gb=job.mem_gb or cluster.mem_gb,
        timeout_min=job.time_min or cluster.time_min,
    )
    job_cfg = replace(cfg, output_dir=str(output_dir.path),
                      tensor_parallel_size=cfg.tensor_parallel_size or (job.gpus if cluster.gpus else 1))
    return executor.submit(EvalTask(OmegaConf.to_container(OmegaConf.structured(job_cfg)), models))


def needs_gepa_service(cfg: RunConfig) -> bool:
    return cfg.algorithm.p2o.enabled and cfg.gepa.mode == "service"


def job_state(job: Optional[submitit.Job]) -> str:
    """SLURM's state word (RUNNING, COMPLETED, FAILED, CANCELLED, TIMEOUT, PENDING, ...)."""
    if job is None:
        return "-"
    return job.state.split()[0]
