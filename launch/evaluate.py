"""Evaluate a checkpoint on a task over several sampling seeds, as the paper reports (mean ± std):

    python launch/evaluate.py --config configs/t5_samsum.py --config.student.path=runs/x/best \\
        --config.eval.seeds='(10, 20, 30, 40, 50)'
"""

import _cli


def body(config):
    import json

    import jax

    from distillm_jax import trainer
    from distillm_jax.data import tasks

    seeds = tuple(config.eval.seeds)
    out = trainer.evaluate_model(config, seeds)
    if jax.process_index() != 0:  # every host evaluates its share; one reports
        return
    name = tasks.get(config.data.task).metric
    where = config.student.path or "a new random student"
    print(f"{where} on {config.data.task} ({config.data.valid_split}), sampling seeds {seeds}:")
    print(f"{name} {out[name]:.2f} ± {out[name + '_std']:.2f}; validation CE {out['val_ce']:.4f}")
    print(json.dumps(out))


if __name__ == "__main__":
    _cli.main(body)
