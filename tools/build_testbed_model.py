"""Rebuild the CPU testbed's base policy (assets/testbed_model/, what `experiment=testbed` runs): a small Qwen3 with
a tokenizer trained on the task, warm-started by the project's megatron learner with the `sft` loss, then its
latent-skill report (assets/testbed_model/latent_skill.json). Deterministic from --seed; ~12 min on 2 CPU cores.

    python tools/build_testbed_model.py [--out assets/testbed_model] [--seed 0] [--rows N] [--layers L]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from p2o_hpc.model_dir import TESTBED_MODEL_DIR
from p2o_hpc.trainer.testbed_model import REPORT_NAME, TestbedModelSpec, build_testbed_model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(TESTBED_MODEL_DIR))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rows", type=int, default=None, help="warm-start corpus rows (default: the spec's)")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--epochs", type=float, default=None)
    parser.add_argument("--lr", type=float, default=None)
    args = parser.parse_args(argv)
    spec = TestbedModelSpec(seed=args.seed)
    if args.rows:
        spec = dataclasses.replace(spec, corpus=dataclasses.replace(spec.corpus, rows=args.rows))
    if args.layers:
        spec = dataclasses.replace(spec, architecture={**spec.architecture, "num_hidden_layers": args.layers})
    if args.epochs or args.lr:
        spec = dataclasses.replace(spec, sft=dataclasses.replace(spec.sft, epochs=args.epochs or spec.sft.epochs,
                                                                  lr=args.lr or spec.sft.lr))
    out = build_testbed_model(Path(args.out), spec)
    report = json.loads((out / REPORT_NAME).read_text())
    print(json.dumps({k: v for k, v in report.items() if k not in ("accuracy", "worked_format_rate", "spec")},
                     indent=1))
    for key, value in report["accuracy"].items():
        print(f"{key:24s} accuracy {value:.2f}  worked format {report['worked_format_rate'][key]:.2f}")
    print(f"testbed model → {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
