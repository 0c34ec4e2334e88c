"""OpenLLaMA2-7B -> OpenLLaMA2-3B on Dolly-15K with DistiLLM's skew reverse KL. As in the paper, the 3B
student trains as LoRA adapters (r 16, alpha 64, dropout 0.1, on q and v) over its frozen weights; exports
are merged HF checkpoints with the adapters also in PEFT's layout (``<export>/adapter``). Rate, length and
scheduler as the official script for this pair (the paper states none of them): 5e-4 for 10 epochs, SRKL
with φ starting at 0.2 and rising by 0.1 each time validation CE rises by more than 0.2
(``--init-threshold 0.2 --loss-eps 0.2``). The pipeline SFTs the 7B teacher on Dolly first, as LoRA
adapters too (merged into its exported ``best/``). Both hub
checkpoints ship ``pytorch_model*.bin`` only, which load without torch.
``:tiny``: tiny random Llamas (LoRA as well) on a 24-row local sample of Dolly."""

from ml_collections import ConfigDict

from configs import base, paper, tiny


def get_config(arg: str = "") -> ConfigDict:
    teacher, student = "openlm-research/open_llama_7b_v2", "openlm-research/open_llama_3b_v2"
    c = paper.distillm(base.get_config(), "openllama_dolly", teacher, student, lr=5e-4, epochs=10)
    c.offpolicy.init_phi, c.offpolicy.loss_eps = 0.2, 0.2
    paper.dolly(c)
    lo = c.student.lora
    lo.rank, lo.alpha, lo.dropout, lo.targets, lo.peft = 16, 64.0, 0.1, ("q", "v"), True
    t = c.teacher.lora  # the teacher's SFT stage: adapters as well (a 7B's full AdamW state is 84 GB)
    t.rank, t.alpha, t.dropout, t.targets = 16, 64.0, 0.1, ("q", "v")
    return tiny.variant(c, arg, "openllama_dolly", teacher=tiny.llama(64, 2, 4), student=tiny.llama(32, 1, 2))
