"""The paper's pipeline as one command (``launch/train.py``): every stage is a run of ``trainer.train`` in
its own folder under ``run_dir``; a stage whose result exists is skipped, a stopped one continues from its
last checkpoint, so the same command, killed anywhere, picks up where it stopped.

1. ``teacher``: SFT of the teacher on the task (``teacher.train_steps`` / ``train_epochs`` > 0), from its
   pretrained checkpoint (``teacher.path``) or a new model (``teacher.config``) -> ``run_dir/teacher``.
2. ``student_sft``: the student's "init", SFT the same way (``student.train_*``) -> ``run_dir/student_sft``.
   Both keep the checkpoint with the best validation CE (``best/``), as the paper's init.
3. ``distill``: the configured method from them -> ``run_dir``; then each method of ``compare`` (e.g.
   ``kd``: the same loss on ground truth only; ``sft``) for the same steps from the same init ->
   ``run_dir/<method>``.
4. ``test``: teacher, init and every trained student (its ``best/``) on ``data.test_split`` and on each of
   ``data.test_sets``, sampled with every seed of ``eval.seeds``: a table of mean ± std per set, with
   each student's batch sources and final φ -> ``run_dir/test.json`` (``test_<set>.json`` for the others).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os

import jax
from ml_collections import ConfigDict

from distillm_jax import config as cfglib
from distillm_jax import methods, reporting, storage, trainer
from distillm_jax.config import planner, preflight
from distillm_jax.run import lock as runlock
from distillm_jax.run.folder import STAGES, RunDir
from distillm_jax.trainer import override

ROLES = ("teacher", "student")
RESULTS = {"teacher": "teacher_sft", "student_sft": "student_sft", "distill": "student"}  # else: the method


@dataclasses.dataclass(frozen=True)
class Stage:
    """A training stage: its name and the config it runs with (its ``run_dir`` is where it writes)."""

    name: str
    config: ConfigDict

    @property
    def done(self) -> bool:
        """Finished: its summary is written and no checkpoint is older than it says (a folder whose later
        checkpoints were removed, to go back, is continued from the latest one left)."""
        folder = self.folder
        if not storage.exists(folder.summary):
            return False
        steps = json.loads(storage.read_text(folder.summary)).get("steps", 0)
        saved = folder.checkpoint_steps()
        return not saved or saved[-1] >= steps

    @property
    def folder(self) -> RunDir:
        return RunDir(self.config.run_dir)


def trains_first(spec: ConfigDict) -> bool:
    """The spec has an SFT stage that later stages start from: none for ``student.start`` "pretrained",
    nor for a checkpoint marked ``tuned`` (already fine-tuned on the task: used as it is)."""
    if spec.tuned and spec.path:
        return False
    return bool(spec.train_steps or spec.train_epochs) and spec.get("start", "init") == "init"


def sft_config(c: ConfigDict, role: str) -> ConfigDict:
    """The SFT stage of ``role``: its spec trained as the student, CE only, checkpoints chosen by the
    validation CE (no sampling during SFT)."""
    spec = c[role]
    sub = override(
        c,
        run_dir=RunDir(c.run_dir).stage(STAGES[role]).path,
        method="sft",
        compare=(),
        compare_sft=False,
        student=ConfigDict(spec.to_dict()),
        optim__steps=spec.train_steps or c.optim.steps,
        optim__epochs=0 if spec.train_steps else spec.train_epochs,
        optim__lr=spec.train_lr or c.optim.lr,
        optim__end_lr=min(c.optim.end_lr, spec.train_lr or c.optim.lr),  # a constant rate stays constant
        data__max_train_rows=spec.train_rows or c.data.max_train_rows,
        eval__generate=False,
        data__test_split="",
        loss__lm_coef=0.0,
    )
    sub.student.train_steps, sub.student.train_epochs, sub.student.train_lr = 0, 0, 0.0
    sub.student.train_rows = 0
    return sub


def _trained(c: ConfigDict, role: str, *, planning: bool = False) -> ConfigDict:
    """``c`` with ``role`` pointing at its SFT stage's best checkpoint (``planning``: at the model it
    starts from, which has the same shapes, since that checkpoint does not exist yet)."""
    changes = {f"{role}__train_steps": 0, f"{role}__train_epochs": 0, f"{role}__tuned": True}
    if not planning:
        changes[f"{role}__path"] = RunDir(c.run_dir).stage(STAGES[role]).best
    return override(c, **changes)


def stages(config: ConfigDict, *, planning: bool = False) -> list[Stage]:
    """Every training stage of ``config``, in order, each with the config it runs with (``planning``: as
    the memory planner reads them, before any stage has run)."""
    out, c = [], config
    for role in ROLES:
        if role not in cfglib.roles(config):
            continue
        if trains_first(config[role]):
            out.append(Stage(STAGES[role], sft_config(config, role)))
            c = _trained(c, role, planning=planning)
    out.append(Stage("distill", c))
    for method in cfglib.compared(c)[1:]:
        folder = RunDir(c.run_dir).stage(method).path
        arm = override(c, run_dir=folder, method=method, compare=(), compare_sft=False)
        out.append(Stage(method, arm))
    return out


def result_key(stage: str) -> str:
    return RESULTS.get(stage, stage)


def sft_first(c: ConfigDict, role: str, results: dict) -> ConfigDict:
    """Run (or reuse) the SFT stage of ``role``; return ``c`` pointing at its result."""
    stage = Stage(STAGES[role], sft_config(c, role))
    results[result_key(stage.name)] = _run_stage(stage, 1, 1)
    return _trained(c, role)


def _run_stage(stage: Stage, index: int, count: int) -> dict:
    c, lead = stage.config, jax.process_index() == 0
    if stage.done:
        if lead:
            print(f"stage {index}/{count} {stage.name}: done before, in {c.run_dir}")
        return json.loads(storage.read_text(stage.folder.summary))
    if lead:
        what = c.method if methods.get(c.method).teacher else "SFT"
        print(f"stage {index}/{count} {stage.name}: {what} -> {c.run_dir}")
    # The run folder's config was checked (run_config.json): a stage continues what it finds, or starts.
    staged = override(c, resume=True, start_if_empty=True)
    return trainer.train_checked(staged, stage=f"{index}/{count} {stage.name}")


OWN = ("resume", "start_if_empty", "distributed")  # how this process was started, not what the run is
# how a stage ran, not what it made (``compare``: which other stages there are)
HOW = (*OWN, "mesh", "checkpoint", "log_interval", "compare", "compare_sft")
UNREAD_BY_SFT = ("loss", "offpolicy", "teacher")  # and every method's own group (``Method.group``)


def _plain(config: dict, drop: tuple[str, ...]) -> dict:
    """A config as its JSON record holds it (tuples as lists), without the keys ``drop``."""
    return json.loads(json.dumps({k: v for k, v in config.items() if k not in drop}, default=list))


def _check_same_run(c: ConfigDict) -> bool:
    """The run folder keeps the config it was started with; the same command continues it. Another
    config is refused, unless ``resume=True`` says to continue with it, and never where a stage it
    changes has finished (resume does not redo a finished stage: it would be skipped as "done before"
    and the old results shown as the new ones). A folder holding a run not started by this command is
    refused; so is ``resume=True`` with nothing to continue (``start_if_empty`` starts). A record with
    nothing of a run beside it is a first start that failed, not a run. Returns whether this start
    made the record (``_undo`` takes it back if the start fails before any stage has written)."""
    path = RunDir(c.run_dir).run_config
    mine = _plain(c.to_dict(), OWN)
    preflight.writable(RunDir(c.run_dir))
    found = _found(c)
    recorded = storage.exists(path) and bool(found)
    if not recorded:  # not started by this pipeline (or not at all)
        preflight.reuse(c, found, bool(found), "holds no run to continue")
    else:
        theirs = json.loads(storage.read_text(path))
        diff = _differences(theirs, mine)
        finished = _finished_otherwise(c, theirs) if diff else ""
        if finished:
            raise cfglib.ConfigError(
                f"{c.run_dir} holds a run of another config ({diff}) whose stage {finished} has finished; "
                "a finished stage is not redone, so these settings cannot continue it: choose another run_dir"
            )
        if diff and not c.resume:
            raise cfglib.ConfigError(
                f"{c.run_dir} holds a run of another config ({diff}); choose another run_dir, or pass "
                "--config.resume=True to continue it with these settings"
            )
    if jax.process_index() == 0:
        storage.write(path, json.dumps(mine, indent=1, sort_keys=True))
    return not recorded


def _folders(c: ConfigDict) -> list[str]:
    """The run folder and each stage's."""
    return list(dict.fromkeys([c.run_dir, *(stage.config.run_dir for stage in stages(c))]))


def _found(c: ConfigDict) -> list[str]:
    """What of a run the folders of ``c`` hold."""
    return [part for folder in _folders(c) for part in _held_in(folder, c.run_dir)]


def _finished_otherwise(c: ConfigDict, theirs: dict) -> str:
    """The first stage (or ``test``) that has finished under the recorded config ``theirs`` and would
    run otherwise under ``c``; "" if none."""
    old = _merged(c.to_dict(), theirs)  # keys the record lacks (an older version's) take today's values
    try:
        old_c = ConfigDict(old)
        before = {stage.name: _made_of(stage) for stage in stages(old_c)}
        old_test = _test_spec(old_c)
    except Exception:  # a record this version cannot read as a config: every stage counts as changed
        before, old_test = {}, None
    for stage in stages(c):
        if stage.done and before.get(stage.name) != _made_of(stage):
            return stage.name
    if storage.exists(RunDir(c.run_dir).test()) and old_test != _test_spec(c):
        return "test"
    return ""


def _made_of(stage: Stage) -> dict:
    """The settings a stage's result depends on (an SFT stage reads no teacher, loss or SGO settings)."""
    c = stage.config
    unread = UNREAD_BY_SFT + tuple(m.group for m in methods.REGISTRY.values() if m.group)
    made = _plain(c.to_dict(), HOW + (unread if not methods.get(c.method).teacher else ()))
    for group, key in (("eval", "seeds"), ("data", "test_split"), ("data", "test_sets")):  # the test's
        made[group].pop(key, None)
    return made


def _merged(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = (
            _merged(base[key], value)
            if isinstance(value, dict) and isinstance(base.get(key), dict)
            else value
        )
    return out


def _test_spec(c: ConfigDict) -> str:
    """What the test stage's tables depend on."""
    spec = {"arms": cfglib.compared(c), "sets": cfglib.test_sets(c), "eval": c.eval.to_dict()}
    return json.dumps(spec, sort_keys=True, default=list)


def _undo(c: ConfigDict, created: list[str]) -> None:
    """A first start that failed before any stage wrote: its record and the empty folders it made go,
    so the folder is as before (and the corrected command is not refused as another config)."""
    if jax.process_index() or _found(c):
        return
    with contextlib.suppress(FileNotFoundError):
        storage.remove(RunDir(c.run_dir).run_config)
    for folder in sorted(created, key=len, reverse=True):
        with contextlib.suppress(OSError):
            if not storage.is_remote(folder):  # a bucket has no empty folders to remove
                os.rmdir(folder)  # only if empty


def _held_in(stage_dir: str, run_dir: str) -> list[str]:
    """What of a run ``stage_dir`` holds, named from ``run_dir``."""
    rel = stage_dir[len(run_dir) :].strip("/") if stage_dir.startswith(run_dir) else stage_dir
    return [f"{rel}/{name}" if rel else name for name in RunDir(stage_dir).held()]


def _differences(a, b, prefix: str = "") -> str:
    """The first few keys where two nested dicts differ, as ``key: old -> new``."""
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            sub = _differences(x, y, f"{prefix}{key}.")
            out += [sub] if sub else []
        elif x != y:
            out.append(f"{prefix}{key}: {x!r} -> {y!r}")
    return "; ".join(out[:3])


def _note_skipped(c: ConfigDict) -> None:
    """Say which configured SFT stages do not run, and why (a tuned checkpoint; a teacher no method reads)."""
    if jax.process_index():
        return
    for role in ROLES:
        spec = c[role]
        if not (spec.train_steps or spec.train_epochs):
            continue
        asked = (
            f"{role}.train_steps={spec.train_steps}"
            if spec.train_steps
            else f"{role}.train_epochs={spec.train_epochs}"
        )
        if role not in cfglib.roles(c):
            print(f"note: no method of this run reads the teacher: its SFT stage ({asked}) is skipped")
        elif spec.tuned and spec.path:
            print(
                f"note: {role}.tuned=True: {spec.path} is used as it is; its SFT stage ({asked}) is skipped"
            )


def _warn_untuned_teacher(c: ConfigDict) -> None:
    if not methods.get(c.method).teacher or c.teacher.tuned or trains_first(c.teacher) or jax.process_index():
        return
    print(
        f"warning: the teacher ({c.teacher.path or 'a new model'}) was not fine-tuned on {c.data.task}: the "
        "paper distils from a task-tuned teacher; set teacher.train_epochs (an SFT stage first) or point "
        "teacher.path at a fine-tuned checkpoint with teacher.tuned=True"
    )


def run(config: ConfigDict) -> dict:
    """The whole pipeline of ``config``; returns each stage's summary (and ``test``: the test table's
    scores)."""
    cfglib.check(config)
    preflight.mesh_and_batch(config)
    _warn_if_too_big(config)
    planned = next(stage.config for stage in stages(config, planning=True) if stage.name == "distill")
    tokenizer = preflight.tokenizers(planned)  # of the models the stages start from: files, no weights
    preflight.model_configs(planned, cfglib.roles(config), len(tokenizer))
    # the local folders this start makes (``_undo``); a bucket has none to make, and is not asked before
    # ``writable`` has said in one line whether it can be written at all
    created = [f for f in _folders(config) if not storage.is_remote(f) and not os.path.exists(f)]
    folder = RunDir(config.run_dir)
    preflight.writable(folder)
    fresh = False
    try:
        with runlock.hold(folder):
            fresh = _check_same_run(config)  # last of the checks: it records the run's config in its folder
            return _stages(config)
    except BaseException:
        if fresh:
            _undo(config, created)
        raise


def _stages(config: ConfigDict) -> dict:
    """Every stage of a checked ``config``, then the tables."""
    _note_skipped(config)
    _warn_untuned_teacher(config)
    todo = stages(config)
    count = len(todo) + bool(cfglib.test_sets(config))
    results = {}
    for i, stage in enumerate(todo, 1):
        results[result_key(stage.name)] = _run_stage(stage, i, count)
        if "stopped_at" in results[result_key(stage.name)]:  # SIGTERM: saved; the same command continues
            return results
    distilled = next(stage.config for stage in todo if stage.name == "distill")
    arms = cfglib.compared(config)
    if len(arms) > 1:  # the teacher beside the students, on the same rows
        seed = config.seed * 1000 + results["student"]["steps"]  # as the students' final evaluation
        teacher = override(distilled, student=ConfigDict(distilled.teacher.to_dict()), method="sft")
        teacher.student.lora.rank = 0
        results["teacher"] = {"final": trainer.evaluate_model(teacher, (seed,))}
    if jax.process_index() == 0 and len(arms) > 1:  # the demo's table, on the validation rows
        print(comparison(results, arms[1:]))
    sets = cfglib.test_sets(config)
    if sets:  # the task's own test set, and the others by name
        scores = test(config, distilled, count, results)
        results["test"] = scores.pop(sets[0][0])
        if scores:
            results["test_sets"] = scores
    if jax.process_index() == 0 and len(arms) > 1:
        print(ONE_RUN)
    return results


ONE_RUN = (
    "note: one training run per method. The ± above is over sampling seeds only; another training seed "
    "(or another machine's float rounding) moves each method by more than that, so these figures rank "
    "no method. bench/evidence.py compares methods over paired training seeds, with intervals "
    "(BENCHMARKS.md, 'Does DistiLLM pay off here?')."
)


def stopped(results: dict) -> bool:
    """The pipeline stopped on a signal (its stage saved): the same command continues it."""
    return any(isinstance(v, dict) and "stopped_at" in v for v in results.values())


def test(config: ConfigDict, distilled: ConfigDict, index: int, results: dict | None = None) -> dict:
    """Stage 4: each model of the pipeline on every test set, over ``eval.seeds``: ``{set: {model:
    scores}}``, the task's own set cached in ``test.json``, the others in ``test_<set>.json``, each as
    soon as it is complete, so a stopped stage continues with the next set."""
    lead, seeds = jax.process_index() == 0, tuple(config.eval.seeds)
    sets = cfglib.test_sets(config)
    out: dict = {}
    for k, (name, source, split) in enumerate(sets):
        path = RunDir(config.run_dir).test("" if k == 0 else name)
        if storage.exists(path):
            if lead:
                print(f"stage {index}/{index} test {name}: done before ({path})")
            scores = json.loads(storage.read_text(path))
        else:
            if lead:
                print(f"stage {index}/{index} test {name}: {split} over seeds {seeds} -> {path}")
            scores = {}
            for model, role, where in _test_models(config, distilled):
                spec = ConfigDict(distilled[role].to_dict())
                spec.path, spec.lora.rank = where, 0  # exports are merged checkpoints
                c = override(distilled, student=spec, method="sft")
                c.data.source = source
                c.data.valid_split, c.data.max_valid_rows = split, 0
                scores[model] = trainer.evaluate_model(c, seeds)
            if lead:
                storage.write(path, json.dumps(scores, indent=1))
        if lead:
            print(test_table(scores, config, results or {}, f"{name}: {split}"))
        out[name] = scores
    return out


def _test_models(config: ConfigDict, distilled: ConfigDict) -> list[tuple[str, str, str]]:
    """(name, spec role, checkpoint) of every model the test stage scores."""
    arms = cfglib.compared(config)
    out = [("teacher", "teacher", distilled.teacher.path)] if "teacher" in cfglib.roles(config) else []
    out.append(("student init", "student", distilled.student.path))
    folder = RunDir(config.run_dir)
    out.append((f"student {distilled.method}", "student", folder.best))
    out += [(f"student {m}", "student", folder.stage(m).best) for m in arms[1:]]
    return [x for x in out if x[2]]


def test_table(scores: dict, config: ConfigDict, results: dict, title: str = "") -> str:
    """One test set's scores, and for each trained student how its steps were fed (``results``: the
    stages' summaries)."""
    metric = next(k for k in next(iter(scores.values())) if k not in ("val_ce", "scores") and "_std" not in k)
    seeds = len(tuple(config.eval.seeds))
    rows = [("model", f"{metric} (mean ± std, {seeds} seeds)", "test CE", *FED)]
    trained = {f"student {m}": "student" if m == config.method else m for m in cfglib.compared(config)}
    for name, s in scores.items():
        fed = fed_by(results.get(trained.get(name, ""), {}))
        rows.append((name, f"{s[metric]:.2f} ± {s[metric + '_std']:.2f}", f"{s['val_ce']:.4f}", *fed))
    return f"test ({title or config.data.test_split}):\n" + reporting.table(rows)


FED = ("steps data / SGO / replay", "final φ")


def fed_by(summary: dict) -> tuple[str, str]:
    """A student's batch sources (steps on ground truth, fresh SGOs, replayed SGOs) and final φ, for the
    tables ("" for a model that was not trained here)."""
    src = summary.get("sources")
    if not src:
        return "", ""
    adaptive = methods.get(summary.get("method", "sft")).adaptive
    phi = summary.get("phi") if adaptive else None  # the adaptive scheduler's
    return f"{src['data']} / {src['sgo']} / {src['replay']}", "" if phi is None else f"{phi:g}"


def _warn_if_too_big(c: ConfigDict) -> None:
    """The memory planner's verdict before anything is loaded, on devices that report their memory
    (a warning: its activation figures are estimates; ``launch/plan.py`` shows the parts)."""
    memory = planner.device_memory()
    if memory is None or jax.process_index() != 0:
        return
    for stage in stages(c, planning=True):
        try:
            parts = planner.plan(stage.config, jax.device_count())
        except (OSError, ValueError):  # e.g. a hub id without the hub: the run itself will say
            return
        if not planner.fits(parts, memory):
            print(f"warning: stage {stage.name}: {planner.advice(parts, memory)} (python launch/plan.py)")


def comparison(results: dict, arms: list[str]) -> str:
    """Teacher / student before / distilled / each compared method on the task metric and validation CE
    (the final evaluation's seed), with each student's batch sources and final φ."""
    s = results["student"]
    metric = s["metric"]
    rows = [("model", metric, "val_ce", *FED)]

    def add(name, m, summary=None):
        value = lambda k: f"{m.get(k, float('nan')):.{2 if k == metric else 4}f}"  # noqa: E731
        rows.append((name, value(metric), value("val_ce"), *fed_by(summary or {})))

    teacher = results.get("teacher")
    if teacher is not None:
        add("teacher", teacher["final"])
    add("student before", s["initial"])
    for summary in [s] + [results[m] for m in arms]:
        add(f"student {summary['method']} ({summary['loss']})", summary["final"], summary)
    return "validation (the run's seed):\n" + reporting.table(rows)
