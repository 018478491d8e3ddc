"""The learner's GPU memory per GPU for a run config, and the host memory per node (p2o_hpc/megatron/memory_plan.py).

    .venv/bin/python tools/plan_memory.py experiment=paper_p2o                      # the paper preset (8×80 GB)
    .venv/bin/python tools/plan_memory.py experiment=paper_p2o parallel=tp1 parallel.data=8 \\
        algorithm.micro_batch_size=4                                                   # the old TP1 layout
    .venv/bin/python tools/plan_memory.py --run RUN_DIR                               # a run's saved config

Overrides are the launcher's (Hydra); the model's shape comes from its config.json (model.path: a folder, tiny,
testbed, a hub name in the local HF cache or one the estimator knows offline). Activations are sized for the worst
case micro-batch, micro_batch_size × (max_prompt_tokens + max_response_tokens), or with algorithm.micro_batch_tokens
one of that many padded tokens (rows × longest), packed or not as parallel.pack_sequences says. Exit status 1 when
it does not fit parallel.gpu_memory_gb.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rich.console import Console

from p2o_hpc.config import RunConfig, register_configs, to_run_config, validate
from p2o_hpc.megatron import memory_plan
from p2o_hpc.paths import REPO_ROOT


def compose(overrides: list[str]) -> RunConfig:
    """The run config the launcher would compose from these overrides."""
    from hydra import compose as hydra_compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(str(REPO_ROOT / "conf"), version_base="1.3"):
        return to_run_config(hydra_compose("config", overrides=overrides))


def model_shape(path: str) -> tuple[memory_plan.ModelShape, str]:
    """(shape, where it came from) for model.path, without downloading weights."""
    if path in ("tiny", "testbed") or Path(path).is_dir():
        from p2o_hpc.model_dir import resolve_model_dir

        folder = resolve_model_dir(path)
        return memory_plan.read_model_shape(folder), f"{folder}/config.json"
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(path, "config.json")
    if isinstance(cached, str):
        return memory_plan.read_model_shape(Path(cached).parent), f"HF cache {cached}"
    if path in memory_plan.KNOWN_SHAPES:
        return memory_plan.KNOWN_SHAPES[path], f"{path}'s config.json values known to memory_plan (offline)"
    raise SystemExit(f"model.path={path}: no config.json here (not in the HF cache, not a folder) and no shape known "
                     "offline; download the model once or pass model.path=<folder>")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a run dir: plan its saved config.yaml (overrides are not applied)")
    parser.add_argument("--spec", choices=("te", "local"), default="te",
                        help="te: GPUs with Transformer-Engine (flash attention); local: megatron's own modules "
                             "with torch's fused SDPA")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. experiment=paper_p2o parallel.tensor=4")
    args = parser.parse_args(argv)
    if args.run:
        from p2o_hpc.run_dir import RunDir

        cfg = RunDir(Path(args.run)).load_config()
    else:
        cfg = compose(args.overrides)
    validate(cfg)
    shape, source = model_shape(cfg.model.path)
    memory_plan.check_layout(shape, cfg)
    plan = memory_plan.estimate(shape, cfg, spec=args.spec)
    console = Console()
    console.print(f"{cfg.model.path} ({shape.parameters / 1e9:.2f} B parameters; shape from {source})")
    console.print(memory_plan.describe(plan))
    console.print(memory_plan.plan_table(plan))
    console.print(f"host memory per node (learner job; sleeping engines' weights offloaded to host): "
                  f"{memory_plan.host_memory_gb_per_node(shape, cfg)} GB")
    if not plan.fits:
        console.print("[yellow]does not fit:[/yellow] " + "; ".join(memory_plan.suggestions(plan)))
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
