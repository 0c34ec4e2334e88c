"""Memory per device of every stage of a run (teacher SFT, student init, distillation) before anything is
loaded, and whether each fits: ``python launch/plan.py --config configs/gpt2_dolly.py --devices 16
--memory_gib 32`` (a TPU v4-32 slice). Exits with one ``error:`` line when a stage will not fit."""

import sys

import _cli
from absl import flags

DEVICES = flags.DEFINE_integer("devices", 0, "devices of the run (0: this machine's)")
MEMORY = flags.DEFINE_float("memory_gib", 0.0, "memory of one device in GiB (0: as the device reports)")


def body(config):
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


if __name__ == "__main__":
    _cli.main(body)
