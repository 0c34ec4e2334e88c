"""The benchmarks run end to end on tiny shapes through ``bench/run_all.py`` (one run for the module),
their two sides agree, and BENCHMARKS.md is rendered from what they wrote."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytest.importorskip("torch")
pytest.importorskip("trl")

pytestmark = pytest.mark.slow  # end-to-end: the full suite (CI) runs them, -m 'not slow' skips


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """``run_all.py --quick``: every benchmark's tiny form, its results and the rendered markdown."""
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, "bench/run_all.py", "--quick", "--results", str(out / "results")]
    cmd += ["--out", str(out / "BENCHMARKS.md"), "--log", str(out / "log.txt")]
    env = {"JAX_DISABLE_MOST_OPTIMIZATIONS": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, **env}
    )
    log = (out / "log.txt").read_text() if (out / "log.txt").exists() else ""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:] + log[-3000:]
    return out


def rows(quick, name):
    (path,) = (quick / "results").glob(f"{name}_*.json")
    result = json.loads(path.read_text())
    assert result["date"] and "jax" in result["versions"] and result["machine"]
    return result


def test_markdown_has_every_benchmark(quick):
    md = (quick / "BENCHMARKS.md").read_text()
    for script in ("losses", "forward", "generate", "train_step", "speedup", "evidence", "accelerator"):
        assert f"(`bench/{script}.py`)" in md
    assert md.count("| ours tok/s | peer tok/s | ours / peer |") == 1  # the train step's table
    assert "**Target:** at least 2× TRL GKDTrainer's tokens/s with the defaults" in md
    assert ".png)" in md  # the speed-up curve is linked


def test_losses_chunked_agrees_with_plain(quick):
    result = rows(quick, "losses")
    for name in ("srkl", "jsd"):
        plain, chunked = (
            next(r for r in result["rows"] if r["divergence"] == name and r["form"] == f)
            for f in ("plain", "chunked")
        )
        assert abs(chunked["value"] - plain["value"]) <= 1e-5 * abs(plain["value"])
        assert chunked["temp_mib"] < plain["temp_mib"] and plain["ms"] > 0 and chunked["ms"] > 0


def test_forward_and_generate_measure_both_sides(quick):
    forward = rows(quick, "forward")["rows"]
    assert [r["model"] for r in forward] == ["gpt2", "llama"] and all(r["ratio"] > 0 for r in forward)
    generate = rows(quick, "generate")["rows"]
    assert {r["model"] for r in generate} == {"gpt2", "t5"} and all(r["ratio"] > 0 for r in generate)
    assert all(r["floor_s"] > 0 and r["stream_bytes_per_s"] > 0 for r in generate)  # the bytes-read floor


def test_generation_floor_counts_what_a_decode_step_reads(monkeypatch):
    """The bytes-read floor, against an independent count from transformers' parameters: the
    decoder's weights and the head every step, not the encoder, the embedding rows or the
    cross-attention's key/value projections; the keys and values filled so far."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import generate as bench_generate
    from common import torch_and_ours

    b, p, new = 3, 5, 4
    for name, config in bench_generate.hf_configs(quick=True).items():
        hf, ours = torch_and_ours(config)
        v, d = config.vocab_size, config.d_model if name == "t5" else config.n_embd
        if name == "gpt2":
            skip = ("transformer.wte", "transformer.wpe", "lm_head")
            kept = [n for n, _ in hf.named_parameters() if not n.startswith(skip)]
            layers, width, filled = config.n_layer, config.n_embd, p + (new - 1) / 2
            cross = 0
        else:
            cross_kv = ("EncDecAttention.k.weight", "EncDecAttention.v.weight")
            kept = [
                n
                for n, _ in hf.named_parameters()
                if n.startswith("decoder.") and "embed_tokens" not in n and not n.endswith(cross_kv)
            ]
            layers, width, filled = (
                config.num_decoder_layers,
                config.num_heads * config.d_kv,
                1 + (new - 1) / 2,
            )
            cross = 2 * layers * b * width * p * 4
        params = dict(hf.named_parameters())
        weights = 4 * (sum(params[n].numel() for n in kept) + v * d)
        kv = 2 * layers * b * width * 4 * filled
        assert bench_generate.decode_bytes(ours, b, p, new) == int(new * (weights + cross + kv)), name


def test_train_step_matches_trl_and_torch(quick):
    (row,) = rows(quick, "train_step")["rows"]
    # Same weights, same batch: the first step's loss agrees with TRL's GKD (JSD) and with the torch
    # loop (SRKL), and so does the loss after the AdamW updates (all three skip weight decay on biases
    # and norm scales).
    assert [p["peer"] for p in row["pairs"]] == ["trl", "torch"]
    for pair in row["pairs"]:
        ours, theirs = row["sides"][pair["ours_side"]], row["sides"][pair["peer_side"]]
        assert len(ours["losses"]) == len(theirs["losses"]) == row["warmup"] + row["repeats"]
        assert ours["losses"][0] > 0 and pair["first_loss_rel_diff"] <= 2e-4
        assert abs(ours["losses"][-1] - theirs["losses"][-1]) <= 5e-4 * abs(theirs["losses"][-1])
        assert ours["losses"][-1] < ours["losses"][0] and ours["compiles"] == 1
        assert ours["tok_s"] > 0 and theirs["tok_s"] > 0 and pair["ratio"] > 0
        assert 0 < ours["flop_s"] < 10 * row["peak_flop_s"]


def test_speedup_runs_trl_gkd_beside_ours(quick):
    result = rows(quick, "speedup")
    distillm, trl = result["rows"]
    assert (distillm["arm"], trl["arm"]) == ("distillm", "trl_gkd_positions")
    assert result["target"] == trl["best_rougeL"]
    # TRL's saves are scored at the same steps as our evaluations, from the same init (step 0).
    assert [p[0] for p in trl["curve"]] == [p[0] for p in distillm["curve"]] == [0, 2, 4]
    assert trl["curve"][0][2:] == distillm["curve"][0][2:]  # same student init, same draws (mean, std)
    assert result["args"]["draws"] == 2 and trl["curve"][0][3] > 0  # two seeds per point: a spread
    assert trl["gen_seconds"] > 0 and trl["sources"]["sgo"] == 4 and trl["loss"] == "jsd"
    assert 0 < trl["curve"][1][1] <= trl["train_seconds"]
    assert (quick / "results" / "speedup_cpu_gpt2.png").stat().st_size > 1000


def test_trl_positions_hook_counts_from_the_first_real_token(monkeypatch):
    """The fixed TRL arm's hook: a left-padded row gets the positions ``generate`` gives it, so its
    logits equal the unpadded row's; without the hook (TRL as shipped) they do not."""
    import torch
    import transformers

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    from trl_gkd import positions_from_mask

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 5, 6, 7]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    alone = model(input_ids=ids[:1, 2:], attention_mask=mask[:1, 2:]).logits
    with torch.no_grad():
        shipped = model(input_ids=ids, attention_mask=mask).logits
        model.register_forward_pre_hook(positions_from_mask, with_kwargs=True)
        fixed = model(input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(fixed[0, 2:], alone[0], atol=1e-5)
    assert not torch.allclose(shipped[0, 2:], alone[0], atol=1e-3)


def test_evidence_pairs_arms_over_training_seeds(quick):
    """Every arm at every training seed, each from its seed's init, tested over the sampling seeds; the
    markdown has the paired table with its intervals."""
    result = rows(quick, "evidence")
    runs = result["rows"]
    assert sorted((r["arm"], r["seed"]) for r in runs) == [
        ("distillm", 0),
        ("distillm", 1),
        ("sft", 0),
        ("sft", 1),
    ]
    assert result["lr"] == {"sft": 3e-3, "distillm": 3e-3}
    for r in runs:
        assert len(r["test_scores"]) == len(result["eval_seeds"]) and len(r["steps"]) == r["curve"][-1][0]
    md = (quick / "BENCHMARKS.md").read_text()
    assert "## Does DistiLLM pay off here? (`bench/evidence.py`)" in md and "95 % interval" in md


def test_accelerator_script_runs_tiny(quick):
    (row,) = rows(quick, "accelerator")["rows"]
    assert row["compiles"] == 1 and row["step_s"] > 0 and 0 < row["mfu"] < 10
    assert row["losses"][-1] < row["losses"][0] and row["compiled_bytes"] > 0


def test_run_all_renders_without_running(tmp_path):
    """``--render`` writes the markdown from stored results alone (here: the repository's)."""
    out = tmp_path / "B.md"
    cmd = [sys.executable, "bench/run_all.py", "--render", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    md = out.read_text()
    assert "### `generate_h200` — 1x gpu:NVIDIA H200" in md and "### Findings" in md
