"""Evaluate a checkpoint on a task over several sampling seeds, as the paper reports (mean ± std):

    python launch/evaluate.py --config configs/t5_samsum.py --config.student.path=runs/x/best \\
        --config.eval.seeds='(10, 20, 30, 40, 50)'
"""

import _cli


def body(config):
    import json

    import numpy as np

    from distillm_jax import trainer

    run = trainer.Run(config, evaluate_only=True)
    scores = [run.metric(run.student, seed) for seed in config.eval.seeds]
    name = run.task.metric
    where = config.student.path or "a new random student"
    print(f"{where} on {config.data.task} ({len(run.valid_rows)} rows of {config.data.valid_split}): ")
    print(f"{name} {np.mean(scores):.2f} ± {np.std(scores):.2f} over seeds {tuple(config.eval.seeds)}")
    print(json.dumps({"metric": name, "seeds": list(config.eval.seeds), "scores": scores}))


if __name__ == "__main__":
    _cli.main(body)
