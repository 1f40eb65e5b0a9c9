"""Distillation losses against float64 dense references written here from the
formulas, the tail conventions by hand, and their properties (identical
distributions give zero, masked tokens get no gradient, chunked equals plain)."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from hpd_tools.errors import HPDError
from hpd_tools.losses import LOSSES, TAIL_MASS_FLOOR, LossOutput, Targets, compute_loss, restrict_to_width, sample_from_logits

ATOL = 1e-6
ALL = [
    ("sft", {}),
    ("fkl", {"tail": "bucket"}),
    ("fkl", {"tail": "renormalize"}),
    ("fkl", {"tail": "ignore"}),
    ("rkl", {"tail_estimate": "kth"}),
    ("rkl", {"tail_estimate": "uniform"}),
    ("jsd", {"beta": 0.0}),
    ("jsd", {"beta": 0.1}),
    ("jsd", {"beta": 0.5}),
    ("jsd", {"beta": 1.0}),
    ("akl", {}),
    ("akl", {"mu": 0.8}),
    ("hpd", {"tail_estimate": "kth"}),
    ("hpd", {"tail_estimate": "uniform"}),
]
IDS = [f"{name}-{'-'.join(f'{k}={v}' for k, v in opts.items())}" for name, opts in ALL]


def close(actual, expected, atol=ATOL):
    """Within 1e-6 absolute plus 1e-6 relative: the float32 rounding of values of a few nats."""
    torch.testing.assert_close(torch.as_tensor(actual).double(), torch.as_tensor(expected).double(), rtol=1e-6, atol=atol)


def case(seed: int, *, T: int = 16, V: int = 11, k: int | None = None, scale: float = 2.0):
    """Random student logits (float32 leaf) and a teacher whose top-k is taken from a
    full float32 distribution; returns (logits, targets, teacher log-probs [T, V] float64)."""
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(T, V, generator=g, dtype=torch.float64) * scale).float().requires_grad_()
    lt = torch.log_softmax(torch.randn(T, V, generator=g, dtype=torch.float64) * scale, -1).float()
    labels = torch.randint(0, V, (T,), generator=g)
    vals, ids = lt.topk(k or V, dim=-1)
    t = Targets(
        labels=labels,
        mask=torch.ones(T, dtype=torch.bool),
        label_logprob=lt.gather(-1, labels[:, None]).squeeze(-1),
        topk_ids=ids,
        topk_logprobs=vals,
        noise=torch.rand(T, generator=g, dtype=torch.float64).float(),
    )
    return z, t, lt.double()


def with_(t: Targets, **changes) -> Targets:
    fields = dict(t.__dict__)
    fields.update(changes)
    return Targets(**fields)


def noise_for(z: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """Noise that makes the inverse-CDF sample land mid-interval on ``tokens``."""
    cdf = torch.softmax(z.detach().double(), -1).cumsum(-1)
    lo = torch.cat([torch.zeros(z.shape[0], 1, dtype=torch.float64), cdf[:, :-1]], -1)
    j = torch.tensor(tokens)[:, None]
    return ((lo.gather(-1, j) + cdf.gather(-1, j)) / 2).squeeze(-1).float()


# ----------------------------------------------------------------------------- float64 dense references


def ref_sample(z64: torch.Tensor, noise: torch.Tensor) -> list[int]:
    q = torch.softmax(z64.detach(), -1)
    out = []
    for t in range(q.shape[0]):
        c, pick = 0.0, q.shape[1] - 1
        for v in range(q.shape[1]):
            c += float(q[t, v])
            if float(noise[t]) < c:
                pick = v
                break
        out.append(pick)
    return out


def ref_loss(name: str, z64: torch.Tensor, lt: torch.Tensor, labels: torch.Tensor, noise: torch.Tensor, **opt) -> torch.Tensor:
    """Per-token loss [T], full vocabulary, float64; lt [T, V] the teacher."""
    ls = torch.log_softmax(z64, -1)
    q, p = ls.exp(), lt.exp()
    T, V = ls.shape
    if name == "sft":
        return -ls[torch.arange(T), labels]
    if name == "fkl":
        if opt.get("tail") == "renormalize":
            p = p / p.sum(-1, keepdim=True)
        return (p * (p.log() - ls)).sum(-1)
    if name in ("rkl", "hpd"):
        y2 = ref_sample(z64, noise)
        out = []
        for t in range(T):
            y, yp = int(labels[t]), y2[t]
            if name == "rkl":
                w = lt[t, yp] - ls[t, yp].detach()
                out.append(-w * ls[t, yp])
                continue
            g = (lt[t, y] - ls[t, y].detach()) * q[t, y].detach()
            r = (lt[t, yp] - ls[t, yp].detach()) * q[t, yp].detach()
            mf, mr = bool(g > 0), bool(r < 0)
            w_y = g + p[t, y] * mf + p[t, y] * (mf and mr)
            w_y2 = r * mr
            out.append(-w_y * ls[t, y] - (w_y2 * ls[t, yp] if yp != y else 0.0))
        return torch.stack(out)
    if name == "jsd":
        beta = opt["beta"]
        if beta == 0:
            return (p * (lt - ls)).sum(-1)
        if beta == 1:
            return (q * (ls - lt)).sum(-1)
        m = beta * p + (1 - beta) * q
        return beta * (p * (lt - m.log())).sum(-1) + (1 - beta) * (q * (ls - m.log())).sum(-1)
    if name == "akl":
        mu = opt.get("mu", 0.5)
        out = []
        for t in range(T):
            order = sorted(range(V), key=lambda v: -float(p[t, v]))
            above, g_head, g_tail = 0.0, 0.0, 0.0
            for v in order:
                gap = abs(float(p[t, v]) - float(q[t, v].detach()))
                if above < mu:
                    g_head += gap
                else:
                    g_tail += gap
                above += float(p[t, v])
            fwd = (p[t] * (lt[t] - ls[t])).sum()
            rev = (q[t] * (ls[t] - lt[t])).sum()
            out.append(g_head / (g_head + g_tail) * fwd + g_tail / (g_head + g_tail) * rev)
        return torch.stack(out)
    raise AssertionError(name)


def only(t: Targets, i: int) -> Targets:
    mask = torch.zeros_like(t.mask)
    mask[i] = True
    return with_(t, mask=mask)


# ----------------------------------------------------------------------------- dense agreement (k = V)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name,opts", ALL, ids=IDS)
def test_full_topk_matches_dense_float64_reference(name, opts, seed):
    z, t, lt = case(seed)
    z64 = z.detach().double().requires_grad_()
    ref = ref_loss(name, z64, lt, t.labels, t.noise, **opts)
    if name in ("rkl", "hpd"):
        assert sample_from_logits(z, t.noise).tolist() == ref_sample(z64, t.noise)
    for i in range(z.shape[0]):  # per-token values, one active position at a time
        close(LOSSES[name](z, only(t, i), **opts).loss_sum, ref[i])
    out = LOSSES[name](z, t, **opts)
    assert out.n_tokens == z.shape[0] and out.loss_sum.dtype == torch.float32
    out.loss_sum.backward()
    ref.sum().backward()
    close(z.grad, z64.grad)


def test_rkl_gradient_in_expectation_is_reverse_kl_gradient():
    """sum over y' of pi_s(y') * grad(loss | y') equals grad KL(pi_s || p_T)."""
    z, t, lt = case(3, T=4, V=7)
    q = torch.softmax(z.detach().double(), -1)
    expected_grad = torch.zeros(z.shape, dtype=torch.float64)
    for v in range(z.shape[1]):
        zv = z.detach().clone().requires_grad_()
        LOSSES["rkl"](zv, with_(t, noise=noise_for(zv, [v] * z.shape[0]))).loss_sum.backward()
        expected_grad += q[:, v : v + 1] * zv.grad.double()
    z64 = z.detach().double().requires_grad_()
    ls = torch.log_softmax(z64, -1)
    (ls.exp() * (ls - lt)).sum().backward()
    close(expected_grad, z64.grad)


# ----------------------------------------------------------------------------- tails (k < V)


def buckets64(z: torch.Tensor, t: Targets):
    q = torch.softmax(z.detach().double(), -1)
    p_s = t.topk_logprobs.double().exp()
    q_s = q.gather(-1, t.topk_ids)
    return p_s, q_s, 1 - p_s.sum(-1), 1 - q_s.sum(-1)


@pytest.mark.parametrize("tail", ["bucket", "renormalize", "ignore"])
def test_fkl_tail_conventions_by_hand(tail):
    z, t, _ = case(4, V=11, k=4)
    z64 = z.detach().double().requires_grad_()
    q = torch.softmax(z64, -1)
    p = t.topk_logprobs.double().exp()
    q_s = q.gather(-1, t.topk_ids)
    if tail == "bucket":
        p_rest, q_rest = 1 - p.sum(-1), 1 - q_s.sum(-1)
        assert (p_rest > 0.005).all()
        expected = (p * (p / q_s).log()).sum(-1) + p_rest * (p_rest / q_rest).log()
    elif tail == "renormalize":
        pn = p / p.sum(-1, keepdim=True)
        expected = (pn * (pn / q_s).log()).sum(-1)
    else:
        expected = (p * (p / q_s).log()).sum(-1)
    for i in range(z.shape[0]):
        close(LOSSES["fkl"](z, only(t, i), tail=tail).loss_sum, expected[i])
    out = LOSSES["fkl"](z, t, tail=tail)
    out.loss_sum.backward()
    expected.sum().backward()
    close(z.grad, z64.grad)
    close(out.stats["teacher_tail_mass"], (1 - p.sum(-1)).sum())
    close(out.stats["student_tail_mass"], (1 - q_s.detach().sum(-1)).sum())


def outside_case(seed: int):
    """k < V, with y' forced (by noise) onto a token outside the top-k that is not y."""
    z, t, lt = case(seed, T=6, V=11, k=4)
    outside = []
    for i in range(z.shape[0]):
        choices = [v for v in range(11) if v not in t.topk_ids[i].tolist() and v != int(t.labels[i])]
        outside.append(choices[i % len(choices)])
    return z, with_(t, noise=noise_for(z, outside)), torch.tensor(outside)


def estimate(t: Targets, how: str, V: int) -> torch.Tensor:
    p = t.topk_logprobs.double().exp()
    if how == "kth":
        return t.topk_logprobs[:, -1].double()
    return ((1 - p.sum(-1)) / (V - p.shape[-1])).log()


@pytest.mark.parametrize("how", ["kth", "uniform"])
def test_rkl_outside_topk_uses_the_tail_estimate(how):
    z, t, yp = outside_case(5)
    assert torch.equal(sample_from_logits(z, t.noise), yp)
    est = estimate(t, how, 11)
    if how == "uniform":
        assert (est < t.topk_logprobs[:, -1].double()).all()  # the cap at the k-th is not what is tested
    z64 = z.detach().double().requires_grad_()
    ls = torch.log_softmax(z64, -1).gather(-1, yp[:, None]).squeeze(-1)
    expected = -(est - ls.detach()) * ls
    for i in range(z.shape[0]):
        close(LOSSES["rkl"](z, only(t, i), tail_estimate=how).loss_sum, expected[i])
    out = LOSSES["rkl"](z, t, tail_estimate=how)
    assert out.stats["frac_yprime_outside_topk"] == z.shape[0]
    close(out.stats["rkl_estimate"], (ls.detach() - est).sum())
    out.loss_sum.backward()
    expected.sum().backward()
    close(z.grad, z64.grad)


@pytest.mark.parametrize("how", ["kth", "uniform"])
def test_hpd_outside_topk_uses_the_tail_estimate(how):
    z, t, yp = outside_case(6)
    est = estimate(t, how, 11)
    z64 = z.detach().double().requires_grad_()
    ls = torch.log_softmax(z64, -1)
    lt_full = torch.full(ls.shape, -1e9, dtype=torch.float64)  # a dense teacher that hpd would see
    lt_full.scatter_(-1, t.topk_ids, t.topk_logprobs.double())
    lt_full.scatter_(-1, yp[:, None], est[:, None])
    lt_full.scatter_(-1, t.labels[:, None], t.label_logprob.double()[:, None])
    expected = ref_loss("hpd", z64, lt_full, t.labels, t.noise)
    for i in range(z.shape[0]):
        close(LOSSES["hpd"](z, only(t, i), tail_estimate=how).loss_sum, expected[i])
    out = LOSSES["hpd"](z, t, tail_estimate=how)
    ls_yp = ls.detach().gather(-1, yp[:, None]).squeeze(-1)
    close(out.stats["r"], ((est - ls_yp) * ls_yp.exp()).sum())
    assert out.stats["frac_yprime_outside_topk"] == z.shape[0] == out.stats["frac_yprime_ne_y"]
    out.loss_sum.backward()
    expected.sum().backward()
    close(z.grad, z64.grad)


def test_uniform_estimate_is_capped_at_the_kth_and_floored():
    V, k = 11, 2
    z = torch.zeros(2, V, requires_grad=True)
    # Row 0: top-2 hold 0.4, so the uniform share 0.6/9 = 0.067 exceeds the 2nd's 0.05: capped.
    # Row 1: top-2 hold all the mass: the tail mass is floored.
    lp = torch.tensor([[0.35, 0.05], [0.5, 0.5]]).log()
    t = Targets(
        labels=torch.tensor([0, 0]),
        mask=torch.ones(2, dtype=torch.bool),
        label_logprob=torch.tensor([0.35, 0.5]).log(),
        topk_ids=torch.tensor([[0, 1], [0, 1]]),
        topk_logprobs=lp,
        noise=noise_for(z, [5, 5]),
    )
    ls = -math.log(V)
    out = LOSSES["rkl"](z, t, tail_estimate="uniform")
    expected_lt = torch.tensor([math.log(0.05), math.log(TAIL_MASS_FLOOR / (V - k))], dtype=torch.float64)
    close(out.stats["rkl_estimate"], (ls - expected_lt).sum(), atol=1e-5)
    assert torch.isfinite(out.loss_sum)


def test_jsd_endpoints_are_forward_and_reverse_kl_on_buckets():
    z, t, _ = case(7, V=11, k=4)
    z64 = z.detach().double().requires_grad_()
    q = torch.softmax(z64, -1)
    p_s = t.topk_logprobs.double().exp()
    qb = torch.cat([q.gather(-1, t.topk_ids), 1 - q.gather(-1, t.topk_ids).sum(-1, keepdim=True)], -1)
    pb = torch.cat([p_s, 1 - p_s.sum(-1, keepdim=True)], -1)
    # beta = 0 is fkl with the bucket tail, value and gradient.
    a = LOSSES["jsd"](z, t, beta=0.0)
    z2 = z.detach().clone().requires_grad_()
    b = LOSSES["fkl"](z2, t, tail="bucket")
    close(a.loss_sum, b.loss_sum)
    a.loss_sum.backward()
    b.loss_sum.backward()
    close(z.grad, z2.grad)
    # beta = 1 is KL(q || p) on buckets; the interior is TRL's generalised JSD on buckets.
    for beta, expected in [
        (1.0, (qb * (qb / pb).log()).sum(-1)),
        (0.3, None),
    ]:
        if expected is None:
            m = beta * pb + (1 - beta) * qb
            expected = beta * (pb * (pb / m).log()).sum(-1) + (1 - beta) * (qb * (qb / m).log()).sum(-1)
        zz = z.detach().clone().requires_grad_()
        z64.grad = None
        out = LOSSES["jsd"](zz, t, beta=beta)
        for i in range(z.shape[0]):
            close(LOSSES["jsd"](zz, only(t, i), beta=beta).loss_sum, expected[i])
        close(out.stats["jsd"], expected.sum())
        out.loss_sum.backward()
        expected.sum().backward(retain_graph=True)
        # Reverse KL with a bucket log-ratio of ~4 nats: float32 log-probs (ulp 5e-7 at |ls| ~ 4)
        # bound the agreement of its gradient to a few 1e-6 (1.7e-6 here; 2e-8 when run in float64).
        close(zz.grad, z64.grad, atol=5e-6 if beta == 1.0 else ATOL)


def test_akl_on_buckets_by_hand():
    """The tail bucket counts as tail; top-k tokens are head while the mass above them is < mu."""
    z, t, _ = case(8, T=6, V=11, k=4)
    z64 = z.detach().double().requires_grad_()
    q = torch.softmax(z64, -1)
    p_s = t.topk_logprobs.double().exp()
    qb = torch.cat([q.gather(-1, t.topk_ids), 1 - q.gather(-1, t.topk_ids).sum(-1, keepdim=True)], -1)
    pb = torch.cat([p_s, 1 - p_s.sum(-1, keepdim=True)], -1)
    above = torch.cat([torch.zeros(6, 1, dtype=torch.float64), p_s.cumsum(-1)[:, :-1]], -1)
    head = torch.cat([above < 0.5, torch.zeros(6, 1, dtype=torch.bool)], -1)
    assert head[:, 1:].any() and (~head[:, :-1]).any()  # both head and tail hold top-k tokens somewhere
    gap = (pb - qb.detach()).abs()
    w = (gap * head).sum(-1) / gap.sum(-1)
    expected = w * (pb * (pb / qb).log()).sum(-1) + (1 - w) * (qb * (qb / pb).log()).sum(-1)
    out = LOSSES["akl"](z, t)
    close(out.loss_sum, expected.sum())
    close(out.stats["head_weight"], w.sum())
    out.loss_sum.backward()
    expected.sum().backward()
    close(z.grad, z64.grad)


# ----------------------------------------------------------------------------- properties


def test_identical_distributions_give_zero():
    z, t, _ = case(9)
    zf = z.detach()
    lt = zf - torch.logsumexp(zf, -1, keepdim=True)  # the library's own float32 arithmetic: bitwise equal
    vals, ids = lt.topk(zf.shape[1], dim=-1)
    same = with_(t, topk_ids=ids, topk_logprobs=vals, label_logprob=lt.gather(-1, t.labels[:, None]).squeeze(-1))
    for name, opts in ALL:
        if name == "sft":
            continue
        zz = zf.clone().requires_grad_()
        out = LOSSES[name](zz, same, **opts)
        out.loss_sum.backward()
        close(out.loss_sum, 0.0)
        close(zz.grad, torch.zeros_like(zz))
    out = LOSSES["hpd"](zf, same)
    # g = r = 0 exactly, so neither mask fires and every weight is 0.
    assert out.stats["g"] == 0 and out.stats["r"] == 0
    assert out.stats["frac_mf"] == 0 and out.stats["frac_mr"] == 0 and out.stats["frac_both"] == 0
    assert out.loss_sum == 0


@pytest.mark.parametrize("name,opts", ALL, ids=IDS)
def test_masked_positions_get_no_gradient_and_cannot_poison(name, opts):
    z, t, _ = case(10, V=11, k=4)
    mask = torch.tensor([i % 3 != 0 for i in range(z.shape[0])])
    poisoned = z.detach().clone()
    poisoned[~mask] = float("nan")
    # Padded rows as the cache reader fills them: all-zero top-k log-probs.
    tk = t.topk_logprobs.clone()
    tk[~mask] = 0.0
    zz = poisoned.requires_grad_()
    out = LOSSES[name](zz, with_(t, mask=mask, topk_logprobs=tk), **opts)
    out.loss_sum.backward()
    assert out.n_tokens == int(mask.sum())
    assert torch.isfinite(out.loss_sum) and all(torch.isfinite(v) for v in out.stats.values())
    assert torch.equal(zz.grad[~mask], torch.zeros_like(zz.grad[~mask]))
    # The active rows alone give the same.
    sub = Targets(*(getattr(t, f)[mask] for f in ("labels", "mask", "label_logprob", "topk_ids", "topk_logprobs", "noise")))
    zs = z.detach()[mask].clone().requires_grad_()
    ref = LOSSES[name](zs, sub, **opts)
    ref.loss_sum.backward()
    close(out.loss_sum, ref.loss_sum)
    close(zz.grad[mask], zs.grad)


@pytest.mark.parametrize("name,opts", ALL, ids=IDS)
def test_empty_mask_gives_zero_and_backward_works(name, opts):
    z, t, _ = case(11, k=4)
    out = LOSSES[name](z, with_(t, mask=torch.zeros_like(t.mask)), **opts)
    assert out.n_tokens == 0 and out.loss_sum.item() == 0.0 and out.loss_sum.requires_grad
    out.loss_sum.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))
    assert all(v.item() == 0.0 for v in out.stats.values())


@pytest.mark.parametrize("name,opts", ALL, ids=IDS)
def test_chunked_equals_unchunked(name, opts):
    z, t, _ = case(12, T=20, V=11, k=4)
    t = with_(t, mask=torch.rand(20, generator=torch.Generator().manual_seed(0)) > 0.3)
    whole = LOSSES[name](z, t, **opts)
    whole.loss_sum.backward()
    grad = z.grad.clone()
    z.grad = None
    halves = [LOSSES[name](z[s], t.rows(s), **opts) for s in (slice(0, 9), slice(9, 20))]
    sum(h.loss_sum for h in halves).backward()
    assert whole.n_tokens == sum(h.n_tokens for h in halves)
    close(whole.loss_sum, sum(h.loss_sum for h in halves))
    close(z.grad, grad)
    assert whole.stats.keys() == halves[0].stats.keys()
    for key in whole.stats:
        close(whole.stats[key], halves[0].stats[key] + halves[1].stats[key])


@pytest.mark.parametrize("name,opts", [("rkl", {}), ("hpd", {}), ("akl", {})])
def test_checkpoint_recomputation_gives_the_same_gradient(name, opts):
    z, t, _ = case(13, k=4)
    LOSSES[name](z, t, **opts).loss_sum.backward()
    plain = z.grad.clone()
    z.grad = None
    checkpoint(lambda x: LOSSES[name](x, t, **opts).loss_sum, z, use_reentrant=False).backward()
    assert torch.equal(z.grad, plain)


def test_bfloat16_logits_are_computed_in_float32():
    z, t, _ = case(14, k=4)
    zb = z.detach().bfloat16().requires_grad_()
    out = LOSSES["hpd"](zb, t)
    assert out.loss_sum.dtype == torch.float32
    out.loss_sum.backward()
    assert zb.grad.dtype == torch.bfloat16
    zf = zb.detach().float().requires_grad_()
    ref = LOSSES["hpd"](zf, t)
    close(out.loss_sum, ref.loss_sum)


def test_sampling_frequencies_and_determinism():
    probs = torch.tensor([0.05, 0.4, 0.15, 0.3, 0.1])
    n = 20000
    logits = probs.log().expand(n, -1)
    noise = torch.rand(n, generator=torch.Generator().manual_seed(0))
    ys = sample_from_logits(logits, noise)
    freq = torch.bincount(ys, minlength=5).double() / n
    assert (freq - probs.double()).abs().max() < 0.02
    assert torch.equal(ys, sample_from_logits(logits, noise.clone()))
    # Inverse CDF edges: noise 0 picks the first token with mass, noise -> 1 the last (clamped).
    edge = sample_from_logits(torch.tensor([[-float("inf"), 0.0, 0.0], [0.0, 0.0, 0.0]]), torch.tensor([0.0, 1.0]))
    assert edge.tolist() == [1, 2]


def test_hpd_diagnostics_on_hand_built_positions():
    # Student q and teacher p over 4 tokens; y the data token, y' forced by noise.
    q = torch.tensor([0.3, 0.1, 0.3, 0.3], dtype=torch.float64)
    p = torch.tensor([0.6, 0.2, 0.1, 0.1], dtype=torch.float64)
    rows = [  # (y, y', m_f, m_r)
        (0, 1, True, False),  # teacher wants more of y; student undershoots y'
        (2, 3, False, True),  # student overshoots both
        (0, 2, True, True),  # both fire: extra pull on y
        (0, 0, True, False),  # y' == y: r = g
        (2, 2, False, True),  # y' == y with g < 0: m_r counts, but no push on y'
    ]
    T = len(rows)
    z = q.log().float().expand(T, -1).clone().requires_grad_()
    lt = p.log().float()
    t = Targets(
        labels=torch.tensor([r[0] for r in rows]),
        mask=torch.ones(T, dtype=torch.bool),
        label_logprob=lt[[r[0] for r in rows]],
        topk_ids=p.argsort(descending=True, stable=True).expand(T, -1).clone(),
        topk_logprobs=lt.sort(descending=True, stable=True).values.expand(T, -1).clone(),
        noise=noise_for(z, [r[1] for r in rows]),
    )
    out = LOSSES["hpd"](z, t)
    g = [(p[y].log() - q[y].log()) * q[y] for y, _, _, _ in rows]
    r = [(p[yp].log() - q[yp].log()) * q[yp] for _, yp, _, _ in rows]
    assert out.stats["frac_mf"] == sum(row[2] for row in rows) == 3
    assert out.stats["frac_mr"] == sum(row[3] for row in rows) == 3
    assert out.stats["frac_both"] == 1
    assert out.stats["frac_yprime_ne_y"] == 3
    assert out.stats["frac_yprime_outside_topk"] == 0
    close(out.stats["g"], sum(g))
    close(out.stats["r"], sum(r))
    lq = q.log()
    expected = [
        -(g[0] + p[0]) * lq[0],
        -g[1] * lq[2] - r[1] * lq[3],
        -(g[2] + 2 * p[0]) * lq[0] - r[2] * lq[2],
        -(g[3] + p[0]) * lq[0],
        -g[4] * lq[2],
    ]
    for i in range(T):
        close(LOSSES["hpd"](z, only(t, i)).loss_sum, expected[i])


def test_compute_loss_dispatches_and_rejects_unknowns():
    z, t, _ = case(15, k=4)
    for name, opts in ALL:
        a, b = compute_loss(name, z, t, **opts), LOSSES[name](z, t, **opts)
        assert isinstance(a, LossOutput) and torch.equal(a.loss_sum, b.loss_sum)
    with pytest.raises(HPDError, match="unknown loss 'kl'"):
        compute_loss("kl", z, t)
    with pytest.raises(HPDError, match="no option 'beta'"):
        compute_loss("fkl", z, t, beta=0.5)
    with pytest.raises(HPDError, match="tail='drop'"):
        compute_loss("fkl", z, t, tail="drop")
    with pytest.raises(HPDError, match="tail_estimate"):
        compute_loss("hpd", z, t, tail_estimate="mean")
    with pytest.raises(HPDError, match="beta"):
        compute_loss("jsd", z, t, beta=1.5)
    with pytest.raises(HPDError, match="mu"):
        compute_loss("akl", z, t, mu=0.0)


# ----------------------------------------------------------------------------- widths: teacher ids past the student's logits


def wide_case(seed: int, *, T: int = 12, V: int = 11, extra: int = 6, k: int = 5):
    """A teacher over V + extra ids whose extra ids score high, and a student over V
    (one tokenizer, embeddings of different widths). Row 0 has every top-k id past
    V, row 1 none (when k < V), the others a mix. Returns (logits [T, V], targets, the teacher's
    log-probs [T, V + extra] float64)."""
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(T, V, generator=g, dtype=torch.float64) * 2.0).float().requires_grad_()
    scores = torch.randn(T, V + extra, generator=g, dtype=torch.float64) * 2.0
    scores[:, V:] += 1.5
    scores[0, V:] += 30.0
    scores[1, V:] -= 30.0
    lt = torch.log_softmax(scores, -1).float()
    labels = torch.randint(0, V, (T,), generator=g)
    vals, ids = lt.topk(k, dim=-1)
    dropped = ids >= V
    assert dropped[0].all() and dropped[2:].any(-1).all() and (~dropped[2:]).any(-1).all()
    assert k >= V or not dropped[1].any()
    # y' forced (by noise) onto the row's first kept id (the placeholder of its dropped
    # entries) on even rows, onto a token outside the kept top-k on odd rows.
    forced = []
    for i in range(T):
        kept = [v for v in ids[i].tolist() if v < V]
        outside = [v for v in range(V) if v not in kept and v != int(labels[i])]
        forced.append(kept[0] if kept and (i % 2 == 0 or not outside) else outside[i % len(outside)])
    t = Targets(
        labels=labels,
        mask=torch.ones(T, dtype=torch.bool),
        label_logprob=lt.gather(-1, labels[:, None]).squeeze(-1),
        topk_ids=ids,
        topk_logprobs=vals,
        noise=noise_for(z, forced),
    )
    return z, t, lt.double()


def kl64(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(a > 0, a * (a.log() - b.log()), 0.0).sum(-1)


def wide_reference(name: str, z64: torch.Tensor, t: Targets, lt_full: torch.Tensor, **opt) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-token loss [T], dropped mass [T]), float64, from the dense teacher and
    student: the kept top-k ids (those < V) are buckets, every other teacher id
    (dropped ones included) is in the tail."""
    T, V = z64.shape
    ls = torch.log_softmax(z64, -1)
    q, p_full = ls.exp(), lt_full.exp()
    ids = t.topk_ids
    keep = ids < V
    in_kept = torch.zeros_like(p_full, dtype=torch.bool)
    in_kept.scatter_(-1, torch.where(keep, ids, V), True)  # column V: a dropped slot, unset below
    in_kept[:, V] = False
    dropped = (p_full * torch.zeros_like(in_kept).scatter_(-1, ids, ~keep)).sum(-1)
    if name in ("rkl", "hpd"):
        lt_topk = t.topk_logprobs.double()
        kth = lt_topk.min(-1).values
        if opt.get("tail_estimate", "kth") == "kth":
            est = kth
        else:
            outside_mass = (1 - lt_topk.exp().sum(-1)).clamp(min=TAIL_MASS_FLOOR)
            est = (outside_mass / (V - keep.sum(-1))).log().clamp(max=kth)
        dense = est[:, None].expand(T, V).clone()  # the teacher as hpd sees it over the student's ids
        dense[in_kept[:, :V]] = lt_full[:, :V][in_kept[:, :V]]
        dense.scatter_(-1, t.labels[:, None], t.label_logprob.double()[:, None])
        return ref_loss(name, z64, dense, t.labels, t.noise), dropped
    p_s = torch.where(keep, p_full.gather(-1, ids), 0.0)
    q_s = torch.where(keep, q.gather(-1, ids.clamp(max=V - 1)), 0.0)
    pb = torch.cat([p_s, (p_full * ~in_kept).sum(-1, keepdim=True)], -1)
    qb = torch.cat([q_s, (q * ~in_kept[:, :V]).sum(-1, keepdim=True)], -1)
    pb_floor = torch.cat([p_s, pb[:, -1:].clamp(min=TAIL_MASS_FLOOR)], -1)
    if name == "fkl":
        tail = opt["tail"]
        if tail == "bucket":
            return kl64(pb, qb), dropped
        if tail == "renormalize":
            total = p_s.sum(-1, keepdim=True)
            return kl64(torch.where(total > 0, p_s / total, 0.0), q_s), dropped
        return kl64(p_s, q_s), dropped
    if name == "jsd":
        beta = opt["beta"]
        if beta == 0:
            return kl64(pb, qb), dropped
        if beta == 1:
            return kl64(qb, pb_floor), dropped
        m = beta * pb + (1 - beta) * qb
        return beta * kl64(pb, m) + (1 - beta) * kl64(qb, m), dropped
    if name == "akl":
        mu = opt.get("mu", 0.5)
        above = torch.cat([torch.zeros(T, 1, dtype=torch.float64), p_s.cumsum(-1)[:, :-1]], -1)  # kept mass ranked above
        head = torch.cat([keep & (above < mu), torch.zeros(T, 1, dtype=torch.bool)], -1)
        gap = (pb - qb.detach()).abs()
        w = (gap * head).sum(-1) / gap.sum(-1)
        return w * kl64(pb, qb) + (1 - w) * kl64(qb, pb_floor), dropped
    raise AssertionError(name)


def test_restrict_to_width_by_hand():
    ids = torch.tensor([[12, 3, 15, 4], [13, 14, 11, 12], [1, 2, 3, 4]], dtype=torch.int32)
    lp = torch.tensor([[0.4, 0.3, 0.1, 0.05], [0.5, 0.2, 0.1, 0.1], [0.4, 0.3, 0.2, 0.1]]).log().half()
    out_ids, out_lp, dropped = restrict_to_width(ids, lp, 11)
    assert out_ids.dtype == torch.long and out_lp.dtype == torch.float32
    # Dropped entries: the row's first kept id as placeholder (0 when none is kept), -inf.
    assert out_ids.tolist() == [[3, 3, 3, 4], [0, 0, 0, 0], [1, 2, 3, 4]]
    assert torch.isneginf(out_lp[0, [0, 2]]).all() and torch.isneginf(out_lp[1]).all()
    assert torch.equal(out_lp[2], lp[2].float()) and torch.equal(out_lp[0, [1, 3]], lp[0, [1, 3]].float())
    close(dropped, torch.stack([lp[0, [0, 2]].float().exp().sum(), lp[1].float().exp().sum(), torch.tensor(0.0)]))


@pytest.mark.parametrize("name,opts", [x for x in ALL if x[0] != "sft"], ids=[i for i, x in zip(IDS, ALL) if x[0] != "sft"])
def test_wide_teacher_matches_dense_reference_with_dropped_mass_in_the_tail(name, opts):
    z, t, lt_full = wide_case(20)
    z64 = z.detach().double().requires_grad_()
    ref, dropped = wide_reference(name, z64, t, lt_full, **opts)
    assert (dropped[0] > 0.9) and dropped[1] == 0 and (dropped[2:] > 0).all()
    for i in range(z.shape[0]):
        close(LOSSES[name](z, only(t, i), **opts).loss_sum, ref[i])
    out = LOSSES[name](z, t, **opts)
    assert torch.isfinite(out.loss_sum) and all(torch.isfinite(v) for v in out.stats.values())
    close(out.stats["dropped_mass"], dropped.sum())
    out.loss_sum.backward()
    ref.sum().backward()
    assert torch.isfinite(z.grad).all()
    close(z.grad, z64.grad, atol=5e-6 if name in ("jsd", "akl") else ATOL)  # reverse KL on buckets: see the jsd endpoint test
    if name in ("rkl", "hpd"):
        # Even rows land on the first kept id, odd rows outside the kept top-k (row 0 keeps nothing).
        outside = [i % 2 == 1 or i == 0 for i in range(z.shape[0])]
        assert out.stats["frac_yprime_outside_topk"] == sum(outside)


@pytest.mark.parametrize("name,opts", ALL, ids=IDS)
def test_wide_teacher_chunked_masked_and_bfloat16(name, opts):
    z, t, _ = wide_case(21, T=14)
    mask = torch.tensor([i % 4 != 3 for i in range(14)])
    poisoned = z.detach().clone()
    poisoned[~mask] = float("nan")
    zz = poisoned.requires_grad_()
    whole = LOSSES[name](zz, with_(t, mask=mask), **opts)
    whole.loss_sum.backward()
    assert torch.isfinite(whole.loss_sum) and torch.isfinite(zz.grad).all()
    assert torch.equal(zz.grad[~mask], torch.zeros_like(zz.grad[~mask]))
    zc = z.detach().clone().requires_grad_()
    tm = with_(t, mask=mask)
    halves = [LOSSES[name](zc[s], tm.rows(s), **opts) for s in (slice(0, 5), slice(5, 14))]
    sum(h.loss_sum for h in halves).backward()
    close(whole.loss_sum, sum(h.loss_sum for h in halves))
    close(zz.grad[mask], zc.grad[mask])
    for key in whole.stats:
        close(whole.stats[key], halves[0].stats[key] + halves[1].stats[key])
    zb = z.detach().bfloat16().requires_grad_()
    out = LOSSES[name](zb, t, **opts)
    out.loss_sum.backward()
    assert torch.isfinite(out.loss_sum) and torch.isfinite(zb.grad.float()).all()


@pytest.mark.parametrize("name,opts", ALL, ids=IDS)
def test_wide_teacher_with_k_at_least_the_student_width_stays_finite(name, opts):
    """k >= V: no tail bucket; the dropped mass is left out, nothing indexes past V."""
    z, t, _ = wide_case(22, V=6, extra=8, k=7)
    out = LOSSES[name](z, t, **opts)
    out.loss_sum.backward()
    assert torch.isfinite(out.loss_sum) and torch.isfinite(z.grad).all()
    if name != "sft":
        assert out.stats["dropped_mass"] > 0
