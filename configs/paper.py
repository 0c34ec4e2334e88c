"""What every paper config shares: the paper's pipeline (teacher SFT, student init, DistiLLM, the test
split over five seeds), DistiLLM's loss, the paper's optimiser and evaluation protocol, and Dolly's split;
each config file then names its pair, task and learning rate.

The paper distils a teacher fine-tuned on the task into a student given an SFT "init" (3 epochs, best
validation loss). The configs name pretrained hub models, so ``launch/train.py`` runs those two SFT stages
first (``pipeline.py``); a teacher already fine-tuned on the task (``MiniLLM/teacher-gpt2-1.5B`` for GPT-2
XL on Dolly) is marked ``teacher.tuned`` and used as it is.
"""

from ml_collections import ConfigDict

from distillm_jax import methods

# Every method of the paper's tables as (data strategy = trainer method, divergence, its
# parameters). ``onpolicy`` (fresh SGOs every step) keeps DistiLLM's loss to isolate the data strategy.
METHODS = {
    "distillm": ("srkl", {"alpha": 0.1}),  # adaptive off-policy SGOs + skew reverse KL
    "sft": ("fkl", {}),  # CE only
    "kd": ("fkl", {}),
    "seqkd": ("fkl", {}),
    "imitkd": ("fkl", {}),
    # With probability offpolicy.gkd_lambda = 0.5 fresh SGOs into the buffer and a step on a buffer sample
    # (the DistiLLM authors' mixed-jsd); gkd_onpolicy: a step on the fresh SGOs (GKD's paper, TRL).
    "gkd": ("jsd", {"beta": 0.1}),
    "gkd_onpolicy": ("jsd", {"beta": 0.1}),
    "onpolicy": ("srkl", {"alpha": 0.1}),
    # Not a divergence on batches: the policy gradient of the reverse KL (val_rkl is what it lowers).
    "minillm": ("rkl", {}),
    # (2 − β)·SKL on teacher outputs + β·SRKL on student outputs, both with this alpha; val_sfkl reported.
    "distillm2": ("sfkl", {"alpha": 0.1}),
}


def method(c: ConfigDict, name: str) -> ConfigDict:
    """``c`` switched to the paper's ``name`` method: its data strategy and its divergence. DistiLLM
    (and ``onpolicy``, its loss on fresh SGOs) keep the pair's skew divergence when it has one (the
    official GPT-2 base script runs SKL, the others SRKL)."""
    skew = c.loss.name if c.loss.name in ("srkl", "sfkl") else None
    c.method = name
    c.loss.name, params = METHODS[name]
    if name in ("distillm", "onpolicy") and skew:
        c.loss.name = skew
    for key, value in params.items():
        c.loss[key] = value
    c.run_dir = c.run_dir if name == "distillm" else f"{c.run_dir}_{name}"
    if not methods.get(name).chunked:  # MiniLLM's and DistiLLM-2's losses have no chunked form
        c.loss.chunk_size = 0
    if name == "minillm":
        minillm(c)
    return c


GPUS = 4  # the paper's runs: 4 GPUs (A100); the scripts give rows per GPU


def scripts(c: ConfigDict, table: dict[str, tuple[str, int]]) -> ConfigDict:
    """``c``'s method started and batched as the authors' script for the pair does (``:scripts``):
    ``table`` maps a method to (where its student starts, rows per GPU); the paper's text instead starts
    every student from the SFT'd init at the pair's batch (the default). A method the table does not
    name has no script: it keeps the paper's setting."""
    if c.method in table:
        c.student.start, per_gpu = table[c.method]
        c.optim.batch_size, c.optim.grad_accum = per_gpu * GPUS, 1
    return c


def minillm(c: ConfigDict) -> ConfigDict:
    """MiniLLM as its authors run it (microsoft/LMOps, ``minillm/scripts/gpt2/minillm/``; the same for
    their OPT and LLaMA pairs): a constant 5e-6 after 100 warmup steps, AdamW β2 0.95 and weight decay
    1e-6, clip 1.0; global batch 256 (16 GPUs x 16), rounds of 256 rollouts x 4 PPO passes, until 10
    epochs of prompts (their 5000-iteration cap comes later on Dolly). Their LM term on pre-training
    text (lm_coef 1, half CE half FKL to the teacher) needs a corpus: ``--config.loss.lm_coef=1.0
    --config.data.lm_source=PATH``; without one this is their ``no_pt`` run, as DistiLLM here runs
    without its own LM term. The micro-batch stays the pair's: 256 rows by gradient accumulation."""
    micro = c.optim.batch_size // c.optim.grad_accum
    c.optim.lr = c.optim.end_lr = 5e-6
    c.optim.warmup_steps, c.optim.b2, c.optim.weight_decay, c.optim.clip = 100, 0.95, 1e-6, 1.0
    if 256 % micro == 0:
        c.optim.batch_size, c.optim.grad_accum = 256, 256 // micro
    c.optim.epochs = 10
    c.minillm.rollouts = 256
    c.loss.lm_kd_ratio = 0.5
    return c


def distillm(
    c: ConfigDict,
    name: str,
    teacher: str,
    student: str,
    *,
    lr: float,
    epochs: int,
    tuned: bool = False,
    loss: str = "srkl",
) -> ConfigDict:
    c.run_dir = f"runs/{name}"
    c.teacher.path, c.teacher.dtype = teacher, "bfloat16"  # frozen: bf16 weights and compute
    c.student.path, c.student.dtype = student, "bfloat16"  # bf16 compute over float32 params (AdamW)
    # Stage 1: the teacher's SFT on the task, as the official GPT-2 XL teacher's (lr 5e-5, 10 epochs);
    # not for a teacher already fine-tuned on it (tuned=True).
    c.teacher.tuned = tuned
    c.teacher.train_epochs, c.teacher.train_lr = (0, 0.0) if tuned else (10, 5e-5)
    c.student.train_epochs = 3  # stage 2: the student's init, at the pair's rate; best validation CE
    c.data.test_split = "test"  # stage 4: every model on the test split over eval.seeds
    c.loss.name = loss  # DistiLLM's skew divergence: SRKL, or SKL where the official script runs it
    method(c, "distillm")  # adaptive SGOs (offpolicy.*: loss_eps 0.1, buffer 4000, decreasing replay)
    c.loss.kd_ratio = 1.0
    # The paper adds lm_coef 1.0 of plain LM loss on OpenWebText: --config.loss.lm_coef=1.0
    # --config.data.lm_source=/path/to/openwebtext (jsonl / parquet with a "text" column).
    c.loss.lm_coef = 0.0
    c.optim.batch_size = 32  # the paper's 8 per device x 4 devices
    c.optim.lr, c.optim.epochs = lr, epochs  # AdamW wd 0.01, cosine to 1e-7, no warmup, clip 1.0 (base)
    c.eval.interval = 0  # every epoch; best/ keeps the best dev ROUGE-L / BLEU
    c.eval.temperature, c.eval.top_k, c.eval.top_p = 1.0, 0, 1.0  # the paper samples; 0 = greedy
    c.eval.no_repeat_ngram_size = 6  # the test stage only; best/ is picked by plain sampling
    c.eval.seeds = (10, 20, 30, 40, 50)  # the test stage (and launch/evaluate.py): mean ± std
    # All devices on FSDP. A TPU v4-32 slice (16 chips): data=1, fsdp=16, tensor=1; batch 32 = 2 rows a chip.
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
    return c


def dolly(c: ConfigDict) -> ConfigDict:
    """The paper's Dolly split, exactly: MiniLLM's processed Dolly-15K (``MiniLLM/dolly``), which DistiLLM
    reuses: ``valid.jsonl`` holds the 500 test rows, ``raw.jsonl`` the rest, shuffled, of which the first
    1000 are the dev set and the others the training set. The hub's ``databricks/databricks-dolly-15k``
    has only a train split in its original order: ``--config.data.source=databricks/databricks-dolly-15k``
    with splits ``train[1500:]`` / ``train[:1000]`` / ``train[1000:1500]`` holds out other rows. Local
    files: a directory with ``train.jsonl`` / ``validation.jsonl`` / ``test.jsonl`` and those split names."""
    c.data.task, c.data.source = "dolly", "MiniLLM/dolly?data_files=train:raw.jsonl,test:valid.jsonl"
    c.data.train_split, c.data.valid_split, c.data.test_split = "train[1000:]", "train[:1000]", "test"
    c.data.test_sets = TEST_SETS
    c.data.max_valid_rows = 1000
    c.data.max_prompt_length, c.data.max_length = 256, 512
    return c


# The paper's other instruction-following test sets (its Table 1), as the authors evaluate them: MiniLLM's
# processed copies on the hub (the files their eval scripts read; each row's prompt is Dolly's template),
# S-NI and UnNI the "11_" folder the eval scripts read (the last of four response-length buckets), UnNI
# capped at its first 10,000 rows as their --dev-num does.
# Self-Instruct holds 242 of the 252 user-oriented tasks (the 10 with the longest prompts are left out).
TEST_SETS = (
    "self-inst=MiniLLM/self-inst?data_files=test:valid.jsonl",  # 242 rows
    "vicuna=MiniLLM/Vicuna?data_files=test:valid.jsonl",  # 80 questions, GPT-3.5's answers as references
    "sinst=MiniLLM/sinst?data_files=test:11_/valid.jsonl",  # 1,694 rows of 37 tasks, up to 10 references
    "uinst=MiniLLM/uinst?data_files=test:11_/valid.jsonl#test[:10000]",  # its first 10,000 rows
)
