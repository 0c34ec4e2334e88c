"""Memory per device of a run before anything is loaded, and whether it fits:
``python launch/plan.py --config configs/gpt2_dolly.py --devices 16 --memory_gib 32`` (a TPU v4-32 slice).
Exits with one ``error:`` line when the run will not fit."""

import sys

import _cli
from absl import flags

DEVICES = flags.DEFINE_integer("devices", 0, "devices of the run (0: this machine's)")
MEMORY = flags.DEFINE_float("memory_gib", 0.0, "memory of one device in GiB (0: as the device reports)")


def body(config):
    import jax

    from distillm_jax import planner
    from distillm_jax.config import ConfigError

    devices = DEVICES.value or jax.device_count()
    try:
        parts = planner.plan(config, devices)
    except (OSError, ValueError) as e:  # a hub id without the hub, a mesh that does not fit the devices
        raise ConfigError(str(e).splitlines()[0]) from None
    memory = int(MEMORY.value * planner.GIB) or planner.device_memory()
    print(planner.report(parts, devices, memory))
    if memory is None:
        print("(no memory limit known for this device: pass --memory_gib to check the fit)")
    elif not planner.fits(parts, memory):
        print(f"error: {planner.advice(parts, memory)}", file=sys.stderr)
        sys.exit(2)
    else:
        print("fits")


if __name__ == "__main__":
    _cli.main(body)
