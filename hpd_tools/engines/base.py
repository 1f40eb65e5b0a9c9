"""The interface every teacher engine implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np


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


class TeacherEngine(Protocol):
    name: str
    version: str
    vocab_size: int

    def score(self, sequences: Sequence[np.ndarray], k: int) -> list[Scored]:
        """Score each token sequence (as a prompt: no sampling)."""
        ...

    def close(self) -> None:
        ...
