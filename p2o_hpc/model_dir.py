"""Where a run's model weights come from: model.path as a local folder, the project's tiny model, or a hub name."""

from __future__ import annotations

from pathlib import Path


def resolve_model_dir(path: str) -> str:
    """"tiny" → the project's tiny Qwen3; a folder → itself; anything else is a hub name, downloaded once."""
    if path == "tiny":
        from p2o_hpc.tiny_model import build_tiny_model

        return str(build_tiny_model())
    if Path(path).is_dir():
        return str(Path(path).resolve())
    if Path(path).is_absolute() or path.startswith("."):
        raise FileNotFoundError(f"model.path={path!r}: no such folder")
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id=path, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"])
