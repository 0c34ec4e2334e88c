"""Fresh SGOs stay on the devices: the training batch the sampler's tokens make is built there, equal to
the one the host would build from the same rows, and a step trained on fresh SGOs copies nothing to
the host unless the replay buffer keeps them."""

from pathlib import Path

import jax
import numpy as np
import pytest

from distillm_jax import models, sharding
from distillm_jax.data import batching
from distillm_jax.generate import Sampling
from distillm_jax.methods import offpolicy
from distillm_jax.run import data as rundata
from distillm_jax.sampling import Sampler

FIXTURES = Path(__file__).parent / "fixtures"


def sampler_for(family: str, mesh) -> tuple:
    model = models.from_pretrained(str(FIXTURES / family), mesh=mesh)
    start = model.hf_config.get("decoder_start_token_id") or 0
    enc_dec = hasattr(model, "encode")
    eos = model.hf_config.get("eos_token_id") or 1
    pad = model.hf_config.get("pad_token_id")
    batches = rundata.Batches(
        mesh, batching.Lengths(8, 20), eos if pad is None else pad, encoder_decoder=enc_dec, start_id=start
    )
    return model, batches, Sampler(batches, eos)


@pytest.mark.parametrize("family,new", [("gpt2", 12), ("t5", 12), ("llama", 7)])
def test_fresh_sgo_batch_built_on_the_devices_equals_the_host_batch(family, new):
    """Decoder-only and encoder-decoder layouts, a sampler filling the response's room and one leaving
    part of it empty (fewer new tokens): every array, its sharding and dtype as the host path's."""
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    model, batches, sampler = sampler_for(family, mesh)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(3, 40, rng.integers(2, 8))) for _ in range(8)]
    if batches.encoder_decoder:
        prompts = [[*p, 1] for p in prompts]
    sampled = sampler.sgo(model, prompts, new, Sampling(temperature=1.0), jax.random.key(3))
    # A random model rarely says its EOS: make a frequent later token the EOS, so rows end early.
    tokens = np.asarray(sampled.tokens)
    counts = np.bincount(tokens[:, 2:].ravel(), minlength=tokens.max() + 1)
    counts[tokens[:, :2].ravel()] = 0
    common = counts.argmax()
    sampled = Sampler(batches, int(common)).sgo(
        model, prompts, new, Sampling(temperature=1.0), jax.random.key(3)
    )
    responses = offpolicy.cut_at_eos(np.asarray(sampled.tokens), np.asarray(sampled.mask))
    assert len({len(r) for r in responses}) > 1  # rows of different lengths, some ended by the EOS
    host = batches.to_devices(batches.host(list(zip(prompts, responses, strict=True))))
    assert set(sampled.batch) == set(host)
    for k, want in host.items():
        got = sampled.batch[k]
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=k)
        assert got.dtype == want.dtype and got.sharding == want.sharding, k
    assert float(sampled.stats["sgo_len"]) == pytest.approx(np.mean([len(r) for r in responses]))
    real = sum(
        int(np.asarray(host[k]).sum()) for k in ("attention_mask", "decoder_attention_mask") if k in host
    )
    assert int(sampled.stats["tokens"]) == real


def test_fresh_sgos_reach_the_host_only_for_the_replay_buffer():
    """On-policy: the step's batch is the device one and no row is copied; DistiLLM's fresh step: the
    same device batch trains, and the rows go to the buffer."""
    model, batches, sampler = sampler_for("gpt2", sharding.make_mesh(data=2, fsdp=2, tensor=2))
    worker = offpolicy.GenerationWorker(
        lambda params, prompts, key: sampler.sgo(model, prompts, 12, Sampling(), key), threaded=False
    )
    prompts = iter(range(10**6))

    def next_rows():
        return [([5 + next(prompts) % 30, 7], [2]) for _ in range(8)]

    def feeder(strategy, phi=0.0):
        return offpolicy.Feeder(
            strategy,
            offpolicy.AdaptiveScheduler(phi=phi),
            offpolicy.ReplayBuffer(16, batches.shards),
            worker,
            next_rows,
            seed=0,
            total=4,
        )

    on = feeder(offpolicy.fresh_every_step)
    (m,), info = on.rows_for(0, params=None)
    assert isinstance(m, offpolicy.Pending) and m._rows is None and len(on.buffer) == 0
    assert info["source"] == "sgo" and info["sgo_len"] == [m.sampled.stats["sgo_len"]]

    adaptive = feeder(offpolicy.adaptive, phi=1.0)  # buffer empty: a fresh step, stored
    (m,), info = adaptive.rows_for(0, params=None)
    assert info["source"] == "sgo" and isinstance(m, offpolicy.Pending)
    assert len(adaptive.buffer) == 8
    stored = [row for shard in adaptive.buffer.rows.values() for row in shard]
    assert stored == m.rows()
