"""The embedded default: offline, on a CPU, in minutes, on the shipped demo task (dialogue -> summary).

The teacher is the shipped T5 (4+4 layers, d_model 128) trained by SFT on 4000 rows of the task
(``distillm_jax/data/demo_teacher``; ``:teacher`` trains it again, about 10 minutes). A smaller T5 student
(2+2 layers, d_model 64) has only 32 labelled rows: the setting where distillation matters most, and where
DistiLLM's second idea acts. The student first gets an SFT "init" (100 steps, the checkpoint with the best
validation CE, as the paper's students); from it three students train 300 steps each at a constant 5e-3:
DistiLLM (SRKL + adaptive student-generated outputs), SRKL on ground truth only (``kd``: DistiLLM with φ
held at 0) and SFT. Then all of them, with teacher and init, are scored on 500 test dialogues with three
sampling seeds (temperature 1.0, no_repeat_ngram_size 6, ROUGE-L, the paper's protocol; ``best/`` is picked
by sampling without the n-gram ban).

Why 32 rows and 5e-3, from measurements (2-core CPU, 2026-12-02, before the students trained with T5's
dropout 0.1): with the 4000 rows the teacher saw, or 256, or 128, the SRKL student's validation CE falls
or stays flat for the whole run at 1e-3 to 5e-3 (the teacher's soft labels keep it from overfitting), so
φ stays 0 and DistiLLM is SRKL KD. At 64 rows φ rose once, late (step 225 of 400); at 32 rows (300 steps
= 300 epochs) the CE rose by 0.1 two or three times and φ climbed to 0.2-0.3. With dropout (2026-12-05)
the CE rises sooner: φ reached 0.3 by step 100 and one step in three trained on student outputs, fresh
or replayed. Rates of 1e-2 make φ climb anywhere, but by a jump in CE that hurts both SRKL students (SFT
then wins): a shock, not the drift the scheduler is for. ``offpolicy.capacity`` 128 rows (4 batches)
keeps the paper's buffer-to-run ratio (its 4000 rows are ~1.4 % of a 20-epoch Dolly run's samples), so
replay starts soon after φ does.

``:tiny`` shortens everything for the tests (a tiny teacher trained on the spot). ``:gpt2`` is the same
task with a decoder-only pair: a GPT-2-shaped teacher (4 layers, width 128) trained by SFT on the spot
on 4000 rows (1500 steps, about 10 minutes on a CPU) and a GPT-2-shaped student (2 layers, width 64);
``:tiny,gpt2`` its tiny form. The benchmarks against decoder-only peers (TRL) run on it. ``:long`` is the
long-response regime of ``bench/evidence.py`` (``long_responses``), ``:tiny,long`` its tiny form and
``:teacher,long`` makes its shipped teacher again.
"""

from ml_collections import ConfigDict

from configs import base
from distillm_jax.data import demo


def t5(d_model: int, layers: int, heads: int, d_ff: int) -> ConfigDict:
    return ConfigDict(
        {
            "model_type": "t5",
            "vocab_size": len(demo.vocabulary()),  # the demo tokenizer's
            "d_model": d_model,
            "d_kv": d_model // heads,
            "d_ff": d_ff,
            "num_layers": layers,
            "num_decoder_layers": layers,
            "num_heads": heads,
            "feed_forward_proj": "relu",
            "tie_word_embeddings": True,
            "pad_token_id": 0,
            "eos_token_id": 1,
            "decoder_start_token_id": 0,
        },
        type_safe=False,
    )


def gpt2(width: int, layers: int, heads: int) -> ConfigDict:
    return ConfigDict(
        {
            "model_type": "gpt2",
            "vocab_size": len(demo.vocabulary()),
            "n_embd": width,
            "n_layer": layers,
            "n_head": heads,
            "n_positions": 128,  # >= data.max_length
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 1,
        },
        type_safe=False,
    )


def get_config(arg: str = "") -> ConfigDict:
    c = base.get_config()
    c.run_dir = "runs/demo"
    c.method = "distillm"  # SRKL + adaptive SGOs (offpolicy.*: the paper's, but for capacity)
    c.compare = ("kd", "sft")  # the ablation: SRKL on ground truth only (φ held at 0), and SFT
    c.tokenizer = "demo"
    c.teacher.path = str(demo.TEACHER)
    c.teacher.tuned = True  # the shipped teacher was trained on the demo task
    c.teacher.train_rows = 4000  # a teacher trained here (:gpt2) sees the rows the shipped one saw
    c.teacher.config = t5(128, 4, 4, 512)  # what the shipped teacher is (used when path is "")
    c.student.config = t5(64, 2, 2, 256)
    c.student.seed = 1
    c.student.train_steps = 100  # the SFT'd init every student starts from (best validation CE)
    c.student.train_lr = 3e-3
    c.data.task = "demo"
    c.data.max_prompt_length = 96
    c.data.max_length = 128
    c.data.demo_rows = 4000  # the generator's training rows (the teacher's)
    c.data.max_train_rows = 32  # the student's: the first 32 of them
    c.data.max_valid_rows = 200
    c.data.test_split = "test"  # 500 test dialogues (the test stage), eval.seeds
    c.loss.name = "srkl"
    c.loss.alpha = 0.1
    c.optim.batch_size = 32
    c.optim.lr = c.optim.end_lr = 5e-3  # constant
    c.optim.steps = 300
    c.offpolicy.capacity = 128
    c.eval.interval = 25
    c.eval.seeds = (10, 20, 30)
    c.eval.batch_size = 40
    c.eval.temperature = 1.0  # the paper's protocol: sampled generations
    c.eval.no_repeat_ngram_size = 6
    c.log_interval = 10
    c.mesh.fsdp = 1
    parts = set(arg.split(",")) - {""}
    valid = ("", "teacher", "tiny", "gpt2", "long", "tiny gpt2", "tiny long", "teacher long")
    if parts not in [set(v.split()) for v in valid]:
        raise ValueError(
            "configs/demo.py takes '', 'teacher', 'tiny', 'gpt2', 'long' or 'tiny,gpt2', 'tiny,long', "
            f"'teacher,long'; got {arg!r}"
        )
    arg = "tiny" if "tiny" in parts else "teacher" if "teacher" in parts else ""
    if "long" in parts:
        long_responses(c)
    if "gpt2" in parts:
        c.run_dir = "runs/demo_gpt2"
        c.teacher.path, c.teacher.tuned = "", False
        c.teacher.config = gpt2(128, 4, 4)
        c.teacher.train_steps, c.teacher.train_lr = 1500, 2e-3
        c.student.config = gpt2(64, 2, 2)
    if arg == "teacher":  # make the shipped teacher again: SFT of a new T5 (its final/ is the teacher)
        c.run_dir = "runs/demo_long_teacher" if "long" in parts else "runs/demo_teacher"
        c.method, c.compare = "sft", ()
        c.student.config = ConfigDict(c.teacher.config.to_dict(), type_safe=False)
        c.student.seed, c.student.train_steps = 0, 0
        c.student.dropout = 0.0  # the shipped teacher was trained without dropout: this makes it again
        c.data.max_train_rows, c.data.test_split = 0, ""
        c.optim.steps, c.optim.lr, c.optim.end_lr = 1500, 2e-3, 1e-7
        c.eval.interval, c.eval.temperature, c.eval.no_repeat_ngram_size = 300, 0.0, 0
        if "long" in parts:  # 5 epochs of the 4000 rows, 16 minutes on 2 cores
            c.optim.batch_size, c.optim.steps, c.eval.interval = 32, 600, 200
            c.teacher.path = ""  # SFT uses none; the one this run makes does not exist yet
    elif arg == "tiny":
        c.run_dir = "runs/demo_tiny" + "".join(f"_{p}" for p in sorted(parts - {"tiny"}))
        c.teacher.path, c.teacher.tuned = "", False
        c.teacher.config = gpt2(32, 1, 2) if "gpt2" in parts else t5(32, 1, 2, 64)
        c.teacher.train_steps = 4
        c.student.config = gpt2(16, 1, 2) if "gpt2" in parts else t5(16, 1, 2, 32)
        c.student.train_steps = 2
        c.data.demo_rows = 64
        c.data.max_train_rows = 0
        c.data.max_valid_rows = 16
        c.data.test_split = "test[:16]"
        c.eval.seeds = (10, 20)
        c.offpolicy.capacity = 16
        c.data.max_prompt_length = 80
        c.data.max_length = 112
        c.optim.batch_size = 8
        c.optim.steps = 4
        c.eval.interval = 2
        c.eval.batch_size = 8
        c.eval.max_new_tokens = 8
        c.log_interval = 1
        c.mesh.fsdp = -1
        if "long" in parts:  # prompts of 3-5 records: up to ~90 tokens
            c.data.max_prompt_length, c.data.max_length = 96, 128
    return c


def long_responses(c: ConfigDict) -> None:
    """``:long``: the long-response regime of ``bench/evidence.py`` (``demo_long``: 3-5 fact records ->
    a dialogue for each, ~170 response tokens, up to 256 kept). The teacher is shipped
    (``distillm_jax/data/demo_long_teacher``, the same T5 shape as the demo's: ``:teacher,long``, then 600
    more steps from its ``final/`` at 1e-3 with ``--config.student.path=runs/demo_long_teacher/final
    --config.optim.lr=1e-3 --config.run_dir=runs/demo_long_teacher2``; 2 × 15 minutes on 2 cores, validation
    CE 0.43, greedy ROUGE-L 38.5). The student is a T5 of 2+2 layers at the teacher's width with 64
    labelled rows."""
    c.run_dir = "runs/demo_long"
    c.data.task = "demo_long"
    c.teacher.path = str(demo.LONG_TEACHER)
    c.student.config = t5(128, 2, 4, 512)
    c.data.max_prompt_length, c.data.max_length = 96, 352  # the decoder: 256 tokens
    c.data.max_train_rows = 64
    c.data.max_valid_rows = 100
    c.data.test_split = "test[:300]"
    c.optim.batch_size = 16
    c.optim.steps = 100
    c.offpolicy.capacity = 64  # 4 batches, as the demo's
    c.eval.interval = 20
    c.eval.batch_size = 50
    c.eval.no_repeat_ngram_size = 0  # the dialogues repeat their phrases: a 6-gram ban would cut them
