"""Every jitted program of a stage compiled for a TPU slice from this host, with nothing allocated: the
compiler's own bytes per device and FLOPs, beside the planner's estimate (``launch/plan.py
--topology``).

TPU's compiler ships on PyPI (``libtpu``); ``jax.experimental.topologies`` gives a slice's devices to
compile for without the slice. The programs are the ones a run executes — ``step.jit_train_step``,
``step.jit_eval_step`` and ``generate``'s sampler, built from the same settings — called on abstract
arguments (``jax.ShapeDtypeStruct`` in their shardings on the slice's mesh): the student's trainable
params and optimizer state, its frozen part, the teacher's params, a micro-batch of the config's
shapes, the sampler's prompts.

A stage's peak per device: what stays resident for the whole stage (params, optimizer state, frozen
weights, the teacher: the train step's argument bytes less its batch) plus, for the program that needs
most, its other arguments, temporaries and outputs not aliased to its inputs. The roofline time of a
program is the larger of its FLOPs at the chip's peak and its HBM traffic at the chip's bandwidth: a
lower bound on its step time (cost_analysis's own ``optimal_seconds`` is not used: it can come out
negative)."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import math
import os
import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import ConfigDict

from distillm_jax import generate, lora, losses, models, step
from distillm_jax import sharding as shd
from distillm_jax.config import settings
from distillm_jax.data import batching
from distillm_jax.errors import ConfigError
from distillm_jax.models import dropout, stack

GIB = 2**30
LIBTPU = "pip install 'libtpu==0.0.42.*'  (the libtpu that jax[tpu]==0.10.2 pins)"


@dataclasses.dataclass(frozen=True)
class Chip:
    """One TPU chip as a compile target: ``hbm`` is what its compiler lets a program use (slightly under
    the marketed 16 / 32 / 95 GiB), peak dense bfloat16 FLOP/s and HBM bytes/s from Google's pages."""

    kind: str  # device_kind as jax reports it
    hbm: int
    flops: float
    bandwidth: float
    source: str
    options: tuple = ()  # get_topology_desc's extra arguments
    accelerator: str = ""  # TPU_ACCELERATOR_TYPE to quiet libtpu's host probe


CHIPS = {
    "v4": Chip(
        "TPU v4",
        int(30.75 * GIB),
        2.75e14,
        1.2e12,
        "https://cloud.google.com/tpu/docs/v4",
        (("chip_config_name", "megacore"),),  # one device per chip (2 cores), as a v4 VM shows it
        "v4-8",
    ),
    "v5e": Chip(
        "TPU v5 lite",
        int(15.75 * GIB),
        1.97e14,
        8.19e11,
        "https://cloud.google.com/tpu/docs/v5e",
        (),
        "v5litepod-4",
    ),
    "v5p": Chip(
        "TPU v5", int(95.74 * GIB), 4.59e14, 2.765e12, "https://cloud.google.com/tpu/docs/v5p", (), "v5p-8"
    ),
    "v6e": Chip(
        "TPU v6 lite",
        int(31.25 * GIB),
        9.18e14,
        1.64e12,
        "https://cloud.google.com/tpu/docs/v6e",
        (),
        "v6e-4",
    ),
}


def chip(topology_name: str) -> Chip:
    prefix = topology_name.split(":")[0]
    if prefix not in CHIPS or ":" not in topology_name:
        raise ConfigError(
            f"topology {topology_name!r}: give a TPU slice as jax names it, <chip>:<shape> with chip one of "
            f"{', '.join(CHIPS)} (e.g. v5e:2x2, v5e:4x4, v4:2x2x2, v5p:2x2x4, v6e:4x4)"
        )
    return CHIPS[prefix]


def topology(name: str):
    """The topology (``.devices``) of the TPU slice ``name`` (``v5e:2x2``, ``v4:2x2x2``, ...) to compile
    for, from this host; one line naming the install when libtpu is missing."""
    c = chip(name)
    if importlib.util.find_spec("libtpu") is None:
        raise ConfigError(f"compiling for a TPU slice needs TPU's compiler: {LIBTPU}")
    # No TPU here: tell libtpu what a TPU VM's metadata would (else it logs errors while it looks), and
    # let several processes (pytest workers) load it.
    for key, value in (
        ("TPU_ACCELERATOR_TYPE", c.accelerator),
        ("TPU_WORKER_HOSTNAMES", "localhost"),
        ("TPU_SKIP_MDS_QUERY", "1"),
        ("ALLOW_MULTIPLE_LIBTPU_LOAD", "1"),
    ):
        os.environ.setdefault(key, value)
    from jax.experimental import topologies

    try:
        return topologies.get_topology_desc(topology_name=name, platform="tpu", **dict(c.options))
    except Exception as e:  # libtpu and the compiler name what they refused
        raise ConfigError(f"topology {name}: {str(e).strip().splitlines()[0]}") from None


@dataclasses.dataclass(frozen=True)
class Program:
    """One compiled program's figures per device (bytes, FLOPs) and its compile seconds; ``extra``: its
    argument bytes besides the stage's resident state (batch, prompts)."""

    name: str
    seconds: float
    arguments: int
    outputs: int
    temporaries: int
    aliased: int
    flops: float
    traffic: float  # HBM bytes accessed
    extra: int
    instructions: int = 0  # of the optimized HLO: what the compile time grows with

    def peak(self, resident: int) -> int:
        return resident + self.extra + self.temporaries + self.outputs - self.aliased


@dataclasses.dataclass(frozen=True)
class StagePlan:
    programs: list[Program]
    resident: int
    formula_flops: float  # the train step's FLOPs per device by the model formula
    tokens: int  # tokens of one train step (global micro-batch)
    devices: int
    chip: Chip
    topology: str

    @property
    def peak(self) -> int:
        return max(p.peak(self.resident) for p in self.programs)

    @property
    def fits(self) -> bool:
        return self.peak <= self.chip.hbm

    @property
    def step_seconds(self) -> float:
        """The train step's roofline time: its FLOPs at the chip's peak or its HBM traffic at the chip's
        bandwidth, whichever is longer. FLOPs are the compiler's or the model formula's, the larger: the
        chunked loss loops over a data-dependent number of chunks, a loop the compiler counts once."""
        train = self.programs[0]
        return max(
            max(train.flops, self.formula_flops) / self.chip.flops, train.traffic / self.chip.bandwidth
        )


def _compile(name: str, fn, args: tuple, states: tuple[int, ...]) -> Program:
    """``fn`` compiled for ``args`` (abstract); ``args[i]`` for ``i`` in ``states`` are the stage's
    resident state, the others (batch, prompts, key) count as the program's own, less any it does not
    read (the compiler drops those)."""
    own = [a for i, a in enumerate(args) if i not in states]
    start = time.perf_counter()
    cache = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)  # a compile-only TPU program cannot be cached
    try:
        compiled = fn.lower(*args).compile()
    except Exception as e:  # the compiler's refusal (HBM exhausted) is the finding; anything else is not
        message = str(e).strip().splitlines()[0]
        if "RESOURCE_EXHAUSTED" not in message and "exceeds" not in message:
            raise
        return Program(name, time.perf_counter() - start, 0, 0, _asked(message), 0, 0.0, 0.0, _bytes(own))
    finally:
        jax.config.update("jax_enable_compilation_cache", cache)
    seconds = time.perf_counter() - start
    read = []
    for i, (arg, formats) in enumerate(zip(args, compiled.input_formats[0], strict=True)):
        formats = jax.tree.leaves(formats, is_leaf=lambda x: hasattr(x, "layout"))
        if i not in states:
            read += [x for x, f in zip(jax.tree.leaves(arg), formats, strict=True) if f.layout is not None]
    m = compiled.memory_analysis()
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list) else cost
    return Program(
        name,
        seconds,
        m.argument_size_in_bytes,
        m.output_size_in_bytes,
        m.temp_size_in_bytes,
        m.alias_size_in_bytes,
        float(cost.get("flops", 0.0)),
        float(cost.get("bytes accessed", 0.0)),
        _bytes(read),
        compiled.as_text().count("\n"),
    )


def _asked(message: str) -> int:
    """The bytes a refused program asked for, read from the compiler's message ("... (20.44G) ...")."""
    import re

    found = re.search(r"\((\d+(?:\.\d+)?)([KMGT])\)", message)
    if not found:
        return 2**62
    return int(float(found.group(1)) * 1024 ** " KMGT".index(found.group(2)))


def _abstract(tree, shardings):
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _placed_state(state: nnx.State, mesh) -> nnx.State:
    """An abstract state in the shardings its logical axes give on ``mesh``."""
    shardings = shd.state_shardings(state, mesh)
    flat = dict(nnx.to_flat_state(shardings))

    def one(path, v):
        return v.replace(jax.ShapeDtypeStruct(v.get_value().shape, v.get_value().dtype, sharding=flat[path]))

    return nnx.from_flat_state([(path, one(path, v)) for path, v in nnx.to_flat_state(state)])


def _opt_state(tx, params, mesh):
    """The optimizer state ``step.init_opt_state`` makes: params-shaped parts (AdamW's moments,
    MultiSteps' sums) in the params' shardings, the rest (counters) replicated."""
    shape, tree = jax.tree.structure(params), jax.eval_shape(tx.init, params)
    replicated = NamedSharding(mesh, PartitionSpec())

    def place(node):
        if jax.tree.structure(node) == shape:
            return _abstract(node, jax.tree.map(lambda p: p.sharding, params))
        return jax.ShapeDtypeStruct(node.shape, node.dtype, sharding=replicated)

    return jax.tree.map(place, tree, is_leaf=lambda n: jax.tree.structure(n) == shape)


def _model(spec: settings.ModelSpec, hf, trainable: bool) -> nnx.Module:
    """The shape-only model ``run.build.build_model`` would build from ``spec``."""
    from distillm_jax.run.build import model_dtypes

    dtype, param_dtype = model_dtypes(spec, trainable)
    model = models.abstract_model(hf, param_dtype, dtype=dtype, dropout=spec.dropout)
    lo = spec.lora
    if trainable and lo.rank:
        lora.apply(
            model, rank=lo.rank, alpha=lo.alpha, dropout=lo.dropout, targets=lo.targets, seed=spec.seed
        )
    return stack.configure(model, spec.layers)


def _bytes(tree) -> int:
    """Bytes of one device's shard of every leaf."""
    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        key = jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
        total += math.prod(shard) * (8 if key else jnp.dtype(x.dtype).itemsize)  # a threefry key: 2 words
    return total


def _host_batch(s: settings.RunSettings, rows: int, encoder_decoder: bool) -> dict:
    pairs = [([1, 1], [1, 1])] * rows
    if encoder_decoder:
        return batching.encoder_decoder_batch(pairs, s.data.lengths, pad=0, start=0)
    return batching.decoder_only_batch(pairs, s.data.lengths, pad=0)


def _on_mesh(batch: dict, mesh) -> dict:
    def put(x):
        if isinstance(x, dict):
            return {k: put(v) for k, v in x.items()}
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=shd.batch_sharding(mesh, x.ndim))

    return put(batch)


def _counts(state: nnx.State) -> tuple[int, int]:
    """(encoder, rest) parameter counts of a model."""
    enc = rest = 0
    for path, v in nnx.to_flat_state(state):
        n = math.prod(v.get_value().shape)
        if path and path[0] == "encoder":
            enc += n
        else:
            rest += n
    return enc, rest


def formula_flops(
    s: settings.RunSettings, student: tuple, teacher: tuple | None, rows: int, batches: int
) -> float:
    """The train step's FLOPs by the model formula: 2·N per token forward (a weight's multiply-add),
    3× that for the trained student (forward + both backward products; LoRA: 2×, no weight gradients),
    the frozen teacher forward only; plus attention's scores and weighted sums, 4·T·d per token and
    layer forward. Encoder weights see the prompt's tokens, the rest the decoder's."""
    p, total = s.data.lengths.max_prompt_length, s.data.lengths.max_length

    def forward(model) -> float:  # (module, its HF config)
        d = models.dims(model[1])
        enc, rest = _counts(nnx.state(model[0], nnx.Param))
        t = total - p if d.enc_dec else total
        attention = 4 * (d.enc_layers * p * p + d.layers * t * (t + (p if d.enc_dec else 0))) * d.d
        return rows * (2 * enc * p + 2 * rest * t + attention)

    trained = 2.0 if s.student.lora.rank else 3.0
    out = trained * forward(student)
    if teacher is not None and s.loss.kd_ratio > 0:
        out += forward(teacher)
    return out * batches


def plan_stage(config: ConfigDict, topology_name: str, *, depth: dict[str, int] | None = None) -> StagePlan:
    """Compile every program of one stage (a checked stage config) for the slice ``topology_name``.

    The compiler's cost analysis counts a loop's body once, so a scanned stack's FLOPs and HBM traffic
    are those of one layer: they are then measured on the same step with its stacks looped at 1 and 2
    layers (``depth``: only the train step, each role's layer count) and extrapolated to the full depth,
    exactly, since every layer costs the same and the rest does not change."""
    slice_ = topology(topology_name)
    devices = slice_.devices
    target = chip(topology_name)
    from jax.experimental import topologies

    sizes = shd.mesh_sizes(**config.mesh, devices=len(devices))
    mesh = topologies.make_mesh(slice_, sizes, shd.MESH_AXES)
    student_hf = models.spec_config(config.student, planning=True)
    vocab = models.dims(student_hf).vocab
    s = settings.build(config, vocab)
    if config.loss.chunk_size < 0 and s.method.chunked:  # the run's default form on a TPU
        s = dataclasses.replace(
            s,
            loss=dataclasses.replace(
                s.loss, chunk_size=losses.auto_chunk_size(vocab, s.student.dtype, "tpu")
            ),
        )
    teacher_hf = models.spec_config(config.teacher, planning=True) if s.method.teacher else None
    if depth is not None:  # looped, at these depths
        student_hf, teacher_hf = _deeper(student_hf, depth["student"]), _deeper(teacher_hf, depth["teacher"])
        looped = {
            r: dataclasses.replace(
                getattr(s, r), layers=dataclasses.replace(getattr(s, r).layers, scan=False)
            )
            for r in ("student", "teacher")
        }
        s = dataclasses.replace(s, **looped)
    student = _model(s.student, student_hf, trainable=True)
    teacher = None if teacher_hf is None else _model(s.teacher, teacher_hf, trainable=False)
    enc_dec = hasattr(student, "encode")

    s_graph, params, frozen = step.split_student(student)
    params, frozen = _placed_state(params, mesh), _placed_state(frozen, mesh)
    t_graph = None if teacher is None else nnx.graphdef(teacher)
    t_state = None if teacher is None else _placed_state(nnx.state(teacher), mesh)
    tx = s.optim.adamw(1000)
    opt_state = _opt_state(tx, params, mesh)

    micro = s.optim.batch_size // s.optim.grad_accum
    host = s.method.batch_like(_host_batch(s, micro, enc_dec))
    if s.loss.lm_coef > 0:
        host["lm"] = batching.text_batch([[1, 1]] * micro, s.data.lengths.max_length, 0)
    batch = _on_mesh(host, mesh)
    batches = sum(1 for b in (host, *host.values()) if isinstance(b, dict) and "labels" in b)
    key = None
    if s.method.dropout and dropout.active(student):
        key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=NamedSharding(mesh, PartitionSpec()))
    resident_args = (params, opt_state, frozen, t_state)
    train = step.jit_train_step(
        s_graph, t_graph, tx, s.loss, jax.tree.map(lambda x: x.sharding, (params, opt_state))
    )
    programs = [_compile("train step", train, (*resident_args, batch, key), (0, 1, 2, 3))]
    if depth is not None:
        return StagePlan(programs, 0, 0.0, 0, len(devices), target, topology_name)
    scanned = s.student.layers.scan or (teacher is not None and s.teacher.layers.scan)
    if scanned and programs[0].arguments:
        programs[0] = _at_full_depth(programs[0], config, topology_name, student_hf, teacher_hf)
    resident = programs[0].arguments - programs[0].extra
    if not programs[0].arguments:  # refused: count the states exactly instead
        resident = _bytes(resident_args)
    evaluation = step.jit_eval_step(s_graph, t_graph, s.loss)
    eval_batch = _on_mesh(_host_batch(s, s.eval.batch_size, enc_dec), mesh)
    programs.append(_compile("eval step", evaluation, (params, frozen, t_state, eval_batch), (0, 1, 2)))
    programs += _samplers(s, mesh, student, teacher, micro)
    flops = formula_flops(s, (student, student_hf), teacher and (teacher, teacher_hf), micro, batches)
    tokens = micro * s.data.lengths.max_length
    return StagePlan(programs, resident, flops / len(devices), tokens, len(devices), target, topology_name)


def _deeper(hf, layers: int):
    """A copy of a transformers config with ``layers`` layers in each of its stacks."""
    if hf is None:
        return None
    hf = copy.deepcopy(hf)
    for name in ("n_layer", "num_hidden_layers", "num_layers", "num_decoder_layers"):
        if hasattr(hf, name):
            setattr(hf, name, layers)
    return hf


def _at_full_depth(train: Program, config: ConfigDict, topology_name: str, student_hf, teacher_hf) -> Program:
    """The scanned train step's FLOPs and HBM traffic at its models' full depth (``plan_stage``)."""

    def cost(student: int, teacher: int) -> tuple[float, float]:
        p = plan_stage(config, topology_name, depth={"student": student, "teacher": teacher}).programs[0]
        return (p.flops, p.traffic) if p.arguments else (math.nan, math.nan)  # nan: refused

    base = cost(1, 1)
    per_student = [b - a for a, b in zip(base, cost(2, 1), strict=True)]
    per_teacher = [b - a for a, b in zip(base, cost(1, 2), strict=True)] if teacher_hf is not None else [0, 0]
    if any(math.isnan(x) for x in (*base, *per_student, *per_teacher)):
        return train
    n_s = models.dims(student_hf).layers
    n_t = models.dims(teacher_hf).layers if teacher_hf is not None else 1
    flops, traffic = (
        b + (n_s - 1) * ps + (n_t - 1) * pt for b, ps, pt in zip(base, per_student, per_teacher, strict=True)
    )
    return dataclasses.replace(train, flops=flops, traffic=traffic)


def _samplers(s: settings.RunSettings, mesh, student, teacher, micro: int) -> list[Program]:
    """The stage's generation loops: the student's evaluation sampler (when the metric is generated)
    and the method's own (``Method.samplers``), each at its rows and new tokens."""
    nets = {"student": student, "teacher": teacher}
    wanted = []
    if s.eval.generate:
        wanted.append(
            ("eval sampler", ("student",), s.eval.batch_size, s.new_tokens(s.eval), s.eval.sampling)
        )
    for held in s.method.samplers:
        wanted.append((f"{'+'.join(held)} sampler", held, micro, s.new_tokens(s.sgo), s.sgo.sampling))
    out = []
    for name, held, rows, n_new, sampling in wanted:
        if any(nets[h] is None for h in held):
            continue
        model = nets[held[0]]
        decode = generate.Decode(n_new, sampling, 1, 0, 0, 0, generate.segment_ends(n_new))
        graph, state = nnx.split(model)
        state = _placed_state(state, mesh)
        p = s.data.lengths.max_prompt_length
        rows_sharding = shd.batch_sharding(mesh)
        if rows % (mesh.shape["data"] * mesh.shape["fsdp"]):
            rows_sharding = NamedSharding(mesh, PartitionSpec())
        prompt = jax.ShapeDtypeStruct((rows, p), jnp.int32, sharding=rows_sharding)
        key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=NamedSharding(mesh, PartitionSpec()))
        mixer, mix_graph = None, None
        if len(held) > 1:
            mix_graph, mix_state = nnx.split(nets[held[1]])
            alpha = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, PartitionSpec()))
            mixer = (_placed_state(mix_state, mesh), alpha)
        fn = generate._compiled(graph, hasattr(model, "encode"), decode, rows_sharding, mix_graph)
        out.append(_compile(name, fn, (state, prompt, prompt, key, mixer), (0, 4)))
    return out


def report(plan: StagePlan, config: ConfigDict) -> str:
    """A stage's programs as a table (per device), its peak against the chip's HBM and the planner's
    estimate beside it."""
    from distillm_jax.config import planner

    c = plan.chip
    unit, u = (GIB, "GiB") if plan.peak >= GIB else (2**20, "MiB")
    fl, f = (1e12, "TFLOP") if plan.programs[0].flops >= 1e12 else (1e9, "GFLOP")
    lines = [
        f"  {'program':<22} {'compile s':>9} {'args ' + u:>9} {'temp ' + u:>9} {'out ' + u:>9} "
        f"{'peak ' + u:>9} {f:>9} {'roofline ms':>11}"
    ]
    for i, p in enumerate(plan.programs):
        sizes = " ".join(
            f"{n / unit:9.2f}" for n in (p.arguments, p.temporaries, p.outputs, p.peak(plan.resident))
        )
        refused = "  refused by the compiler: HBM exhausted" if not p.arguments else ""
        # Only the train step's cost is counted whole: the others loop (decode steps, a scanned stack),
        # and a loop's body is counted once.
        cost = f"{p.flops / fl:9.3f} {plan.step_seconds * 1e3:11.2f}" if i == 0 else f"{'-':>9} {'-':>11}"
        lines.append(f"  {p.name:<22} {p.seconds:9.1f} {sizes} {cost}{refused}")
    train = plan.programs[0]
    estimate = planner.plan(config, plan.devices)["total"]
    lines += [
        f"  resident (params, optimizer state, teacher): {plan.resident / unit:.2f} {u} per device",
        f"  peak per device: {plan.peak / unit:.2f} {u} of {c.hbm / GIB:.2f} GiB ({c.kind}): "
        + ("fits" if plan.fits else "does NOT fit"),
        f"  planner's estimate: {estimate / unit:.2f} {u} "
        f"({(estimate / plan.peak - 1) * 100:+.0f} % against the compiler)",
        f"  train step FLOPs per device: {train.flops / fl:.3f} {f} by the compiler, "
        f"{plan.formula_flops / fl:.3f} {f} by the model formula",
    ]
    if train.arguments:
        seconds = plan.step_seconds
        lines.append(
            f"  train step roofline: {seconds * 1e3:.2f} ms (the larger FLOPs at {c.flops / 1e12:.0f} "
            f"TFLOP/s, HBM traffic at {c.bandwidth / 1e9:.0f} GB/s): at most {plan.tokens / seconds:,.0f} "
            f"tokens/s on {plan.devices} chips"
        )
    return "\n".join(lines)


def advice(plan: StagePlan, config: ConfigDict, role: str = "student") -> str:
    """The change that makes a stage fit its slice, found by compiling it: rematerialisation, then
    smaller micro-batches; else the chips its resident state alone needs. ``role``: the config group the
    stage trains (a teacher's SFT stage trains ``teacher`` as its student)."""
    c = plan.chip
    need = f"needs {plan.peak / GIB:.2f} GiB per device, more than the {c.hbm / GIB:.2f} GiB of a {c.kind}"
    o = config.optim
    data, fsdp, _ = shd.mesh_sizes(**config.mesh, devices=plan.devices)
    remat = {} if config.student.remat != "none" else {"remat": "full"}
    tries = [(f"{role}.remat=full", remat, {})] if remat else []
    for accum in (o.grad_accum * k for k in (2, 4, 8)):
        if o.batch_size % accum == 0 and (o.batch_size // accum) % (data * fsdp) == 0:
            label = f"optim.grad_accum={accum}"
            tries.append((f"{role}.remat=full and {label}" if remat else label, remat, {"grad_accum": accum}))
    for label, student, optim in tries:
        changed = ConfigDict(config.to_dict())
        changed.student.update(student)
        changed.optim.update(optim)
        fitted = plan_stage(changed, plan.topology)
        if fitted.fits:
            return f"{need}: {label} makes it fit ({fitted.peak / GIB:.2f} GiB, compiled); or a larger slice"
    chips = math.ceil(plan.devices * plan.resident / (0.8 * c.hbm))
    return (
        f"{need}, with rematerialisation and micro-batches down to one row per data shard: its params and "
        f"optimizer state alone need about {chips} chips (mesh.fsdp over a larger slice), or train LoRA "
        f"adapters ({role}.lora.rank), or keep params in bfloat16 ({role}.param_dtype)"
    )
