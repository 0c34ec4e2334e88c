"""Export a run's student as a Hugging Face checkpoint, from any of its orbax checkpoints:

    python launch/export.py --config configs/demo.py --step 275 --out runs/demo/step275
(``--step``: one the run kept, ``ls runs/demo/checkpoints``; without it, the latest. The config must be
the run's, for the student's shape. ``--out`` must be a new folder: an export never writes over one.)
"""

import _cli
from absl import flags

STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
OUT = flags.DEFINE_string("out", None, "output directory (default: <run_dir>/export-<step>)")


def body(config):
    from distillm_jax import trainer

    path = trainer.export_checkpoint(config, STEP.value, OUT.value)
    print(f"exported {path}")


if __name__ == "__main__":
    _cli.main(body)
