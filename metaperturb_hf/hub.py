"""Publishing perturbation functions to the Hugging Face Hub."""

from pathlib import Path

from huggingface_hub import HfApi

# What a released φ folder holds, by exact top-level name (fnmatch's `*` would also match checkpoints/.../x.py).
RELEASE_PATTERNS = [
    "config.json",
    "model.safetensors",
    "configuration_metaperturb.py",
    "modeling_metaperturb.py",
    "meta_training.json",
    "README.md",
]


def push_perturbation_folder(folder: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload the φ written by `save_pretrained` (plus its meta_training.json) to `repo_id` in one commit."""
    folder = Path(folder)
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"{folder} holds no saved perturbation function (config.json + model.safetensors).")
    api = HfApi()
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=folder, allow_patterns=RELEASE_PATTERNS,
                      commit_message="Upload MetaPerturb perturbation function")
    return str(url)
