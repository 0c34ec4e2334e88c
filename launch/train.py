"""Train (distil) a student: ``python launch/train.py --config configs/demo.py [--config.a.b=v ...]``."""

import _cli


def body(config) -> bool:
    from distillm_jax import pipeline

    return pipeline.stopped(pipeline.run(config))


if __name__ == "__main__":
    _cli.main(body)
