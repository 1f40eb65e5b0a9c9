"""Distillation losses: every method is a log-likelihood weighted by detached weights.

For a flat chunk of T positions with student logits ``z`` [T, V]::

    L = -(1/N_active) * sum_t sum_v  w_t(v) * log pi_s(v | x_<t)

Each function returns the SUM over active positions of its per-token loss
(``LossOutput.loss_sum``), the count of active positions and diagnostic SUMS;
the training loop divides once by the global active count. Notation:
``ls = log pi_s`` (log_softmax of the logits in float32), ``lt = log p_T``,
``y`` the data token, ``y'`` a token sampled from ``pi_s`` by inverse CDF with
the chunk's ``noise`` (no RNG inside), or ``targets.sampled`` when the caller
drew it already: ``hpd_tools.distill.chunked_loss`` draws ``y'`` once, in the
forward pass, and hands it to the recomputation under ``torch.utils.checkpoint``,
whose logits need not be bit-identical on a GPU (a bf16 logit near a CDF
boundary would flip ``y'``). ``SAMPLING_LOSSES`` names the losses that use ``y'``.

Positions with ``mask`` False are dropped before any arithmetic: they add
nothing to the loss and get exactly zero gradient, whatever their logits or
teacher rows hold (padding, NaN).

The teacher is known only on its top-k. Conventions for the rest:

- Widths: the teacher's top-k ids index the teacher's vocabulary, which may be
  wider than the student's logits (one tokenizer, embeddings padded to different
  sizes: Qwen2.5-7B has 152,064 rows, Qwen2.5-1.5B 151,936). Ids >= V, the
  logits' width, leave the top-k (:func:`restrict_to_width`): they count as
  absent entries (no weight, never indexed into the logits, never matched by
  ``y'``) and their teacher mass joins the tail bucket. Every loss that reads
  the top-k reports that mass as the stat ``dropped_mass``.

- Buckets: the k top-k tokens plus one tail bucket holding everything else.
  The teacher's tail mass is ``1 - sum_topk p_T`` (clamped at 0; quantised
  log-probs can sum past 1), the student's is its mass outside the teacher's
  (kept) top-k ids. When k >= V there is no tail bucket (dropped mass, if any,
  is then left out). jsd and akl always use buckets; fkl can also renormalise
  or ignore (see :func:`fkl`).
- Where a divergence needs the log of the teacher's tail mass with the student
  as the weighting side (reverse KL on buckets, jsd at beta=1, the uniform
  estimate), the mass is floored at ``TAIL_MASS_FLOOR`` so the value stays finite.
- ``lt(y')`` for a sampled token: ``label_logprob`` when ``y' == y`` (always
  exact), else the top-k entry when ``y'`` is in the top-k, else an estimate,
  option ``tail_estimate``:
  "kth"     -- the k-th (smallest) of the k stored log-probs, an upper bound on any
               token outside the teacher's top-k;
  "uniform" -- ``log(tail_mass / (V - k_kept))``, the mass outside the teacher's
               top-k shared evenly by the student's tokens outside the kept
               top-k, capped at the k-th log-prob (no tail token can exceed it).
  V is the logits' width, k_kept the row's count of ids < V. Both use all k
  stored entries, dropped ones included: a token the student can sample outside
  the kept top-k lies outside the teacher's top-k, and dropped mass sits on
  tokens it cannot sample.

Three teacher signals (DESIGN.md section 8), told apart by the Targets' fields:

- top-k (``sample_weights`` and ``teacher_logprobs`` None): the conventions above.
- sampled (``sample_weights`` set, a sampled cache): ``topk_ids`` are the distinct
  ids among N draws from p, ``topk_logprobs`` their exact log-probs (padding -inf),
  ``sample_weights`` w = count/N (0 on padding; only w > 0 marks a real entry).
  fkl is the unbiased estimate ``sum_v w_v (lt_v - ls_v)`` of KL(p || pi_s) (its
  gradient is unbiased too) and needs no tail; hpd forward=cached uses the same
  weights for its forward term. lt(y') for rkl/hpd: exact when y' was drawn, else
  option ``tail_estimate``: "uniform" ``log((1 - m) / (V - d))``, m the drawn
  set's teacher mass (floored at ``TAIL_MASS_FLOOR``), d the drawn ids < V, not
  capped; "kth" the smallest drawn log-prob, an estimate and NOT a bound (an
  undrawn token may be more likely than a drawn one). jsd and akl have no sound
  estimator from draws of p alone and refuse sampled targets. Drawn ids >= V drop
  out as above (their estimated share is ``dropped_mass``).
- dense (``teacher_logprobs`` [T, V_t] set, the online reference): every loss is
  exact over the vocabulary; ``topk_*`` and ``label_logprob`` are not read (lt(y)
  and lt(y') come from the full row). Teacher ids >= V drop out (their mass is
  ``dropped_mass``, left out as with k >= V); a teacher narrower than the logits,
  and entries of -inf (tokens the teacher cannot emit), read as
  ``log(TAIL_MASS_FLOOR / V)`` so reverse terms stay finite.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field, fields
from typing import Callable

import torch
from torch import Tensor

from .errors import HPDError

TAIL_MASS_FLOOR = 1e-8
FKL_TAILS = ("bucket", "renormalize", "ignore")
TAIL_ESTIMATES = ("kth", "uniform")
HPD_FORWARDS = ("data", "cached")
STUDENT_TAIL_FLOOR = 1e-6


@dataclass
class Targets:
    """One chunk of T positions; all tensors on the logits' device."""

    labels: Tensor  # long [T]: y_t, the data token (the token at i+1)
    mask: Tensor  # bool [T]: positions that count (response tokens)
    label_logprob: Tensor  # float [T]: lt(y), exact
    topk_ids: Tensor  # long [T, k]: teacher top-k ids by rank
    topk_logprobs: Tensor  # float [T, k]: teacher top-k log-probs (<= 0, sorted desc)
    noise: Tensor  # float [T]: uniform(0, 1) draws for sampling y' ~ pi_s
    sampled: Tensor | None = None  # long [T]: y' already drawn from these logits with this noise; None: draw it here
    sample_weights: Tensor | None = None  # float [T, k]: count/N per drawn id, 0 on padding (a sampled cache); None: top-k
    teacher_logprobs: Tensor | None = None  # float [T, V_t]: the teacher's full log-softmax (dense); set: topk_*, label_logprob unread

    def rows(self, index: Tensor) -> Targets:
        return Targets(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index] for f in fields(self)})


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


def _sampled(s: _Student, t: Targets) -> Tensor:
    """y' [T]: the caller's draw when it made one (``t.sampled``), else drawn here."""
    return t.sampled.long() if t.sampled is not None else sample_from_logits(s.z, t.noise)


def restrict_to_width(topk_ids: Tensor, topk_logprobs: Tensor, width: int) -> tuple[Tensor, Tensor, Tensor]:
    """The teacher's top-k as seen by logits ``width`` wide: ids >= width drop out.

    A dropped entry's id becomes a placeholder that is safe to gather with (the
    row's first kept id, 0 when none is kept) and its log-prob -inf, so its mass
    falls into ``1 - sum exp(log-probs)``. Returns (ids long [T, k], log-probs
    float32 [T, k], dropped teacher mass float32 [T]). [T, k] elementwise work
    only: no host sync, nothing [T, V].
    """
    ids, lt, _, dropped = _restrict(topk_ids, topk_logprobs, width)
    return ids, lt, dropped


def _restrict(topk_ids: Tensor, topk_logprobs: Tensor, width: int, valid: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    ids = topk_ids.long()
    lt = topk_logprobs.float()
    keep = ids < width
    if valid is not None:  # a sampled row's padding (count 0) is no entry at all, whatever its code decodes to
        keep = keep & valid
        lt = lt.masked_fill(~valid, float("-inf"))
    first = keep.int().argmax(-1, keepdim=True)  # the first kept rank (0 when none is)
    placeholder = torch.where(keep.any(-1, keepdim=True), ids.gather(-1, first), 0)
    dropped = torch.where(keep, 0.0, lt.exp()).sum(-1)
    return torch.where(keep, ids, placeholder), torch.where(keep, lt, float("-inf")), keep, dropped


@dataclass
class _Topk:
    """The teacher's top-k restricted to the logits' width (module docstring, "Widths")."""

    ids: Tensor  # long [T, k]: kept ids; dropped entries hold a placeholder id
    lt: Tensor  # float32 [T, k]: log-probs, -inf where dropped
    keep: Tensor  # bool [T, k]
    dropped: Tensor  # float32 [T]: teacher mass on dropped ids
    stored: Tensor  # float32 [T, k]: the k stored log-probs, dropped ones included (-inf on a sampled row's padding)
    weights: Tensor | None = None  # float32 [T, k]: count/N on kept drawn ids, 0 elsewhere (sampled); None: top-k


def _topk(t: Targets, width: int) -> _Topk:
    if t.sample_weights is None:
        ids, lt, keep, dropped = _restrict(t.topk_ids, t.topk_logprobs, width)
        return _Topk(ids, lt, keep, dropped, t.topk_logprobs.float())
    w = t.sample_weights.float()
    valid = w > 0
    ids, lt, keep, dropped = _restrict(t.topk_ids, t.topk_logprobs, width, valid)
    stored = t.topk_logprobs.float().masked_fill(~valid, float("-inf"))
    return _Topk(ids, lt, keep, dropped, stored, torch.where(keep, w, 0.0))


def _active(logits: Tensor, t: Targets) -> tuple[_Student, Targets]:
    if bool(t.mask.all()):  # no copy for the common fully active chunk (one host sync per chunk)
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


def _buckets(s: _Student, top: _Topk) -> _Buckets:
    lt = top.lt
    lq = torch.where(top.keep, s.at(top.ids), float("-inf"))
    if lt.shape[-1] >= s.vocab:
        zero = lt.new_zeros(lt.shape[0])
        return _Buckets(lq, lt, lt, zero, zero)
    tail = _tail_mass(lt)  # dropped mass included: its log-prob is -inf
    # Placeholders repeat a kept id of their row, so the scatter in outside() is
    # still exact; a row with nothing kept has all the student's mass outside.
    lq_rest = torch.where(top.keep.any(-1), s.outside(top.ids), 0.0)
    return _Buckets(
        lq=torch.cat([lq, lq_rest.unsqueeze(-1)], dim=-1),
        lp=torch.cat([lt, tail.log().unsqueeze(-1)], dim=-1),
        lp_floor=torch.cat([lt, tail.clamp(min=TAIL_MASS_FLOOR).log().unsqueeze(-1)], dim=-1),
        teacher_tail=tail,
        student_tail=lq_rest.detach().exp(),
    )


def _gathered_buckets(s: _Student, top: _Topk) -> _Buckets:
    """:func:`_buckets` from the k gathered ids alone: the student's mass outside them
    is ``1 - sum_S q`` (float64 over the k entries), not a logsumexp over a [T, V] copy
    of the logits with S masked out. That difference resolves about 1e-6 (float32
    log-probs); below ``STUDENT_TAIL_FLOOR`` its log continues linearly (value and
    slope continuous), so a student with too little tail mass is still pushed toward
    the teacher's, never away from it. ``lp_floor`` is not filled in (lp)."""
    lt = top.lt
    lq = torch.where(top.keep, s.at(top.ids), float("-inf"))
    if lt.shape[-1] >= s.vocab:
        zero = lt.new_zeros(lt.shape[0])
        return _Buckets(lq, lt, lt, zero, zero)
    tail = _tail_mass(lt)
    kept = s.z.gather(-1, top.ids).double() - s.lse.double().unsqueeze(-1)  # one rounding fewer than lq's
    rest = 1.0 - torch.where(top.keep, kept.exp(), 0.0).sum(-1)
    f = STUDENT_TAIL_FLOOR
    lq_rest = torch.where(rest > f, rest.clamp(min=f).log(), math.log(f) + (rest - f) / f).float()
    lq_rest = torch.where(top.keep.any(-1), lq_rest, 0.0)  # nothing kept: all the student's mass is outside
    lp = torch.cat([lt, tail.log().unsqueeze(-1)], dim=-1)
    return _Buckets(torch.cat([lq, lq_rest.unsqueeze(-1)], dim=-1), lp, lp, tail, lq_rest.detach().exp())


def _forward_kl(b: _Buckets, k: int, tail: str) -> Tensor:
    """fkl's per-token value [T] for option ``tail`` (see :func:`fkl`)."""
    if tail == "bucket":
        return _kl(b.lp, b.lq)
    if tail == "renormalize":
        lt = b.lp[:, :k]
        # A row with nothing kept has no teacher signal: -inf - finite, weight 0.
        norm = torch.logsumexp(lt, dim=-1, keepdim=True).clamp(min=torch.finfo(lt.dtype).min)
        return _kl(lt - norm, b.lq[:, :k])
    return _kl(b.lp[:, :k], b.lq[:, :k])


def _teacher_logprob_at(ids: Tensor, t: Targets, top: _Topk, vocab: int, tail_estimate: str) -> tuple[Tensor, Tensor]:
    """(lt(ids) [T] per the module's convention, in_topk bool [T]: ids in the kept top-k)."""
    match = (top.ids == ids.unsqueeze(-1)) & top.keep
    in_topk = match.any(-1)
    exact = top.lt.gather(-1, match.int().argmax(-1, keepdim=True)).squeeze(-1)
    if top.weights is None:
        kth = top.stored.min(-1).values
    else:  # the smallest drawn log-prob (padding is -inf); a row with no draw (never active) reads 0
        kth = top.stored.masked_fill(torch.isneginf(top.stored), 0.0).min(-1).values
    if tail_estimate == "kth":
        estimate = kth
    else:
        missing = (vocab - top.keep.sum(-1)).clamp(min=1).float()
        estimate = _tail_mass(top.stored).clamp(min=TAIL_MASS_FLOOR).log() - missing.log()
        if top.weights is None:  # no top-k tail token can exceed the k-th; an undrawn token can exceed a drawn one
            estimate = estimate.clamp(max=kth)
    lt = torch.where(in_topk, exact, estimate)
    return torch.where(ids == t.labels.long(), t.label_logprob.float(), lt), in_topk


def _sampled_forward(s: _Student, top: _Topk) -> Tensor:
    """fkl's unbiased estimate [T] on a sampled row: sum_v w_v (lt_v - ls_v) over the
    kept drawn ids ([T, k] work only: no tail, nothing [T, V] beyond the logsumexp)."""
    diff = torch.where(top.keep, top.lt - s.at(top.ids), 0.0)  # where, not a product: lt is -inf off the kept ids
    return (top.weights * diff).sum(-1)


def _student_rest(s: _Student, top: _Topk) -> Tensor:
    """The student's mass outside the kept ids [T], 1 - sum q in float64 (a statistic only)."""
    with torch.no_grad():
        kept = s.z.gather(-1, top.ids).double() - s.lse.double().unsqueeze(-1)
        return (1.0 - torch.where(top.keep, kept.exp(), 0.0).sum(-1)).clamp(min=0.0).float()


@dataclass
class _Dense:
    """The teacher's full log-softmax as the logits' width sees it (module docstring, "dense")."""

    lt: Tensor  # float32 [T, V]: teacher log-probs at the student's ids, -inf and missing ids floored
    dropped: Tensor  # float32 [T]: teacher mass on ids >= V

    def at(self, ids: Tensor) -> Tensor:
        return self.lt.gather(-1, ids.long().unsqueeze(-1)).squeeze(-1)


def _dense(t: Targets, vocab: int) -> _Dense:
    full = t.teacher_logprobs
    floor = math.log(TAIL_MASS_FLOOR / vocab)
    # One [T, V] float32 copy: the floor for -inf entries (NaN stays NaN: a broken teacher row is a bug to see).
    lt = full[:, :vocab].float().nan_to_num(nan=math.nan, neginf=floor)
    if lt.shape[-1] < vocab:
        lt = torch.nn.functional.pad(lt, (0, vocab - lt.shape[-1]), value=floor)
    dropped = full[:, vocab:].float().exp().sum(-1) if full.shape[-1] > vocab else lt.new_zeros(lt.shape[0])
    return _Dense(lt, dropped)


def _dense_forward(s: _Student, d: _Dense) -> Tensor:
    """Exact KL(p || pi_s) [T] over the vocabulary: sum_v p_v (lt_v - z_v + lse).

    Two [T, V] float32 buffers (p, and the difference, scaled in place); the
    backward needs p only."""
    with torch.no_grad():
        p = d.lt.exp()
    diff = d.lt - s.z
    diff.add_(s.lse.unsqueeze(-1)).mul_(p)
    return diff.sum(-1)


def _dense_buckets(s: _Student, d: _Dense) -> _Buckets:
    """The full distributions as jsd and akl read buckets: one per id, no tail bucket."""
    zero = d.lt.new_zeros(d.lt.shape[0])
    lq = s.z - s.lse.unsqueeze(-1)
    return _Buckets(lq, d.lt, d.lt, zero, zero)


def _refuse_sampled(name: str, t: Targets) -> None:
    if t.sample_weights is not None and t.teacher_logprobs is None:  # with a dense teacher the draws are not read
        raise HPDError(f"loss {name} cannot use a sampled cache (no sound estimator from draws of the teacher alone); use fkl, rkl or hpd, or a top-k cache")


def _check_sampled_tail(loss: str, t: Targets, tail: str) -> None:
    if t.sample_weights is not None and t.teacher_logprobs is None and tail != "bucket":
        raise HPDError(f"loss {loss}: option tail={tail} does not apply to a sampled cache (the estimate needs no tail); drop the option")


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
    S holds the kept ids only (module docstring, "Widths"): with "bucket" the dropped
    mass is part of p_rest, "renormalize" renormalises on the kept ids.
    Shapes: logits [T, V], topk [T, k]. stats: fkl, teacher_tail_mass (dropped mass
    included), student_tail_mass, dropped_mass.

    Sampled targets: loss_t = sum_v w_v (lt_v - ls_v), w = count/N, an unbiased
    estimate of KL(p_T || pi_s) and of its gradient; ``tail`` must stay "bucket" (no
    tail); the tail masses are the teacher's and the student's mass outside the drawn
    ids. Dense targets: loss_t = KL(p_T || pi_s) over the vocabulary (tail masses 0).
    """
    _check("tail", tail, FKL_TAILS)
    _check_sampled_tail("fkl", t, tail)
    s, a = _active(logits, t)
    if a.teacher_logprobs is not None:
        d = _dense(a, s.vocab)
        loss = _dense_forward(s, d)
        zero = _sum(d.dropped.new_zeros(()))
        return LossOutput(loss.sum(), a.labels.shape[0], {"fkl": _sum(loss), "teacher_tail_mass": zero, "student_tail_mass": zero, "dropped_mass": _sum(d.dropped)})
    top = _topk(a, s.vocab)
    if top.weights is not None:
        loss = _sampled_forward(s, top)
        stats = {"fkl": _sum(loss), "teacher_tail_mass": _sum(_tail_mass(top.lt)), "student_tail_mass": _sum(_student_rest(s, top)), "dropped_mass": _sum(top.dropped)}
        return LossOutput(loss.sum(), a.labels.shape[0], stats)
    b = _buckets(s, top)
    loss = _forward_kl(b, a.topk_ids.shape[-1], tail)
    stats = {"fkl": _sum(loss), "teacher_tail_mass": _sum(b.teacher_tail), "student_tail_mass": _sum(b.student_tail), "dropped_mass": _sum(top.dropped)}
    return LossOutput(loss.sum(), a.labels.shape[0], stats)


def rkl(logits: Tensor, t: Targets, *, tail_estimate: str = "kth") -> LossOutput:
    """Reverse KL(pi_s || p_T) by a policy-gradient step on one sampled token.

    y' ~ pi_s (inverse CDF with ``noise``, or ``sampled``), w = lt(y') - ls(y') (detached),
    loss_t = -w * ls(y'). In expectation over y' its gradient is the gradient of
    KL(pi_s || p_T) (with lt(y') as estimated, see the module docstring).
    Shapes: logits [T, V]. stats: rkl_estimate (sum of ls(y') - lt(y'), the
    one-sample estimate of the reverse KL), frac_yprime_outside_topk (sampled: y'
    not drawn; dense: 0), dropped_mass. Dense targets: lt(y') exact.
    """
    _check("tail_estimate", tail_estimate, TAIL_ESTIMATES)
    s, a = _active(logits, t)
    y2 = _sampled(s, a)
    ls = s.at(y2)
    if a.teacher_logprobs is not None:
        d = _dense(a, s.vocab)
        lt, in_topk, dropped = d.at(y2), torch.ones_like(y2, dtype=torch.bool), d.dropped
    else:
        top = _topk(a, s.vocab)
        lt, in_topk = _teacher_logprob_at(y2, a, top, s.vocab, tail_estimate)
        dropped = top.dropped
    w = lt - ls.detach()
    loss = -w * ls
    stats = {"rkl_estimate": _sum(-w), "frac_yprime_outside_topk": _sum(~in_topk), "dropped_mass": _sum(dropped)}
    return LossOutput(loss.sum(), a.labels.shape[0], stats)


def jsd(logits: Tensor, t: Targets, *, beta: float = 0.5) -> LossOutput:
    """Generalised Jensen-Shannon divergence (GKD, TRL's convention) on the k+1 buckets.

    With p the teacher and q the student bucket distributions, M = beta p + (1-beta) q:

        beta = 0:  KL(p || q)                            (forward)
        beta = 1:  KL(q || p)                            (reverse; p's tail mass floored)
        else:      beta KL(p || M) + (1 - beta) KL(q || M)

    As in TRL the endpoints are defined as the two KLs; the interior tends to 0 at
    both ends, so it is not continuous with them. loss_t is the divergence itself.
    Shapes: logits [T, V], topk [T, k]. stats: jsd, dropped_mass. Dense targets: the
    same over the vocabulary, one bucket per id (several [T, V] buffers: a baseline).
    Sampled targets: refused (HPDError).
    """
    _check_unit("beta", beta)
    _refuse_sampled("jsd", t)
    s, a = _active(logits, t)
    if a.teacher_logprobs is not None:
        d = _dense(a, s.vocab)
        b, dropped = _dense_buckets(s, d), d.dropped
    else:
        top = _topk(a, s.vocab)
        b, dropped = _buckets(s, top), top.dropped
    if beta == 0.0:
        loss = _kl(b.lp, b.lq)
    elif beta == 1.0:
        loss = _kl(b.lq, b.lp_floor)
    else:
        # Dropped entries are -inf on both sides: lm is -inf there, and the NaN that
        # logsumexp's backward makes of it stops at the constant -inf in _buckets' where.
        lm = torch.logsumexp(torch.stack([b.lp + math.log(beta), b.lq + math.log1p(-beta)]), dim=0)
        loss = beta * _kl(b.lp, lm) + (1.0 - beta) * _kl(b.lq, lm)
    return LossOutput(loss.sum(), a.labels.shape[0], {"jsd": _sum(loss), "dropped_mass": _sum(dropped)})


def akl(logits: Tensor, t: Targets, *, mu: float = 0.5) -> LossOutput:
    """Adaptive KL (Wu et al. 2024) on the k+1 buckets.

    Head H: the fewest top-ranked teacher tokens whose mass reaches ``mu`` (a top-k
    token is in H when the teacher mass ranked above it is < mu; the tail bucket is
    never in H). With p, q the teacher and student bucket distributions:

        g_head = sum_{b in H} |p_b - q_b|,   g_tail = sum_{b not in H} |p_b - q_b|
        loss_t = g_head/(g_head+g_tail) * KL(p||q) + g_tail/(g_head+g_tail) * KL(q||p)

    mixing weights detached (0.5 each when both gaps are 0); KL(q||p) floors p's
    tail mass. loss_t is that value. Shapes: logits [T, V], topk [T, k].
    Dropped entries (module docstring, "Widths") have p = q = 0 and no gap.
    stats: akl, fkl, rkl, head_weight (the sum of g_head/(g_head+g_tail)), dropped_mass.
    Dense targets: the same over the vocabulary, one bucket per id (a [T, V] sort).
    Sampled targets: refused (HPDError).
    """
    if not 0.0 < mu <= 1.0:
        raise HPDError(f"loss option mu={mu!r} must be in (0, 1]")
    _refuse_sampled("akl", t)
    s, a = _active(logits, t)
    if a.teacher_logprobs is not None:
        d = _dense(a, s.vocab)
        b, dropped, k = _dense_buckets(s, d), d.dropped, s.vocab
    else:
        top = _topk(a, s.vocab)
        b, dropped, k = _buckets(s, top), top.dropped, a.topk_ids.shape[-1]
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
    stats = {"akl": _sum(loss), "fkl": _sum(forward), "rkl": _sum(reverse), "head_weight": _sum(w_head), "dropped_mass": _sum(dropped)}
    return LossOutput(loss.sum(), a.labels.shape[0], stats)


def hpd(logits: Tensor, t: Targets, *, tail_estimate: str = "kth", forward: str = "data", tail: str = "bucket") -> LossOutput:
    """Hybrid Policy Distillation (DESIGN.md section 2), weights detached.

    Option ``forward="data"`` (the default, HPD as published):

        g    = (lt(y)  - ls(y))  * exp(ls(y))          m_f = g > 0
        r    = (lt(y') - ls(y')) * exp(ls(y'))         m_r = r < 0
        w_y  = g + exp(lt(y)) * m_f + exp(lt(y)) * (m_f and m_r)
        w_y' = r * m_r
        loss_t = -w_y * ls(y) - w_y' * ls(y') * [y' != y]

    y the data token with lt(y) = label_logprob; y' ~ pi_s by inverse CDF with
    ``noise`` (or ``sampled``); lt(y') per the module docstring (option ``tail_estimate``).
    Shapes: logits [T, V]. stats (sums; the masks count even where y' == y):
    frac_mf, frac_mr, frac_both, frac_yprime_ne_y, g, r, frac_yprime_outside_topk,
    dropped_mass, and nll (the student's -ls(y): the surrogate loss itself sits
    near zero, this is the curve that shows training progress).

    Option ``forward="cached"``: the forward signal on every cached id instead of
    on y alone, the reverse term on y' as above:

        loss_t = fkl_t(tail) - w_y' * ls(y'),   w_y' = r * m_r

    fkl_t(tail) is :func:`fkl`'s per-token value with its option ``tail`` (weights
    p_T on the kept top-k, the tail bucket / renormalisation / nothing), the
    student's tail mass taken as ``1 - sum_topk q`` (:func:`_gathered_buckets`: no
    [T, V] copy; equal to fkl's wherever that mass exceeds ~1e-6). y enters only
    through lt(y') when y' == y. There is no [y' != y] gate and no extra pull on y:
    with forward="data" the gate avoids counting y twice (at y' == y, r = g and
    w_y already holds it); here y has no weight of its own. ``tail`` is read only
    with forward="cached". stats: fkl, teacher_tail_mass, student_tail_mass,
    frac_mr, r, frac_yprime_ne_y, frac_yprime_outside_topk, dropped_mass, nll.

    Sampled targets: lt(y') exact when y' was drawn, else the tail estimate (module
    docstring, "sampled"); forward="cached" weights its forward term by count/N (fkl's
    estimate; ``tail`` must stay "bucket"). Dense targets: lt(y) and lt(y') exact;
    forward="cached" uses the full distribution (exact KL).
    """
    _check("tail_estimate", tail_estimate, TAIL_ESTIMATES)
    _check("forward", forward, HPD_FORWARDS)
    _check("tail", tail, FKL_TAILS)
    if forward == "cached":
        _check_sampled_tail("hpd", t, tail)
    s, a = _active(logits, t)
    dense = _dense(a, s.vocab) if a.teacher_logprobs is not None else None
    top = _topk(a, s.vocab) if dense is None else None
    if forward == "cached":
        return _hpd_cached(s, a, top, dense, tail_estimate, tail)
    y = a.labels.long()
    y2 = _sampled(s, a)
    ls_y, ls_y2 = s.at(y), s.at(y2)
    if dense is None:
        lt_y = a.label_logprob.float()
        lt_y2, in_topk = _teacher_logprob_at(y2, a, top, s.vocab, tail_estimate)
        dropped = top.dropped
    else:
        lt_y, lt_y2, in_topk, dropped = dense.at(y), dense.at(y2), torch.ones_like(y2, dtype=torch.bool), dense.dropped
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
        "dropped_mass": _sum(dropped),
        "nll": _sum(-ls_y.detach()),
    }
    return LossOutput(loss.sum(), a.labels.shape[0], stats)


def _hpd_cached(s: _Student, a: Targets, top: _Topk | None, dense: _Dense | None, tail_estimate: str, tail: str) -> LossOutput:
    y, y2 = a.labels.long(), _sampled(s, a)
    ls_y2 = s.at(y2)
    if dense is not None:
        forward = _dense_forward(s, dense)
        teacher_tail = student_tail = forward.new_zeros(forward.shape)
        lt_y2, in_topk, dropped = dense.at(y2), torch.ones_like(y2, dtype=torch.bool), dense.dropped
    else:
        if top.weights is not None:
            forward, teacher_tail, student_tail = _sampled_forward(s, top), _tail_mass(top.lt), _student_rest(s, top)
        else:
            b = _gathered_buckets(s, top)
            forward, teacher_tail, student_tail = _forward_kl(b, a.topk_ids.shape[-1], tail), b.teacher_tail, b.student_tail
        lt_y2, in_topk = _teacher_logprob_at(y2, a, top, s.vocab, tail_estimate)
        dropped = top.dropped
    with torch.no_grad():
        r = (lt_y2 - ls_y2) * ls_y2.exp()
        m_r = r < 0
        w_y2 = r * m_r
    loss = forward - w_y2 * ls_y2
    stats = {
        "fkl": _sum(forward),
        "teacher_tail_mass": _sum(teacher_tail),
        "student_tail_mass": _sum(student_tail),
        "frac_mr": _sum(m_r),
        "r": _sum(r),
        "frac_yprime_ne_y": _sum(y2 != y),
        "frac_yprime_outside_topk": _sum(~in_topk),
        "dropped_mass": _sum(dropped),
        "nll": _sum(-s.at(y).detach()),
    }
    return LossOutput(loss.sum(), a.labels.shape[0], stats)


LOSSES: dict[str, Callable[..., LossOutput]] = {"sft": sft, "fkl": fkl, "rkl": rkl, "jsd": jsd, "akl": akl, "hpd": hpd}
# The losses that read y' (``Targets.sampled`` or a draw from ``Targets.noise``).
SAMPLING_LOSSES = frozenset({"rkl", "hpd"})


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
