"""The config layer: a run's ``ml_collections`` config from its file (``load_file``), every key's default
(``defaults.py``), the start-up checks (``checks.py``), what can be checked before any model loads
(``preflight.py``), the memory plan (``planner.py``) and the typed settings below the trainer
(``settings.py``). docs/architecture.md §9."""

from distillm_jax.config.checks import (
    DTYPES,
    LORA_TARGETS,
    STARTS,
    ConfigError,
    check,
    compared,
    defaults,
    load_file,
    loss_params,
    roles,
    test_sets,
)

__all__ = [
    "DTYPES",
    "LORA_TARGETS",
    "STARTS",
    "ConfigError",
    "check",
    "compared",
    "defaults",
    "load_file",
    "loss_params",
    "roles",
    "test_sets",
]
