"""What every paper config shares (PAPER.md §4): DistiLLM's loss, the paper's optimiser and evaluation
protocol, and Dolly's split; each config file then names its pair, task and learning rate.

The paper distils an SFT'd teacher into an SFT'd student ("init": 3 epochs of SFT, best validation loss):
point ``teacher.path`` (and ``student.path``) at such checkpoints, e.g. ``best/`` of a ``method="sft"``
run; the hub ids in the configs are the pretrained models.
"""

from ml_collections import ConfigDict

# PAPER.md §3: every method of the paper's tables as (data strategy = trainer method, divergence, its
# parameters). ``onpolicy`` (fresh SGOs every step) keeps DistiLLM's loss to isolate the data strategy.
METHODS = {
    "distillm": ("srkl", {"alpha": 0.1}),  # adaptive off-policy SGOs + skew reverse KL
    "sft": ("fkl", {}),  # CE only
    "kd": ("fkl", {}),
    "seqkd": ("fkl", {}),
    "imitkd": ("fkl", {}),
    "gkd": ("jsd", {"beta": 0.1}),  # with probability offpolicy.gkd_lambda = 0.5 on fresh SGOs
    "onpolicy": ("srkl", {"alpha": 0.1}),
    # Not a divergence on batches: the policy gradient of the reverse KL (val_rkl is what it lowers).
    "minillm": ("rkl", {}),
    # (2 − β)·SKL on teacher outputs + β·SRKL on student outputs, both with this alpha; val_sfkl reported.
    "distillm2": ("sfkl", {"alpha": 0.1}),
}


def method(c: ConfigDict, name: str) -> ConfigDict:
    """``c`` switched to the paper's ``name`` method: its data strategy and its divergence."""
    c.method = name
    c.loss.name, params = METHODS[name]
    for key, value in params.items():
        c.loss[key] = value
    c.run_dir = c.run_dir if name == "distillm" else f"{c.run_dir}_{name}"
    if name in ("minillm", "distillm2"):  # their losses have no chunked form
        c.loss.chunk_size = 0
    if name == "minillm":  # PPO epochs train on whole rollout batches
        c.optim.grad_accum = 1
    return c


def distillm(c: ConfigDict, name: str, teacher: str, student: str, *, lr: float, epochs: int) -> ConfigDict:
    c.run_dir = f"runs/{name}"
    c.teacher.path, c.teacher.dtype = teacher, "bfloat16"  # frozen: bf16 weights and compute
    c.student.path, c.student.dtype = student, "bfloat16"  # bf16 compute over float32 params (AdamW)
    method(c, "distillm")  # adaptive SGOs (offpolicy.*: loss_eps 0.1, buffer 1000, decreasing replay)
    c.loss.kd_ratio = 1.0
    # The paper adds lm_coef 1.0 of plain LM loss on OpenWebText: --config.loss.lm_coef=1.0
    # --config.data.lm_source=/path/to/openwebtext (jsonl / parquet with a "text" column).
    c.loss.lm_coef = 0.0
    c.optim.batch_size = 32  # the paper's 8 per device x 4 devices
    c.optim.lr, c.optim.epochs = lr, epochs  # AdamW wd 0.01, cosine to 1e-7, no warmup, clip 1.0 (base)
    c.eval.interval = 0  # every epoch; best/ keeps the best dev ROUGE-L / BLEU
    c.eval.temperature, c.eval.top_k, c.eval.top_p = 1.0, 0, 1.0  # the paper samples; 0 = greedy
    c.eval.no_repeat_ngram_size = 6
    c.eval.seeds = (10, 20, 30, 40, 50)  # launch/evaluate.py: mean ± std
    # All devices on FSDP. A TPU v4-32 slice (16 chips): data=1, fsdp=16, tensor=1; batch 32 = 2 rows a chip.
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    return c


def dolly(c: ConfigDict) -> ConfigDict:
    """databricks/databricks-dolly-15k has only a train split: 1000 dev and 500 test rows are held out of
    it as in the paper (which draws them at random; these are the first ones). Test:
    ``--config.data.valid_split='train[1000:1500]'`` with launch/evaluate.py. Local files: ``data.source``
    = a directory with train.jsonl / validation.jsonl, and the splits "train" / "validation"."""
    c.data.task, c.data.source = "dolly", ""
    c.data.train_split, c.data.valid_split, c.data.max_valid_rows = "train[1500:]", "train[:1000]", 1000
    c.data.max_prompt_length, c.data.max_length = 256, 512
    return c
