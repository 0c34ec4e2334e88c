"""What one run is made of, built once from a checked config: its settings, mesh, tokenizer, rows,
models, sampler and validator. The data is read before any model loads, so a wrong file or column
costs seconds; every user mistake found here is a ``ConfigError`` (one line)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx
from ml_collections import ConfigDict

from distillm_jax import config as cfglib
from distillm_jax import lora, models, sharding
from distillm_jax.config import settings
from distillm_jax.data import batching, tasks
from distillm_jax.data import tokenizers as toklib
from distillm_jax.models import stack
from distillm_jax.run import data as rundata
from distillm_jax.sampling import Sampler
from distillm_jax.validation import Validator


def build_model(spec: settings.ModelSpec | ConfigDict, mesh, *, trainable: bool) -> nnx.Module:
    """A checkpoint (``spec.path``) or a new random model (``spec.config``), placed on ``mesh``. A
    trained model keeps float32 params unless ``param_dtype`` says otherwise (AdamW's updates are small);
    its dropout rates are the checkpoint's or ``spec.dropout`` (they act only in its train steps)."""
    if isinstance(spec, ConfigDict):  # a config's teacher / student group
        spec = settings.ModelSpec.of(spec)
    dtype, param_dtype = model_dtypes(spec, trainable)
    kw = dict(dtype=dtype, param_dtype=param_dtype, mesh=mesh, dropout=spec.dropout)
    if spec.path:
        model = models.from_pretrained(spec.path, **kw)
    else:
        model = models.create(models.spec_config(spec), seed=spec.seed, **kw)  # from spec.config
    stack.configure(model, spec.layers)
    lo = spec.lora
    if trainable and lo.rank:  # adapters on the frozen weights (kept in the param dtype they load in)
        lora.apply(
            model, rank=lo.rank, alpha=lo.alpha, dropout=lo.dropout, targets=lo.targets, seed=spec.seed
        )
    return model


def model_dtypes(spec: settings.ModelSpec, trainable: bool) -> tuple[jnp.dtype, jnp.dtype]:
    """(compute dtype, param dtype) of a model: a trained one keeps float32 params unless set."""
    return jnp.dtype(spec.dtype), jnp.dtype(spec.param_dtype or ("float32" if trainable else spec.dtype))


class Run:
    """A run's pieces, from a config that ``config.check`` and ``preflight`` accepted (``trainer.train``,
    ``pipeline.run`` and the launch scripts check before they build one). ``evaluate_only``
    (``launch/evaluate.py``, the test stage): the student, the tokenizer and the validation rows; no
    teacher, no training rows, nothing more read or loaded."""

    def __init__(self, config: ConfigDict, *, evaluate_only: bool = False):
        student = settings.ModelSpec.of(config.student)
        vocab = models.spec_config(student).vocab_size  # config.json only: no weights read yet
        self.settings = s = settings.build(config, vocab)
        d = s.data
        self.mesh = sharding.make_mesh(**s.mesh)
        self.task = tasks.get(d.task, d.languages)
        try:
            self.tokenizer = toklib.load(s.tokenizer, s.student.path)
            if s.method.teacher:
                toklib.check_same(self.tokenizer, s.teacher.path)
        except ValueError as e:
            raise cfglib.ConfigError(str(e)) from None
        raw_train = None
        if not evaluate_only:
            raw_train = rundata.read(
                self.task, d.source, d.train_split, max_rows=d.max_train_rows, demo_rows=d.demo_rows
            )
        raw_valid = rundata.read(
            self.task, d.source, d.valid_split, max_rows=d.max_valid_rows, demo_rows=d.max_valid_rows or 500
        )
        texts = None
        if s.loss.lm_coef > 0 and not evaluate_only:
            lm = rundata.read(
                tasks.get("openwebtext"), d.lm_source, d.lm_split, max_rows=d.lm_max_rows, demo_rows=0
            )
            texts = [r["text"] for r in lm]
        self.student = build_model(s.student, self.mesh, trainable=True)
        enc_dec = hasattr(self.student, "encode")
        self._check_vocab(self.student, "student")
        if s.loss.lm_coef > 0 and enc_dec:
            raise cfglib.ConfigError("loss.lm_coef (plain LM loss) needs a decoder-only student; set it to 0")
        start_id = self.student.hf_config.get("decoder_start_token_id") or 0
        self.batches = rundata.Batches(
            self.mesh, d.lengths, self.tokenizer.pad_token_id, encoder_decoder=enc_dec, start_id=start_id
        )
        self.sampler = Sampler(self.batches, self.tokenizer.eos_token_id)
        self.valid_rows, self.valid_refs = self._tokenized(d.valid_split, raw_valid)
        self.validator = Validator(
            self.batches,
            self.sampler,
            self.tokenizer,
            self.task.metric,
            self.valid_rows,
            self.valid_refs,
            s.eval,
            s.new_tokens(s.eval),
        )
        self.teacher, self.train_rows, self.lm_rows = None, [], None
        if evaluate_only:
            return
        if s.method.teacher:
            self.teacher = build_model(s.teacher, self.mesh, trainable=False)
            self._check_vocab(self.teacher, "teacher")
            if hasattr(self.teacher, "encode") != enc_dec:
                raise cfglib.ConfigError(
                    "teacher and student must both be encoder-decoder or both decoder-only"
                )
        self.train_rows, _ = self._tokenized(d.train_split, raw_train)
        if len(self.train_rows) < s.optim.batch_size:
            raise cfglib.ConfigError(
                f"{len(self.train_rows)} usable training rows are fewer than one batch ({s.optim.batch_size})"
            )
        self.lm_rows = None if texts is None else batching.LazyTokens(texts, self.tokenizer)

    def _check_vocab(self, model: nnx.Module, role: str) -> None:
        if model.config.vocab < len(self.tokenizer):
            raise cfglib.ConfigError(
                f"the {role}'s vocabulary ({model.config.vocab}) is smaller than the tokenizer's "
                f"({len(self.tokenizer)}); they do not belong together"
            )

    def _tokenized(self, split: str, raw: list[dict]) -> tuple[list, list[str]]:
        return rundata.tokenize(
            self.task,
            split,
            raw,
            self.tokenizer,
            self.settings.data.lengths,
            encoder_decoder=self.batches.encoder_decoder,
        )
