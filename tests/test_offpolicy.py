"""The adaptive off-policy pieces on the host, without a model: the scheduler's transitions, the replay
ratios, the buffer, SGO masks, the frequency of each batch source, the feeder's look-ahead and its saved
state; and two tiny runs that engage the scheduler."""

import threading
import time

import numpy as np
import pytest

from distillm_jax import config as cfglib
from distillm_jax import methods
from distillm_jax.data import batching
from distillm_jax.methods import offpolicy


def strategy(name: str, lam: float = 0.5):
    """Method ``name``'s data strategy, with GKD's λ at ``lam`` (its settings from a config)."""
    c = cfglib.defaults()
    c.offpolicy.gkd_lambda = lam
    method = methods.get(name)
    return method.strategy(method.settings(c))


def test_scheduler_follows_a_scripted_sequence_of_validation_losses():
    s = offpolicy.AdaptiveScheduler(loss_eps=0.1)
    script = [
        (2.0, 0.0, 2.0),  # the loss before training: only sets prev_loss
        (1.8, 0.0, 2.0),  # improving: nothing moves (prev_loss does not follow it down)
        (2.09, 0.0, 2.0),  # worse, but by less than loss_eps
        (2.1, 0.1, 2.1),  # exactly prev_loss + loss_eps: φ rises, prev_loss moves
        (2.15, 0.1, 2.1),
        (2.3, 0.2, 2.3),
        (1.0, 0.2, 2.3),
    ]
    for loss, phi, prev in script:
        s.update(loss)
        assert (s.phi, s.prev_loss) == (pytest.approx(phi), pytest.approx(prev)), loss


def test_scheduler_edge_cases_and_the_cap():
    s = offpolicy.AdaptiveScheduler(loss_eps=0.1, prev_loss=0.2)
    assert s.update(0.3)  # 0.3 >= 0.2 + 0.1 as written, although 0.2 + 0.1 > 0.3 in floats
    zero = offpolicy.AdaptiveScheduler(loss_eps=0.0, prev_loss=1.0)
    assert zero.update(1.0) and not zero.update(0.999)  # eps 0: an equal loss counts as no better
    capped = offpolicy.AdaptiveScheduler(loss_eps=0.1, prev_loss=0.0)
    for i in range(1, 15):
        capped.update(0.1 * i + 1e-6)
    assert capped.phi == 1.0  # exactly: ten rises of 0.1 land on 1.0, then it stays
    nan = offpolicy.AdaptiveScheduler(prev_loss=1.0)
    assert not nan.update(float("nan")) and nan.prev_loss == 1.0
    with pytest.raises(ValueError, match="replay_ratio"):
        offpolicy.AdaptiveScheduler(replay_ratio="sometimes")


@pytest.mark.parametrize(
    "ratio, expected",  # fresh threshold at step 0, 50, 100 of 100 with φ = 0.8
    [("decreasing", (0.8, 0.4, 0.0)), ("constant", (0.4, 0.4, 0.4)), ("increasing", (0.0, 0.4, 0.8))],
)
def test_replay_ratios(ratio, expected):
    s = offpolicy.AdaptiveScheduler(replay_ratio=ratio, phi=0.8)
    got = tuple(s.fresh_threshold(step, 100) for step in (0, 50, 100))
    np.testing.assert_allclose(got, expected)
    # Once the buffer is full, draws below the threshold generate, the rest of φ replays.
    assert s.choose(0.79, 50, 100, buffer_full=False) == "sgo"
    assert s.choose(0.39, 50, 100, buffer_full=True) == "sgo"
    assert s.choose(0.41, 50, 100, buffer_full=True) == "replay"
    assert s.choose(0.81, 50, 100, buffer_full=True) == "data"


def test_each_source_comes_with_its_probability():
    n, step, total = 20000, 25, 100
    draws = [offpolicy.uniform(7, i) for i in range(n)]
    assert draws[:5] == [offpolicy.uniform(7, i) for i in range(5)]  # the same on every host and resume
    assert draws[:5] != [offpolicy.uniform(8, i) for i in range(5)]
    s = offpolicy.AdaptiveScheduler(phi=0.6)

    def shares(method, full):
        plan = strategy(method, 0.3)  # the method says which strategy it uses
        got = [plan(s, r, step, total, full).source for r in draws]
        return {k: got.count(k) / n for k in ("sgo", "replay", "data")}

    tol = 4 * np.sqrt(0.25 / n)
    full = shares("distillm", True)  # fresh 0.6 * (1 - 0.25) = 0.45, replay 0.15, data 0.4
    assert (
        abs(full["sgo"] - 0.45) < tol and abs(full["replay"] - 0.15) < tol and abs(full["data"] - 0.4) < tol
    )
    filling = shares("distillm", False)  # until the buffer is full every SGO step generates
    assert abs(filling["sgo"] - 0.6) < tol and filling["replay"] == 0
    gkd = shares("gkd", True)  # the DistiLLM authors' GKD: λ of the steps generate, then replay
    assert abs(gkd["replay"] - 0.3) < tol and gkd["sgo"] == 0
    assert strategy("gkd", 0.3)(s, 0.2, 0, 1, False) == offpolicy.Decision(
        "replay", generate=True, store=True
    )
    fresh = shares("gkd_onpolicy", True)  # GKD's own paper and TRL: λ of the steps on fresh SGOs
    assert abs(fresh["sgo"] - 0.3) < tol and fresh["replay"] == 0
    assert shares("onpolicy", True)["sgo"] == 1.0 and shares("imitkd", True)["replay"] == 1.0
    assert strategy("imitkd", 0.5)(s, 0.5, 0, 1, False) == offpolicy.Decision(
        "replay", generate=True, store=True
    )
    assert strategy("kd", 0.5) is None  # ground truth only: the feeder's default
    assert offpolicy.ground_truth(s, 0.0, 0, 1, False) == offpolicy.Decision("data")


def test_buffer_is_fifo_bounded_and_samples_distinct_rows():
    buf = offpolicy.ReplayBuffer(3)
    buf.add([([1], [10]), ([2], [20])])
    assert len(buf) == 2 and not buf.full and buf.full_after(1)
    buf.add([([3], [30]), ([4], [40]), ([5], [50])])
    assert buf.full and [p[0] for p, _ in buf.rows[0]] == [3, 4, 5]  # the oldest left first
    for step in range(20):
        got = buf.draw(3, seed=0, step=step)
        assert sorted(p[0] for p, _ in got) == [3, 4, 5]  # without replacement within a batch
    seen = {buf.draw(1, seed=0, step=step)[0][0][0] for step in range(200)}
    assert seen == {3, 4, 5}
    with pytest.raises(ValueError, match="cannot sample 4"):
        buf.draw(4, seed=0, step=0)
    again = offpolicy.ReplayBuffer(3)
    again.load(buf.state())
    assert list(again.rows[0]) == list(buf.rows[0])


def test_buffer_shards_make_replay_independent_of_the_process_count():
    """One host feeding 4 data shards, or two hosts feeding 2 each: the same rows go in, the same rows
    come out of a replay, and the state of either reshards into the other."""
    one = offpolicy.ReplayBuffer(5, shards=range(4))
    two = [offpolicy.ReplayBuffer(5, shards=(0, 1)), offpolicy.ReplayBuffer(5, shards=(2, 3))]
    for step in range(4):
        rows = [([step], [100 * step + i]) for i in range(8)]  # a global batch of 8, 2 rows a shard
        one.add(rows)
        two[0].add(rows[:4])
        two[1].add(rows[4:])
    assert one.full and all(b.full for b in two)  # 5 per shard: 8 rows of the 10 pushed each
    for step in range(5):
        assert one.draw(8, 3, step) == two[0].draw(4, 3, step) + two[1].draw(4, 3, step)
    moved = offpolicy.ReplayBuffer(5, shards=(2, 3))
    moved.load(one.state())
    assert moved.draw(4, 3, 9) == two[1].draw(4, 3, 9)
    with pytest.raises(ValueError, match="do not split over this host's 2 data shards"):
        two[0].add([([1], [1])])


@pytest.mark.parametrize("pad", [0, 1])  # pad == eos (GPT-2, OPT, LLaMA) and pad != eos
def test_sgo_masks_cover_the_response_through_its_eos(pad):
    eos, lengths = 1, batching.Lengths(4, 10)
    tokens = np.array([[5, 6, eos, pad, pad, pad], [7, 8, 9, 10, 11, 12], [eos, pad, pad, pad, pad, pad]])
    mask = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0]], bool)
    responses = offpolicy.cut_at_eos(tokens, mask)
    assert responses == [[5, 6, eos], [7, 8, 9, 10, 11, 12], [eos]]  # no EOS produced: all of it
    rows = [([3, 4], r) for r in responses]
    b = batching.decoder_only_batch(rows, lengths, pad)
    for i, r in enumerate(responses):
        assert b["labels"][i][b["loss_mask"][i] != 0].tolist() == r  # never the prompt, nothing after EOS
    e = batching.encoder_decoder_batch(rows, lengths, pad, start=0)
    for i, r in enumerate(responses):
        assert e["labels"][i][e["loss_mask"][i] != 0].tolist() == r


class FakeSampler:
    """Stands in for the device sampler: answers each prompt with (its first token + params, EOS), and
    records which params each call saw."""

    def __init__(self, delay: float = 0.0):
        self.calls, self.delay = [], delay

    def __call__(self, params, prompts, key):
        self.calls.append(params)
        if self.delay:
            time.sleep(self.delay)
        tokens = np.array([[p[0] + params, 1, 0] for p in prompts])
        return tokens, np.array([[1, 1, 0]] * len(prompts), bool)


def make_feeder(method, sampler, *, lookahead=0, threaded=False, phi=0.0, capacity=8, ratio="decreasing"):
    counter = iter(range(10**6))

    def next_rows():
        i = next(counter)
        return [([100 * i + k], [7, 1]) for k in range(2)]

    worker = offpolicy.GenerationWorker(sampler, threaded=threaded)
    scheduler = offpolicy.AdaptiveScheduler(phi=phi, replay_ratio=ratio)
    buffer = offpolicy.ReplayBuffer(capacity)
    feeder = offpolicy.Feeder(
        strategy(method),
        scheduler,
        buffer,
        worker,
        next_rows,
        seed=3,
        total=50,
        lookahead=lookahead,
    )
    return feeder, worker


def test_feeder_paper_mode_is_on_policy_and_overlap_mode_bounded_stale():
    sampler = FakeSampler()
    feeder, _ = make_feeder("onpolicy", sampler)
    for step in range(4):
        micro, info = feeder.rows_for(step, params=step)
        assert sampler.calls[-1] == step and info["source"] == "sgo"  # the params of this very step
        assert micro == [
            [([100 * step], [100 * step + step, 1]), ([100 * step + 1], [100 * step + 1 + step, 1])]
        ]
        assert info["sgo_len"] == [2.0]

    sampler = FakeSampler(delay=0.01)
    feeder, worker = make_feeder("onpolicy", sampler, lookahead=2, threaded=True)
    for step in range(10):
        micro, _ = feeder.rows_for(step, params=step)
        used = micro[0][0][1][0] - micro[0][0][0][0]  # the params the SGO was sampled with
        assert step - 2 <= used <= step and used == max(step - 2, 0)
    worker.close()


def test_feeder_state_resumes_the_same_rows():
    """A feeder saved mid-run (buffer filled, steps decided ahead) continues exactly as one never
    stopped: same sources, same rows."""

    def run(stop_at=None):
        sampler = FakeSampler()
        kw = {"lookahead": 2, "threaded": True, "capacity": 4, "ratio": "increasing"}
        feeder, worker = make_feeder("distillm", sampler, phi=0.7, **kw)
        out = []
        for step in range(12):
            if step == stop_at:
                state = feeder.state()
                worker.close()
                feeder, worker = make_feeder("distillm", sampler, **kw)
                feeder.load(state)
                # the data order resumes after the steps already decided
                feeder.next_rows = _continue(state)
            micro, info = feeder.rows_for(step, params=step)
            out.append((info["source"], micro))
        worker.close()
        return out

    whole, resumed = run(), run(stop_at=5)
    assert [s for s, _ in whole] == [s for s, _ in resumed]
    assert {s for s, _ in whole} == {"sgo", "replay", "data"}
    assert whole == resumed


def _continue(state):
    counter = iter(range(state["decided"], 10**6))

    def next_rows():
        i = next(counter)
        return [([100 * i + k], [7, 1]) for k in range(2)]

    return next_rows


class _DeviceArray(np.ndarray):
    """A numpy array that, like a device array, is ready only at ``done_at`` (``block_until_ready``
    sleeps until then): a sampler that runs on the device while the host goes on."""

    done_at = 0.0

    def block_until_ready(self):
        time.sleep(max(self.done_at - time.perf_counter(), 0.0))
        return self


class DeviceSampler(FakeSampler):
    """``FakeSampler`` whose results, dispatched at once, are ready ``device_s`` seconds later."""

    def __init__(self, device_s: float):
        super().__init__()
        self.device_s = device_s

    def __call__(self, params, prompts, key):
        done_at = time.perf_counter() + self.device_s
        out = []
        for a in super().__call__(params, prompts, key):
            a = a.view(_DeviceArray)
            a.done_at = done_at
            out.append(a)
        return tuple(out)


@pytest.mark.parametrize("overlap", [False, True])
def test_generation_time_hidden_behind_training_is_counted(overlap):
    """``gen_s`` is the time the loop blocked on the sampler, ``gen_total_s`` the sampler's own: in
    paper mode they are the same, in overlap mode a sampler that finishes while a step trains counts in
    the second only (the run's "hidden behind training"). Device and step times are fixed sleeps, far
    apart, so the check does not depend on the machine's load."""
    device_s, train_s = 0.3, 0.5
    lookahead = 1 if overlap else 0
    feeder, worker = make_feeder("onpolicy", DeviceSampler(device_s), lookahead=lookahead, threaded=overlap)
    infos = []
    for step in range(4):
        _, info = feeder.rows_for(step, params=step)
        infos.append(info)
        time.sleep(train_s)  # the step trains on the devices' behalf
    worker.close()
    for info in infos[1:]:  # step 0's sampler was dispatched with it: nothing to hide it behind
        assert info["gen_total_s"] >= device_s
        if overlap:
            assert info["gen_s"] < device_s / 3 and info["gen_total_s"] - info["gen_s"] > device_s / 2
        else:
            assert info["gen_total_s"] == info["gen_s"]


def test_overlap_worker_never_deadlocks_on_a_slow_sampler():
    sampler = FakeSampler(delay=0.05)
    feeder, worker = make_feeder("gkd", sampler, lookahead=3, threaded=True)
    done = threading.Event()

    def go():
        for step in range(20):
            feeder.rows_for(step, params=step)
        feeder.state()
        worker.close()
        done.set()

    threading.Thread(target=go, daemon=True).start()
    assert done.wait(30)


def test_sampled_sgos_stop_at_their_first_eos_when_pad_is_eos(quick_compiles):
    """GPT-2 / OPT / LLaMA pad with the EOS id: the sampler's mask, not the token values, says where a
    response ends, so the EOS the student produced stays in its loss and nothing after it does."""
    import jax
    from transformers import GPT2Config

    from distillm_jax import generate, models

    eos = 1
    hf = GPT2Config(
        vocab_size=8, n_embd=16, n_layer=1, n_head=2, n_positions=32, eos_token_id=eos, pad_token_id=eos
    )
    model = models.create(hf, seed=0)
    ids, mask = np.full((16, 4), 5, np.int32), np.ones((16, 4), np.int32)
    tokens, out_mask = generate.generate(
        model, ids, mask, 10, temperature=1.0, rng=jax.random.key(0), eos_token_id=eos, pad_token_id=eos
    )
    responses = offpolicy.cut_at_eos(np.asarray(tokens), np.asarray(out_mask))
    ended = [r for r in responses if r[-1] == eos]
    assert ended and len(ended) < len(responses)  # both kinds occur with this seed
    for r in responses:
        assert eos not in r[:-1] and (r[-1] == eos or len(r) == 10)
    b = batching.decoder_only_batch(
        [(list(p), r) for p, r in zip(ids.tolist(), responses, strict=True)], batching.Lengths(4, 14), eos
    )
    for i, r in enumerate(responses):
        assert b["labels"][i][b["loss_mask"][i] != 0].tolist() == r


def tiny_run(tmp_path, **changes):
    """The tiny demo as one DistiLLM run from its random models (no SFT stages, no sampled evaluation)."""
    import sys
    from pathlib import Path

    from distillm_jax import config as cfglib
    from distillm_jax import trainer

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root))
    c = cfglib.load_file(str(root / "configs" / "demo.py"), "tiny")
    fixed = {"run_dir": str(tmp_path / "run"), "resume": False, "eval__generate": False}
    fixed.update(teacher__train_steps=0, student__train_steps=0, checkpoint__interval=100)
    return trainer.override(c, **{**fixed, **changes})


@pytest.mark.slow
def test_scheduler_engages_when_validation_ce_rises(tmp_path, quick_compiles, capsys):
    """A tiny DistiLLM run whose validation CE rises at every evaluation (a rate that diverges): φ climbs,
    steps train on fresh and replayed SGOs, and the end-of-run line says so, with the generation time the
    overlap mode hid behind training."""
    from distillm_jax import reporting, trainer

    c = tiny_run(
        tmp_path,
        optim__lr=3.0,  # diverges: the validation CE rises
        optim__steps=12,
        eval__interval=1,
        offpolicy__loss_eps=0.0,
        offpolicy__capacity=8,  # one micro-batch: full after the first SGO step, then replay
        offpolicy__overlap=True,
        data__demo_rows=16,
        log_interval=4,
    )
    s = trainer.train(c)
    assert s["phi"] > 0.5 and s["phi_path"][0] == [1, 0.1]
    assert [phi for _, phi in s["phi_path"]] == sorted({phi for _, phi in s["phi_path"]})  # changes only
    assert s["sources"]["sgo"] > 0 and s["sources"]["replay"] > 0
    assert sum(s["sources"].values()) == 12 and s["buffer"] == [8, 8]
    # the sampler's own time and the loop's wait on it are both counted; how much of it overlap mode hid
    # depends on the machine's load (test_generation_time_hidden_behind_training_is_counted shows it)
    assert s["gen_total_seconds"] >= s["gen_seconds"] > 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("distillm SGOs: φ 0 → 0.1 at step 1 → 0.2 at step 2")
    assert f"fresh SGOs {s['sources']['sgo']}, replayed {s['sources']['replay']}" in line
    assert "buffer 8 of 8 rows" in line and "hidden behind training" in line
    rows = [r for r in reporting.read_rows(str(tmp_path / "run" / "metrics.jsonl")) if r["kind"] == "train"]
    assert max(r["src_sgo"] + r["src_replay"] for r in rows) > 0


@pytest.mark.slow
def test_init_phi_starts_the_scheduler_on_sgos(tmp_path, quick_compiles):
    """``offpolicy.init_phi`` (the official --init-threshold): with φ 1 from the start and a validation
    CE that never rises by loss_eps, every step trains on SGOs (fresh, then replayed) and φ stays."""
    from distillm_jax import trainer

    c = tiny_run(
        tmp_path,
        optim__steps=4,
        eval__interval=4,
        offpolicy__init_phi=1.0,
        offpolicy__loss_eps=100.0,
        offpolicy__capacity=8,
    )
    s = trainer.train(c)
    assert s["phi"] == 1.0 and s["phi_path"] == [] and s["sources"]["data"] == 0
    assert s["sources"]["sgo"] >= 1 and s["sources"]["sgo"] + s["sources"]["replay"] == 4
