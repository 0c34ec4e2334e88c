"""The embedded default: offline, on a CPU, in minutes. A T5 teacher (4+4 layers, d_model 128) is trained
on the shipped demo task (dialogue -> summary) by SFT; a smaller T5 student (2+2 layers, d_model 64) gets
a short SFT "init" (as the paper's students do), then is distilled from the teacher with SRKL (DistiLLM's
skew reverse KL) for 300 steps and compared with the same init trained 300 more steps by SFT.
``:tiny`` shortens everything for the tests."""

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


def get_config(arg: str = "") -> ConfigDict:
    c = base.get_config()
    c.run_dir = "runs/demo"
    c.resume = True  # re-running the command continues (or just reprints) the same run
    c.method = "kd"
    c.compare_sft = True
    c.tokenizer = "demo"
    c.teacher.config = t5(128, 4, 4, 512)
    c.teacher.train_steps = 600
    c.teacher.train_lr = 3e-3
    c.student.config = t5(64, 2, 2, 256)
    c.student.seed = 1
    c.student.train_steps = 100  # an SFT'd init first, as the paper's students; both arms start from it
    c.data.task = "demo"
    c.data.max_prompt_length = 96
    c.data.max_length = 128
    c.data.demo_rows = 4000
    c.data.max_valid_rows = 200
    c.loss.name = "srkl"
    c.loss.alpha = 0.1
    c.optim.batch_size = 32
    c.optim.lr = 3e-3
    c.optim.steps = 300
    c.eval.interval = 100
    c.eval.batch_size = 40
    c.eval.temperature = 0.0  # greedy: a stable comparison in a single run
    c.eval.no_repeat_ngram_size = 0
    c.log_interval = 10
    c.mesh.fsdp = 1
    if arg == "tiny":
        c.run_dir = "runs/demo_tiny"
        c.teacher.config = t5(32, 1, 2, 64)
        c.teacher.train_steps = 4
        c.student.config = t5(16, 1, 2, 32)
        c.student.train_steps = 2
        c.data.demo_rows = 64
        c.data.max_valid_rows = 16
        c.data.max_prompt_length = 80
        c.data.max_length = 112
        c.optim.batch_size = 8
        c.optim.steps = 4
        c.eval.interval = 2
        c.eval.batch_size = 8
        c.eval.max_new_tokens = 8
        c.log_interval = 1
        c.mesh.fsdp = -1
    elif arg:
        raise ValueError(f"configs/demo.py takes '' or 'tiny', got {arg!r}")
    return c
