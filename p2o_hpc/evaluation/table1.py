"""One evaluation, start to end: every model on every benchmark (resumable), then the Table-1 report rebuilt from the
whole output dir. What `python -m p2o_hpc.eval` runs here (cluster=local) or inside its SLURM job."""

from __future__ import annotations

from pathlib import Path

from p2o_hpc.evaluation.config import EvalConfig
from p2o_hpc.evaluation.report import write_report
from p2o_hpc.evaluation.runner import EvalModel, evaluate_model, load_benchmarks, resolve_models


def run_eval(cfg: EvalConfig, models: list[EvalModel] | None = None, console=None) -> dict[str, Path]:
    """Returns the report's paths ({"markdown": …, "csv": …})."""
    models = resolve_models(cfg) if models is None else models
    benchmarks = load_benchmarks(cfg)
    for model in models:
        evaluate_model(model, cfg, benchmarks, console)
    return write_report(cfg.output_dir)
