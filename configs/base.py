"""Every key a run accepts, with its default: ``distillm_jax.config.defaults`` (inside the package, so that an
installed package checks configs). Config files start from ``base.get_config()``."""

from distillm_jax.config.defaults import get_config, model_spec

__all__ = ["get_config", "model_spec"]
