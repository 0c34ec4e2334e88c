"""T5-XL (3B) -> T5-Base (220M) on SAMSum dialogue summarization, scored by ROUGE-L, with DistiLLM's
skew reverse KL (T5-Small is the paper's other student: --config.student.path=google-t5/t5-small). The
paper gives no T5 rate: 1e-4, 10 epochs. The original T5 (not v1.1) was pre-trained with the
"summarize: " prefix the task uses. ``:tiny``: tiny random T5s (ReLU, tied head) on 24 local dialogues."""

from ml_collections import ConfigDict

from configs import base, paper, tiny


def get_config(arg: str = "") -> ConfigDict:
    c = paper.distillm(
        base.get_config(), "t5_samsum", "google-t5/t5-3b", "google-t5/t5-base", lr=1e-4, epochs=10
    )
    # knkarthick/samsum (Samsung/samsum was deleted from the hub): train 14732 / validation 818 / test 819
    c.data.task, c.data.source = "samsum", ""
    c.data.max_valid_rows = 0  # all
    c.data.max_prompt_length, c.data.max_length = 512, 640  # the dialogue; + up to 128 summary tokens
    return tiny.variant(c, arg, "t5_samsum", teacher=tiny.t5(64, 2, 4), student=tiny.t5(32, 1, 2))
