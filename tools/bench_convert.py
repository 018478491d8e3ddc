"""Converter benchmark: peak memory and MB/s of tools/convert_to_hf.py on a learner checkpoint much larger than
one layer.

    python tools/bench_convert.py [--hidden 1024] [--ffn 3072] [--layers 24] [--tp 2] [--max-shard-gb 0.25]

Builds a random Qwen3 of that shape (the project's tiny-model factory), lets the megatron learner at TP=--tp
import it and save a real checkpoint (model + optimizer, save_checkpoint), then converts that checkpoint in a
fresh process and prints the checkpoint's model bytes, the converter's MB/s (first read to renamed folder) and
its peak resident memory, next to the resident memory of a process that only imports the converter (torch,
megatron-core, transformers): ``peak_over_imports_mb`` is what the conversion itself holds. The streaming claim
holds when that stays near one layer plus one output shard, far below the model size.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IMPORT_ONLY = ("from p2o_hpc.megatron import checkpoint_to_hf; import transformers.models.qwen3; "
               "print(checkpoint_to_hf._peak_rss_bytes())")


def _save_worker(hf_dir: str, tp: int, out_dir: str) -> None:
    from p2o_hpc.config import AlgorithmConfig
    from p2o_hpc.megatron.checkpointing import save_checkpoint
    from p2o_hpc.megatron.distributed import init_megatron
    from p2o_hpc.megatron.model_provider import read_hf_architecture
    from p2o_hpc.megatron.training import LRSchedule, build_learner

    init_megatron(tp, 1)
    arch = read_hf_architecture(hf_dir)
    learner = build_learner(arch, hf_dir, AlgorithmConfig(), LRSchedule(warmup_steps=0, total_steps=10))
    save_checkpoint(learner, Path(out_dir) / "checkpoints")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=3072)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--max-shard-gb", type=float, default=0.25)
    parser.add_argument("--workdir", help="keep the model, checkpoint and export here (default: a temp folder)")
    args = parser.parse_args(argv)

    from p2o_hpc.megatron.distributed import launch_local
    from p2o_hpc.tiny_model import build_tiny_model

    with tempfile.TemporaryDirectory(prefix="p2o_bench_convert_") as tmp:
        work = Path(args.workdir or tmp)
        overrides = {"hidden_size": args.hidden, "intermediate_size": args.ffn, "num_hidden_layers": args.layers,
                     "num_attention_heads": args.heads, "num_key_value_heads": args.kv_heads}
        model_dir = build_tiny_model(overrides=overrides, cache_root=work / "models")
        launch_local(_save_worker, args.tp, str(model_dir), args.tp, str(work / "run"))
        checkpoint = next((work / "run" / "checkpoints").glob("step_*"))
        imports = subprocess.run([sys.executable, "-c", IMPORT_ONLY], capture_output=True, text=True, check=True,
                                 cwd=REPO)
        import_rss = int(imports.stdout.split()[-1])
        shutil.rmtree(work / "hf", ignore_errors=True)  # a kept --workdir: convert again, not "already complete"
        result = subprocess.run([sys.executable, str(REPO / "tools" / "convert_to_hf.py"), str(checkpoint),
                                 str(work / "hf"), "--base-model", str(model_dir), "--dtype", "fp32",
                                 "--max-shard-gb", str(args.max_shard_gb)], capture_output=True, text=True, cwd=REPO)
        if result.returncode:
            print(result.stderr[-3000:], file=sys.stderr)
            return 1
        line = next(line for line in result.stdout.splitlines() if line.startswith("hf_dir="))
        fields = dict(re.findall(r"(\w+)=(\S+)", line))
        model_bytes, peak = int(fields["bytes"]), float(fields["peak_rss_mb"]) * 1e6
        layer_bytes = model_bytes / args.layers  # roughly: the embedding is not a layer
        print(f"model=hidden{args.hidden}_ffn{args.ffn}_layers{args.layers} tp={args.tp} "
              f"parameters={fields['parameters']} model_mb={model_bytes / 1e6:.0f} layer_mb~{layer_bytes / 1e6:.0f} "
              f"shard_mb={args.max_shard_gb * 1024:.0f}")
        print(f"seconds={fields['seconds']} mb_per_s={fields['mb_per_s']}")
        print(f"peak_rss_mb={peak / 1e6:.0f} imports_only_rss_mb={import_rss / 1e6:.0f} "
              f"peak_over_imports_mb={(peak - import_rss) / 1e6:.0f} peak_over_imports_vs_model="
              f"{(peak - import_rss) / model_bytes:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
