"""distillm_jax: DistiLLM (skew KL divergences + adaptive off-policy student outputs) in JAX/Flax.

Public modules: ``losses`` (the divergences), ``models`` (model families, HF checkpoints), ``generate``
(the sampler), ``sharding`` (mesh and logical-axis rules). Training runs through ``trainer.train`` (one
run) and ``pipeline.run`` (the paper's stages), as ``launch/train.py`` does; docs/architecture.md maps the
rest.
"""

from distillm_jax import generate, losses, models, sharding

__all__ = ["generate", "losses", "models", "sharding"]
__version__ = "0.1.0"
