"""Every test sees 8 simulated CPU devices, so sharded code paths run on any machine.

The flags must be set before jax is imported anywhere; pytest imports this file first. Setting
JAX_PLATFORMS (e.g. ``cuda``) beforehand runs the single-device tests on an accelerator instead.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax
import pytest
from jax.sharding import AxisType


@pytest.fixture(scope="session")
def mesh() -> jax.sharding.Mesh:
    """The 8 devices as the project's ('data', 'fsdp', 'tensor') mesh, 2 x 2 x 2."""
    assert jax.device_count() == 8, "conftest must set the device count before jax starts"
    return jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)


@pytest.fixture
def quick_compiles():
    """XLA's cheapest compiles, for end-to-end runs only: a tiny run is nearly all compilation (model
    inits, the train and eval steps, the sampler) and runs for milliseconds; unoptimized programs build
    2-3x faster. Numerical tests keep the default."""
    before = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)
