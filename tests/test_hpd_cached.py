"""hpd with forward=cached: fkl's forward term on every cached id plus hpd's reverse
term on y'. The identity tested against float64 dense references:

    grad_z hpd(z; forward=cached, tail) = grad_z fkl(z; tail) + grad_z [-w_y' * ls(y')],
    w_y' = r * [r < 0],  r = (lt(y') - ls(y')) * exp(ls(y'))  (detached)

and forward=data (the default) is the seed's HPD, bit for bit."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from test_distill import config
from test_losses import case, close, noise_for, only, ref_loss, ref_sample, wide_case, wide_reference, with_
from torch.utils.checkpoint import checkpoint

import hpd_tools.losses as L
from hpd_tools.distill import train
from hpd_tools.errors import HPDError
from hpd_tools.losses import LOSSES, TAIL_MASS_FLOOR, LossOutput, Targets, compute_loss
from hpd_tools.training.config import check_loss_options

TAILS = ["bucket", "renormalize", "ignore"]


def cached(z, t, **opts):
    return LOSSES["hpd"](z, t, forward="cached", **opts)


def seed_hpd(logits: torch.Tensor, t: Targets, tail_estimate: str = "kth") -> LossOutput:
    """hpd as it was before the forward option (commit d6b123a), verbatim."""
    s, a = L._active(logits, t)
    top = L._topk(a, s.vocab)
    y = a.labels.long()
    y2 = L._sampled(s, a)
    ls_y, ls_y2 = s.at(y), s.at(y2)
    lt_y = a.label_logprob.float()
    lt_y2, in_topk = L._teacher_logprob_at(y2, a, top, s.vocab, tail_estimate)
    with torch.no_grad():
        g = (lt_y - ls_y) * ls_y.exp()
        r = (lt_y2 - ls_y2) * ls_y2.exp()
        m_f, m_r = g > 0, r < 0
        both = m_f & m_r
        p_y = lt_y.exp()
        w_y = g + p_y * m_f + p_y * both
        differs = y2 != y
        w_y2 = r * m_r * differs
    loss = -w_y * ls_y - w_y2 * ls_y2
    stats = {"frac_mf": L._sum(m_f), "frac_mr": L._sum(m_r), "frac_both": L._sum(both), "frac_yprime_ne_y": L._sum(differs), "g": L._sum(g),
             "r": L._sum(r), "frac_yprime_outside_topk": L._sum(~in_topk), "dropped_mass": L._sum(top.dropped), "nll": L._sum(-ls_y.detach())}
    return LossOutput(loss.sum(), a.labels.shape[0], stats)


def dense_teacher(t: Targets, V: int, how: str) -> torch.Tensor:
    """lt [T, V] float64 as hpd reads it at y': the kept top-k exact, the label exact,
    every other id the tail estimate (the module docstring of hpd_tools.losses)."""
    stored = t.topk_logprobs.double()
    keep = t.topk_ids < V
    kth = stored.min(-1).values
    if how == "kth":
        est = kth
    else:
        mass = (1 - stored.exp().sum(-1)).clamp(min=TAIL_MASS_FLOOR)
        est = (mass / (V - keep.sum(-1)).clamp(min=1)).log().clamp(max=kth)
    dense = est[:, None].expand(-1, V).clone()
    for i in range(dense.shape[0]):
        for j in range(t.topk_ids.shape[1]):
            if keep[i, j]:
                dense[i, t.topk_ids[i, j]] = stored[i, j]
    dense.scatter_(-1, t.labels[:, None], t.label_logprob.double()[:, None])
    return dense


def reverse_ref(z64: torch.Tensor, t: Targets, how: str) -> torch.Tensor:
    """-w_y' * ls(y') [T], float64: hpd's reverse term on y', no [y' != y] gate."""
    ls = torch.log_softmax(z64, -1)
    lt = dense_teacher(t, z64.shape[1], how)
    rows = torch.arange(z64.shape[0])
    y2 = torch.tensor(ref_sample(z64, t.noise))
    ls_y2 = ls[rows, y2]
    r = (lt[rows, y2] - ls_y2.detach()) * ls_y2.detach().exp()
    return -(r * (r < 0)) * ls_y2


def shaped(kind: str, seed: int):
    """(logits, targets, teacher [T, >V] float64): a top-k with a tail, the full
    distribution (k = V), or a teacher wider than the student (dropped ids)."""
    if kind == "wide":
        return wide_case(20)  # wide_case asserts its row layout, which holds for the seeds test_losses uses
    z, t, lt = case(seed, V=11, k=None if kind == "full" else 4)
    return z, t, torch.cat([lt, torch.full((lt.shape[0], 1), -math.inf, dtype=lt.dtype)], -1)  # one empty column: wide_reference's shape


def fkl_reference(kind: str, z64: torch.Tensor, t: Targets, lt_full: torch.Tensor, tail: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(fkl's per-token value [T], dropped mass [T]) in float64; k = V has no tail
    bucket (the bucket reference would take the log of an empty one)."""
    if kind == "full":
        return ref_loss("fkl", z64, lt_full[:, : z64.shape[1]], t.labels, t.noise, tail=tail), torch.zeros(z64.shape[0], dtype=torch.float64)
    return wide_reference("fkl", z64, t, lt_full, tail=tail)


@pytest.mark.parametrize("how", ["kth", "uniform"])
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("kind", ["topk", "full", "wide"])
def test_gradient_is_fkl_plus_the_reverse_term(kind, tail, how):
    z, t, lt_full = shaped(kind, 30)
    z64 = z.detach().double().requires_grad_()
    forward, dropped = fkl_reference(kind, z64, t, lt_full, tail)
    ref = forward + reverse_ref(z64, t, how)
    for i in range(z.shape[0]):
        close(cached(z, only(t, i), tail=tail, tail_estimate=how).loss_sum, ref[i])
    out = cached(z, t, tail=tail, tail_estimate=how)
    close(out.stats["fkl"], forward.detach().sum())
    close(out.stats["dropped_mass"], dropped.sum())
    out.loss_sum.backward()
    ref.sum().backward()
    close(z.grad, z64.grad)
    # The same identity with the library's own fkl for the forward part.
    zf = z.detach().clone().requires_grad_()
    LOSSES["fkl"](zf, t, tail=tail).loss_sum.backward()
    z64r = z.detach().double().requires_grad_()
    reverse_ref(z64r, t, how).sum().backward()
    close(z.grad, zf.grad.double() + z64r.grad)


@pytest.mark.parametrize("how", ["kth", "uniform"])
@pytest.mark.parametrize("kind", ["topk", "full", "wide"])
def test_forward_data_is_the_seed_hpd_bit_for_bit(kind, how):
    z, t, _ = shaped(kind, 31)
    t = with_(t, mask=torch.arange(z.shape[0]) % 5 != 2)
    runs = {}
    for label, fn in [("seed", lambda x: seed_hpd(x, t, how)), ("default", lambda x: LOSSES["hpd"](x, t, tail_estimate=how)),
                      ("data", lambda x: LOSSES["hpd"](x, t, tail_estimate=how, forward="data", tail="renormalize"))]:
        x = z.detach().clone().requires_grad_()
        out = fn(x)
        out.loss_sum.backward()
        runs[label] = (out, x.grad)
    seed_out, seed_grad = runs["seed"]
    for label in ("default", "data"):
        out, grad = runs[label]
        assert torch.equal(out.loss_sum, seed_out.loss_sum) and torch.equal(grad, seed_grad), label
        assert out.stats.keys() == seed_out.stats.keys() and all(torch.equal(out.stats[k], seed_out.stats[k]) for k in out.stats), label


def test_forward_data_with_a_given_draw_is_the_seed_hpd():
    z, t, _ = shaped("topk", 32)
    t = with_(t, sampled=torch.randint(0, 11, (z.shape[0],), generator=torch.Generator().manual_seed(1)))
    assert torch.equal(LOSSES["hpd"](z, t).loss_sum, seed_hpd(z, t).loss_sum)


def test_the_reverse_term_applies_where_y_prime_is_y():
    """Student overshoots y at y' == y: forward=data leaves it to w_y (= g = r),
    forward=cached pushes y' down by r on top of fkl's term."""
    q = torch.tensor([0.7, 0.1, 0.1, 0.1], dtype=torch.float64)
    p = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    z = q.log().float()[None].requires_grad_()
    lt = p.log().float()
    t = Targets(labels=torch.tensor([0]), mask=torch.tensor([True]), label_logprob=lt[:1], topk_ids=torch.arange(4)[None],
                topk_logprobs=lt[None], noise=noise_for(z, [0]))
    out = cached(z, t)
    r = (p[0].log() - q[0].log()) * q[0]
    assert r < 0 and out.stats["frac_mr"] == 1 and out.stats["frac_yprime_ne_y"] == 0
    close(out.loss_sum, (p * (p / q).log()).sum() - r * q[0].log())
    close(out.stats["r"], r)


def test_identical_distributions_give_zero():
    z, t, _ = case(33, V=11, k=4)
    zf = z.detach()
    lt = zf - torch.logsumexp(zf, -1, keepdim=True)
    vals, ids = lt.topk(11, dim=-1)
    same = with_(t, topk_ids=ids, topk_logprobs=vals, label_logprob=lt.gather(-1, t.labels[:, None]).squeeze(-1))
    for tail in TAILS:
        x = zf.clone().requires_grad_()
        out = cached(x, same, tail=tail)
        out.loss_sum.backward()
        close(out.loss_sum, 0.0)
        close(x.grad, torch.zeros_like(x))
        assert out.stats["frac_mr"] == 0


@pytest.mark.parametrize("tail", TAILS)
def test_masked_empty_chunked_bfloat16_and_checkpoint(tail):
    z, t, _ = wide_case(21, T=14)
    mask = torch.tensor([i % 4 != 3 for i in range(14)])
    poisoned = z.detach().clone()
    poisoned[~mask] = float("nan")
    tk = t.topk_logprobs.clone()
    tk[~mask] = 0.0  # padded rows as the reader fills them
    tm = with_(t, mask=mask, topk_logprobs=tk)
    zz = poisoned.requires_grad_()
    whole = cached(zz, tm, tail=tail)
    whole.loss_sum.backward()
    assert whole.n_tokens == int(mask.sum()) and torch.isfinite(whole.loss_sum)
    assert all(torch.isfinite(v) for v in whole.stats.values())
    assert torch.equal(zz.grad[~mask], torch.zeros_like(zz.grad[~mask]))
    zc = z.detach().clone().requires_grad_()
    halves = [cached(zc[s], tm.rows(s), tail=tail) for s in (slice(0, 5), slice(5, 14))]
    sum(h.loss_sum for h in halves).backward()
    close(whole.loss_sum, sum(h.loss_sum for h in halves))
    close(zz.grad[mask], zc.grad[mask])
    for key in whole.stats:
        close(whole.stats[key], halves[0].stats[key] + halves[1].stats[key])
    empty = cached(zc, with_(t, mask=torch.zeros_like(mask)), tail=tail)
    assert empty.n_tokens == 0 and empty.loss_sum.item() == 0.0 and all(v.item() == 0.0 for v in empty.stats.values())
    zb = z.detach().bfloat16().requires_grad_()
    out = cached(zb, t, tail=tail)
    assert out.loss_sum.dtype == torch.float32
    out.loss_sum.backward()
    assert zb.grad.dtype == torch.bfloat16 and torch.isfinite(zb.grad.float()).all()
    zp = z.detach().clone().requires_grad_()
    cached(zp, t, tail=tail).loss_sum.backward()
    zk = z.detach().clone().requires_grad_()
    checkpoint(lambda x: cached(x, t, tail=tail).loss_sum, zk, use_reentrant=False).backward()
    assert torch.equal(zk.grad, zp.grad)


def test_student_tail_from_the_gathered_ids():
    """Above ~1e-6 the student's tail mass (1 - sum_topk q) gives fkl's bucket loss;
    a student with almost none still has its tail logits pushed up (the clamp's
    zero slope would push them down, toward the top-k the forward term weights)."""
    V, k = 11, 3
    p = torch.tensor([0.5, 0.3, 0.1]).log()
    t = Targets(labels=torch.tensor([0, 0]), mask=torch.ones(2, dtype=torch.bool), label_logprob=p[:1].expand(2),
                topk_ids=torch.arange(k).expand(2, -1), topk_logprobs=p.expand(2, -1), noise=torch.zeros(2))
    z = torch.zeros(2, V)
    z[0, :k] = 8.0  # student tail ~ 8 * exp(-8) / 3 ~ 1e-3
    z[1, :k] = 20.0  # ~ 5e-9: below what 1 - sum resolves
    x = z.clone().requires_grad_()
    out = cached(x, only(t, 0))
    ref = LOSSES["fkl"](z[:1], t.rows(torch.tensor([0])))
    close(out.stats["fkl"], ref.loss_sum, atol=1e-5)
    x = z.clone().requires_grad_()
    out = cached(x, only(t, 1))
    out.loss_sum.backward()
    assert torch.isfinite(out.loss_sum) and torch.isfinite(x.grad).all()
    assert (x.grad[1, k:] < 0).all()


def test_unknown_values_are_one_line_errors():
    z, t, _ = case(35, k=4)
    with pytest.raises(HPDError, match=r"^loss option forward='dense' is not one of data, cached$"):
        compute_loss("hpd", z, t, forward="dense")
    with pytest.raises(HPDError, match=r"^loss option tail='drop' is not one of bucket, renormalize, ignore$"):
        compute_loss("hpd", z, t, forward="cached", tail="drop")
    with pytest.raises(HPDError, match=r"^--loss-option forward=dense: loss option forward='dense' is not one of data, cached$"):
        check_loss_options("hpd", {"forward": "dense"})
    check_loss_options("hpd", {"forward": "cached", "tail": "renormalize", "tail_estimate": "uniform"})


def test_one_step_trains_with_forward_cached(setup, tmp_path):
    last = train(config(setup, tmp_path / "run", max_steps=1, loss_options={"forward": "cached"}))
    assert math.isfinite(last["loss"]) and (tmp_path / "run" / "final" / "config.json").exists()
    row = json.loads(Path(tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert row["hpd/fkl"] > 0 and "hpd/frac_mr" in row and "hpd/frac_mf" not in row


def test_resume_compares_the_forward_option():
    """A run saved before the option existed (no loss options) resumes as forward=data;
    forward=cached is a change check_resume names."""
    from hpd_tools.training.run_folder import _run_options

    run = {"caches": ["c"], "student": "s", "out": "o", "loss": "hpd"}
    before = _run_options(run, None)["loss_options"]
    assert before == _run_options({**run, "loss_options": {"forward": "data"}}, None)["loss_options"]
    assert before != _run_options({**run, "loss_options": {"forward": "cached"}}, None)["loss_options"]
