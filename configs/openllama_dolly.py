"""OpenLLaMA2-7B -> OpenLLaMA2-3B on Dolly-15K with DistiLLM's skew reverse KL. The paper fine-tunes the
3B student with LoRA (r 16, alpha 64); this config trains it fully (no LoRA yet) at the OPT rate 5e-5 for
10 epochs (the paper states neither for LLaMA). Check that the hub checkpoints ship safetensors (convert
``.bin`` ones first). ``:tiny``: tiny random Llamas on a 24-row local sample of Dolly."""

from ml_collections import ConfigDict

from configs import base, paper, tiny


def get_config(arg: str = "") -> ConfigDict:
    teacher, student = "openlm-research/open_llama_7b_v2", "openlm-research/open_llama_3b_v2"
    c = paper.distillm(base.get_config(), "openllama_dolly", teacher, student, lr=5e-5, epochs=10)
    paper.dolly(c)
    return tiny.variant(c, arg, "openllama_dolly", teacher=tiny.llama(64, 2, 4), student=tiny.llama(32, 1, 2))
