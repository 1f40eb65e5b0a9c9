"""The cache and losses inside another trainer (hpd_tools.api, examples/hf_trainer.py):
the dataset's batches are distill's, a resumed dataset continues them, the loss
is distill's micro-step loss, and transformers.Trainer trains with them."""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT, train_records, write_jsonl
from test_distill import make_student
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, TrainingArguments

from hpd_tools import CacheCollator, CacheConfig, CacheDataset, build_cache, distill_loss
from hpd_tools.distill import DistillConfig, micro_step
from hpd_tools.errors import HPDError
from hpd_tools.stream import StepStream
from hpd_tools.training.state import noise_generator

BATCH_TOKENS = 512


@pytest.fixture(scope="module")
def setup(teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer-api")
    data = write_jsonl(root / "train.jsonl", train_records(40))
    cache = build_cache(CacheConfig(teacher=str(teacher), data=str(data), engine="hf", top_k=8, max_length=256, chunk_tokens=512,
                                    out=str(root / "cache"))).location
    return {"cache": cache, "student": make_student(teacher, root / "student"), "root": root}


def _same_payload(a, b) -> None:
    """Two batches ship the same segments (the alignment gaps between them are not data)."""
    assert a.payload.segments == b.payload.segments
    for at, dtype, shape in a.payload.segments.values():
        n = int(np.prod(shape)) * dtype.itemsize
        np.testing.assert_array_equal(a.payload.host[at : at + n], b.payload.host[at : at + n])


def _same(a, b) -> None:
    """Two micro-batches: the same sequences, the same rows shipped, the same noise."""
    np.testing.assert_array_equal(a.batch.indices, b.batch.indices)
    np.testing.assert_array_equal(a.batch.input_ids, b.batch.input_ids)
    _same_payload(a.batch, b.batch)
    assert a.slot == b.slot
    torch.testing.assert_close(a.noise, b.noise, rtol=0, atol=0)


@pytest.mark.parametrize("rank,world_size,grad_accum", [(0, 1, 2), (1, 2, 1)])
def test_dataset_yields_distills_batches_and_noise(setup, rank, world_size, grad_accum):
    """Per step, one micro-batch per data slot of this rank, in slot order: what
    distill's StepStream hands that rank, with the noise distill draws for it."""
    slots = list(range(rank * grad_accum, (rank + 1) * grad_accum))
    stream = StepStream([setup["cache"]], slots=slots, n_slots=world_size * grad_accum, batch_tokens=BATCH_TOKENS, seed=3)
    noise = {j: noise_generator(3, j) for j in slots}
    dataset = CacheDataset([setup["cache"]], batch_tokens=BATCH_TOKENS, seed=3, grad_accum=grad_accum, rank=rank, world_size=world_size)
    items = iter(dataset)
    for _ in range(3):
        for slot, want in zip(slots, stream.next_batch()):
            got = next(items)
            assert got.slot == slot
            np.testing.assert_array_equal(got.batch.indices, want.indices)
            _same_payload(got.batch, want)
            torch.testing.assert_close(got.noise, torch.rand(int(want.loss_mask.sum()), generator=noise[slot]), rtol=0, atol=0)
    dataset.close()


def test_resumed_dataset_continues_where_it_stopped(setup):
    """A state saved mid-step (3 of 2 x 2 micro-batches yielded) and at a step's
    end, through JSON, continues the batches and the noise exactly; so does the
    dataset itself after close()."""
    def make():
        return CacheDataset([setup["cache"]], batch_tokens=BATCH_TOKENS, seed=1, grad_accum=2, rank=0, world_size=1)

    first = make()
    items = iter(first)
    states = {}
    for n in range(1, 5):
        next(items)
        if n in (3, 4):
            states[n] = json.loads(json.dumps(first.state_dict()))
    first.close()  # stopping the read-ahead thread loses nothing: the states below continue to the same batches
    expected = [next(items) for _ in range(6)]
    first.close()
    assert states[3]["taken_in_step"] == 1
    for n, state in states.items():
        resumed = make()
        resumed.load_state_dict(state)
        it = iter(resumed)
        got = [next(it) for _ in range(6 + 4 - n)]
        for a, b in zip(got[4 - n:], expected):
            _same(a, b)
        resumed.close()
    other = CacheDataset([setup["cache"]], batch_tokens=BATCH_TOKENS, seed=1, grad_accum=1, rank=0, world_size=1)
    with pytest.raises(HPDError, match="2 data slots, this dataset 1"):
        other.load_state_dict(states[3])


def _grads(model):
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


@pytest.mark.parametrize("loss", ["hpd", "fkl"])
def test_loss_equals_distills_micro_step(setup, loss):
    """distill_loss x the batch's response tokens is micro_step's loss sum, with
    the same diagnostics and gradients (hpd: the same y' from the same noise)."""
    dataset = CacheDataset([setup["cache"]], batch_tokens=BATCH_TOKENS, seed=2, rank=0, world_size=1)
    item = next(iter(dataset))
    dataset.close()
    cfg = DistillConfig(caches=[setup["cache"]], student=str(setup["student"]), out="unused", loss=loss, loss_chunk_tokens=64)
    a = AutoModelForCausalLM.from_pretrained(setup["student"])
    b = copy.deepcopy(a)
    want, want_stats = micro_step(a, item.batch, noise_generator(2, item.slot), cfg, torch.device("cpu"), 1.0)
    batch = CacheCollator("cpu")([item])
    n = batch["targets"].labels.shape[0]
    got, stats = distill_loss(b, batch["inputs"], batch["loss_mask"], batch["targets"], loss, chunk_tokens=64, return_stats=True)
    (got * n).backward()
    assert float(got.detach()) * n == pytest.approx(want, rel=1e-5, abs=1e-5)
    assert {k: float(v) for k, v in stats.items()} == pytest.approx({k: float(v) for k, v in want_stats.items()}, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(_grads(b), _grads(a), atol=1e-6, rtol=1e-5)
    with pytest.raises(HPDError, match="choose one of"):
        distill_loss(b, batch["inputs"], batch["loss_mask"], batch["targets"], "kl")
    with pytest.raises(HPDError, match="whole batch already"):
        CacheCollator()([item, item])


def _example():
    spec = importlib.util.spec_from_file_location("hf_trainer", ROOT / "examples" / "hf_trainer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_trainer_step_accumulates_as_distill(setup, tmp_path):
    """One step of the example's Trainer over 2 accumulated micro-batches (hpd,
    so y' comes from the dataset's noise): the gradient distill's two micro-steps
    give, each scaled by 1 / the step's response tokens."""
    grads = []

    class Grab(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            grads.append(_grads(model).clone())

    model = AutoModelForCausalLM.from_pretrained(setup["student"])
    reference = copy.deepcopy(model)
    dataset = CacheDataset([setup["cache"]], batch_tokens=BATCH_TOKENS, seed=4, grad_accum=2, rank=0, world_size=1)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, gradient_accumulation_steps=2, max_grad_norm=0.0, report_to="none",
                             save_strategy="no", use_cpu=True)
    trainer = _example().DistillTrainer(model=model, args=args, train_dataset=dataset, data_collator=CacheCollator("cpu"), callbacks=[Grab()],
                                        loss="hpd", loss_options={})
    trainer.train()
    dataset.close()

    batches = StepStream([setup["cache"]], slots=[0, 1], n_slots=2, batch_tokens=BATCH_TOKENS, seed=4).next_batch()
    n = sum(int(b.loss_mask.sum()) for b in batches)
    cfg = DistillConfig(caches=[setup["cache"]], student=str(setup["student"]), out="unused", loss="hpd")
    for slot, batch in enumerate(batches):
        micro_step(reference, batch, noise_generator(4, slot), cfg, torch.device("cpu"), 1.0 / n)
    torch.testing.assert_close(grads[0], _grads(reference), atol=1e-6, rtol=1e-5)


def test_hf_trainer_example_trains_and_resumes(setup, tmp_path, monkeypatch):
    """examples/hf_trainer.py as a script: 4 steps with checkpoints; then --resume
    to 5 (in-process, to spare a second start of torch and transformers). The
    stream position it saved is a fresh dataset's after 4 steps, and the
    student's forward KL on those steps' batches falls."""
    out = tmp_path / "run"
    args = ["--cache", setup["cache"], "--student", str(setup["student"]), "--out", str(out), "--loss", "fkl",
            "--batch-tokens", str(BATCH_TOKENS), "--grad-accum", "2", "--lr", "3e-3", "--save-every", "2"]
    run = subprocess.run([sys.executable, str(ROOT / "examples" / "hf_trainer.py"), *args, "--max-steps", "4"], capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(json.loads((out / "losses.json").read_text())) == 4
    monkeypatch.setattr(sys, "argv", ["hf_trainer.py", *args, "--max-steps", "5", "--resume"])
    _example().main()
    losses = json.loads((out / "losses.json").read_text())
    assert len(losses) == 5 and all(np.isfinite(losses))  # the resumed run keeps the first run's log

    fresh = CacheDataset([setup["cache"]], batch_tokens=BATCH_TOKENS, seed=0, grad_accum=2, rank=0, world_size=1)
    items = iter(fresh)
    held = [next(items) for _ in range(8)]  # 4 steps x 2 micro-batches
    assert json.loads((out / "checkpoint-4" / "hpd_stream-rank0.json").read_text()) == json.loads(json.dumps(fresh.state_dict()))
    fresh.close()

    collate = CacheCollator("cpu")

    @torch.no_grad()
    def fkl(model) -> float:
        return float(np.mean([float(distill_loss(model, **{k: v for k, v in collate(i).items() if k in ("inputs", "loss_mask", "targets")}, loss="fkl")) for i in held]))

    before = fkl(AutoModelForCausalLM.from_pretrained(setup["student"]))
    after = fkl(AutoModelForCausalLM.from_pretrained(out / "final"))
    assert after < before - 0.02, (before, after)
    assert AutoTokenizer.from_pretrained(out / "final") is not None
