"""Where a run's model weights come from: model.path as a local folder, the project's tiny model, or a hub name."""

from __future__ import annotations

from pathlib import Path


class ModelNotAvailable(FileNotFoundError):
    """model.path names no local folder and the hub cannot supply it (offline, unreachable, unknown or gated)."""


# The CPU testbed's warm-started base policy ships with the repository (a few MB), beside the tool that rebuilds it.
TESTBED_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "testbed_model"


def resolve_model_dir(path: str) -> str:
    """"tiny" → the project's tiny Qwen3; "testbed" → the testbed's warm-started policy; a folder → itself;
    anything else is a hub name, downloaded once."""
    if path == "tiny":
        from p2o_hpc.tiny_model import build_tiny_model

        return str(build_tiny_model())
    if path == "testbed":
        if not (TESTBED_MODEL_DIR / "config.json").is_file():
            raise ModelNotAvailable(f"model.path=testbed: {TESTBED_MODEL_DIR} holds no model; rebuild it with "
                                    "`python tools/build_testbed_model.py`")
        return str(TESTBED_MODEL_DIR)
    if Path(path).is_dir():
        return str(Path(path).resolve())
    if Path(path).is_absolute() or path.startswith("."):
        raise FileNotFoundError(f"model.path={path!r}: no such folder")
    return _download(path)


def _download(repo_id: str) -> str:
    """The hub snapshot (from the HF cache when it is there). A machine without the hub gets what to do instead of
    huggingface_hub's traceback, which names neither model.path nor the alternatives."""
    import httpx
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    try:
        return snapshot_download(repo_id=repo_id,
                                 allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"])
    except HFValidationError as error:
        raise ModelNotAvailable(f"model.path={repo_id!r} is neither a local folder nor a hub name (owner/name): "
                                f"{error}") from error
    except (OSError, httpx.HTTPError) as error:  # LocalEntryNotFoundError, HfHubHTTPError, connection errors
        cause = f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0]}"
        if isinstance(error, GatedRepoError):
            raise ModelNotAvailable(f"model.path={repo_id!r} is a gated hub model: accept its licence on the hub and "
                                    f"set HF_TOKEN, or set model.path to a local copy ({cause})") from error
        if isinstance(error, RepositoryNotFoundError):
            raise ModelNotAvailable(f"model.path={repo_id!r}: no such model on the hub (a typo, or private: set "
                                    f"HF_TOKEN), and no local folder of that name ({cause})") from error
        raise ModelNotAvailable(
            f"model.path={repo_id!r}: the model {repo_id} is neither in the local Hugging Face cache "
            f"({constants.HF_HUB_CACHE}) nor reachable on the hub ({cause}). Set model.path=/path/to/a/local/folder "
            f"(a Hugging Face model folder with config.json and *.safetensors), or pre-download it where there is "
            f"network with `hf download {repo_id}` (huggingface-cli download in huggingface_hub < 1.0) into the "
            "same HF_HOME; on a CPU machine run experiment=smoke (model.path=tiny, the project's tiny Qwen3)."
        ) from error
