"""Model checkpoints named by hub id: ``org/name`` or ``org/name@revision`` (a branch such as
``refs/pr/24``, a tag or a commit), resolved to a local snapshot directory once, so that the weights, the
config and the tokenizer all come from the same revision.

Only what a run reads is downloaded: configs, tokenizer files and one weight format — safetensors where
the revision has them, else ``pytorch_model*.bin`` (read without torch, ``torch_bin.py``). Many older
hub models (OPT, OpenLLaMA, mT5) ship only ``.bin`` on ``main``; their safetensors live in unmerged
``refs/pr/N`` conversion branches, which ``@refs/pr/N`` selects.
"""

from __future__ import annotations

import os

from distillm_jax.models.hf_io import CheckpointError

SMALL_FILES = ["*.json", "*.model", "*.txt", "*.tiktoken"]  # configs and tokenizers, never code
SAFETENSORS = ["*.safetensors", "*.safetensors.index.json"]
TORCH_BIN = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]


def is_local(path: str) -> bool:
    """A directory on disk, or a path written as one (``./x``, ``/x``, ``~/x``): never a hub id."""
    return os.path.exists(os.path.expanduser(path)) or path.startswith((".", "/", "~"))


def split_revision(hub_id: str) -> tuple[str, str | None]:
    """``org/name@revision`` as (``org/name``, ``revision``); no ``@``: (hub_id, None)."""
    repo, _, revision = hub_id.partition("@")
    return repo, revision or None


def _weight_patterns(repo: str, revision: str | None) -> list[str]:
    """Safetensors when the revision has them, else the ``.bin`` files; offline: whatever is cached."""
    from huggingface_hub import HfApi

    try:
        files = [s.rfilename for s in HfApi().model_info(repo, revision=revision).siblings or []]
    except Exception:  # offline (HF_HUB_OFFLINE) or unreachable: snapshot_download says which
        return SAFETENSORS + TORCH_BIN
    if any(f.endswith(".safetensors") for f in files):
        return SAFETENSORS
    return TORCH_BIN


def download(hub_id: str, *, weights: bool = True) -> str:
    """The local snapshot directory of a hub model (downloaded on first use, then from the cache);
    ``weights=False``: its configs and tokenizer only (what the checks before loading read). One try:
    an unreachable hub is one line at once, not transformers' half a minute of retries."""
    from huggingface_hub import snapshot_download

    repo, revision = split_revision(hub_id)
    patterns = SMALL_FILES + (_weight_patterns(repo, revision) if weights else [])
    try:
        return snapshot_download(repo, revision=revision, allow_patterns=patterns)
    except Exception as e:  # offline, a typo in a local path, a private repo: say which, in one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        where = f" at revision {revision}" if revision else ""
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        todo = (
            "the hub cache has no copy of it (HF_HUB_OFFLINE is set): download it where there is a network, "
            "or set the path to a local copy"
            if offline
            else "without a network, set the path to a local copy of it (or HF_HUB_OFFLINE=1 to read the hub "
            "cache)"
        )
        raise CheckpointError(
            f"{hub_id} is neither a local checkpoint directory nor a downloadable hub id{where} "
            f"({type(e).__name__}: {first[:160]}); {todo}"
        ) from None


def local_dir(path_or_hub_id: str, *, weights: bool = True) -> str:
    """A checkpoint directory for a local path or a hub id (``org/name[@revision]``; ``weights=False``:
    its configs and tokenizer files only)."""
    path = os.path.expanduser(path_or_hub_id)
    if os.path.isdir(path):
        return path
    if is_local(path_or_hub_id):
        raise CheckpointError(f"{path_or_hub_id} is not a checkpoint directory")
    return download(path_or_hub_id, weights=weights)
