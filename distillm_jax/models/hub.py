"""Model checkpoints named by hub id: ``org/name`` or ``org/name@revision`` (a branch such as
``refs/pr/24``, a tag or a commit), resolved to a local snapshot directory once, so that the weights, the
config and the tokenizer all come from the same revision.

A checkpoint folder in a bucket (``gs://…``, ``s3://…``) is used in place: its small files (configs,
tokenizer) are copied to a local cache for transformers, its weights read from the bucket by ``hf_io``.

Only what a run reads is downloaded: configs, tokenizer files and one weight format — safetensors where
the revision has them, else ``pytorch_model*.bin`` (read without torch, ``torch_bin.py``). Many older
hub models (OPT, OpenLLaMA, mT5) ship only ``.bin`` on ``main``; their safetensors live in unmerged
``refs/pr/N`` conversion branches, which ``@refs/pr/N`` selects.
"""

from __future__ import annotations

import fnmatch
import hashlib
import os

from distillm_jax import storage
from distillm_jax.models.hf_io import CheckpointError

SMALL_FILES = ["*.json", "*.model", "*.txt", "*.tiktoken"]  # configs and tokenizers, never code
SAFETENSORS = ["*.safetensors", "*.safetensors.index.json"]
TORCH_BIN = ["pytorch_model*.bin", "pytorch_model.bin.index.json"]


def is_local(path: str) -> bool:
    """A directory on disk, or a path written as one (``./x``, ``/x``, ``~/x``): never a hub id (nor a
    bucket URL)."""
    if storage.is_remote(path):
        return False
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


def local_dir(path_or_hub_id: str, *, weights: bool = True, model: bool = True) -> str:
    """A checkpoint directory for a local path or a hub id (``org/name[@revision]``; ``weights=False``:
    its configs and tokenizer files only). A bucket's folder: a local copy of its small files (its weights
    stay in the bucket: ``weights_at``), which must hold a model's config.json unless ``model=False`` (a
    tokenizer's folder)."""
    if storage.is_remote(path_or_hub_id):
        return bucket_files(path_or_hub_id, model=model)
    path = os.path.expanduser(path_or_hub_id)
    if os.path.isdir(path):
        return path
    if is_local(path_or_hub_id):
        raise CheckpointError(f"{path_or_hub_id} is not a checkpoint directory")
    return download(path_or_hub_id, weights=weights)


def weights_at(path_or_hub_id: str, directory: str) -> str:
    """Where a checkpoint's weights are read: the bucket folder itself (ranged reads, no copy), else the
    local directory ``local_dir`` gave."""
    return storage.absolute(path_or_hub_id) if storage.is_remote(path_or_hub_id) else directory


def cache_root() -> str:
    """Local copies of buckets' small files: ``$DISTILLM_CACHE`` or ``~/.cache/distillm_jax``."""
    default = os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "distillm_jax")
    return os.path.expanduser(os.environ.get("DISTILLM_CACHE", default))


def bucket_files(url: str, *, model: bool = True) -> str:
    """A local folder holding the configs and tokenizer files of the checkpoint folder ``url`` in a bucket,
    fetched at every call (a few small files: a re-exported checkpoint is never read stale). Each file is
    renamed into place whole, so processes of one host may fetch the same folder at once."""
    url = storage.absolute(url)
    with storage.refused(f"cannot read {url}", CheckpointError):
        names = storage.listdir(url)
    if model and "config.json" not in names:
        raise CheckpointError(f"{url} is not a checkpoint folder (no config.json there)")
    local = os.path.join(cache_root(), "buckets", hashlib.sha1(url.encode()).hexdigest()[:16])
    os.makedirs(local, exist_ok=True)
    small = [name for name in names if any(fnmatch.fnmatch(name, pattern) for pattern in SMALL_FILES)]
    for name in small:
        storage.write(os.path.join(local, name), storage.read_bytes(storage.join(url, name)))
    for name in set(os.listdir(local)) - set(small):  # gone from the bucket: gone here
        if os.path.isfile(os.path.join(local, name)) and not name.endswith(".tmp"):
            os.remove(os.path.join(local, name))
    return local
