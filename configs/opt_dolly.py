"""OPT-2.7B -> OPT-1.3B on Dolly-15K with DistiLLM's skew reverse KL (the paper's OPT rate 5e-5; its other
students are opt-125m and opt-350m: --config.student.path=facebook/opt-350m). 10 epochs, as the official
script for this pair (the paper states none for OPT; the official opt-125m script runs 20).
``:tiny``: tiny random OPTs on a 24-row local sample of Dolly."""

from ml_collections import ConfigDict

from configs import base, paper, tiny


def get_config(arg: str = "") -> ConfigDict:
    c = paper.distillm(
        base.get_config(), "opt_dolly", "facebook/opt-2.7b", "facebook/opt-1.3b", lr=5e-5, epochs=10
    )
    paper.dolly(c)
    return tiny.variant(c, arg, "opt_dolly", teacher=tiny.opt(64, 2, 4), student=tiny.opt(32, 1, 2))
