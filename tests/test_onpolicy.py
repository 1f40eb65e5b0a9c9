"""On-policy rounds: the student samples, an online teacher scores, training uses both."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli
from hpd_tools.distill import train
from hpd_tools.errors import HPDError
from test_distill import config


def rounds(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "onpolicy/rkl" in r]


def test_rounds_lower_the_teacher_scored_reverse_kl(setup, trained_teacher, tmp_path):
    out = tmp_path / "run"
    cfg = config(setup, out, loss="hpd", max_steps=20, lr=3e-3, online_teacher=str(trained_teacher), online_engine="hf",
                 sample_every=5, sample_prompts=16, sample_max_new_tokens=24, onpolicy_weight=0.5, onpolicy_buffer=32)
    last = train(cfg)
    found = rounds(out)
    assert len(found) == 4
    first = found[0]
    for key in ("onpolicy/teacher_nll", "onpolicy/mean_length", "onpolicy/frac_truncated", "onpolicy/sample_tokens_per_s",
                "onpolicy/score_tokens_per_s", "onpolicy/sample_seconds", "onpolicy/score_seconds"):
        assert key in first, key
    assert 0 < first["onpolicy/mean_length"] <= 24
    # The first round samples the untrained student; later rounds, the trained one.
    # (Measured: 2.11 then 1.64-1.86 nats; one round's estimate varies by ~0.1.)
    later = np.mean([r["onpolicy/rkl"] for r in found[1:]])
    assert later < first["onpolicy/rkl"] - 0.15
    assert np.mean([r["onpolicy/teacher_nll"] for r in found[1:]]) < first["onpolicy/teacher_nll"]
    steps = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "onpolicy/loss" in r]
    assert steps and all(r["onpolicy/weight"] == 0.5 for r in steps)
    assert "onpolicy/rkl" in last


def test_resume_with_rollouts_matches_uninterrupted(setup, trained_teacher, tmp_path):
    import shutil

    common = dict(loss="hpd", online_teacher=str(trained_teacher), online_engine="hf", sample_every=2, sample_prompts=4,
                  sample_max_new_tokens=12, save_every=3, max_steps=6)
    train(config(setup, tmp_path / "ref", **common))
    # The same run as if it had crashed after its step-3 checkpoint: resume from there.
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "ref", cut)
    for name in ("step-000006", "final"):
        shutil.rmtree(cut / name)
    assert (cut / "step-000003" / "onpolicy-rank0.npz").exists()
    train(config(setup, cut, resume=True, **common))
    want = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    got = [json.loads(x) for x in (cut / "metrics.jsonl").read_text().splitlines()]
    key = lambda rows: [(r["step"], round(r.get("loss", r.get("onpolicy/rkl", 0.0)), 5)) for r in rows if "loss" in r or "onpolicy/rkl" in r]  # noqa: E731
    assert key(got) == key(want)


def test_options_that_conflict(setup, tmp_path):
    with pytest.raises(HPDError, match="--sample-every needs --online-teacher"):
        train(config(setup, tmp_path / "a", sample_every=2))
    with pytest.raises(HPDError, match="--online-teacher needs --sample-every"):
        train(config(setup, tmp_path / "b", online_teacher="x"))
    with pytest.raises(HPDError, match="--onpolicy-weight"):
        train(config(setup, tmp_path / "c", online_teacher="x", sample_every=1, onpolicy_weight=1.5))


def test_online_teacher_with_another_tokenizer_is_refused(setup, tmp_path):
    from conftest import build_tiny_teacher

    other = build_tiny_teacher(tmp_path / "other", vocab=700)
    with pytest.raises(HPDError, match="--online-teacher.*tokenizer"):
        train(config(setup, tmp_path / "run", online_teacher=str(other), online_engine="hf", sample_every=2))


def test_cli_in_process_vllm_online_teacher(setup, trained_teacher, tmp_path):
    out = tmp_path / "cli"
    proc = run_cli("distill", "--cache", setup["train"], "--student", str(setup["student"]), "--out", str(out), "--max-steps", "4",
                   "--batch-tokens", "1024", "--online-teacher", str(trained_teacher), "--online-engine", "vllm", "--sample-every", "2",
                   "--sample-prompts", "4", "--sample-max-new-tokens", "16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = rounds(out)
    assert len(found) == 2 and all(np.isfinite(r["onpolicy/rkl"]) for r in found)
    assert "on-policy rkl" in proc.stderr


def _old_prompts(reader, max_length: int, n: int) -> list[np.ndarray]:
    """The prompts as drawn before the cursor: the whole order recomputed and the
    sequence read for every prompt."""
    from hpd_tools.onpolicy import prompt_of

    out, epoch, taken = [], 0, 0
    while len(out) < n:
        order = reader.order(epoch)
        if taken >= len(order):
            epoch, taken = epoch + 1, 0
            continue
        prompt = prompt_of(reader.read_sequence(int(order[taken])))
        taken += 1
        if prompt is not None and len(prompt) + 1 < max_length:
            out.append(prompt)
    return out


@pytest.mark.parametrize("rank,world_size", [(0, 1), (1, 3), (5, 16)])  # 16 ranks: more than the cache's units, shared by sequence
def test_prompt_cursor_draws_the_old_order_and_resumes(setup, tmp_path, rank, world_size):
    from transformers import AutoTokenizer

    from hpd_tools.cache.reader import CacheReader
    from hpd_tools.onpolicy import OnPolicy

    cfg = config(setup, tmp_path / "run")
    tok = AutoTokenizer.from_pretrained(setup["student"])
    lengths = [len(s.tokens) for s in CacheReader(setup["train"]).sequences(0)]
    max_length = int(np.median(lengths))  # about half the prompts are too long: the filter matters
    assert CacheReader(setup["train"], rank=rank, world_size=world_size).by_sequence == (world_size == 16)
    reference = CacheReader(setup["train"], seed=cfg.seed + 1000, rank=rank, world_size=world_size)
    want = _old_prompts(reference, max_length, 100)  # two epochs and more of this rank's share

    def make() -> OnPolicy:
        return OnPolicy(cfg, tok, setup["train"], k=16, max_length=max_length, rank=rank, world_size=world_size)

    a = make()
    got = [p for _ in range(6) for p in a._next_prompts(7)]
    state = a.state()
    assert state["prompt_epoch"] >= 0 and state["prompt_taken"] > 0
    got += [p for _ in range(4) for p in a._next_prompts(7)]
    resumed = make()
    resumed.load_state(state, None)
    again = [p for _ in range(4) for p in resumed._next_prompts(7)]
    a.close()
    resumed.close()
    assert len(got) == 70 and all(p.dtype == np.int64 for p in got)
    for x, y in zip(got, want):
        np.testing.assert_array_equal(x, y)
    for x, y in zip(again, got[42:]):
        np.testing.assert_array_equal(x, y)
    assert a.prompt_epoch >= 1  # the draws crossed into another epoch


def test_prompt_cache_without_a_usable_prompt_is_refused(setup, tmp_path):
    from transformers import AutoTokenizer

    from hpd_tools.onpolicy import OnPolicy

    onpolicy = OnPolicy(config(setup, tmp_path / "run"), AutoTokenizer.from_pretrained(setup["student"]), setup["train"], k=16, max_length=3)
    with pytest.raises(HPDError, match="--prompt-cache .*no sequence"):
        onpolicy._next_prompts(1)
