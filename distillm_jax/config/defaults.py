"""Defaults of every run (docs/method.md). Config files start from ``get_config()`` (``configs/base.py``
re-exports it) and change what their setup needs; every key a run accepts is defined here, inside the
package so that an installed ``distillm_jax`` checks configs, and a typo in a config file or an override
(``--config.optim.lr=1e-4``) is an error, not a silently ignored setting."""

from ml_collections import ConfigDict, config_dict


def model_spec(path: str = "", dtype: str = "float32") -> ConfigDict:
    return ConfigDict(
        {
            "path": path,  # a checkpoint folder (local, gs://, s3://) or hub id; "" + `config`: a new model
            "config": ConfigDict({}, type_safe=False),  # HF config kwargs (with model_type) for a new model
            "seed": 0,  # initialisation seed of a new model
            "dtype": dtype,  # compute dtype: float32 or bfloat16
            "param_dtype": "",  # "" = dtype; the student's params stay float32 for AdamW unless set
            # Dropout in its training steps (never in evaluation, sampling, or as a frozen teacher): unset
            # = the rates of the checkpoint's config.json, as transformers trains it (GPT-2 / OPT / T5:
            # 0.1); a number sets every dropout site of the model to it (0: none).
            "dropout": config_dict.placeholder(float),
            # How its layers run in training and scoring (models/stack.py): scan_layers compiles one
            # layer body for the whole stack (big models compile in seconds, not minutes; one extra copy
            # of the layers' params per device); remat recomputes each layer's activations in the
            # backward pass instead of keeping them: none | full | dots | dots_no_batch. Same numbers.
            "scan_layers": False,
            "remat": "none",
            # A first stage of SFT on the task (the paper's fine-tuned teacher and the student's "init"),
            # from `path` (a pretrained model) or from `config`, in run_dir/teacher or run_dir/student_sft;
            # the checkpoint with the best validation CE goes on. train_steps, else train_epochs.
            "train_steps": 0,
            "train_epochs": 0,
            "train_lr": 0.0,  # its learning rate; 0 = optim.lr
            "train_rows": 0,  # training rows it reads; 0 = data.max_train_rows
            "tuned": False,  # `path` is already fine-tuned on the task (no warning that it is not)
            # LoRA (rank > 0): train adapters on frozen base weights; the optimizer holds adapters only.
            # The paper's OpenLLaMA setting: rank 16, alpha 64, dropout 0.1. Exports are merged HF
            # checkpoints; peft=True also writes the adapters in PEFT's layout to <export>/adapter.
            "lora": ConfigDict(
                {
                    "rank": 0,
                    "alpha": 16.0,
                    "dropout": 0.0,
                    "targets": ("q", "v"),  # of q k v o (attention), gate up down (MLP)
                    "peft": False,
                }
            ),
        }
    )


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.run_dir = "runs/default"  # checkpoints, metrics.jsonl, ...: a local folder or gs://bucket/path
    c.seed = 0
    c.resume = False  # continue the run in run_dir from its latest complete checkpoint (none there: an error)
    c.start_if_empty = False  # with resume=True: start from step 0 when run_dir has no checkpoint yet
    # sft (CE only) | kd (loss.name on ground truth) | seqkd (on teacher outputs) | distillm (adaptive
    # SGOs + replay) | imitkd | gkd | onpolicy (SGO baselines; configs/paper.py sets each one's loss) |
    # minillm (policy gradient on reverse KL) | distillm2 (contrastive, on teacher and student outputs)
    c.method = "kd"
    # more students beside `method`, each from the same init for the same steps, in run_dir/<method>,
    # scored in one table: e.g. ("kd", "sft") = the loss on ground truth only (DistiLLM with φ held at 0),
    # and plain SFT. compare_sft=True is short for "sft" in it.
    c.compare = ()
    c.compare_sft = False

    c.teacher = model_spec(dtype="float32")
    c.student = model_spec()
    # Where the distillation stages' student starts: "init" = its SFT stage's best checkpoint when
    # student.train_steps / train_epochs are set (the paper's text: every student from the SFT'd init),
    # else student.path; "pretrained" = student.path as given, no SFT stage (the authors' KD, SeqKD and
    # SFT scripts; a paper config's ``:scripts``).
    c.student.start = "init"
    c.tokenizer = ""  # "" = the student's checkpoint; "demo" / "bytes": built-in; else a directory

    c.data = ConfigDict()
    c.data.task = "dolly"  # dolly | samsum | iwslt2017 | demo | demo_long
    # "" = the task's hub dataset; else a .jsonl/.json/.parquet/.csv file, a pattern of them (data/*.jsonl:
    # one split) or a directory of <split>.<ext> files (local, gs:// or s3://), or a hub dataset:
    # org/name[:config][@revision][?data_dir=...&data_files=...]
    c.data.source = ""
    c.data.languages = "en-de"  # iwslt2017: the translation direction, src-tgt
    c.data.train_split = "train"  # splits may be sliced: train[1000:], train[:10%]
    c.data.valid_split = "validation"
    c.data.test_split = ""  # the pipeline's last stage: every model on it over eval.seeds ("" = none)
    # More test sets for that stage, each scored the same way in a table of its own: "name=source" (a
    # source as data.source, its split test_split) or "name=source#split" (a split of its own, e.g. the
    # first 10,000 rows: test[:10000]). The Dolly configs: the paper's Self-Instruct, Vicuna, S-NI, UnNI.
    c.data.test_sets = ()
    c.data.max_prompt_length = 256
    c.data.max_length = 512
    c.data.max_train_rows = 0  # 0 = all
    c.data.max_valid_rows = 500  # validation CE and generation use this many rows
    c.data.demo_rows = 4000  # training rows drawn from the demo generator
    c.data.lm_source = ""  # plain text for the LM loss ("text" column), a source as data.source
    c.data.lm_split = "train"
    c.data.lm_max_rows = 100_000  # documents of it held (streamed from the hub: never all of OpenWebText)

    c.loss = ConfigDict()
    c.loss.name = "fkl"  # any divergence of losses.py: fkl rkl sfkl srkl jsd tvd symkl
    c.loss.kd_ratio = 1.0  # (1 - kd_ratio)·CE + kd_ratio·D
    c.loss.alpha = 0.1  # sfkl / srkl skew
    c.loss.beta = 0.1  # jsd: the authors' js_distance (λ 0.9 on the student is β 0.1 on the teacher)
    c.loss.lam = 0.9  # symkl
    c.loss.lm_coef = 0.0  # weight of the LM loss on data.lm_source
    c.loss.lm_kd_ratio = 0.0  # the LM loss: (1 − it)·CE + it·FKL to the teacher (MiniLLM's: 0.5)
    # The loss form: -1 = chosen for the run by vocabulary, backend and dtype (losses.auto_chunk_size:
    # chunked from 32k entries on CPU and in bfloat16); 0 = the plain form; > 0 = chunked, this many
    # positions at a time (the full [batch, length, vocab] logits never exist).
    c.loss.chunk_size = -1

    c.optim = ConfigDict()
    c.optim.batch_size = 32  # global, per optimizer update: batch_size = micro-batch * grad_accum
    c.optim.grad_accum = 1
    c.optim.lr = 5e-4
    c.optim.end_lr = 1e-7
    c.optim.weight_decay = 0.01  # not on biases and norm scales
    c.optim.b2 = 0.999  # AdamW's second-moment decay (β1 0.9)
    c.optim.warmup_steps = 0
    c.optim.clip = 1.0
    c.optim.epochs = 0  # the run's length: epochs, or steps when epochs is 0
    c.optim.steps = 1000

    c.eval = ConfigDict()
    c.eval.interval = 0  # optimizer steps between evaluations; 0 = once per epoch
    c.eval.batch_size = 32
    c.eval.generate = True  # ROUGE-L / BLEU from generations, not only validation CE
    c.eval.max_new_tokens = 0  # 0 = max_length - max_prompt_length
    c.eval.temperature = 1.0  # the paper samples; 0 = greedy
    c.eval.top_k = 0
    c.eval.top_p = 1.0
    c.eval.no_repeat_ngram_size = 6  # the final evaluation only (test stage, launch/evaluate.py)
    c.eval.draws = 1  # evaluations during training: the metric is the mean over this many sampled
    # generations of the validation rows (> 1: less noise in best/ and the curves; also logs <metric>_std)
    c.eval.seeds = (10,)  # the test stage and launch/evaluate.py: the paper's (10, 20, 30, 40, 50)

    # Student-generated outputs, shared by the methods that sample the student while it trains
    # (distillm, imitkd, gkd, gkd_onpolicy, onpolicy) and MiniLLM's rollouts. Each method adds its own
    # keys (DistiLLM's init_phi / loss_eps / replay_ratio, GKD's gkd_lambda) and groups (minillm,
    # distillm2, seqkd) from its file in distillm_jax/methods/.
    c.offpolicy = ConfigDict()
    c.offpolicy.capacity = 4000  # replay buffer rows in all, over the data shards (the paper: 1000 a GPU x 4)
    c.offpolicy.temperature = 1.0  # the student's sampling for SGOs (the paper: 1.0, no top-k / top-p)
    c.offpolicy.top_k = 0
    c.offpolicy.top_p = 1.0
    c.offpolicy.max_new_tokens = 0  # 0 = max_length - max_prompt_length
    c.offpolicy.overlap = False  # generate SGOs ahead, on params up to max_staleness updates old
    c.offpolicy.max_staleness = 2

    c.checkpoint = ConfigDict()
    c.checkpoint.interval = 0  # optimizer steps between checkpoints; 0 = at every evaluation
    c.checkpoint.keep = 2

    c.log_interval = 10  # steps between progress updates, metrics.jsonl and tensorboard rows

    c.distributed = ConfigDict()  # several processes (hosts); TPU pods and SLURM jobs are detected
    c.distributed.auto = False  # join by JAX's cluster detection (TPU pod slices, SLURM): launch/*.sh set it
    c.distributed.coordinator = ""  # "host:port" of process 0, to start processes by hand (or simulate)
    c.distributed.num_processes = 1
    c.distributed.process_id = 0
    c.distributed.heartbeat_timeout = 100  # seconds without news before a lost process stops the others
    c.distributed.init_timeout = 300  # seconds to wait for every process to join

    c.mesh = ConfigDict()  # a TPU v4-32 pod slice: data=1, fsdp=16, tensor=1 (fsdp=-1: all devices)
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    from distillm_jax import methods  # the methods' own keys (they import this layer's neighbours)

    return methods.add_defaults(c)
