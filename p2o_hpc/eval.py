"""Evaluation entry point, a Hydra app: ``python -m p2o_hpc.eval models=<path> [benchmarks=[aime24,…]] [limit=N]``.

Scores models on the six Table-1 benchmarks with the Qwen2.5-Math suite's protocol (p2o_hpc.evaluation) and ends
with the table (`<output_dir>/table.md`, `table.csv`). `cluster=local` (default) runs here; `cluster=slurm` or a
site preset submits the same work as one submitit job through the learner's submission path
(p2o_hpc.cluster.slurm_jobs: partition, account, setup, … from cluster.*) and waits for it. Re-running a command
resumes it: problems already scored are not generated again.

    python -m p2o_hpc.eval models=/models/Qwen3-4B
    python -m p2o_hpc.eval models='["base=/models/Qwen3-4B","p2o=multirun/…/algorithm=p2o,reflection=self"]'
    python -m p2o_hpc.eval -m models=/models/Qwen3-4B,outputs/2026-11-23/10-00-00     # one point per model
    python -m p2o_hpc.eval models=outputs/…/run all_checkpoints=true cluster=my_site job.gpus=1
"""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.errors import CompactHydraException
from omegaconf import DictConfig

from p2o_hpc.evaluation.config import register_eval_configs, to_eval_config, validate_eval
from p2o_hpc.evaluation.runner import load_benchmarks, resolve_models
from p2o_hpc.evaluation.table1 import run_eval


class EvalRefused(CompactHydraException):
    """Bad input (model path, key, file): Hydra prints the one line, not a traceback."""


register_eval_configs()


@hydra.main(config_path="../conf", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from rich.console import Console

    console = Console()
    try:  # every input checked before an engine starts or a job is submitted
        eval_cfg = to_eval_config(cfg)
        validate_eval(eval_cfg)
        models = resolve_models(eval_cfg)
        load_benchmarks(eval_cfg)
        if eval_cfg.cluster.kind == "local":
            run_eval(eval_cfg, models, console=console)
            return
        from p2o_hpc.cluster.slurm_jobs import submit_eval

        job = submit_eval(eval_cfg, models)
    except (ValueError, FileNotFoundError) as error:  # EvalError, BenchmarkError, DatasetError, ModelNotAvailable…
        raise EvalRefused(str(error)) from error
    folder = Path(eval_cfg.output_dir).resolve() / eval_cfg.cluster.submitit_folder
    console.print(f"submitted eval job {job.job_id} ({len(models)} model(s)); logs in {folder}")
    try:
        paths = job.result()
    except Exception as error:  # noqa: BLE001 - submitit's FailedJobError / UncompletedJobError, with the job's log
        raise EvalRefused(f"eval job {job.job_id} failed: {error}") from error
    print(Path(paths["markdown"]).read_text(), flush=True)
    console.print(f"table: {paths['markdown']} and {paths['csv']}")


if __name__ == "__main__":
    main()
