"""The distill stage on the tiny teacher's caches and a tiny student sharing its tokenizer."""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from transformers import AutoModelForCausalLM

from conftest import ROOT, build_tiny_teacher, make_student, run_cli, train_records, write_jsonl  # noqa: F401  (make_student: other modules import it from here)
from test_cache import reseal_checksums
from hpd_tools.cache.reader import CacheReader, collate
from hpd_tools.distill import DistillConfig, chunked_loss, evaluate, micro_step, to_targets, train
from hpd_tools.errors import HPDError

CLI = str(Path(sys.executable).parent / "hpd-tools")


def config(setup, out: Path, **kw) -> DistillConfig:
    base = dict(caches=[setup["train"]], student=str(setup["student"]), out=str(out), loss="hpd", max_steps=6, batch_tokens=1024,
                lr=2e-3, warmup_steps=1, loss_chunk_tokens=256, seed=0)
    base.update(kw)
    return DistillConfig(**base)


def test_training_lowers_loss_and_eval_fkl(setup, tmp_path):
    cfg = config(setup, tmp_path / "run", max_steps=30, eval_cache=setup["eval"], eval_every=30)
    model = AutoModelForCausalLM.from_pretrained(setup["student"])
    before = evaluate(model, setup["eval"], cfg, torch.device("cpu"))
    last = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # HPD's loss is a surrogate with signed, detached weights (it sits near zero);
    # the student's NLL of the data tokens is the curve that must fall.
    nll = [r["hpd/nll"] for r in rows if "hpd/nll" in r]
    assert len(nll) == 30
    assert np.mean(nll[-5:]) < np.mean(nll[:5]) - 0.5
    assert last["eval/fkl_topk"] < 0.9 * before["eval/fkl_topk"]
    assert last["eval/student_nll"] < before["eval/student_nll"]
    assert last["eval/teacher_nll"] == pytest.approx(before["eval/teacher_nll"])
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "hpd/frac_mf", "hpd/frac_mr", "hpd/frac_both", "hpd/frac_yprime_ne_y", "hpd/g", "hpd/r"):
        assert key in rows[0], key
    final = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    assert final.config.num_hidden_layers == 1


@pytest.mark.parametrize("loss", ["sft", "fkl", "rkl", "jsd", "akl"])
def test_every_loss_trains(setup, tmp_path, loss):
    last = train(config(setup, tmp_path / loss, loss=loss, max_steps=3))
    assert np.isfinite(last["loss"]) and (tmp_path / loss / "final" / "config.json").exists()


def _batches(setup, n: int):
    reader = CacheReader(setup["train"], seed=3)
    seqs = []
    for s in reader.sequences():
        seqs.append(s)
        if len(seqs) == n:
            return seqs


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_gradient_accumulation_equals_one_big_batch(setup):
    seqs = _batches(setup, 6)
    cfg = config(setup, Path("unused"), loss_chunk_tokens=64)
    k = CacheReader(setup["train"]).k
    parts = [collate(seqs[:2], k), collate(seqs[2:], k)]
    whole = collate(seqs, k)
    n = int(whole.loss_mask.sum())
    a = AutoModelForCausalLM.from_pretrained(setup["student"])
    b = copy.deepcopy(a)
    gen = torch.Generator().manual_seed(5)
    for part in parts:
        micro_step(a, part, gen, cfg, torch.device("cpu"), 1.0 / n)
    micro_step(b, whole, torch.Generator().manual_seed(5), cfg, torch.device("cpu"), 1.0 / n)
    torch.testing.assert_close(_grads(a), _grads(b), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("loss", ["hpd", "fkl"])
def test_packed_batch_equals_padded_batch(setup, loss):
    """The same sequences packed end to end (position ids, no mask) and padded
    (attention mask): the same loss, diagnostics and gradients; packing only
    drops the padding."""
    from hpd_tools.cache.reader import pack
    from hpd_tools.distill import packing_works

    seqs = _batches(setup, 6)
    cfg = config(setup, Path("unused"), loss=loss, loss_chunk_tokens=64)
    k = CacheReader(setup["train"]).k
    packed = pack(seqs, k)
    padded = collate([seqs[i] for i in packed.order], k)  # the same order, so the same HPD samples
    assert packed.input_ids.shape == (1, padded.n_tokens) and packed.n_tokens == padded.n_tokens
    assert padded.input_ids.size > packed.input_ids.size
    a = AutoModelForCausalLM.from_pretrained(setup["student"])
    b = copy.deepcopy(a)
    assert packing_works(a)
    la, sa = micro_step(a, padded, torch.Generator().manual_seed(5), cfg, torch.device("cpu"), 1.0)
    lb, sb = micro_step(b, packed, torch.Generator().manual_seed(5), cfg, torch.device("cpu"), 1.0)
    assert lb == pytest.approx(la, rel=1e-5, abs=1e-5)
    assert {n: float(v) for n, v in sb.items()} == pytest.approx({n: float(v) for n, v in sa.items()}, rel=1e-4, abs=1e-4)
    torch.testing.assert_close(_grads(a), _grads(b), atol=1e-5, rtol=1e-4)


def test_packed_training_runs_and_fills_batches(setup, tmp_path):
    """--pack: every batch holds up to --batch-tokens real tokens, so a step sees
    more response tokens than a padded one at the same budget."""
    padded = train(config(setup, tmp_path / "padded", max_steps=3))
    packed = train(config(setup, tmp_path / "packed", max_steps=3, pack=True))
    assert packed["response_tokens"] > padded["response_tokens"]
    assert np.isfinite(packed["loss"]) and packed["hpd/nll"] > 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "packed" / "final")
    assert model is not None


def test_chunked_loss_equals_unchunked(setup):
    seqs = _batches(setup, 4)
    batch = collate(seqs, CacheReader(setup["train"]).k)
    model = AutoModelForCausalLM.from_pretrained(setup["student"])
    results = []
    for chunk in (7, 100000):
        model.zero_grad()
        cfg = config(setup, Path("unused"), loss_chunk_tokens=chunk)
        inputs, t = to_targets(batch, torch.device("cpu"))
        t.noise = torch.rand(t.labels.shape[0], generator=torch.Generator().manual_seed(0))
        hidden = model.base_model(**inputs).last_hidden_state[torch.from_numpy(batch.loss_mask)]
        loss, stats = chunked_loss(model, hidden, t, cfg)
        loss.backward()
        results.append((loss.detach(), _grads(model).clone(), {k: float(v) for k, v in stats.items()}))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-6, rtol=1e-4)
    assert results[0][2] == pytest.approx(results[1][2], rel=1e-6, abs=1e-6)


def _losses(path: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, path.read_text().splitlines()) if "loss" in r}


def test_killed_run_resumes_to_the_same_result(setup, tmp_path):
    steps = 10
    reference = tmp_path / "reference"
    train(config(setup, reference, max_steps=steps, save_every=2))
    out = tmp_path / "killed"
    cmd = [CLI, "distill", "--cache", setup["train"], "--student", str(setup["student"]), "--out", str(out), "--max-steps", str(steps),
           "--batch-tokens", "1024", "--lr", "2e-3", "--warmup-steps", "1", "--loss-chunk-tokens", "256", "--save-every", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "step-000004").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "final").exists(), "the run must be killed before it finishes"
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    got, want = _losses(out / "metrics.jsonl"), _losses(reference / "metrics.jsonl")
    assert sorted(got) == list(range(1, steps + 1))
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-4, abs=1e-5), step
    a = AutoModelForCausalLM.from_pretrained(out / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(reference / "final").state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-4)


def test_tokenizer_mismatch_names_both_hashes(setup, tmp_path):
    other = build_tiny_teacher(tmp_path / "other", vocab=700)
    with pytest.raises(HPDError, match=r"made with tokenizer [0-9a-f]{16}, the student's is [0-9a-f]{16}"):
        train(config(setup, tmp_path / "run", student=str(other)))
    assert not (tmp_path / "run").exists()


def test_incomplete_cache_and_bad_student_are_refused(setup, tmp_path):
    broken = tmp_path / "incomplete"
    shutil.copytree(setup["train"], broken)
    group = zarr.open_group(str(broken), mode="r+")
    attrs = dict(group.attrs["hpd_cache"])
    attrs["complete"] = False
    group.attrs["hpd_cache"] = attrs
    with pytest.raises(HPDError, match="incomplete"):
        train(config(setup, tmp_path / "a", caches=[str(broken)]))
    (tmp_path / "junk").mkdir()
    with pytest.raises(HPDError, match="does not load"):
        train(config(setup, tmp_path / "b", student=str(tmp_path / "junk")))


def test_earlier_run_needs_resume(setup, tmp_path):
    train(config(setup, tmp_path / "run", max_steps=2))
    with pytest.raises(HPDError, match="--resume"):
        train(config(setup, tmp_path / "run", max_steps=2))


def test_nan_loss_stops_with_step_and_keeps_checkpoint(setup, tmp_path):
    poisoned = tmp_path / "poisoned"
    shutil.copytree(setup["train"], poisoned)
    arr = zarr.open_group(str(poisoned), mode="r+")["label_logprob"]
    values = arr[:]
    values[:] = np.float16(np.nan)
    arr[:] = values
    reseal_checksums(poisoned)  # values wrong but checksums valid (a writer bug): the loop's own check must stop it
    run = tmp_path / "run"
    cfg = config(setup, run, caches=[str(poisoned)], loss="hpd", save_every=1)
    with pytest.raises(HPDError, match=r"step 1: loss is nan on the batch of sequences \[\d+"):
        train(cfg)
    assert not (run / "final").exists()


def test_cli_distill_and_conflicting_options(setup, tmp_path):
    out = tmp_path / "cli"
    proc = run_cli("distill", "--cache", setup["train"], "--student", str(setup["student"]), "--out", str(out), "--max-steps", "2",
                   "--batch-tokens", "1024", "--loss", "fkl", "--loss-option", "tail=renormalize", "--eval-cache", setup["eval"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == str(out / "final")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/fkl_topk" in r for r in rows)
    # The refusals in this process (a CLI start costs seconds): the command line's exit 2 and one line
    # for --eval-every without --eval-cache is a row of tests/test_fuzz.py.
    with pytest.raises(HPDError, match="--eval-every needs --eval-cache"):
        train(config(setup, tmp_path / "x", eval_every=5))
    with pytest.raises(HPDError, match="--pack-width 512: give a positive width, with --pack"):
        train(config(setup, tmp_path / "y", pack_width=512))


def test_bfloat16_autocast_and_seed_determinism(setup, tmp_path):
    a = train(config(setup, tmp_path / "a", max_steps=3, dtype="bfloat16"))
    b = train(config(setup, tmp_path / "b", max_steps=3, dtype="bfloat16"))
    assert np.isfinite(a["loss"]) and a["loss"] == b["loss"]
    c = train(config(setup, tmp_path / "c", max_steps=3, seed=1))
    assert c["loss"] != a["loss"]


def test_pack_is_refused_for_a_student_that_mixes_packed_sequences(setup, tmp_path, monkeypatch):
    """A transformers without packed-sequence masks (older releases, or a model
    that builds its own mask) lets packed sequences attend to each other: the
    start-up check catches it before any training."""
    import transformers.masking_utils as masking

    from hpd_tools.distill import packing_works

    model = AutoModelForCausalLM.from_pretrained(setup["student"])
    assert packing_works(model)
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)
    assert not packing_works(model)
    with pytest.raises(HPDError, match="--pack: the student .* mixes packed sequences"):
        train(config(setup, tmp_path / "run", pack=True))
    assert not (tmp_path / "run").exists()
