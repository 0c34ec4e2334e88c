"""Start-up checks of a run's ``ml_collections`` config (docs/architecture.md §9): every key must be one
that ``defaults.py`` (or a method's ``defaults``) defines, with a value of the same type, and the values
must make sense together; each problem is one line (``ConfigError``) before any model is loaded or any
step compiled."""

from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path

from ml_collections import ConfigDict

from distillm_jax import losses, methods, storage
from distillm_jax.config import defaults as default_values
from distillm_jax.data import sources, tasks
from distillm_jax.errors import ConfigError
from distillm_jax.models import hub, stack

LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
DTYPES = ("float32", "bfloat16")
STARTS = ("init", "pretrained")  # student.start


def load_file(path: str, arg: str | None = None) -> ConfigDict:
    """``get_config(arg)`` of a config file (``arg`` is what follows ``:`` in ``--config file.py:arg``)."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location(Path(path).stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg is not None else module.get_config()


def defaults() -> ConfigDict:
    """Every key a run accepts: ``defaults.py``'s and the registered methods' own."""
    return default_values.get_config()


def _compare(config: ConfigDict, base: ConfigDict, prefix: str = "") -> None:
    for key, value in config.items():
        name = prefix + key
        if key not in base:
            raise ConfigError(f"unknown config key {name!r}; valid keys here: {', '.join(sorted(base))}")
        default = base[key]
        if key == "config" and isinstance(default, ConfigDict):  # free-form HF config kwargs
            continue
        if isinstance(default, ConfigDict):
            if not isinstance(value, ConfigDict):
                raise ConfigError(f"config key {name!r} must be a group of keys, got {value!r}")
            _compare(value, default, name + ".")
            continue
        ok = isinstance(value, type(default)) or (isinstance(default, float) and isinstance(value, int))
        if default is None:  # an optional number (``placeholder(float)``): None = not set
            ok = value is None or (isinstance(value, int | float) and not isinstance(value, bool))
        if isinstance(default, int) and isinstance(value, bool) and not isinstance(default, bool):
            ok = False
        if isinstance(default, tuple | list):
            ok = isinstance(value, tuple | list)
        if not ok:
            kind = "a number or None" if default is None else type(default).__name__
            raise ConfigError(f"config key {name!r} must be {kind} (like {default!r}), got {value!r}")


def check(config: ConfigDict) -> None:
    """Raise ``ConfigError`` for the first problem found."""
    _compare(config, defaults())
    _check_finite(config)
    for method in (config.method, *config.compare):
        if method not in methods.REGISTRY:
            raise ConfigError(f"method {method!r} is not one of {', '.join(methods.REGISTRY)}")
    try:
        tasks.get(config.data.task, config.data.languages)
        for key in ("train_split", "valid_split", "test_split", "lm_split"):
            if config.data[key]:
                sources.parse_split(config.data[key])
        for key in ("source", "lm_source"):
            if config.data[key] and not sources.is_local(config.data[key]):
                sources.parse_hub(config.data[key])
        for _, source, split in test_sets(config):
            sources.parse_split(split)
            if source and not sources.is_local(source):
                sources.parse_hub(source)
        losses.validate(config.loss.name, **loss_params(config))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check_places(config)
    if not 0.0 <= config.loss.kd_ratio <= 1.0:
        raise ConfigError(f"loss.kd_ratio must be in [0, 1], got {config.loss.kd_ratio}")
    if config.loss.chunk_size < -1:
        raise ConfigError(
            f"loss.chunk_size must be -1 (chosen for the run), 0 (plain) or positions per chunk, "
            f"got {config.loss.chunk_size}"
        )
    d = config.data
    if not 0 < d.max_prompt_length < d.max_length:
        raise ConfigError(
            f"need 0 < data.max_prompt_length < data.max_length, got {d.max_prompt_length} and {d.max_length}"
        )
    o = config.optim
    if o.batch_size < 1 or o.grad_accum < 1 or o.batch_size % o.grad_accum:
        raise ConfigError(
            f"optim.batch_size ({o.batch_size}) must be a positive multiple of "
            f"optim.grad_accum ({o.grad_accum})"
        )
    if o.epochs <= 0 and o.steps <= 0:
        raise ConfigError("set optim.epochs or optim.steps to a positive number")
    if o.lr <= 0:
        raise ConfigError(f"optim.lr must be positive, got {o.lr}")
    for role in ("teacher", "student"):
        spec = config[role]
        if spec.dtype not in DTYPES or spec.param_dtype not in ("", *DTYPES):
            raise ConfigError(f"{role}.dtype / {role}.param_dtype must be one of {', '.join(DTYPES)}")
        if not spec.path and not spec.config:
            if role not in roles(config):
                continue
            raise ConfigError(
                f"{role}.path is empty: give a checkpoint directory or hub id (or {role}.config)"
            )
        if spec.path and hub.is_local(spec.path) and not os.path.isdir(os.path.expanduser(spec.path)):
            raise ConfigError(f"{role}.path {spec.path} is not a checkpoint directory")
        if spec.dropout is not None and not 0.0 <= spec.dropout < 1.0:
            raise ConfigError(
                f"{role}.dropout must be in [0, 1) (every dropout site of the model at that rate; "
                f"unset: the checkpoint's own rates), got {spec.dropout}"
            )
        if spec.remat not in stack.POLICIES:
            raise ConfigError(f"{role}.remat must be one of {', '.join(stack.POLICIES)}, got {spec.remat!r}")
        if spec.train_steps < 0 or spec.train_epochs < 0 or spec.train_rows < 0:
            raise ConfigError(f"{role}.train_steps, train_epochs and train_rows must be >= 0")
        if not spec.path and "model_type" not in spec.config:
            raise ConfigError(f"{role}.config needs a model_type (e.g. 't5') to build a new model")
    if config.student.get("start", "init") not in STARTS:
        raise ConfigError(f"student.start must be one of {', '.join(STARTS)}, got {config.student.start!r}")
    for key in ("source", "lm_source"):
        src = d[key]
        if src and sources.is_local(src) and not _exists(src, f"data.{key}"):
            raise ConfigError(f"data.{key} {src} does not exist")
    for name, src, _ in test_sets(config)[1:]:
        if sources.is_local(src) and not _exists(src, f"data.test_sets: {name}'s source"):
            raise ConfigError(f"data.test_sets: {name}'s source {src} does not exist")
    _check_one_file(d)
    if config.loss.lm_coef > 0 and not d.lm_source:
        raise ConfigError("loss.lm_coef > 0 needs data.lm_source (plain text with a 'text' column)")
    if config.eval.temperature < 0 or not 0 < config.eval.top_p <= 1:
        raise ConfigError("eval.temperature must be >= 0 and eval.top_p in (0, 1]")
    if not tuple(config.eval.seeds):
        raise ConfigError(
            "eval.seeds is empty: the test scores are sampled once per seed; give at least one, e.g. "
            "--config.eval.seeds='(10,)'"
        )
    if config.eval.draws < 1:
        raise ConfigError(
            f"eval.draws must be >= 1 (sampled generations per evaluation), got {config.eval.draws}"
        )
    _check_offpolicy(config)
    _check_methods(config)
    for method in methods.REGISTRY.values():  # each method's own keys, whichever runs
        method.check(config)
    for name in compared(config):
        methods.get(name).check_run(config)
    d = config.distributed
    if d.coordinator and (":" not in d.coordinator or not 0 <= d.process_id < d.num_processes):
        raise ConfigError(
            "distributed: coordinator must be host:port and 0 <= process_id < num_processes, got "
            f"{d.coordinator!r}, process {d.process_id} of {d.num_processes}"
        )


def _check_finite(node: ConfigDict, prefix: str = "") -> None:
    """Every number of the config is finite: a NaN rate passes ``lr <= 0`` and surfaces as a NaN loss
    steps later, blamed on the data or the model."""
    for key, value in node.items():
        if isinstance(value, ConfigDict):
            _check_finite(value, f"{prefix}{key}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{prefix}{key} must be a finite number, got {value}")


def _check_places(config: ConfigDict) -> None:
    """Every path of the config is local, a hub id, or in a bucket the storage layer serves."""
    places = [("run_dir", config.run_dir, True), ("tokenizer", config.tokenizer, False)]
    places += [(f"{role}.path", config[role].path, False) for role in ("teacher", "student")]
    places += [(f"data.{key}", config.data[key], False) for key in ("source", "lm_source")]
    for key, path, run in places:
        problem = storage.scheme_problem(path, run=run) if path else None
        if problem:
            raise ConfigError(f"{key} {path}: {problem}")


def _exists(path: str, what: str) -> bool:
    """Whether a data file or folder is there (a pattern: some file matches it); a bucket that refuses
    the question is one line."""
    with storage.refused(f"{what} {path}: cannot read it"):
        if storage.is_pattern(path):
            return bool(storage.glob(storage.absolute(path)))
        return storage.exists(storage.absolute(path))


def _check_one_file(d: ConfigDict) -> None:
    """A single data file (or the files of a ``*`` pattern) holds one split: two splits of it must both be
    slices (else the validation rows would be the training rows, and ``best/`` chosen on them)."""
    if not (d.source and sources.is_local(d.source)):
        return
    if not storage.is_pattern(d.source) and not storage.isfile(storage.absolute(d.source)):  # a pattern too
        return
    keys = [k for k in ("train_split", "valid_split", "test_split") if d[k]]
    whole = [k for k in keys if sources.parse_split(d[k])[1] is None]
    if len(keys) > 1 and whole:
        raise ConfigError(
            f"data.source {d.source} is one file, so data.{whole[0]} ({d[whole[0]]!r}) would be all of its "
            "rows for every split; slice it (e.g. --config.data.train_split='train[100:]' "
            "--config.data.valid_split='train[:100]' --config.data.test_split='') or give a folder with "
            "train.jsonl and validation.jsonl"
        )


def _check_offpolicy(config: ConfigDict) -> None:
    """The SGO sampler's settings, shared by every method that samples the student while it trains."""
    o, d = config.offpolicy, config.data
    if o.temperature < 0 or o.top_k < 0 or not 0 < o.top_p <= 1:
        raise ConfigError("offpolicy.temperature and top_k must be >= 0, and offpolicy.top_p in (0, 1]")
    room = d.max_length - d.max_prompt_length
    if not 0 <= o.max_new_tokens <= room:
        raise ConfigError(
            f"offpolicy.max_new_tokens must be in [0, {room}] (data.max_length - data.max_prompt_length; "
            f"0 = all of it), got {o.max_new_tokens}"
        )
    if o.overlap and o.max_staleness < 1:
        raise ConfigError("offpolicy.overlap needs offpolicy.max_staleness >= 1 (updates an SGO may lag)")
    micro = config.optim.batch_size // config.optim.grad_accum
    if o.capacity < micro:
        raise ConfigError(
            f"offpolicy.capacity ({o.capacity}) must hold at least one micro-batch ({micro} rows)"
        )


def _check_methods(config: ConfigDict) -> None:
    """What the method's flags ask of the loss keys, and LoRA."""
    method, entry = config.method, methods.get(config.method)
    if not 0.0 <= config.loss.lm_kd_ratio <= 1.0:
        raise ConfigError(f"loss.lm_kd_ratio must be in [0, 1], got {config.loss.lm_kd_ratio}")
    if not entry.teacher and config.loss.lm_coef > 0 and config.loss.lm_kd_ratio > 0:
        raise ConfigError(f"loss.lm_kd_ratio > 0 needs a teacher; method {method} has none (set it to 0)")
    if not entry.chunked and config.loss.chunk_size > 0:
        raise ConfigError(f"method {method} has no chunked loss; set loss.chunk_size=0")
    for role in ("teacher", "student"):
        lo = config[role].lora
        bad = sorted(set(lo.targets) - set(LORA_TARGETS))
        if lo.rank < 0 or lo.alpha <= 0 or not 0.0 <= lo.dropout < 1.0 or bad or not lo.targets:
            raise ConfigError(
                f"{role}.lora: need rank >= 0, alpha > 0, dropout in [0, 1) and targets among "
                f"{', '.join(LORA_TARGETS)}; got rank {lo.rank}, alpha {lo.alpha}, dropout {lo.dropout}, "
                f"targets {tuple(lo.targets)}"
            )


def test_sets(config: ConfigDict) -> list[tuple[str, str, str]]:
    """The test stage's sets as (name, source, split): the task's own (``data.source`` at
    ``data.test_split``), then each of ``data.test_sets`` ("name=source[#split]"); none without a
    test split."""
    d = config.data
    if not d.test_split:
        return []
    out = [(d.task, d.source, d.test_split)]
    for entry in d.test_sets:
        name, eq, rest = str(entry).partition("=")
        source, _, split = rest.partition("#")
        if not eq or not name.strip() or not source.strip() or "/" in name:
            raise ConfigError(
                f"data.test_sets entry {entry!r}: write name=source or name=source#split "
                "(e.g. vicuna=MiniLLM/Vicuna?data_files=test:valid.jsonl)"
            )
        out.append((name.strip(), source.strip(), split.strip() or d.test_split))
    names = [n for n, _, _ in out]
    if len(set(names)) < len(names):
        raise ConfigError(f"data.test_sets: two test sets share a name ({', '.join(names)})")
    return out


def compared(config: ConfigDict) -> list[str]:
    """Every method the run trains from the same init: ``method`` first, then ``compare`` (and ``sft``
    for ``compare_sft``), each once."""
    out = [config.method]
    for method in (*config.compare, *(["sft"] if config.compare_sft else [])):
        if method not in out:
            out.append(method)
    return out


def roles(config: ConfigDict) -> tuple[str, ...]:
    """The models a config's runs read: the student, and the teacher when a method it trains reads one
    (``sft`` alone does not: no teacher to check, load or fine-tune then)."""
    teacher = any(methods.get(m).teacher for m in compared(config))
    return ("teacher", "student") if teacher else ("student",)


def loss_params(config: ConfigDict) -> dict[str, float]:
    """The divergence's own parameters, picked from ``loss.alpha / beta / lam``."""
    takes = {"sfkl": "alpha", "srkl": "alpha", "jsd": "beta", "symkl": "lam"}.get(config.loss.name)
    return {takes: float(config.loss[takes])} if takes else {}
