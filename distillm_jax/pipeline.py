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

import dataclasses
import json
import os

import jax
from ml_collections import ConfigDict

from distillm_jax import config as cfglib
from distillm_jax import methods, planner, preflight, reporting, trainer
from distillm_jax.trainer import override

ROLES = ("teacher", "student")
STAGE_DIRS = {"teacher": "teacher", "student": "student_sft"}
RESULTS = {"teacher": "teacher_sft", "student_sft": "student_sft", "distill": "student"}  # else: the method
RUN_CONFIG = "run_config.json"  # the config the run folder was started with


@dataclasses.dataclass(frozen=True)
class Stage:
    """A training stage: its name and the config it runs with (its ``run_dir`` is where it writes)."""

    name: str
    config: ConfigDict

    @property
    def done(self) -> bool:
        """Finished: its summary is written and no checkpoint is older than it says (a folder whose later
        checkpoints were removed, to go back, is continued from the latest one left)."""
        path = os.path.join(self.config.run_dir, "summary.json")
        if not os.path.exists(path):
            return False
        with open(path) as f:
            steps = json.load(f).get("steps", 0)
        ckpts = os.path.join(self.config.run_dir, "checkpoints")
        saved = [int(d) for d in os.listdir(ckpts) if d.isdigit()] if os.path.isdir(ckpts) else []
        return not saved or max(saved) >= steps


def trains_first(spec: ConfigDict) -> bool:
    """The spec has an SFT stage that later stages start from (``student.start`` "pretrained": none)."""
    return bool(spec.train_steps or spec.train_epochs) and spec.get("start", "init") == "init"


def sft_config(c: ConfigDict, role: str) -> ConfigDict:
    """The SFT stage of ``role``: its spec trained as the student, CE only, checkpoints chosen by the
    validation CE (no sampling during SFT)."""
    spec = c[role]
    sub = override(
        c,
        run_dir=os.path.join(c.run_dir, STAGE_DIRS[role]),
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
        changes[f"{role}__path"] = os.path.join(c.run_dir, STAGE_DIRS[role], "best")
    return override(c, **changes)


def stages(config: ConfigDict, *, planning: bool = False) -> list[Stage]:
    """Every training stage of ``config``, in order, each with the config it runs with (``planning``: as
    the memory planner reads them, before any stage has run)."""
    out, c = [], config
    for role in ROLES:
        if trains_first(config[role]):
            out.append(Stage(STAGE_DIRS[role], sft_config(config, role)))
            c = _trained(c, role, planning=planning)
    out.append(Stage("distill", c))
    for method in cfglib.compared(c)[1:]:
        arm = override(
            c, run_dir=os.path.join(c.run_dir, method), method=method, compare=(), compare_sft=False
        )
        out.append(Stage(method, arm))
    return out


def result_key(stage: str) -> str:
    return RESULTS.get(stage, stage)


def sft_first(c: ConfigDict, role: str, results: dict) -> ConfigDict:
    """Run (or reuse) the SFT stage of ``role``; return ``c`` pointing at its result."""
    stage = Stage(STAGE_DIRS[role], sft_config(c, role))
    results[result_key(stage.name)] = _run_stage(stage, 1, 1)
    return _trained(c, role)


def _run_stage(stage: Stage, index: int, count: int) -> dict:
    c, lead = stage.config, jax.process_index() == 0
    if stage.done:
        if lead:
            print(f"stage {index}/{count} {stage.name}: done before, in {c.run_dir}")
        with open(os.path.join(c.run_dir, "summary.json")) as f:
            return json.load(f)
    if lead:
        what = c.method if methods.get(c.method).teacher else "SFT"
        print(f"stage {index}/{count} {stage.name}: {what} -> {c.run_dir}")
    # The run folder's config was checked (run_config.json): a stage continues what it finds, or starts.
    staged = override(c, resume=True, start_if_empty=True)
    return trainer.train(staged, stage=f"{index}/{count} {stage.name}")


def _check_same_run(c: ConfigDict) -> None:
    """The run folder keeps the config it was started with; the same command continues it, another
    config is refused (``resume=True`` continues it anyway), and so is a folder holding a run that was
    not started by this command; ``resume=True`` where there is nothing to continue is refused too
    (``start_if_empty`` starts)."""
    path = os.path.join(c.run_dir, RUN_CONFIG)
    own = ("resume", "start_if_empty", "distributed")  # how this process was started, not what the run is
    mine = json.loads(json.dumps({k: v for k, v in c.to_dict().items() if k not in own}, default=list))
    preflight.writable(c.run_dir)
    folders = dict.fromkeys([c.run_dir, *(stage.config.run_dir for stage in stages(c))])
    found = [part for folder in folders for part in _held_in(folder, c.run_dir)]
    if not os.path.exists(path):  # not started by this pipeline (or not at all)
        preflight.reuse(c, found, bool(found), "holds no run to continue")
    if os.path.exists(path) and not c.resume:
        with open(path) as f:
            theirs = json.load(f)
        diff = _differences(theirs, mine)
        if diff:
            raise cfglib.ConfigError(
                f"{c.run_dir} holds a run of another config ({diff}); choose another run_dir, or pass "
                "--config.resume=True to continue it with these settings"
            )
    if jax.process_index() == 0:
        os.makedirs(c.run_dir, exist_ok=True)
        with open(path + ".tmp", "w") as f:
            json.dump(mine, f, indent=1, sort_keys=True)
        os.replace(path + ".tmp", path)


def _held_in(stage_dir: str, run_dir: str) -> list[str]:
    """What of a run ``stage_dir`` holds, named from ``run_dir``."""
    rel = os.path.relpath(stage_dir, run_dir)
    return [name if rel == "." else os.path.join(rel, name) for name in preflight.held(stage_dir)]


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
    preflight.tokenizers(planned)  # of the models the stages start from: files only, before any weights
    _check_same_run(config)  # last: it records the run's config in its folder
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
        path = os.path.join(config.run_dir, "test.json" if k == 0 else f"test_{name}.json")
        if os.path.exists(path):
            if lead:
                print(f"stage {index}/{index} test {name}: done before ({path})")
            with open(path) as f:
                scores = json.load(f)
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
                with open(path + ".tmp", "w") as f:
                    json.dump(scores, f, indent=1)
                os.replace(path + ".tmp", path)
        if lead:
            print(test_table(scores, config, results or {}, f"{name}: {split}"))
        out[name] = scores
    return out


def _test_models(config: ConfigDict, distilled: ConfigDict) -> list[tuple[str, str, str]]:
    """(name, spec role, checkpoint) of every model the test stage scores."""
    arms = cfglib.compared(config)
    out = (
        [("teacher", "teacher", distilled.teacher.path)] if any(methods.get(m).teacher for m in arms) else []
    )
    out.append(("student init", "student", distilled.student.path))
    out.append((f"student {distilled.method}", "student", os.path.join(config.run_dir, "best")))
    out += [(f"student {m}", "student", os.path.join(config.run_dir, m, "best")) for m in arms[1:]]
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
