"""distillm_jax: DistiLLM (skew KL divergences + adaptive off-policy student outputs) in JAX/Flax.

Public modules: ``losses`` (the divergences). Models, the sampler and the trainer join as they land.
"""

from distillm_jax import losses

__all__ = ["losses"]
__version__ = "0.1.0"
