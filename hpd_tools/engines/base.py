"""The interface every teacher engine implements."""

from __future__ import annotations

import difflib
import json
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from ..errors import HPDError


@dataclass
class Scored:
    """Teacher scores of one token sequence of length m, for positions 0..m-2.

    Row i is the teacher's distribution for token i+1 given tokens 0..i:
    ``label_logprob[i] = log p_T(tokens[i+1] | tokens[:i+1])``, and the top-k
    ids and log-probs of that distribution, sorted by rank.
    """

    label_logprob: np.ndarray  # float32 [m-1]
    topk_ids: np.ndarray  # int64 [m-1, k]
    topk_logprobs: np.ndarray  # float32 [m-1, k]
    # Sampled scoring (``samples=N``): topk_ids / topk_logprobs hold each row's
    # distinct drawn ids and their exact teacher log-probs, ordered by log-prob
    # (hpd_tools.sampling.distinct), padded to width N with id 0 / -inf, and
    # sample_counts [m-1, N] (int) their counts (0 = padding; a row sums to N).
    sample_counts: np.ndarray | None = None


class TeacherEngine(Protocol):
    name: str
    version: str
    vocab_size: int

    def score(self, sequences: Sequence[np.ndarray], k: int, *, samples: int = 0, seeds: Sequence[int] | None = None) -> list[Scored]:
        """Score each token sequence (as a prompt: no sampling).

        With ``samples=N`` (> 0), each row holds N seeded draws from the teacher's
        distribution instead of the top-k (``k`` is then ignored), drawn by
        :func:`hpd_tools.sampling.sample_rows` with ``seeds[i]`` (the record's
        :func:`hpd_tools.sampling.record_seed`) at the row's position in the sequence
        (row i = position i), so the draws do not depend on the batching.
        """
        ...

    def close(self) -> None:
        ...


def _matches(value: Any, annotation: Any) -> bool | None:
    """Whether ``value`` fits ``annotation``: True, False, or None where that cannot be
    told cheaply (a config class, an enum, a forward reference)."""
    if annotation is Any:
        return True
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        results = [_matches(value, member) for member in typing.get_args(annotation)]
        return True if True in results else (None if None in results else False)
    if origin in (list, set, frozenset, tuple):
        if not isinstance(value, (list, tuple, set, frozenset)):
            return False
        args = typing.get_args(annotation)
        if origin is not tuple and len(args) == 1:
            results = [_matches(item, args[0]) for item in value]
            return False if False in results else (None if None in results else True)
        return True
    if origin is dict or annotation is dict:
        return isinstance(value, dict)
    return None


def _describe(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        values = [json.dumps(a) for a in typing.get_args(annotation)]
        return "one of " + ", ".join(values[:8]) + (f" (or {len(values) - 8} more)" if len(values) > 8 else "")
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " or ".join(_describe(member) for member in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type):
        return {bool: "true or false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}.get(annotation, annotation.__name__)
    return str(annotation).replace("typing.", "")


def check_options(args: dict[str, Any], accepted: dict[str, Any], *, where: str, owner: str, listing: str, reserved: dict[str, str] | None = None) -> None:
    """Refuse, in one line, an option ``owner`` does not take (with the nearest valid
    names, else ``listing``: where the options are listed), one set from another
    option (``reserved``: key -> what to use instead), or a value of the wrong type.

    ``accepted`` maps each option name to its type annotation; a value whose fit
    cannot be told cheaply is left for the engine to judge.
    """
    for key, value in args.items():
        shown = f"{where} {key}={json.dumps(value, default=str)}"
        if reserved and key in reserved:
            raise HPDError(f"{shown}: hpd-tools sets {key} itself; use {reserved[key]}")
        if key not in accepted:
            names = list(accepted)
            near = difflib.get_close_matches(key, names, n=3, cutoff=0.6) or difflib.get_close_matches(key, names, n=3, cutoff=0.4)
            names_near = ", ".join(near[:-1]) + " or " + near[-1] if len(near) > 1 else "".join(near)
            hint = f"did you mean {names_near}? ({listing})" if near else listing
            raise HPDError(f"{shown}: {owner} has no option {key!r}; {hint}")
        if _matches(value, accepted[key]) is False:
            raise HPDError(f"{shown}: {owner} expects {_describe(accepted[key])} for {key}")


# Rows of log-probs taken at once: a [rows, vocab] float32 block (1.2 GB at 2,048 rows
# of a 152k vocabulary) is the largest tensor, whatever the batch holds.
LOGPROB_CHUNK_ROWS = 2048


def chunked_logprobs(
    logits_of: Callable[[Any], Any], rows: Any, labels: Any, *, k: int = 0, chunk_rows: int = LOGPROB_CHUNK_ROWS
) -> tuple[Any, Any, Any]:
    """Log-probs of ``labels`` [N] (and, with ``k``, each row's top-k) under the logits
    ``logits_of(rows[a:b])`` [b-a, V], chunk by chunk: ``chunk_rows`` rows of float32
    logits at a time, never [N, V] (``rows``: hidden states [N, H] and ``logits_of``
    the LM head, or precomputed logits and the identity).

    log p(v) = z_v - logsumexp(z) per row, in float32. Returns ``(label [N],
    top_logprobs [N, k], top_ids [N, k])`` on the logits' device (top-k by rank,
    None when ``k`` is 0), with no host synchronisation.
    """
    import torch

    label = top_lp = top_ids = None
    n = int(rows.shape[0])
    for a in range(0, n, chunk_rows):
        b = min(a + chunk_rows, n)
        z = logits_of(rows[a:b]).float()
        lse = torch.logsumexp(z, dim=-1, keepdim=True)
        if label is None:
            label = torch.empty(n, dtype=torch.float32, device=z.device)
            if k:
                top_lp = torch.empty((n, k), dtype=torch.float32, device=z.device)
                top_ids = torch.empty((n, k), dtype=torch.long, device=z.device)
        label[a:b] = (z.gather(-1, labels[a:b, None].to(z.device)) - lse)[:, 0]
        if k:
            values, ids = z.topk(k, dim=-1)
            top_lp[a:b] = values - lse
            top_ids[a:b] = ids
        del z, lse
    if label is None:  # no rows
        device = getattr(rows, "device", None)
        label = torch.empty(0, dtype=torch.float32, device=device)
        if k:
            top_lp = torch.empty((0, k), dtype=torch.float32, device=device)
            top_ids = torch.empty((0, k), dtype=torch.long, device=device)
    return label, top_lp, top_ids
