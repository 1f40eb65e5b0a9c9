"""The dense reference: a teacher held in memory whose full distribution is
computed online, for training (``--dense-teacher``) and for evaluation
(``--eval-teacher``: ``eval/full_fkl``).

The teacher runs once per micro-batch on the student's own inputs (the same
input ids, attention mask or packed position ids), under ``no_grad``, and
keeps only its final hidden states at the trained positions, [n, H].
Its LM head and log-softmax are applied one loss chunk at a time, where the
student's logits for that chunk are made (``student.chunked_loss``): a
[chunk, V] float32 block exists at once, never [B, L, V]. Under a
checkpointed chunk the recomputation in backward makes the teacher's chunk
again, under ``no_grad`` too (one more head matmul, no graph): keeping it
instead would hold every chunk's [chunk, V] until backward.

Placement: every rank loads its own whole teacher onto its device (the ranks'
micro-batches differ, and a replica needs no collectives); it is never
wrapped by DDP or FSDP2. Its weights are held in the run's resolved dtype
(bfloat16 on GPUs with bf16: nothing updates them, so no float32 master copy
is needed; float32 elsewhere) and its forward runs under the student's autocast.

Widths: the teacher shares the student's tokenizer, but their LM heads may be
of different widths (the seed paper's Qwen2.5-7B over Qwen2.5-1.5B). Training
hands the losses the teacher's own width [chunk, V_t] (hpd_tools.losses,
"dense", drops ids past the student's and logs their mass); ``eval/full_fkl``
leaves that mass out the same way (``eval/dropped_teacher_mass`` says how much
on the top-k; those ids are no tokenizer's tokens).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import HPDError, first_line
from ..hashing import tokenizer_hash

log = logging.getLogger("hpd_tools.distill")


class DenseTeacher:
    """A teacher model in eval mode, no gradients, on ``device``; see the module docstring."""

    def __init__(self, model: Any, flag: str, name: str):
        self.model, self.flag, self.name = model, flag, name
        self.head = model.get_output_embeddings()

    @torch.no_grad()
    def hidden(self, inputs: dict[str, Any], mask: torch.Tensor) -> TeacherRows:
        """The teacher's final hidden states at ``mask``'s positions of one micro-batch."""
        return TeacherRows(self, self.model.base_model(**inputs).last_hidden_state[mask])

    @torch.no_grad()
    def logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        """float32 [rows, V_t]: log-softmax of the teacher's logits of these rows."""
        return torch.log_softmax(self.head(hidden).float(), dim=-1)


@dataclass
class TeacherRows:
    """One micro-batch's teacher hidden states [n, H], in the order of the student's trained rows."""

    teacher: DenseTeacher
    hidden: torch.Tensor

    def logprobs(self, a: int, b: int) -> torch.Tensor:
        """float32 [b - a, V]: the teacher's full log-probs at rows a..b (one loss chunk)."""
        return self.teacher.logprobs(self.hidden[a:b])


def load_teacher(name: str, flag: str, student_tokenizer: Any, *, dtype: str, device: torch.device,
                 attn_implementation: str | None = None, packed: bool = False) -> DenseTeacher:
    """The teacher ``name`` (a folder or a Hub id) for ``flag``, checked against
    the student's tokenizer before its weights load: the same tokenizer hash
    that every cache is checked with."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..hub import local_model

    path = local_model(name, None, flag)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # a folder without a tokenizer, or a broken one
        raise HPDError(f"{flag} {name}: its tokenizer does not load ({first_line(exc)}); give a model folder with its tokenizer") from None
    theirs, ours = tokenizer_hash(tokenizer), tokenizer_hash(student_tokenizer)
    if theirs != ours:
        raise HPDError(f"{flag} {name}: tokenizer {theirs[:16]} differs from the student's {ours[:16]}; the teacher must share the student's tokenizer")
    attn = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32, **attn)
    except Exception as exc:
        raise HPDError(f"{flag} {name}: does not load as a causal LM ({first_line(exc)})") from None
    if model.get_output_embeddings() is None or not hasattr(model, "base_model"):
        raise HPDError(f"{flag} {name}: no output embedding (LM head) to read the teacher's distribution from")
    model.to(device).eval().requires_grad_(False)
    if packed:
        from .student import packing_works

        if not packing_works(model):
            raise HPDError(f"--pack: the teacher {flag} {name} ({type(model).__name__}) mixes packed sequences (its attention does not follow position-id boundaries); train without --pack")
    params = sum(p.numel() for p in model.parameters())
    log.info("%s %s: %.3g M parameters, %s on %s, one replica per rank", flag, name, params / 1e6, dtype, device)
    return DenseTeacher(model, flag, name)


def full_fkl_sum(lt: torch.Tensor, ls: torch.Tensor) -> torch.Tensor:
    """float64 scalar: sum over rows of KL(p || q) = sum_v p(v) (lt(v) - ls(v)),
    p = exp(lt); lt [rows, V_t] and ls [rows, V] float32 log-probs (terms with
    p = 0 are 0; teacher ids past V are left out, a narrower teacher has p = 0 there)."""
    v = ls.shape[-1]
    lt = lt[:, :v]
    if lt.shape[-1] < v:
        ls = ls[:, : lt.shape[-1]]
    p = lt.exp()
    return (p * torch.where(p > 0, lt - ls, 0.0)).sum().double()
