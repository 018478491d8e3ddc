"""Bad configurations fail before any process starts, with a message naming the offending key."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import LlamaConfig, MistralConfig, Qwen3Config

from p2o_hpc.cluster.runs import preflight
from p2o_hpc.data import DatasetError
from p2o_hpc.megatron.model_provider import read_hf_architecture
from p2o_hpc.config import AlgorithmConfig, RunConfig, to_run_config
from p2o_hpc.paths import REPO_ROOT
from p2o_hpc.megatron.training import LRSchedule, build_learner, uses_torch_adamw_fallback


def test_unsupported_model_type_is_named():
    with pytest.raises(NotImplementedError, match="model_type 'mistral'"):
        read_hf_architecture(MistralConfig())


def test_rope_scaling_is_refused_not_silently_ignored():
    config = LlamaConfig(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    with pytest.raises(NotImplementedError, match="rope scaling"):
        read_hf_architecture(config)


def test_qwen3_reads_head_dim_and_rope_theta():
    arch = read_hf_architecture(Qwen3Config(hidden_size=256, num_attention_heads=4, head_dim=128, rope_theta=5e5))
    assert (arch.head_dim, arch.rope_theta, arch.qk_norm, arch.qkv_bias) == (128, 5e5, True, False)


def test_distributed_optimizer_on_adamw_fallback_is_refused():
    assert uses_torch_adamw_fallback()  # no TE/Apex on this machine
    arch = read_hf_architecture(Qwen3Config())
    with pytest.raises(ValueError, match="use_distributed_optimizer"):
        build_learner(arch, None, AlgorithmConfig(), LRSchedule(warmup_steps=0, total_steps=1),
                      use_distributed_optimizer=True)


# ------------------------------------------------------------------ preflight: the model folder and the data


def _launch(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "p2o_hpc.launch", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore", **env})


def _small_run(train: str) -> RunConfig:
    return to_run_config({"data": {"train": train, "recipe": None}})


def _rows(path: Path, lines: list[bytes]) -> str:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


@pytest.mark.parametrize("key, size, message", [
    ("tensor", 3, "parallel.tensor=3 does not divide the model's num_attention_heads=4"),
    ("tensor", 4, "parallel.tensor=4 does not divide the model's num_key_value_heads=2"),
    ("pipeline", 3, "parallel.pipeline=3 does not divide the model's num_hidden_layers=4"),
])  # fmt: skip
def test_preflight_checks_the_model_against_the_parallel_layout(tiny_model_dir, key, size, message):
    """Megatron refuses these in every rank after init; the launcher reads them from the model's config.json."""
    cfg = _small_run("math500")
    setattr(cfg.parallel, key, size)
    with pytest.raises(ValueError, match=re.escape(message) + r".*model folder .*qwen3-tiny.*model.path="):
        preflight(cfg, str(tiny_model_dir))
    setattr(cfg.parallel, key, 2)  # divides 4 heads, 2 KV groups, 384 MLP rows, 4 layers
    preflight(cfg, str(tiny_model_dir))


def test_preflight_refuses_a_folder_without_config_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        preflight(_small_run("math500"), str(tmp_path))


@pytest.mark.parametrize("lines, message", [
    ([b'{"problem": "q"}'], r"line 2: missing answer field"),
    ([b'{"problem": 3, "answer": "1"}'], r"line 2: field 'problem' must be a non-empty string"),
    ([b'{"problem": "q", "answer":'], r"line 2: invalid JSON"),
    ([b'{"problem": "caf\xe9", "answer": "1"}'], r"line 2: invalid UTF-8"),
    ([b'{"id": "a", "problem": "q", "answer": "1"}'], r"duplicate problem id 'a': \S*train\.jsonl line 1 and "
                                                      r"\S*train\.jsonl line 2"),
])  # fmt: skip
def test_preflight_reads_the_training_set_as_the_learner_does(tmp_path, lines, message):
    """These rows failed only inside a rank, after megatron's init; now the launcher names the key, file and row."""
    train = _rows(tmp_path / "train.jsonl", [b'{"id": "a", "problem": "1+1", "answer": "2"}', *lines])
    with pytest.raises(DatasetError, match=rf"data\.train=\S*train\.jsonl: .*{message}"):
        preflight(_small_run(train))


def test_preflight_names_a_misspelt_dataset_and_a_template_without_placeholder():
    with pytest.raises(DatasetError, match=r"data\.train=math5000: unknown dataset 'math5000' \(did you mean "
                                           r"'math500'.*known: aime24"):
        preflight(_small_run("math5000"))
    cfg = _small_run("math500")
    cfg.data.template = "Solve: {question}"
    with pytest.raises(ValueError, match=r"data\.template: prompt template has no \{problem\} placeholder"):
        preflight(cfg)


OFFLINE_HUB = "from p2o_hpc.model_dir import resolve_model_dir\ntry:\n    resolve_model_dir('Qwen/Qwen3-4B')\n" \
              "except FileNotFoundError as error:\n    print(type(error).__name__, error)\n"


def test_a_hub_model_without_the_hub_says_what_to_do(tmp_path):
    """Item 6: offline and not in the cache, snapshot_download's bare LocalEntryNotFoundError named no way out.
    HF_HUB_OFFLINE is read when huggingface_hub is imported, hence a fresh process (and no network is touched)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_CACHE", None)
    out = subprocess.run([sys.executable, "-c", OFFLINE_HUB], capture_output=True, text=True, timeout=120, env=env,
                         cwd=REPO_ROOT)
    assert out.stdout.startswith("ModelNotAvailable model.path='Qwen/Qwen3-4B': the model Qwen/Qwen3-4B is neither in "
                                 f"the local Hugging Face cache ({tmp_path / 'hf' / 'hub'}) nor reachable"), out.stderr
    for hint in ("LocalEntryNotFoundError", "model.path=/path/to/a/local/folder", "config.json and *.safetensors",
                 "hf download Qwen/Qwen3-4B", "experiment=smoke"):
        assert hint in out.stdout


def test_a_sweep_checks_every_point_before_submitting_any(tmp_path):
    """`-m` composes, validates, resolves the model (once per model.path) and preflights every point first; a hub
    model on a machine without the hub and a misspelt dataset are named per point, one line each, no traceback."""
    result = _launch("-m", "experiment=smoke", "model.path=Qwen/Qwen3-4B,tiny", "data.train=math500,math5000",
                     f"hydra.sweep.dir={tmp_path / 'sweep'}", HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    assert result.returncode != 0
    assert "3 of 4 sweep points are invalid; nothing was submitted" in result.stderr, result.stderr[-3000:]
    lines = result.stderr.splitlines()
    assert sum("model.path=Qwen/Qwen3-4B data.train=" in line and "hf download Qwen/Qwen3-4B" in line
               for line in lines) == 2
    assert any("model.path=tiny data.train=math5000]: data.train=math5000: unknown dataset 'math5000'" in line
               for line in lines)
    assert "Traceback" not in result.stderr and not list(tmp_path.glob("sweep/*/config.yaml"))


def test_a_single_run_names_a_bad_layout_in_one_line(tmp_path):
    result = _launch("experiment=smoke", "parallel.tensor=4", f"hydra.run.dir={tmp_path / 'run'}")
    assert result.returncode != 0
    assert "parallel.tensor=4 does not divide the model's num_key_value_heads=2" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run" / "config.yaml").exists()
