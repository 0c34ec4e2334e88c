"""mT5-XL -> mT5-Base on IWSLT 2017 English -> German, scored by BLEU (sacrebleu), with DistiLLM's skew
reverse KL (mT5-Small is the paper's other student: --config.student.path=google/mt5-small). mT5 is only
pre-trained: the pipeline SFTs the teacher on the task first. The paper gives no mT5 rate: 1e-4, 5 epochs.
mT5's 250k vocabulary: the loss is computed in chunks of 128 decoder positions. ``:tiny``: tiny random
mT5s (gated GELU, untied head) on 24 local sentence pairs, the loss still chunked."""

from ml_collections import ConfigDict

from configs import base, paper, tiny


def get_config(arg: str = "") -> ConfigDict:
    c = paper.distillm(base.get_config(), "mt5_iwslt", "google/mt5-xl", "google/mt5-base", lr=1e-4, epochs=5)
    # IWSLT/iwslt2017's parquet export (the dataset is a loading script): en-de ~206k / 888 / 8079 rows;
    # another pair: --config.data.languages=en-fr (or de-en, ...)
    c.data.task, c.data.source = "iwslt2017", ""
    c.data.max_valid_rows = 0  # all
    c.data.max_prompt_length, c.data.max_length = 128, 256  # the English sentence; + up to 128 German tokens
    c.loss.chunk_size = 128
    return tiny.variant(c, arg, "mt5_iwslt", teacher=tiny.mt5(64, 2, 4), student=tiny.mt5(32, 1, 2))
