"""Distillation losses: every method is a log-likelihood weighted by detached weights.

For a flat chunk of T positions with student logits ``z`` [T, V]::

    L = -(1/N_active) * sum_t sum_v  w_t(v) * log pi_s(v | x_<t)

Each function returns the SUM over active positions of its per-token loss
(``LossOutput.loss_sum``), the count of active positions and diagnostic SUMS;
the training loop divides once by the global active count. Notation:
``ls = log pi_s`` (log_softmax of the logits in float32), ``lt = log p_T``,
``y`` the data token, ``y'`` a token sampled from ``pi_s`` by inverse CDF with
the chunk's ``noise`` (no RNG inside, so a recomputation under
``torch.utils.checkpoint`` draws the same ``y'``).

Positions with ``mask`` False are dropped before any arithmetic: they add
nothing to the loss and get exactly zero gradient, whatever their logits or
teacher rows hold (padding, NaN).

The teacher is known only on its top-k. Conventions for the rest:

- Buckets: the k top-k tokens plus one tail bucket holding everything else.
  The teacher's tail mass is ``1 - sum_topk p_T`` (clamped at 0; quantised
  log-probs can sum past 1), the student's is its mass outside the teacher's
  top-k ids. When k >= V there is no tail bucket. jsd and akl always use
  buckets; fkl can also renormalise or ignore (see :func:`fkl`).
- Where a divergence needs the log of the teacher's tail mass with the student
  as the weighting side (reverse KL on buckets, jsd at beta=1, the uniform
  estimate), the mass is floored at ``TAIL_MASS_FLOOR`` so the value stays finite.
- ``lt(y')`` for a sampled token: ``label_logprob`` when ``y' == y`` (always
  exact), else the top-k entry when ``y'`` is in the top-k, else an estimate,
  option ``tail_estimate``:
  "kth"     -- the k-th (smallest) top-k log-prob, an upper bound on any tail token;
  "uniform" -- ``log(tail_mass / (V - k))``, the uniform share of the missing mass,
               capped at the k-th log-prob (no tail token can exceed it).
  V is the logits' width.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

from .errors import HPDError

TAIL_MASS_FLOOR = 1e-8
FKL_TAILS = ("bucket", "renormalize", "ignore")
TAIL_ESTIMATES = ("kth", "uniform")


@dataclass
class Targets:
    """One chunk of T positions; all tensors on the logits' device."""

    labels: Tensor  # long [T]: y_t, the data token (the token at i+1)
    mask: Tensor  # bool [T]: positions that count (response tokens)
    label_logprob: Tensor  # float [T]: lt(y), exact
    topk_ids: Tensor  # long [T, k]: teacher top-k ids by rank
    topk_logprobs: Tensor  # float [T, k]: teacher top-k log-probs (<= 0, sorted desc)
    noise: Tensor  # float [T]: uniform(0, 1) draws for sampling y' ~ pi_s

    def rows(self, index: Tensor) -> Targets:
        return Targets(*(getattr(self, f)[index] for f in ("labels", "mask", "label_logprob", "topk_ids", "topk_logprobs", "noise")))


@dataclass
class LossOutput:
    loss_sum: Tensor  # scalar float32: sum over active positions of the per-token loss
    n_tokens: int  # active positions in the chunk
    stats: dict[str, Tensor] = field(default_factory=dict)  # detached sums over active positions


# ----------------------------------------------------------------------------- helpers


def sample_from_logits(logits: Tensor, noise: Tensor) -> Tensor:
    """y' [T] (long) by inverse CDF: the first v with ``cdf(v) > noise * cdf(V-1)``,
    ``cdf`` the cumulative sum of softmax(logits.float()) [T, V]; index clamped to V-1.

    Deterministic in its inputs; no gradient.
    """
    with torch.no_grad():
        cdf = torch.softmax(logits.detach().float(), dim=-1).cumsum_(-1)
        u = noise.detach().float().reshape(-1, 1) * cdf[:, -1:]
        return torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_(max=logits.shape[-1] - 1)


class _Student:
    """Float32 student log-probs at chosen ids, without materialising log_softmax."""

    def __init__(self, logits: Tensor):
        self.z = logits.float()
        self.lse = torch.logsumexp(self.z, dim=-1)
        self.vocab = self.z.shape[-1]

    def at(self, ids: Tensor) -> Tensor:
        if ids.dim() == 1:
            return self.z.gather(-1, ids.unsqueeze(-1)).squeeze(-1) - self.lse
        return self.z.gather(-1, ids) - self.lse.unsqueeze(-1)

    def outside(self, ids: Tensor) -> Tensor:
        """log of the student's mass outside ``ids`` [T, k] (requires k < V)."""
        rest = self.z.scatter(-1, ids, float("-inf"))
        return torch.logsumexp(rest, dim=-1) - self.lse


def _active(logits: Tensor, t: Targets) -> tuple[_Student, Targets]:
    if bool(t.mask.all()):  # no copy for the common fully active chunk
        return _Student(logits), t
    index = t.mask.nonzero().squeeze(-1)
    return _Student(logits[index]), t.rows(index)


def _kl(lp: Tensor, lq: Tensor) -> Tensor:
    """sum_b p_b (lp_b - lq_b) over the last dim, 0 where p_b == 0 (lp_b may be -inf)."""
    p = lp.exp()
    return (p * torch.where(p > 0, lp - lq, 0.0)).sum(-1)


@dataclass
class _Buckets:
    lq: Tensor  # [T, B] student log-probs: top-k ids (+ tail bucket)
    lp: Tensor  # [T, B] teacher log-probs (tail bucket -inf when its mass is 0)
    lp_floor: Tensor  # [T, B] same, tail mass floored at TAIL_MASS_FLOOR
    teacher_tail: Tensor  # [T]
    student_tail: Tensor  # [T]


def _tail_mass(lt_topk: Tensor) -> Tensor:
    # float64: in float32, 1 - sum loses ~1e-7 absolute, a 1e-5 relative error on a 1% tail.
    return (1.0 - lt_topk.double().exp().sum(-1)).clamp(min=0.0).to(lt_topk.dtype)


def _buckets(s: _Student, t: Targets) -> _Buckets:
    ids = t.topk_ids.long()
    lt = t.topk_logprobs.float()
    lq = s.at(ids)
    if ids.shape[-1] >= s.vocab:
        zero = lt.new_zeros(lt.shape[0])
        return _Buckets(lq, lt, lt, zero, zero)
    tail = _tail_mass(lt)
    lq_rest = s.outside(ids)
    return _Buckets(
        lq=torch.cat([lq, lq_rest.unsqueeze(-1)], dim=-1),
        lp=torch.cat([lt, tail.log().unsqueeze(-1)], dim=-1),
        lp_floor=torch.cat([lt, tail.clamp(min=TAIL_MASS_FLOOR).log().unsqueeze(-1)], dim=-1),
        teacher_tail=tail,
        student_tail=lq_rest.detach().exp(),
    )


def _teacher_logprob_at(ids: Tensor, t: Targets, vocab: int, tail_estimate: str) -> tuple[Tensor, Tensor]:
    """(lt(ids) [T] per the module's convention, in_topk bool [T])."""
    topk_ids = t.topk_ids.long()
    lt_topk = t.topk_logprobs.float()
    match = topk_ids == ids.unsqueeze(-1)
    in_topk = match.any(-1)
    exact = lt_topk.gather(-1, match.int().argmax(-1, keepdim=True)).squeeze(-1)
    kth = lt_topk.min(-1).values
    if tail_estimate == "kth":
        estimate = kth
    else:
        missing = max(vocab - topk_ids.shape[-1], 1)
        estimate = (_tail_mass(lt_topk).clamp(min=TAIL_MASS_FLOOR).log() - math.log(missing)).clamp(max=kth)
    lt = torch.where(in_topk, exact, estimate)
    return torch.where(ids == t.labels.long(), t.label_logprob.float(), lt), in_topk


def _check(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise HPDError(f"loss option {name}={value!r} is not one of {', '.join(choices)}")


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise HPDError(f"loss option {name}={value!r} must be in [0, 1]")


def _sum(x: Tensor) -> Tensor:
    return x.detach().float().sum()


# ----------------------------------------------------------------------------- losses


def sft(logits: Tensor, t: Targets) -> LossOutput:
    """Supervised fine-tuning: w = 1 on y.

    loss_t = -ls(y)                            logits [T, V], labels [T]
    stats: nll (= loss).
    """
    s, a = _active(logits, t)
    loss = -s.at(a.labels.long())
    return LossOutput(loss.sum(), a.labels.shape[0], {"nll": _sum(loss)})


def fkl(logits: Tensor, t: Targets, *, tail: str = "bucket") -> LossOutput:
    """Forward KL(p_T || pi_s) on the teacher's top-k support; weights w = p_T.

    With S the top-k ids, p = exp(topk_logprobs), q = pi_s, option ``tail``:

    "bucket"      KL over k+1 buckets, the missing teacher mass matched against the
                  student's mass outside S:
                  sum_{v in S} p_v log(p_v/q_v) + p_rest log(p_rest/q_rest),
                  p_rest = 1 - sum_S p (clamped at 0), q_rest = 1 - sum_S q.
    "renormalize" the teacher renormalised on S, p~ = p / sum_S p; KL(p~ || pi_s) over
                  the full vocabulary = sum_{v in S} p~_v log(p~_v/q_v).
    "ignore"      just the top-k terms: sum_{v in S} p_v log(p_v/q_v) (not a divergence;
                  the missing mass gets no weight).

    loss_t is that value (its gradient is that of -sum_v w(v) ls(v)).
    Shapes: logits [T, V], topk [T, k]. stats: fkl, teacher_tail_mass, student_tail_mass.
    """
    _check("tail", tail, FKL_TAILS)
    s, a = _active(logits, t)
    b = _buckets(s, a)
    k = a.topk_ids.shape[-1]
    if tail == "bucket":
        loss = _kl(b.lp, b.lq)
    elif tail == "renormalize":
        lt = b.lp[:, :k]
        loss = _kl(lt - torch.logsumexp(lt, dim=-1, keepdim=True), b.lq[:, :k])
    else:
        loss = _kl(b.lp[:, :k], b.lq[:, :k])
    stats = {"fkl": _sum(loss), "teacher_tail_mass": _sum(b.teacher_tail), "student_tail_mass": _sum(b.student_tail)}
    return LossOutput(loss.sum(), a.labels.shape[0], stats)


def rkl(logits: Tensor, t: Targets, *, tail_estimate: str = "kth") -> LossOutput:
    """Reverse KL(pi_s || p_T) by a policy-gradient step on one sampled token.

    y' ~ pi_s (inverse CDF with ``noise``), w = lt(y') - ls(y') (detached),
    loss_t = -w * ls(y'). In expectation over y' its gradient is the gradient of
    KL(pi_s || p_T) (with lt(y') as estimated, see the module docstring).
    Shapes: logits [T, V]. stats: rkl_estimate (sum of ls(y') - lt(y'), the
    one-sample estimate of the reverse KL), frac_yprime_outside_topk.
    """
    _check("tail_estimate", tail_estimate, TAIL_ESTIMATES)
    s, a = _active(logits, t)
    y2 = sample_from_logits(s.z, a.noise)
    ls = s.at(y2)
    lt, in_topk = _teacher_logprob_at(y2, a, s.vocab, tail_estimate)
    w = lt - ls.detach()
    loss = -w * ls
    stats = {"rkl_estimate": _sum(-w), "frac_yprime_outside_topk": _sum(~in_topk)}
    return LossOutput(loss.sum(), a.labels.shape[0], stats)


def jsd(logits: Tensor, t: Targets, *, beta: float = 0.5) -> LossOutput:
    """Generalised Jensen-Shannon divergence (GKD, TRL's convention) on the k+1 buckets.

    With p the teacher and q the student bucket distributions, M = beta p + (1-beta) q:

        beta = 0:  KL(p || q)                            (forward)
        beta = 1:  KL(q || p)                            (reverse; p's tail mass floored)
        else:      beta KL(p || M) + (1 - beta) KL(q || M)

    As in TRL the endpoints are defined as the two KLs; the interior tends to 0 at
    both ends, so it is not continuous with them. loss_t is the divergence itself.
    Shapes: logits [T, V], topk [T, k]. stats: jsd.
    """
    _check_unit("beta", beta)
    s, a = _active(logits, t)
    b = _buckets(s, a)
    if beta == 0.0:
        loss = _kl(b.lp, b.lq)
    elif beta == 1.0:
        loss = _kl(b.lq, b.lp_floor)
    else:
        lm = torch.logsumexp(torch.stack([b.lp + math.log(beta), b.lq + math.log1p(-beta)]), dim=0)
        loss = beta * _kl(b.lp, lm) + (1.0 - beta) * _kl(b.lq, lm)
    return LossOutput(loss.sum(), a.labels.shape[0], {"jsd": _sum(loss)})


def akl(logits: Tensor, t: Targets, *, mu: float = 0.5) -> LossOutput:
    """Adaptive KL (Wu et al. 2024) on the k+1 buckets.

    Head H: the fewest top-ranked teacher tokens whose mass reaches ``mu`` (a top-k
    token is in H when the teacher mass ranked above it is < mu; the tail bucket is
    never in H). With p, q the teacher and student bucket distributions:

        g_head = sum_{b in H} |p_b - q_b|,   g_tail = sum_{b not in H} |p_b - q_b|
        loss_t = g_head/(g_head+g_tail) * KL(p||q) + g_tail/(g_head+g_tail) * KL(q||p)

    mixing weights detached (0.5 each when both gaps are 0); KL(q||p) floors p's
    tail mass. loss_t is that value. Shapes: logits [T, V], topk [T, k].
    stats: akl, fkl, rkl, head_weight (the sum of g_head/(g_head+g_tail)).
    """
    if not 0.0 < mu <= 1.0:
        raise HPDError(f"loss option mu={mu!r} must be in (0, 1]")
    s, a = _active(logits, t)
    b = _buckets(s, a)
    k = a.topk_ids.shape[-1]
    p_topk = b.lp[:, :k].exp()
    sorted_p, order = p_topk.sort(dim=-1, descending=True)
    head = torch.zeros_like(p_topk, dtype=torch.bool).scatter(-1, order, (sorted_p.cumsum(-1) - sorted_p) < mu)
    if b.lq.shape[-1] > k:
        head = torch.cat([head, head.new_zeros(head.shape[0], 1)], dim=-1)
    gap = (b.lp.exp() - b.lq.detach().exp()).abs()
    g_head = (gap * head).sum(-1)
    g_total = gap.sum(-1)
    w_head = torch.where(g_total > 0, g_head / g_total.clamp(min=torch.finfo(g_total.dtype).tiny), 0.5)
    forward = _kl(b.lp, b.lq)
    reverse = _kl(b.lq, b.lp_floor)
    loss = w_head * forward + (1.0 - w_head) * reverse
    stats = {"akl": _sum(loss), "fkl": _sum(forward), "rkl": _sum(reverse), "head_weight": _sum(w_head)}
    return LossOutput(loss.sum(), a.labels.shape[0], stats)


def hpd(logits: Tensor, t: Targets, *, tail_estimate: str = "kth") -> LossOutput:
    """Hybrid Policy Distillation (DESIGN.md section 2), weights detached:

        g    = (lt(y)  - ls(y))  * exp(ls(y))          m_f = g > 0
        r    = (lt(y') - ls(y')) * exp(ls(y'))         m_r = r < 0
        w_y  = g + exp(lt(y)) * m_f + exp(lt(y)) * (m_f and m_r)
        w_y' = r * m_r
        loss_t = -w_y * ls(y) - w_y' * ls(y') * [y' != y]

    y the data token with lt(y) = label_logprob; y' ~ pi_s by inverse CDF with
    ``noise``; lt(y') per the module docstring (option ``tail_estimate``).
    Shapes: logits [T, V]. stats (sums; the masks count even where y' == y):
    frac_mf, frac_mr, frac_both, frac_yprime_ne_y, g, r, frac_yprime_outside_topk,
    and nll (the student's -ls(y): the surrogate loss itself sits near zero, this
    is the curve that shows training progress).
    """
    _check("tail_estimate", tail_estimate, TAIL_ESTIMATES)
    s, a = _active(logits, t)
    y = a.labels.long()
    y2 = sample_from_logits(s.z, a.noise)
    ls_y, ls_y2 = s.at(y), s.at(y2)
    lt_y = a.label_logprob.float()
    lt_y2, in_topk = _teacher_logprob_at(y2, a, s.vocab, tail_estimate)
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
    stats = {
        "frac_mf": _sum(m_f),
        "frac_mr": _sum(m_r),
        "frac_both": _sum(both),
        "frac_yprime_ne_y": _sum(differs),
        "g": _sum(g),
        "r": _sum(r),
        "frac_yprime_outside_topk": _sum(~in_topk),
        "nll": _sum(-ls_y.detach()),
    }
    return LossOutput(loss.sum(), a.labels.shape[0], stats)


LOSSES: dict[str, Callable[..., LossOutput]] = {"sft": sft, "fkl": fkl, "rkl": rkl, "jsd": jsd, "akl": akl, "hpd": hpd}


def compute_loss(name: str, logits: Tensor, targets: Targets, **options: object) -> LossOutput:
    """``LOSSES[name](logits, targets, **options)``; an unknown name or option is an HPDError."""
    if name not in LOSSES:
        raise HPDError(f"unknown loss {name!r}: choose one of {', '.join(LOSSES)}")
    fn = LOSSES[name]
    allowed = [p for p in inspect.signature(fn).parameters if p not in ("logits", "t")]
    for key in options:
        if key not in allowed:
            raise HPDError(f"loss {name!r} has no option {key!r}; its options: {', '.join(allowed) or 'none'}")
    return fn(logits, targets, **options)
