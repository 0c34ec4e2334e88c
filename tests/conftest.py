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

# Tests of 5 s or more on 2 cores (measured 2026-12-06; compile-bound: the T5 family against
# transformers, statistics over many draws, command lines) that carry no ``slow`` mark of their own: the
# full suite runs them, the daily subset (-m 'not slow') leaves them out. Their lighter siblings (other
# families, other parameters) stay in it.
SLOW_CASES = frozenset(
    (
        "test_bad_input.py::test_cli_config_errors_are_one_line",
        "test_bad_input.py::test_cli_unknown_key_and_wrong_type_are_one_line",
        "test_bad_input.py::test_ctrl_c_and_sigterm_before_the_first_step_stop_at_once_with_one_line",
        "test_bad_input.py::test_empty_missing_or_null_responses_and_long_prompts_are_counted",
        "test_chunked_losses.py::test_chunked_equals_plain[fkl-1]",
        "test_demo_data.py::test_shipped_long_teacher_knows_the_long_task",
        "test_demo_data.py::test_shipped_teacher_knows_the_current_task",
        "test_dropout.py::test_dropout_sites_are_transformers_sites[t5]",
        "test_dropout.py::test_dropout_sites_are_transformers_sites[t5_v1_1]",
        "test_dropout.py::test_rate_zero_is_the_plain_step_bit_for_bit[gpt2]",
        "test_dropout.py::test_rate_zero_is_the_plain_step_bit_for_bit[t5]",
        "test_dropout.py::test_rate_zero_trains_as_before_dropout_existed[t5]",
        "test_dropout.py::test_rates_come_from_the_config_and_the_override",
        "test_dropout.py::test_train_mode_matches_transformers_dropout_statistics[gpt2-attn_pdrop]",
        "test_dropout.py::test_train_mode_matches_transformers_dropout_statistics[gpt2-embd_pdrop]",
        "test_dropout.py::test_train_mode_matches_transformers_dropout_statistics[gpt2-resid_pdrop]",
        "test_dropout.py::test_train_mode_matches_transformers_dropout_statistics[llama-attention_dropout]",
        "test_dropout.py::test_train_mode_matches_transformers_dropout_statistics[opt-attention_dropout]",
        "test_dropout.py::test_train_mode_matches_transformers_dropout_statistics[opt-dropout]",
        "test_dropout.py::test_train_mode_matches_transformers_dropout_statistics[opt_350m_style-dropout]",
        "test_dropout.py::test_train_mode_matches_transformers_dropout_statistics[t5-dropout_rate]",
        "test_dropout.py::test_train_mode_matches_transformers_dropout_statistics[t5_v1_1-dropout_rate]",
        "test_generate.py::test_a_cache_grown_in_segments_generates_what_one_cache_does[gpt2]",
        "test_generate.py::test_a_cache_grown_in_segments_generates_what_one_cache_does[t5]",
        "test_generate.py::test_first_sampled_token_follows_softmax_of_logits_over_temperature",
        "test_generate.py::test_mixed_first_token_follows_the_mixture_of_both_filtered_models",
        "test_generate.py::test_sampling_reproducible_and_top_k_1_is_greedy",
        "test_hub_stub.py::test_models",
        "test_install.py::test_installed_wheel_checks_configs_without_the_repository",
        "test_methods.py::test_a_new_method_with_a_setting_of_its_own_is_one_file",
        "test_models.py::test_causal_query_blocks_match_transformers[gpt2]",
        "test_models.py::test_causal_query_blocks_match_transformers[mistral]",
        "test_models.py::test_causal_query_blocks_match_transformers[t5]",
        "test_models.py::test_logits_match_transformers_reference[t5]",
        "test_planner.py::test_parameter_shards_are_exact[8]",
        "test_sampling.py::test_fresh_sgo_batch_built_on_the_devices_equals_the_host_batch[gpt2-12]",
        "test_sampling.py::test_fresh_sgo_batch_built_on_the_devices_equals_the_host_batch[llama-7]",
        "test_sampling.py::test_fresh_sgo_batch_built_on_the_devices_equals_the_host_batch[t5-12]",
        "test_sources.py::test_hub_datasets_as_users_meet_them",
        "test_step.py::test_distillation_step_lowers_the_divergence",
        "test_step.py::test_weight_decay_leaves_biases_and_norm_scales_alone[gpt2]",
    )
)


# The files that take longest (CPU seconds on 2 cores, 2026-12-06), handed to the workers first: each
# worker takes a whole file (--dist loadfile) and the next in line when it is done, so the long ones
# starting last would leave one worker alone at the end.
LONG_FILES = {
    "test_configs.py": 380,
    "test_compiled.py": 300,  # compiles for TPU slices (2026-12-06)
    "test_dropout.py": 260,
    "test_bad_input.py": 230,
    "test_benches.py": 170,
    "test_trainer.py": 165,
    "test_generate.py": 150,
    "test_pods.py": 130,
    "test_buckets.py": 120,  # runs against a GCS emulator (2026-12-06)
    "test_models.py": 90,
    "test_stack.py": 90,
}


def pytest_collection_modifyitems(config, items):
    """Long files first (``LONG_FILES``; pyproject's --no-loadscope-reorder keeps this order)."""
    items.sort(key=lambda item: -LONG_FILES.get(item.path.name, 0))


def pytest_itemcollected(item):
    """``SLOW_CASES`` get the ``slow`` mark."""
    if item.nodeid.removeprefix("tests/") in SLOW_CASES:
        item.add_marker(pytest.mark.slow)


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


@pytest.fixture(scope="session")
def gcs():
    """A GCS emulator on 127.0.0.1 for this worker (tests/gcs_emulator.py), named to the code under test by
    ``STORAGE_EMULATOR_HOST`` as a user would; subprocesses get it from ``gcs.env``."""
    from gcs_emulator import Emulator

    emulator = Emulator().start()
    before = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ.update(emulator.env)
    yield emulator
    emulator.stop()
    if before is None:
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
    else:
        os.environ["STORAGE_EMULATOR_HOST"] = before
