"""Where a model's files are on this machine, and how they get there; no torch, so that checks stay light.

Where a model can come from, in the order we look:

1. a local diffusers folder (``model_index.json`` or ``unet/`` inside);
2. a single-file ``.safetensors`` checkpoint (diffusers' ``from_single_file``,
   which needs the matching config in the local Hugging Face cache);
3. a Hugging Face id, resolved from the local cache only. fixative never
   downloads gigabytes behind the user's back: ``fixative model pull ID`` does
   that, with a progress bar, when asked.

Pickle checkpoints (``.ckpt``, ``.bin``, ``.pt``, ``.pth``) are refused:
unpickling runs arbitrary code, and model files are passed around by strangers.
Diffusers folders are loaded with ``use_safetensors=True`` for the same reason.

`fixative run` calls :func:`resolve_model_folder` before it creates a
folder or starts an engine, so that a first run without the model says so
plainly instead of in an engine's log.
"""

from __future__ import annotations

from pathlib import Path

from fixative.engine.errors import ModelError

PICKLE_SUFFIXES = {".ckpt", ".bin", ".pt", ".pth", ".pkl"}
# Parts of a diffusers repo the engine reads; ``fixative model pull`` fetches only these.
NEEDED_PATTERNS = [
    "model_index.json",
    "scheduler/*.json",
    "tokenizer/*",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
]


def resolve_model_folder(model: str) -> Path:
    """Turn the ``model`` setting into a local diffusers folder or .safetensors file, or explain what to do."""
    path = Path(model).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelError(
            f"refusing to load {model}: {path.suffix} checkpoints are Python pickles, and loading one can run "
            "arbitrary code. Use a .safetensors checkpoint or a diffusers folder."
        )
    if path.is_file() and path.suffix.lower() != ".safetensors":
        # diffusers would hand any other single file to torch.load, i.e. unpickle it.
        raise ModelError(
            f"refusing to load {model}: a single-file model must be a .safetensors checkpoint "
            "(anything else may be a pickle, which can run arbitrary code). Or use a diffusers folder."
        )
    if path.exists():
        return path
    if model.startswith((".", "/", "~")) or path.suffix.lower() == ".safetensors":
        raise ModelError(f"model path {path} does not exist")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(model, allow_patterns=NEEDED_PATTERNS, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError) as error:
        raise ModelError(
            f"model {model!r} is not on this machine. Download it once with `fixative model pull {model}` "
            "(about 2.5 GB), or set `[engine] model` in the config file (`fixative protect --model` for one run) "
            "to a local diffusers folder or .safetensors file."
        ) from error


def pull_model(repo_id: str) -> Path:
    """Download the parts of ``repo_id`` the engine needs into the Hugging Face cache (with progress)."""
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, allow_patterns=NEEDED_PATTERNS))
