"""distillm_jax: DistiLLM (skew KL divergences + adaptive off-policy student outputs) in JAX/Flax.

Public modules: ``losses`` (the divergences), ``models`` (model families, HF checkpoints), ``generate``
(the sampler), ``sharding`` (mesh and logical-axis rules). The trainer joins when it lands.
"""

from distillm_jax import generate, losses, models, sharding

__all__ = ["generate", "losses", "models", "sharding"]
__version__ = "0.1.0"
