"""A modern pair outside the paper: Qwen2.5-7B-Instruct -> Qwen2.5-0.5B-Instruct on Dolly-15K with
DistiLLM's skew reverse KL (the OPT rate 5e-5, 10 epochs). A 152k-entry vocabulary, so the loss is computed
in chunks of 128 positions (``loss.chunk_size``) and the full [batch, length, vocab] logits never exist.
Qwen2.5-7B's embedding has 152064 rows and 0.5B's 151936 (both pad the 151665-token tokenizer): the
distillation compares the rows they share. No chat template is applied (Dolly's Alpaca-style prompt).
``:tiny``: tiny random Qwen2 models (GQA, q/k/v bias, the student's head tied), the loss still chunked."""

from ml_collections import ConfigDict

from configs import base, paper, tiny


def get_config(arg: str = "") -> ConfigDict:
    teacher, student = "Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct"
    c = paper.distillm(base.get_config(), "qwen_dolly", teacher, student, lr=5e-5, epochs=10)
    paper.dolly(c)
    c.loss.chunk_size = 128  # 32 rows x 128 positions x 152k logits at a time, not x 512
    t = c.teacher.lora  # the 7B teacher's SFT stage on Dolly as LoRA adapters (merged into its best/)
    t.rank, t.alpha, t.dropout, t.targets = 16, 64.0, 0.1, ("q", "v")
    small = dict(teacher=tiny.qwen2(64, 2, 4, 2, tied=False), student=tiny.qwen2(32, 1, 4, 2, tied=True))
    return tiny.variant(c, arg, "qwen_dolly", **small)  # untied 7B-like teacher, tied 0.5B-like student
