"""Every test sees 8 simulated CPU devices, so sharded code paths run on any machine.

The flags must be set before jax is imported anywhere; pytest imports this file first. Setting
JAX_PLATFORMS (e.g. ``cuda``) beforehand runs the single-device tests on an accelerator instead.
"""

import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
# One XLA compilation cache for the whole session, shared by the pytest workers and every process a test
# starts (they inherit the environment): the suite compiles the same tiny programs many times over (each
# end-to-end run's train / eval steps and sampler), and a cached program loads in milliseconds. The
# first process makes a fresh folder, so a run never reads another run's cache; it is removed at the end.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="distillm_jax_xla_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402  (after the flags above)
import pytest  # noqa: E402
from jax.sharding import AxisType  # noqa: E402


def pytest_unconfigure(config):
    if _OWN_CACHE and not hasattr(config, "workerinput"):  # the controller, after every worker is done
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


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
