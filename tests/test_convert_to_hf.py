"""A learner checkpoint of any layout becomes, in one process, the HF model the learner computed; wrong input is refused.

The learner trains the tiny Qwen3 for two steps at TP=2 and at PP=2, saves its checkpoint and its own logits on a
fixed batch; the checkpoint is then converted here, in the pytest process (no torch.distributed world), and
transformers must reproduce those logits (fp32). That vLLM serves an export (greedy tokens equal to transformers')
is checked in tests/test_eval.py, whose eval converts a run's checkpoint and generates from it.
"""

from __future__ import annotations

import json
import runpy
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from p2o_hpc.config import RunConfig
from p2o_hpc.megatron.checkpoint_to_hf import (EXPORT_MARKER, CheckpointConversionError, convert_checkpoint,
                                               run_checkpoints)
from p2o_hpc.megatron.conversion_check import hf_reference
from p2o_hpc.megatron.distributed import launch_local
from p2o_hpc.run_dir import RunDir
from p2o_hpc.tiny_model import build_tiny_model
from tests import mp_workers

REPO = Path(__file__).resolve().parent.parent
LAYOUTS = {"tp2": (2, 1), "pp2": (1, 2)}


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """layout → a folder with checkpoints/step_2 and logits.pt, both from the learner at that layout."""
    folders = {}
    for name, (tp, pp) in LAYOUTS.items():
        out = tmp_path_factory.mktemp(f"learner_{name}")
        launch_local(mp_workers.learner_worker, tp * pp, str(tiny_model_dir), tp, pp,
                     [("train", 2), ("save",), ("logits", "logits.pt")], str(out))
        folders[name] = out
    return folders


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_export_computes_the_learners_logits(trained, tiny_model_dir, tmp_path, layout):
    checkpoint = trained[layout] / "checkpoints" / "step_2"
    stats = convert_checkpoint(checkpoint, tmp_path / "hf", base_model_dir=str(tiny_model_dir))
    assert not stats.skipped and stats.bytes_written > 0
    learner = torch.load(trained[layout] / "logits.pt")
    logits, logprobs = hf_reference(tmp_path / "hf", learner["input_ids"], learner["attention_mask"])
    valid = learner["attention_mask"].bool()
    assert (logits - learner["logits"])[valid].abs().max().item() <= 1e-4
    assert (logprobs - learner["logprobs"])[valid[:, 1:]].abs().max().item() <= 1e-4
    # Trained weights, not the base model's: the export differs from the folder it started from.
    base_logits, _ = hf_reference(tiny_model_dir, learner["input_ids"], learner["attention_mask"])
    assert (base_logits - logits)[valid].abs().max().item() > 1e-3

    done = json.loads((tmp_path / "hf" / EXPORT_MARKER).read_text())
    assert done["step"] == 2 and done["dtype"] == "float32" and done["parameters"] == stats.parameters
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert stats.parameters == sum(p.numel() for p in base.parameters())  # tied: the embedding counted once
    again = convert_checkpoint(checkpoint, tmp_path / "hf", base_model_dir=str(tiny_model_dir))
    assert again.skipped


def test_both_layouts_export_the_same_key_set_and_a_loadable_bf16_model(trained, tiny_model_dir, tmp_path):
    exports = {layout: convert_checkpoint(trained[layout] / "checkpoints" / "step_2", tmp_path / layout,
                                          base_model_dir=str(tiny_model_dir), dtype="bf16", max_shard_bytes=1 << 20)
               for layout in LAYOUTS}
    key_sets = []
    for stats in exports.values():
        index = json.loads((stats.out_dir / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1  # 1 MiB shards: sharded with an index
        assert index["metadata"]["total_size"] == stats.bytes_written
        key_sets.append(set(index["weight_map"]))
        config = json.loads((stats.out_dir / "config.json").read_text())
        assert "bfloat16" in (config.get("dtype"), config.get("torch_dtype"))
        for file_name in set(index["weight_map"].values()):
            with safe_open(stats.out_dir / file_name, framework="pt") as handle:
                assert all(handle.get_slice(key).get_dtype() == "BF16" for key in handle.keys())
        for needed in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            assert (stats.out_dir / needed).is_file(), needed
        model = AutoModelForCausalLM.from_pretrained(stats.out_dir)
        assert model.dtype == torch.bfloat16
    assert key_sets[0] == key_sets[1]


def test_a_half_written_checkpoint_is_refused_and_nothing_is_written(trained, tiny_model_dir, tmp_path):
    broken = tmp_path / "checkpoints" / "step_2"
    shutil.copytree(trained["tp2"] / "checkpoints" / "step_2", broken)
    (broken / "COMPLETE").unlink()
    with pytest.raises(CheckpointConversionError, match="incomplete checkpoint"):
        convert_checkpoint(broken, tmp_path / "hf", base_model_dir=str(tiny_model_dir))
    (broken / "COMPLETE").write_text("2\n")
    next(broken.glob("*.distcp")).unlink()  # one rank's file lost
    with pytest.raises(CheckpointConversionError, match="data files missing"):
        convert_checkpoint(broken, tmp_path / "hf", base_model_dir=str(tiny_model_dir))
    assert not (tmp_path / "hf").exists() and not list(tmp_path.glob(".hf*"))
    assert run_checkpoints(tmp_path) == [broken]  # has its marker again: listed; a missing file is found on convert


def test_a_checkpoint_of_another_base_model_is_refused(trained, tmp_path):
    checkpoint = trained["pp2"] / "checkpoints" / "step_2"
    fewer_layers = build_tiny_model(overrides={"num_hidden_layers": 2}, cache_root=tmp_path / "models")
    with pytest.raises(CheckpointConversionError, match="holds 4 layers, the base model has 2"):
        convert_checkpoint(checkpoint, tmp_path / "a", base_model_dir=str(fewer_layers))
    wider = build_tiny_model(overrides={"intermediate_size": 512}, cache_root=tmp_path / "models")
    with pytest.raises(CheckpointConversionError, match="another base model|does not convert to a model like"):
        convert_checkpoint(checkpoint, tmp_path / "b", base_model_dir=str(wider))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_converts_the_latest_checkpoint_of_a_run_dir_with_its_base_model(trained, tiny_model_dir, tmp_path, capsys):
    run = RunDir(tmp_path / "run")
    cfg = RunConfig()
    cfg.model.path = str(tiny_model_dir)
    run.write_config(cfg, overrides=[])
    shutil.copytree(trained["pp2"] / "checkpoints", run.checkpoints)
    shutil.copytree(run.checkpoints / "step_2", run.checkpoints / ".step_3.tmp")  # an interrupted later save
    cli = runpy.run_path(str(REPO / "tools" / "convert_to_hf.py"))  # its main(), in this process
    assert cli["main"](["--run", str(run.path)]) == 0
    out = capsys.readouterr().out
    assert f"hf_dir={run.hf_export(2)} parameters=" in out and "mb_per_s=" in out
    assert json.loads((run.hf_export(2) / EXPORT_MARKER).read_text())["base_model"] == str(tiny_model_dir)

    assert cli["main"]([str(tmp_path / "nowhere")]) == 1
    assert "no such checkpoint folder" in capsys.readouterr().err
