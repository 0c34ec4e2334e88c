"""Memory per device of every stage of a run (teacher SFT, student init, distillation) before anything is
loaded, and whether each fits: ``python launch/plan.py --config configs/gpt2_dolly.py --devices 16
--memory_gib 32`` (the planner's estimate), or every stage's programs compiled for a TPU slice from this
host: ``python launch/plan.py --config configs/gpt2_dolly.py --topology v5e:2x2`` (the compiler's bytes
and FLOPs, a roofline step time; needs ``libtpu``). Exits with one ``error:`` line when a stage will not
fit."""

import sys

import _cli
from absl import flags

DEVICES = flags.DEFINE_integer("devices", 0, "devices of the run (0: this machine's)")
MEMORY = flags.DEFINE_float("memory_gib", 0.0, "memory of one device in GiB (0: as the device reports)")
TOPOLOGY = flags.DEFINE_string(
    "topology",
    "",
    "a TPU slice to compile every stage for, as jax names it: v5e:2x2, v4:2x2x2, v5p:2x2x4, v6e:4x4",
)


def body(config):
    if TOPOLOGY.value:
        return compiled_plan(config, TOPOLOGY.value)
    import jax

    from distillm_jax import pipeline
    from distillm_jax.config import ConfigError, planner

    devices = DEVICES.value or jax.device_count()
    memory = int(MEMORY.value * planner.GIB) or planner.device_memory()
    too_big = []
    for stage in pipeline.stages(config, planning=True):
        try:
            parts = planner.plan(stage.config, devices)
        except (OSError, ValueError) as e:  # a hub id without the hub, a mesh that does not fit the devices
            raise ConfigError(str(e).splitlines()[0]) from None
        print(f"stage {stage.name} ({stage.config.method}, {stage.config.run_dir}):")
        print(planner.report(parts, devices, memory))
        if memory is not None and not planner.fits(parts, memory):
            too_big.append(f"stage {stage.name}: {planner.advice(parts, memory)}")
    if memory is None:
        print("(no memory limit known for this device: pass --memory_gib to check the fit)")
    elif too_big:
        print(f"error: {too_big[0]}", file=sys.stderr)
        sys.exit(2)
    else:
        print("every stage fits")


def compiled_plan(config, topology: str) -> None:
    """Every stage compiled for ``topology``: a table per stage, then whether all fit."""
    import jax

    jax.config.update("jax_platforms", "cpu")  # compile for the slice: no local accelerator is used

    from distillm_jax import pipeline
    from distillm_jax.config import compiled

    compiled.topology(topology)  # a bad slice name or no libtpu: one line before anything else
    too_big = []
    for stage in pipeline.stages(config, planning=True):
        print(f"stage {stage.name} ({stage.config.method}, {stage.config.run_dir}), compiled for {topology}:")
        plan = compiled.plan_stage(stage.config, topology)
        print(compiled.report(plan, stage.config))
        if not plan.fits:
            role = "teacher" if stage.name == "teacher" else "student"  # the group the stage trains
            too_big.append(f"stage {stage.name}: {compiled.advice(plan, stage.config, role)}")
    if too_big:
        print(f"error: {too_big[0]}", file=sys.stderr)
        sys.exit(2)
    print(f"every stage fits {topology}")


if __name__ == "__main__":
    _cli.main(body)
