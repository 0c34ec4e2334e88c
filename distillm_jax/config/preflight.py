"""What can be checked before any model loads, checked before: the run folder (writable, not holding
another run unless ``resume``, holding something when ``resume`` says it does) and the device mesh and
batch against the devices present. A paper-size model takes minutes to load; a mistake here costs
seconds and one ``error:`` line."""

from __future__ import annotations

import jax
from ml_collections import ConfigDict

from distillm_jax import sharding, storage
from distillm_jax.config.checks import roles
from distillm_jax.errors import ConfigError
from distillm_jax.models.hf_io import CheckpointError
from distillm_jax.run.folder import RunDir


def writable(run_dir: RunDir) -> None:
    """Create ``run_dir`` and write a file in it, or say in one line why it cannot be (in a bucket also: no
    such bucket, no permission, no credentials)."""
    storage.check_writable(run_dir.path, "run_dir")


def reuse(c: ConfigDict, found: list[str], continuable: bool, nothing: str) -> None:
    """The one rule for a run folder: what it holds (``found``) is never reused without ``resume``, and
    ``resume`` needs something ``continuable`` there unless ``start_if_empty`` (a job scheduler's
    "continue if you can"); ``nothing`` says what is missing."""
    if found and not c.resume:
        raise ConfigError(
            f"{c.run_dir} already holds a run ({', '.join(found[:3])}); pass --config.resume=True to "
            "continue it, or choose another run_dir"
        )
    if c.resume and not continuable and not c.start_if_empty:
        raise ConfigError(
            f"--config.resume=True but {c.run_dir} {nothing}; check run_dir, or pass "
            "--config.start_if_empty=True to start there"
        )


def run_dir(c: ConfigDict) -> None:
    """A trainer's run folder: writable, reused only to continue its checkpoint, and a finished run whose
    checkpoints are gone never overwritten."""
    folder = RunDir(c.run_dir)
    writable(folder)
    found, started = folder.held(), bool(folder.checkpoint_steps())
    reuse(c, found, started, "has no checkpoint to continue")
    if c.resume and not started:
        finished = [name for name in ("summary.json", "final") if name in found]
        if finished:  # a run killed before its first checkpoint holds only metrics and best/ of step 0
            raise ConfigError(
                f"{c.run_dir} holds a finished run ({', '.join(finished)}) whose checkpoints are gone: "
                "nothing to continue, and starting would overwrite it; move it away or choose another run_dir"
            )


def tokenizers(c: ConfigDict):
    """The student's tokenizer loads and the teacher's (if it ships one) has the same vocabulary: files
    only, no weights. Returns the tokenizer."""
    from distillm_jax.data import tokenizers as toklib

    try:
        tokenizer = toklib.load(c.tokenizer, c.student.path)
        if "teacher" in roles(c):
            toklib.check_same(tokenizer, c.teacher.path)
    except (ValueError, CheckpointError) as e:
        raise ConfigError(str(e)) from None
    return tokenizer


def model_configs(c: ConfigDict, roles: tuple[str, ...], tokens: int) -> None:
    """What the models' config.json files say, before any weights: each is readable (a hub id resolves),
    teacher and student are of one kind (encoder-decoder or decoder-only), each vocabulary holds the
    tokenizer's ``tokens``, and a learned position table holds ``data.max_length``. At paper scale each of
    these would otherwise surface after the first stages have trained."""
    from distillm_jax import models

    found = {}
    for role in roles:
        spec = c[role]
        try:
            found[role] = models.spec_config(spec)
        except (CheckpointError, OSError, ValueError) as e:
            raise ConfigError(f"{role}: {e}") from None
    name = lambda role: f"the {role} ({c[role].path or 'a new ' + found[role].model_type})"  # noqa: E731
    if len(found) == 2 and len({models.encoder_decoder(h) for h in found.values()}) == 2:
        kinds = {
            r: "encoder-decoder" if models.encoder_decoder(h) else "decoder-only" for r, h in found.items()
        }
        raise ConfigError(
            f"{name('teacher')} is {kinds['teacher']} and {name('student')} is {kinds['student']}: "
            "distillation here needs both of one kind; choose a teacher and student of the same kind"
        )
    for role, hf in found.items():
        if hf.vocab_size < tokens:
            raise ConfigError(
                f"{name(role)} has a vocabulary of {hf.vocab_size}, fewer than the tokenizer's {tokens} "
                "tokens: they do not belong together"
            )
        limit = models.position_limit(hf)
        if limit is not None and c.data.max_length > limit:
            raise ConfigError(
                f"data.max_length ({c.data.max_length}) is beyond {name(role)}'s {limit} learned positions; "
                f"set data.max_length <= {limit}"
            )


def mesh_and_batch(c: ConfigDict) -> None:
    """The mesh multiplies to the devices present and every batch splits over its data shards (a batch
    that does not would be copied whole to every device)."""
    try:
        sizes = sharding.mesh_sizes(**c.mesh, devices=jax.device_count())
    except ValueError as e:
        raise ConfigError(str(e)) from None
    shards = sizes[0] * sizes[1]  # data x fsdp
    micro = c.optim.batch_size // c.optim.grad_accum
    batches = (
        ("the micro-batch (optim.batch_size / grad_accum)", micro),
        ("eval.batch_size", c.eval.batch_size),
    )
    for name, size in batches:
        if size % shards:
            raise ConfigError(
                f"{name} ({size}) must split over the mesh's {shards} data shards (mesh.data x mesh.fsdp); "
                "make it a multiple, or use a mesh with fewer data shards (e.g. --config.mesh.tensor)"
            )
