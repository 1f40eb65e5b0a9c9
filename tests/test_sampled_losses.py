"""Losses on the two new teacher signals, against float64 dense references.

Dense (``Targets.teacher_logprobs``): every loss exact over the vocabulary, its
value and gradient equal to the reference built from the full teacher (the
top-k fields and the label log-prob are garbage here: they must not be read).

Sampled (``Targets.sample_weights``, count/N on the distinct drawn ids): fkl's
estimate and its gradient equal the dense ones in expectation over seeded draws
(hpd_tools.sampling.sample_rows, the draws a sampled cache stores); rkl/hpd equal
the dense loss exactly when y' is always drawn; the tail estimates by hand; and
the properties (padding changes nothing, masked rows get no gradient, chunked
equals whole, no NaN from -inf padding)."""

from __future__ import annotations

import math

import pytest
import torch
from test_hpd_cached import reverse_ref
from test_losses import ALL, IDS, close, only, ref_loss, ref_sample, with_

from hpd_tools.errors import HPDError
from hpd_tools.losses import LOSSES, TAIL_MASS_FLOOR, Targets, compute_loss
from hpd_tools.sampling import sample_rows

DENSE = [x for x in ALL if x[0] != "sft"] + [("hpd", {"forward": "cached"})]
DENSE_IDS = [i for i, x in zip(IDS, ALL) if x[0] != "sft"] + ["hpd-forward=cached"]


def dense_case(seed: int, *, T: int = 12, V: int = 11, scale: float = 2.0, width: int | None = None):
    """(logits [T, V] float32 leaf, dense targets, teacher log-probs [T, width] float64).
    topk_* and label_logprob hold garbage: a dense loss reads teacher_logprobs only."""
    g = torch.Generator().manual_seed(seed)
    width = width or V
    z = (torch.randn(T, V, generator=g, dtype=torch.float64) * scale).float().requires_grad_()
    lt = torch.log_softmax(torch.randn(T, width, generator=g, dtype=torch.float64) * scale, -1).float()
    labels = torch.randint(0, min(V, width), (T,), generator=g)
    t = Targets(
        labels=labels,
        mask=torch.ones(T, dtype=torch.bool),
        label_logprob=torch.full((T,), -0.5),
        topk_ids=torch.zeros(T, 2, dtype=torch.long),
        topk_logprobs=torch.full((T, 2), -0.1),
        noise=torch.rand(T, generator=g, dtype=torch.float64).float(),
        teacher_logprobs=lt,
    )
    return z, t, lt.double()


def dense_ref(name: str, z64: torch.Tensor, lt: torch.Tensor, t: Targets, **opts) -> torch.Tensor:
    if opts.get("forward") == "cached":
        full = with_(t, label_logprob=lt.gather(-1, t.labels[:, None]).squeeze(-1).float(), topk_ids=lt.argsort(-1, descending=True),
                     topk_logprobs=lt.sort(-1, descending=True).values.float())
        return ref_loss("fkl", z64, lt, t.labels, t.noise) + reverse_ref(z64, full, opts.get("tail_estimate", "kth"))
    return ref_loss(name, z64, lt, t.labels, t.noise, **{k: v for k, v in opts.items() if k != "forward"})


# ----------------------------------------------------------------------------- dense


@pytest.mark.parametrize("name,opts", DENSE, ids=DENSE_IDS)
def test_dense_matches_float64_reference(name, opts):
    z, t, lt = dense_case(40)
    z64 = z.detach().double().requires_grad_()
    ref = dense_ref(name, z64, lt, t, **opts)
    for i in range(z.shape[0]):
        close(LOSSES[name](z, only(t, i), **opts).loss_sum, ref[i])
    out = LOSSES[name](z, t, **opts)
    assert out.n_tokens == z.shape[0] and torch.isfinite(out.loss_sum)
    if name in ("rkl", "hpd"):
        assert out.stats["frac_yprime_outside_topk"] == 0
    out.loss_sum.backward()
    ref.sum().backward()
    close(z.grad, z64.grad, atol=5e-6 if name in ("jsd", "akl") else 1e-6)  # reverse KL in float32: see test_losses' jsd endpoint test


@pytest.mark.parametrize("name,opts", [("fkl", {}), ("hpd", {"forward": "cached"}), ("rkl", {})])
def test_dense_wider_teacher_leaves_its_extra_ids_out(name, opts):
    """A teacher over V + 5 ids: ids >= V drop out, their mass is dropped_mass."""
    V = 11
    z, t, lt = dense_case(41, V=V, width=V + 5)
    z64 = z.detach().double().requires_grad_()
    ref = dense_ref(name, z64, lt[:, :V], t, **opts)
    out = LOSSES[name](z, t, **opts)
    close(out.loss_sum, ref.sum())
    close(out.stats["dropped_mass"], lt[:, V:].exp().sum())
    out.loss_sum.backward()
    ref.sum().backward()
    close(z.grad, z64.grad)


def test_dense_teacher_with_impossible_tokens_and_a_narrow_teacher_stays_finite():
    """-inf teacher entries and student ids past the teacher's width read as log(1e-8 / V)."""
    z, t, _ = dense_case(42, V=11, width=9)
    lt = t.teacher_logprobs.clone()
    lt[:, 3] = float("-inf")
    t = with_(t, teacher_logprobs=lt)
    for name, opts in DENSE:
        zz = z.detach().clone().requires_grad_()
        out = LOSSES[name](zz, t, **opts)
        out.loss_sum.backward()
        assert torch.isfinite(out.loss_sum) and torch.isfinite(zz.grad).all(), (name, opts)
        assert all(torch.isfinite(v) for v in out.stats.values())
    floor = math.log(TAIL_MASS_FLOOR / 11)
    zz = z.detach().clone().requires_grad_()
    LOSSES["fkl"](zz, t).loss_sum.backward()
    lt64 = torch.cat([lt.double(), torch.full((lt.shape[0], 2), floor, dtype=torch.float64)], -1).clamp(min=floor)
    z64 = z.detach().double().requires_grad_()
    ref_loss("fkl", z64, lt64, t.labels, t.noise).sum().backward()
    close(zz.grad, z64.grad)


def assert_halves_add_up(name, opts, z, tm, whole, grad, cut):
    """The loss of rows [:cut] plus rows [cut:] equals the loss of all rows ``whole``
    (value, stats, and gradient ``grad`` on the active rows)."""
    zc = z.detach().clone().requires_grad_()
    halves = [LOSSES[name](zc[s], tm.rows(s), **opts) for s in (slice(0, cut), slice(cut, z.shape[0]))]
    sum(h.loss_sum for h in halves).backward()
    close(whole.loss_sum, sum(h.loss_sum for h in halves))
    close(grad[tm.mask], zc.grad[tm.mask])
    for key in whole.stats:
        close(whole.stats[key], halves[0].stats[key] + halves[1].stats[key])


@pytest.mark.parametrize("name,opts", DENSE, ids=DENSE_IDS)
def test_dense_masked_chunked_and_bfloat16(name, opts):
    z, t, _ = dense_case(43, T=14)
    mask = torch.tensor([i % 4 != 3 for i in range(14)])
    poisoned = z.detach().clone()
    poisoned[~mask] = float("nan")
    lt = t.teacher_logprobs.clone()
    lt[~mask] = float("nan")  # a padded row's teacher is never read
    tm = with_(t, mask=mask, teacher_logprobs=lt)
    zz = poisoned.requires_grad_()
    whole = LOSSES[name](zz, tm, **opts)
    whole.loss_sum.backward()
    assert torch.isfinite(whole.loss_sum) and torch.equal(zz.grad[~mask], torch.zeros_like(zz.grad[~mask]))
    assert_halves_add_up(name, opts, z, tm, whole, zz.grad, cut=5)
    zb = z.detach().bfloat16().requires_grad_()
    out = LOSSES[name](zb, t, **opts)
    assert out.loss_sum.dtype == torch.float32
    out.loss_sum.backward()
    assert torch.isfinite(zb.grad.float()).all()


def test_dense_identical_distributions_give_zero():
    z, t, _ = dense_case(44)
    zf = z.detach()
    same = with_(t, teacher_logprobs=zf - torch.logsumexp(zf, -1, keepdim=True))
    for name, opts in DENSE:
        zz = zf.clone().requires_grad_()
        out = LOSSES[name](zz, same, **opts)
        out.loss_sum.backward()
        close(out.loss_sum, 0.0)
        close(zz.grad, torch.zeros_like(zz))


# ----------------------------------------------------------------------------- sampled


def sampled_targets(lt: torch.Tensor, seed: int, n: int, *, labels: torch.Tensor, noise: torch.Tensor, pad: int = 0) -> Targets:
    """Targets as a sampled cache gives them: n seeded draws per row from lt [T, V]
    (float32), the distinct ids with their exact log-probs, weights count/n, and
    ``pad`` extra columns of padding (id 0, -inf, weight 0)."""
    T = lt.shape[0]
    ids, lps, counts = sample_rows(lt, seed, torch.arange(T), n)
    if pad:
        ids = torch.cat([ids, ids.new_zeros(T, pad)], -1)
        lps = torch.cat([lps, lps.new_full((T, pad), float("-inf"))], -1)
        counts = torch.cat([counts, counts.new_zeros(T, pad)], -1)
    return Targets(labels=labels, mask=torch.ones(T, dtype=torch.bool), label_logprob=lt.gather(-1, labels[:, None]).squeeze(-1),
                   topk_ids=ids, topk_logprobs=lps, noise=noise, sample_weights=counts.float() / n)


@pytest.fixture(scope="module")
def teacher():
    """A teacher over 11 ids with a long tail (a few ids under 1%), a student, labels."""
    g = torch.Generator().manual_seed(50)
    T, V = 5, 11
    lt = torch.log_softmax(torch.randn(T, V, generator=g, dtype=torch.float64) * 1.5, -1).float()
    z = (torch.randn(T, V, generator=g, dtype=torch.float64) * 1.5).float()
    labels = torch.randint(0, V, (T,), generator=g)
    noise = torch.rand(T, generator=g)
    return z, lt, labels, noise


def test_fkl_estimate_and_its_gradient_are_unbiased(teacher):
    """The mean over S independent draws (S copies of each row, drawn at distinct
    positions: sample_rows' draws are independent across positions) of fkl's estimate
    (per row) and of its gradient (per logit) against the float64 dense KL(p || pi_s)
    and its gradient. The estimate is the mean of N i.i.d. f(v) = lt(v) - ls(v),
    v ~ p, and the gradient is q - count/N, so the standard errors are exact:
    sqrt(Var_p f / (N S)) and sqrt(p (1 - p) / (N S)). Each of the 5 + 55 quantities
    must lie within 5 of them (plus 1e-6 of float32 rounding): a false alarm has
    probability < 4e-5 over all 60 for Gaussian means, and the seed is fixed, so the
    test is deterministic. N = 4: the estimate is not the exact KL on any row."""
    z, lt, labels, noise = teacher
    S, N = 4000, 4
    T, V = z.shape
    t = sampled_targets(lt.repeat(S, 1), 9, N, labels=labels.repeat(S), noise=noise.repeat(S))
    assert torch.equal(t.sample_weights.sum(-1), torch.ones(S * T))  # weights sum to 1 per row
    zz = z.repeat(S, 1).requires_grad_()
    out = LOSSES["fkl"](zz, t)
    out.loss_sum.backward()
    grads = zz.grad.double().view(S, T, V)
    row = torch.arange(S * T) % T
    values = torch.stack([LOSSES["fkl"](zz.detach(), with_(t, mask=row == i)).loss_sum.double() for i in range(T)]) / S
    z64 = z.double().requires_grad_()
    ref = ref_loss("fkl", z64, lt.double(), labels, noise)
    ref.sum().backward()
    p = lt.double().exp()
    f = lt.double() - torch.log_softmax(z.double(), -1)
    var_f = (p * f**2).sum(-1) - (p * f).sum(-1) ** 2
    for mean, se, expected in [(values, (var_f / (N * S)).sqrt(), ref.detach()), (grads.mean(0), (p * (1 - p) / (N * S)).sqrt(), z64.grad)]:
        z_scores = ((mean - expected).abs() - 1e-6).clamp(min=0) / se
        assert z_scores.max() < 5.0, z_scores.max()
    assert (grads.std(0).amax(-1) > 0.1).all() and (var_f > 0.1).all()  # the draws vary: the test is not of a constant


def test_hpd_and_rkl_equal_the_dense_loss_when_y_prime_is_always_drawn():
    """A teacher with every id at >= 5% and N = 255 draws: every id is drawn (asserted),
    so lt(y') is exact and rkl / hpd (forward=data) equal their dense references."""
    g = torch.Generator().manual_seed(51)
    T, V = 8, 6
    p = torch.softmax(torch.randn(T, V, generator=g, dtype=torch.float64) * 0.3, -1)
    assert (p > 0.05).all()
    lt = p.log().float()
    z = (torch.randn(T, V, generator=g, dtype=torch.float64) * 1.5).float().requires_grad_()
    labels = torch.randint(0, V, (T,), generator=g)
    t = sampled_targets(lt, 7, 255, labels=labels, noise=torch.rand(T, generator=g), pad=3)
    assert ((t.sample_weights > 0).sum(-1) == V).all()
    for name, opts in [("rkl", {"tail_estimate": "kth"}), ("rkl", {"tail_estimate": "uniform"}), ("hpd", {}), ("hpd", {"tail_estimate": "uniform"})]:
        zz = z.detach().clone().requires_grad_()
        z64 = z.detach().double().requires_grad_()
        ref = ref_loss(name, z64, lt.double(), labels, t.noise)
        out = LOSSES[name](zz, t, **opts)
        assert out.stats["frac_yprime_outside_topk"] == 0
        close(out.loss_sum, ref.sum())
        out.loss_sum.backward()
        ref.sum().backward()
        close(zz.grad, z64.grad)


def test_tail_estimates_for_an_undrawn_y_prime_by_hand():
    """y' forced (``sampled``) onto an undrawn id: uniform = log((1 - m) / (V - d)),
    not capped at the smallest drawn log-prob; kth = the smallest drawn log-prob."""
    V = 11
    lp = torch.tensor([[0.5, 0.3, 0.001, float("nan")], [0.6, 0.05, 0.0, 0.0]]).log()
    lp[0, 3] = 0.0  # padding decoded to a finite code: the weight 0 is what marks it
    lp[1, 2:] = float("-inf")
    t = Targets(labels=torch.tensor([0, 0]), mask=torch.ones(2, dtype=torch.bool), label_logprob=torch.tensor([0.5, 0.6]).log(),
                topk_ids=torch.tensor([[0, 1, 2, 0], [0, 1, 0, 0]]), topk_logprobs=lp, noise=torch.zeros(2),
                sample_weights=torch.tensor([[0.5, 0.25, 0.25, 0.0], [0.75, 0.25, 0.0, 0.0]]), sampled=torch.tensor([7, 9]))
    z = torch.zeros(2, V)
    ls = -math.log(V)
    m = torch.tensor([0.801, 0.65], dtype=torch.float64)
    uniform = ((1 - m) / torch.tensor([V - 3, V - 2])).log()
    assert uniform[0] > math.log(0.001)  # the uniform share exceeds the smallest drawn: no cap
    kth = torch.tensor([0.001, 0.05], dtype=torch.float64).log()
    for how, lt in [("uniform", uniform), ("kth", kth)]:
        out = LOSSES["rkl"](z, t, tail_estimate=how)
        close(out.stats["rkl_estimate"], (ls - lt).sum(), atol=1e-5)
        assert out.stats["frac_yprime_outside_topk"] == 2
    # y' == 0 is drawn in both rows; padding holds id 0 too but must not be matched (its -inf would be read).
    out = LOSSES["rkl"](z, with_(t, sampled=torch.tensor([0, 0]), labels=torch.tensor([1, 1]), label_logprob=torch.tensor([0.3, 0.05]).log()))
    close(out.stats["rkl_estimate"], (ls - torch.tensor([0.5, 0.6], dtype=torch.float64).log()).sum(), atol=1e-5)


def test_hpd_cached_on_sampled_targets_is_the_fkl_estimate_plus_the_reverse_term(teacher):
    z, lt, labels, noise = teacher
    t = sampled_targets(lt, 3, 16, labels=labels, noise=noise)
    za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
    cached = LOSSES["hpd"](za, t, forward="cached", tail_estimate="uniform")
    fkl = LOSSES["fkl"](zb, t)
    rev = LOSSES["hpd"](z, t, tail_estimate="uniform")  # only for the reverse weight r, recomputed below
    close(cached.stats["fkl"], fkl.loss_sum)
    # The reverse term by hand: lt(y') exact where drawn, else log((1 - m) / (V - d)).
    y2 = torch.tensor(ref_sample(z.double(), noise))
    w = t.sample_weights
    drawn = (t.topk_ids == y2[:, None]) & (w > 0)
    m = torch.where(w > 0, t.topk_logprobs.double().exp(), 0.0).sum(-1)
    est = ((1 - m) / (z.shape[1] - (w > 0).sum(-1))).log()
    lt_y2 = torch.where(drawn.any(-1), torch.where(drawn, t.topk_logprobs.double(), 0.0).sum(-1), est)
    z64 = z.double().requires_grad_()
    ls = torch.log_softmax(z64, -1)[torch.arange(z.shape[0]), y2]
    r = (lt_y2 - ls.detach()) * ls.detach().exp()
    close(cached.stats["r"], r.sum())
    close(rev.stats["r"], r.sum())
    (-(r * (r < 0)) * ls).sum().backward()
    cached.loss_sum.backward()
    fkl.loss_sum.backward()
    close(za.grad, zb.grad.double() + z64.grad)


SAMPLED = [("fkl", {}), ("rkl", {}), ("rkl", {"tail_estimate": "uniform"}), ("hpd", {}), ("hpd", {"tail_estimate": "uniform"}),
           ("hpd", {"forward": "cached"}), ("sft", {})]
SAMPLED_IDS = ["fkl", "rkl-kth", "rkl-uniform", "hpd-kth", "hpd-uniform", "hpd-cached", "sft"]


@pytest.mark.parametrize("name,opts", SAMPLED, ids=SAMPLED_IDS)
def test_sampled_padding_masking_chunking(name, opts, teacher):
    z, lt, labels, noise = teacher
    z, lt, labels, noise = z.repeat(3, 1), lt.repeat(3, 1), labels.repeat(3), noise.repeat(3)  # 15 rows
    t = sampled_targets(lt, 11, 6, labels=labels, noise=noise)
    # Padding: more of it (and codes decoded to finite log-probs under weight 0) changes nothing.
    wide = sampled_targets(lt, 11, 6, labels=labels, noise=noise, pad=4)
    garbage = wide.topk_logprobs.clone()
    garbage[torch.isneginf(garbage)] = -0.25
    for other in (wide, with_(wide, topk_logprobs=garbage)):
        za, zb = z.clone().requires_grad_(), z.clone().requires_grad_()
        a, b = LOSSES[name](za, t, **opts), LOSSES[name](zb, other, **opts)
        a.loss_sum.backward()
        b.loss_sum.backward()
        close(a.loss_sum, b.loss_sum)
        close(za.grad, zb.grad)
        for key in a.stats:
            close(a.stats[key], b.stats[key])
    # Masked rows: no gradient, poison ignored; chunked equals whole; finite everywhere.
    mask = torch.tensor([i % 4 != 1 for i in range(15)])
    poisoned = z.clone()
    poisoned[~mask] = float("nan")
    tm = with_(wide, mask=mask)
    zz = poisoned.requires_grad_()
    whole = LOSSES[name](zz, tm, **opts)
    whole.loss_sum.backward()
    assert torch.isfinite(whole.loss_sum) and torch.isfinite(zz.grad).all() and all(torch.isfinite(v) for v in whole.stats.values())
    assert torch.equal(zz.grad[~mask], torch.zeros_like(zz.grad[~mask]))
    assert_halves_add_up(name, opts, z, tm, whole, zz.grad, cut=6)
    empty = LOSSES[name](z.clone().requires_grad_(), with_(t, mask=torch.zeros_like(t.mask)), **opts)
    assert empty.n_tokens == 0 and empty.loss_sum.item() == 0.0


def test_sampled_ids_past_the_student_width_drop_out(teacher):
    """A teacher 3 ids wider than the student: drawn ids >= V carry no weight and
    their teacher mass is dropped_mass; the estimate over the kept ids is unchanged."""
    z, lt, labels, noise = teacher
    T, V = z.shape
    wide = torch.log_softmax(torch.cat([lt, torch.full((T, 3), 0.0)], -1), -1)  # the extra ids hold real mass
    t = sampled_targets(wide, 5, 32, labels=labels, noise=noise)
    past = (t.topk_ids >= V) & (t.sample_weights > 0)
    assert past.any()
    zz = z.clone().requires_grad_()
    out = LOSSES["fkl"](zz, t)
    w = torch.where(past, 0.0, t.sample_weights.double())
    kept = torch.where(past | (w == 0), 0, t.topk_ids)
    z64 = z.double().requires_grad_()
    ls = torch.log_softmax(z64, -1).gather(-1, kept)
    expected = (w * torch.where(w > 0, t.topk_logprobs.double() - ls, 0.0)).sum()
    close(out.loss_sum, expected)
    close(out.stats["dropped_mass"], torch.where(past, t.topk_logprobs.double().exp(), 0.0).sum())
    out.loss_sum.backward()
    expected.backward()
    close(zz.grad, z64.grad)
    for name in ("rkl", "hpd"):
        assert torch.isfinite(LOSSES[name](z, t).loss_sum)


def test_refusals_on_sampled_targets_are_one_line(teacher):
    z, lt, labels, noise = teacher
    t = sampled_targets(lt, 0, 8, labels=labels, noise=noise)
    for name in ("jsd", "akl"):
        with pytest.raises(HPDError, match=rf"^loss {name} cannot use a sampled cache \(no sound estimator") as info:
            compute_loss(name, z, t)
        assert "\n" not in str(info.value)
    for name, opts in [("fkl", {"tail": "renormalize"}), ("hpd", {"forward": "cached", "tail": "ignore"})]:
        with pytest.raises(HPDError, match=r"option tail=\w+ does not apply to a sampled cache"):
            compute_loss(name, z, t, **opts)
    compute_loss("hpd", z, t, tail="renormalize")  # tail is read only with forward=cached


def test_a_dense_teacher_overrides_sampled_targets(teacher):
    """--dense-teacher on a sampled cache: teacher_logprobs set beside the draws; the
    loss is the dense one and nothing is refused (the draws are not read)."""
    z, lt, labels, noise = teacher
    t = sampled_targets(lt, 0, 8, labels=labels, noise=noise)
    both = with_(t, teacher_logprobs=lt)
    dense = with_(t, teacher_logprobs=lt, sample_weights=None)
    for name, opts in [("fkl", {"tail": "renormalize"}), ("jsd", {}), ("akl", {}), ("hpd", {"forward": "cached", "tail": "ignore"})]:
        assert torch.equal(compute_loss(name, z, both, **opts).loss_sum, compute_loss(name, z, dense, **opts).loss_sum)
