"""The dense reference: --eval-teacher's eval/full_fkl and --dense-teacher's online
training, against float64 dense computations done here with the models themselves."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_teacher, run_cli
from transformers import AutoModelForCausalLM

from hpd_tools.cache.reader import CacheReader
from hpd_tools.distill import DistillConfig, evaluate, load_student, train
from hpd_tools.errors import HPDError
from hpd_tools.stream import StepStream
from hpd_tools.training.dense import load_teacher

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def models64(setup, trained_teacher):
    """The student (before training) and the teacher, in float64."""
    return tuple(AutoModelForCausalLM.from_pretrained(p, dtype=torch.float64).eval() for p in (setup["student"], trained_teacher))


@torch.no_grad()
def dense_fkl64(models, input_ids, attention_mask, loss_mask) -> tuple[float, int]:
    """Sum over the masked positions of KL(teacher || student) over the whole vocabulary, in float64, and their count."""
    student, teacher = models
    ls = torch.log_softmax(student(input_ids=input_ids, attention_mask=attention_mask).logits, -1)
    lt = torch.log_softmax(teacher(input_ids=input_ids, attention_mask=attention_mask).logits, -1)
    kl = (lt.exp() * (lt - ls)).sum(-1)[loss_mask]
    return float(kl.sum()), int(loss_mask.sum())


def test_eval_full_fkl_equals_a_float64_dense_computation(setup, trained_teacher, models64):
    cfg = DistillConfig(caches=[setup["train"]], student=str(setup["student"]), out="unused", loss="fkl", batch_tokens=700, loss_chunk_tokens=96)
    student, tokenizer = load_student(str(setup["student"]))
    teacher = load_teacher(str(trained_teacher), "--eval-teacher", tokenizer, dtype="float32", device=CPU)
    got = evaluate(student, setup["eval"], cfg, CPU, teacher=teacher)
    total = count = 0
    for seq in CacheReader(setup["eval"], shuffle=False).sequences():
        ids = torch.from_numpy(seq.tokens)[None]
        s, n = dense_fkl64(models64, ids, torch.ones_like(ids), torch.from_numpy(seq.loss_mask)[None])
        total, count = total + s, count + n
    assert got["eval/tokens"] == count
    assert got["eval/full_fkl"] == pytest.approx(total / count, rel=1e-5)
    # The top-k figure leaves the tail out: a different, smaller number on the same tokens.
    assert 0 < got["eval/fkl_topk"] != pytest.approx(got["eval/full_fkl"], rel=1e-3)
    assert "eval/full_fkl" not in evaluate(student, setup["eval"], DistillConfig(**{**cfg.__dict__, "eval_batches": 1}), CPU)


def test_dense_teacher_trains_from_the_cli(setup, trained_teacher, models64, tmp_path):
    out = tmp_path / "run"
    args = ["--cache", setup["train"], "--student", str(setup["student"]), "--out", str(out), "--loss", "fkl", "--dense-teacher", str(trained_teacher),
            "--eval-cache", setup["eval"], "--eval-every", "2", "--max-steps", "4", "--batch-tokens", "512", "--lr", "3e-3",
            "--loss-chunk-tokens", "100", "--report-to", "none"]
    result = run_cli("distill", *args)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    evals = [r["eval/full_fkl"] for r in rows if "eval/full_fkl" in r]
    assert len(losses) == 4 and len(evals) == 2  # --eval-teacher defaults to the dense teacher
    assert evals[1] < evals[0] and min(losses[-2:]) < losses[0]
    # Step 1's loss is the dense forward KL of its batch (the first of the stream), in float64 here.
    batch = StepStream([setup["train"]], slots=[0], n_slots=1, batch_tokens=512, seed=0).next_batch()[0]
    ids = torch.from_numpy(batch.input_ids)
    attention = (torch.arange(ids.shape[1])[None] < torch.as_tensor(batch.lengths)[:, None]).long()
    total, count = dense_fkl64(models64, ids, attention, torch.from_numpy(batch.loss_mask))
    assert rows[0]["response_tokens"] == count
    assert losses[0] == pytest.approx(total / count, rel=1e-5)


def test_packed_and_chunked_equal_padded_and_whole(setup, trained_teacher):
    """The teacher sees the student's packed position ids like the student: the same
    loss and gradients as the padded batch, a 32-row chunking (checkpointed, the
    teacher chunk remade in backward) as one chunk; the teacher gets no gradient."""
    import copy

    from hpd_tools.cache.reader import collate, pack
    from hpd_tools.distill import micro_step

    seqs = []
    for seq in CacheReader(setup["train"], seed=3).sequences():
        seqs.append(seq)
        if len(seqs) == 3:
            break
    k = CacheReader(setup["train"]).k
    packed = pack(seqs, k)
    padded = collate([seqs[i] for i in packed.order], k)
    a, tokenizer = load_student(str(setup["student"]))
    b = copy.deepcopy(a)
    teacher = load_teacher(str(trained_teacher), "--dense-teacher", tokenizer, dtype="float32", device=CPU, packed=True)
    base = {"caches": [setup["train"]], "student": str(setup["student"]), "out": "unused", "loss": "fkl"}
    la, _ = micro_step(a, padded, torch.Generator().manual_seed(5), DistillConfig(**base, loss_chunk_tokens=100000), CPU, 1.0, teacher=teacher)
    lb, _ = micro_step(b, packed, torch.Generator().manual_seed(5), DistillConfig(**base, loss_chunk_tokens=32), CPU, 1.0, teacher=teacher)
    assert lb == pytest.approx(la, rel=1e-5)
    grads = [torch.cat([p.grad.flatten() for p in m.parameters()]) for m in (a, b)]
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)
    assert all(p.grad is None and not p.requires_grad for p in teacher.model.parameters())


def test_refusals_are_one_line_before_any_step(setup, tmp_path):
    """In process (the CLI prints an HPDError as one line with exit code 2)."""
    base = {"caches": [setup["train"]], "student": str(setup["student"]), "loss": "fkl", "max_steps": 1, "report_to": ["none"]}
    other = build_tiny_teacher(tmp_path / "other", vocab=700, layers=1)
    for flag, key in (("--dense-teacher", "dense_teacher"), ("--eval-teacher", "eval_teacher")):
        out = tmp_path / key
        with pytest.raises(HPDError) as caught:
            train(DistillConfig(out=str(out), eval_cache=setup["eval"], **{key: str(other)}, **base))
        message = str(caught.value)
        assert message.startswith(f"{flag} {other}: tokenizer ") and "differs from the student's" in message and "\n" not in message
        assert not (out / "metrics.jsonl").exists()
    with pytest.raises(HPDError, match=r"^--dense-teacher .*nope: no such folder"):
        train(DistillConfig(out=str(tmp_path / "a"), dense_teacher=str(tmp_path / "nope"), **base))
    with pytest.raises(HPDError, match=r"^--eval-teacher .* needs --eval-cache"):
        DistillConfig(out=str(tmp_path / "b"), eval_teacher=str(tmp_path / "nope"), **base).validate()
