"""Sampled caches on the read side: the reader carries sample_counts (dense batches
and the compact payload), the stream turns them into Targets.sample_weights with
padding at -inf, distill trains on them from the CLI, and mixing / losses that
cannot read draws are refused in one line before training.

The sampled caches are real: the trained tiny teacher scored by the hf engine with
``signal="sampled"`` through the real writer (hpd_tools.cache.build_cache)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from conftest import run_cli, train_records, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

from hpd_tools import CacheConfig, build_cache
from hpd_tools.api import CacheCollator, CacheDataset, distill_loss
from hpd_tools.cache.reader import CacheReader
from hpd_tools.errors import HPDError
from hpd_tools.stream import CacheStream, batch_targets, dense_targets
from hpd_tools.training.config import DistillConfig
from hpd_tools.training.student import check_caches, check_signal, chunked_loss

N = 16
FIELDS = ("labels", "mask", "label_logprob", "topk_ids", "topk_logprobs", "sample_weights")


@pytest.fixture(scope="module")
def caches(setup, trained_teacher, tmp_path_factory) -> dict[int, Path]:
    """Two sampled caches of the trained teacher (N = 16 and N = 8) over 24 records,
    in 512-token units, beside the session's top-k cache (setup["train"], k = 16)."""
    root = tmp_path_factory.mktemp("sampled-read")
    data = write_jsonl(root / "train.jsonl", train_records(24))
    out = {}
    few = write_jsonl(root / "few.jsonl", train_records(4))  # the N = 8 cache only has to exist (the mixing refusal)
    for n in (N, 8):
        config = CacheConfig(teacher=str(trained_teacher), data=str(data if n == N else few), engine="hf", signal="sampled", samples=n, max_length=512,
                             chunk_tokens=512, out=str(root / f"sampled-{n}"))
        out[n] = Path(build_cache(config).location)
    return out


def _equal(a, b) -> None:
    for name in FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x, y), name


def _check_rows(t, n: int = N) -> None:
    w = t.sample_weights
    assert w is not None and w.dtype == torch.float32 and w.shape[-1] == n
    torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[0]), rtol=0, atol=1e-6)  # weights sum to 1 per active row
    pad = w == 0
    assert torch.isneginf(t.topk_logprobs[pad]).all() and (t.topk_ids[pad] == 0).all()
    real = t.topk_logprobs[~pad]
    assert torch.isfinite(real).all() and (real <= 0).all()
    assert not (pad[:, :-1] & ~pad[:, 1:]).any()  # drawn entries first, then padding
    assert pad.any()  # some rows drew fewer than N distinct ids: padding is exercised


def test_batches_carry_counts_and_the_compact_and_dense_paths_agree(caches, setup):
    path = caches[N]
    reader = CacheReader(path, shuffle=False)
    assert reader.signal == "sampled" and reader.k == N
    compact = list(reader.batches(600, compact=True))
    dense = list(reader.batches(600, compact=False))
    assert len(compact) == len(dense) > 1
    group = zarr.open_group(str(path), mode="r")
    counts, offsets = group["sample_counts"][:], group["offsets"][:]
    for c, d in zip(compact, dense):
        assert c.payload is not None and "sample_counts" in c.payload.segments and d.payload is None
        assert np.array_equal(c.sample_counts, d.sample_counts)  # the payload's dense view equals collate's
        assert np.array_equal(c.topk_logprobs, d.topk_logprobs)
        for i, s in enumerate(d.indices):  # counts as stored, at every position of the sequence
            n = d.lengths[i]
            assert np.array_equal(d.sample_counts[i, :n], counts[offsets[s] : offsets[s] + n])
        _, tc = batch_targets(c, torch.device("cpu"))
        _, td = dense_targets(d, torch.device("cpu"))
        _equal(tc, td)
        _check_rows(tc)
        assert torch.equal(tc.sample_weights * N, torch.from_numpy(d.sample_counts[d.loss_mask]).float())
    # Packed batches through the training stream: compact and dense give the same Targets too.
    streams = [CacheStream([str(path)], batch_tokens=700, packed=True, compact=compact_) for compact_ in (True, False)]
    for _ in range(3):
        bc, bd = (s.next_batch() for s in streams)
        _equal(batch_targets(bc, torch.device("cpu"))[1], dense_targets(bd, torch.device("cpu"))[1])
    # A top-k cache's batches carry none.
    topk = next(CacheReader(setup["train"], shuffle=False).batches(600))
    assert topk.sample_counts is None and "sample_counts" not in topk.payload.segments
    assert batch_targets(topk, torch.device("cpu"))[1].sample_weights is None


def test_chunked_loss_and_the_collator_carry_the_weights(caches, setup):
    """Chunks of 7 rows give the loss one chunk gives (Targets sliced with their
    weights), and the trainer API's collator hands the loss sampled targets."""
    model = AutoModelForCausalLM.from_pretrained(setup["student"])
    batch = next(CacheReader(caches[N], shuffle=False).batches(600))
    inputs, targets = batch_targets(batch, torch.device("cpu"))
    targets.noise = torch.rand(targets.labels.shape[0], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        hidden = model.base_model(**inputs).last_hidden_state[torch.from_numpy(batch.loss_mask)]
        sums = {}
        for chunk in (7, 100_000):
            cfg = DistillConfig(caches=[], student="", out="", loss="hpd", loss_options={"forward": "cached"}, loss_chunk_tokens=chunk)
            sums[chunk] = chunked_loss(model, hidden, targets, cfg)
    torch.testing.assert_close(sums[7][0], sums[100_000][0], rtol=1e-5, atol=1e-4)
    assert math.isfinite(float(sums[7][0])) and sums[7][1]["fkl"] > 0
    tokenizer = AutoTokenizer.from_pretrained(setup["student"])
    dataset = CacheDataset([str(caches[N])], batch_tokens=600, seed=0, world_size=1, rank=0, tokenizer=tokenizer)
    item = CacheCollator("cpu")(dataset.next())
    dataset.close()
    _check_rows(item["targets"])
    loss = distill_loss(model, item["inputs"], item["loss_mask"], item["targets"], loss="fkl")
    loss.backward()
    assert math.isfinite(float(loss.detach())) and all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("loss,options", [("fkl", []), ("hpd", ["--loss-option", "forward=cached"])], ids=["fkl", "hpd-cached"])
def test_distill_cli_trains_on_a_sampled_cache(caches, setup, tmp_path, loss, options):
    out = tmp_path / "run"
    proc = run_cli("distill", "--cache", str(caches[N]), "--student", str(setup["student"]), "--out", str(out), "--loss", loss, *options,
                   "--max-steps", "3", "--batch-tokens", "1024", "--loss-chunk-tokens", "256", "--report-to", "none")
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 3 and all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in steps)
    assert all(r[f"{loss}/fkl"] > -1 and 0 <= r[f"{loss}/teacher_tail_mass"] < 1 for r in steps)


def test_plain_hpd_trains_on_a_sampled_cache(caches, setup, tmp_path):
    from hpd_tools.distill import train

    last = train(DistillConfig(caches=[str(caches[N])], student=str(setup["student"]), out=str(tmp_path / "run"), loss="hpd", max_steps=2,
                               batch_tokens=1024, loss_chunk_tokens=256, report_to=["none"]))
    assert math.isfinite(last["loss"])


def test_mixing_and_losses_that_cannot_read_draws_are_refused_in_one_line(caches, setup, tmp_path):
    topk, sampled, other = str(setup["train"]), str(caches[N]), str(caches[8])
    out = tmp_path / "mixed"
    proc = run_cli("distill", "--cache", topk, "--cache", sampled, "--student", str(setup["student"]), "--out", str(out), "--max-steps", "1",
                   "--report-to", "none")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    expected = (f"error: --cache {topk} (top-k, k=16) and --cache {sampled} (sampled, N={N}): "
                "a run trains on one signal; distill from top-k caches or from sampled caches, not both")
    assert errors == [expected], proc.stderr[-2000:]
    assert not (out / "metrics.jsonl").exists()
    tokenizer = AutoTokenizer.from_pretrained(setup["student"])
    with pytest.raises(HPDError, match=rf"^--cache {sampled} \(sampled, N=16\) and --cache {other} \(sampled, N=8\): .*same --samples$"):
        check_caches([sampled, other], tokenizer)
    stores = check_caches([sampled], tokenizer)

    def config(loss: str, **options) -> DistillConfig:
        return DistillConfig(caches=[sampled], student=str(setup["student"]), out=str(tmp_path / "x"), loss=loss, loss_options=options)

    for loss in ("jsd", "akl"):
        with pytest.raises(HPDError, match=rf"^--loss {loss} cannot use sampled cache {sampled} \(no sound estimator") as info:
            check_signal(config(loss), stores)
        assert "\n" not in str(info.value)
    with pytest.raises(HPDError, match=rf"^--loss-option tail=renormalize does not apply to sampled cache {sampled} "):
        check_signal(config("fkl", tail="renormalize"), stores)
    with pytest.raises(HPDError, match="tail=ignore does not apply"):
        check_signal(config("hpd", forward="cached", tail="ignore"), stores)
    for ok in (config("fkl"), config("hpd", tail="renormalize"), config("rkl", tail_estimate="uniform")):
        check_signal(ok, stores)
    check_signal(config("jsd"), check_caches([topk], tokenizer))  # top-k caches: every loss
    # Refused before any step: train() stops at the check (the CLI prints it as one line, exit 2, as the mixed run above).
    from hpd_tools.distill import train

    with pytest.raises(HPDError, match=rf"^--loss jsd cannot use sampled cache {sampled} "):
        train(dataclasses.replace(config("jsd"), report_to=["none"], max_steps=1))
    assert not (tmp_path / "x" / "metrics.jsonl").exists()


def test_eval_on_a_sampled_cache_reports_the_count_weighted_estimate(caches, setup):
    """eval/fkl_topk on a sampled --eval-cache is sum_v (count_v/N) (lt_v - ls_v) per response
    token (the unbiased estimate of forward KL to the full distribution), not a KL on the drawn set."""
    from hpd_tools.training.evaluation import evaluate

    model = AutoModelForCausalLM.from_pretrained(setup["student"]).eval()
    config = DistillConfig(caches=[str(caches[N])], student=str(setup["student"]), out="unused", batch_tokens=600, dtype="float32")
    got = evaluate(model, str(caches[N]), config, torch.device("cpu"))
    total = count = 0.0
    with torch.no_grad():
        for batch in CacheReader(caches[N], shuffle=False).batches(600, compact=False):
            inputs, t = dense_targets(batch, torch.device("cpu"))
            ls = model(**inputs).logits[torch.from_numpy(batch.loss_mask)].double().log_softmax(-1)
            w = t.sample_weights.double()
            lt = t.topk_logprobs.double().masked_fill(w == 0, 0.0)
            total += float((w * (lt - ls.gather(-1, t.topk_ids))).sum())
            count += float(w.shape[0])
    assert got["eval/tokens"] == count
    assert got["eval/fkl_topk"] == pytest.approx(total / count, rel=1e-5)
