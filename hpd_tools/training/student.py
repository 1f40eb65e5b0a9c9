"""The student: loading and checking it against the caches, one micro-batch's
inputs and targets, and its forward + chunked loss as one module."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import fields
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from ..cache.layout import CacheStore
from ..cache.reader import Batch
from ..errors import HPDError, first_line
from ..hashing import tokenizer_hash
from ..losses import SAMPLING_LOSSES, Targets, compute_loss, restrict_to_width, sample_from_logits
from .config import DistillConfig, autocast
from .dense import DenseTeacher, TeacherRows, full_fkl_sum

log = logging.getLogger("hpd_tools.distill")  # the command's logger: what users and -v filter on


def load_student(path: str, attn_implementation: str | None = None, revision: str | None = None) -> tuple[Any, Any]:
    """The student (float32 weights) and its tokenizer, from a folder or a Hub id
    at ``revision`` (hpd_tools.hub); ``attn_implementation`` goes to transformers
    (None: its default)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ..hub import local_model

    path = local_model(path, revision, "--student")
    attn = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model_config = AutoConfig.from_pretrained(path)
    except Exception as exc:  # transformers raises many types for a broken folder
        raise HPDError(f"--student {path}: does not load as a causal LM ({first_line(exc)})") from None
    if attn:
        # Built on the meta device (no memory, no weights read), so that a refusal
        # is told apart from a broken folder.
        try:
            with torch.device("meta"):
                AutoModelForCausalLM.from_config(model_config, **attn)
        except Exception as exc:  # ImportError (a missing package), ValueError (an unknown name), ...
            raise HPDError(f"--attn-implementation {attn_implementation}: transformers refuses it for --student {path} ({first_line(exc, 160)}); "
                           "choose sdpa or eager, or install what it names") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **attn)
    except Exception as exc:
        raise HPDError(f"--student {path}: does not load as a causal LM ({first_line(exc)})") from None
    return model, tokenizer


def check_caches(paths: list[str], tokenizer: Any, what: str = "--cache") -> list[CacheStore]:
    """Every cache complete and made with the student's tokenizer."""
    student_hash = tokenizer_hash(tokenizer)
    stores = []
    for path in paths:
        store = CacheStore(path)
        if not store.complete:
            raise HPDError(f"{what} {path}: cache is incomplete ({len(store.done_units())}/{store.n_units} units); finish it by rerunning its `hpd-tools cache` command")
        if store.attrs["tokenizer_hash"] != student_hash:
            raise HPDError(
                f"{what} {path}: made with tokenizer {store.attrs['tokenizer_hash'][:16]}, the student's is {student_hash[:16]}; "
                "the student must share the teacher's tokenizer"
            )
        store.check_chunk_files()  # a deleted or truncated chunk stops the run before it trains, not when the stream reaches it
        stores.append(store)
    # One signal per run (one estimator): a top-k cache's weights and a sampled one's mean different things.
    topk, sampled = ([s for s in stores if s.signal == kind] for kind in ("topk", "sampled"))
    if topk and sampled:
        raise HPDError(f"{what} {topk[0].path} (top-k, k={topk[0].k}) and {what} {sampled[0].path} (sampled, N={sampled[0].k}): "
                       "a run trains on one signal; distill from top-k caches or from sampled caches, not both")
    other = next((s for s in sampled if s.k != sampled[0].k), None)
    if other is not None:
        raise HPDError(f"{what} {sampled[0].path} (sampled, N={sampled[0].k}) and {what} {other.path} (sampled, N={other.k}): "
                       "sampled caches mixed in one run need the same --samples")
    ks = {s.k for s in stores}
    if len(ks) > 1:
        raise HPDError(f"--cache: caches have different top-k ({sorted(ks)}); mix caches with one k")
    return stores


def check_signal(config: DistillConfig, stores: list[CacheStore]) -> None:
    """Refuse, before training, a loss (or loss option) that cannot read a sampled
    cache: jsd and akl have no sound estimator from draws of the teacher alone, and
    fkl's tail (hpd forward=cached's) does not apply to draws. A dense teacher
    replaces the caches' teacher arrays, so anything goes with it."""
    sampled = next((s for s in stores if s.signal == "sampled"), None)
    if sampled is None or config.dense_teacher:
        return
    if config.loss in ("jsd", "akl"):
        raise HPDError(f"--loss {config.loss} cannot use sampled cache {sampled.path} (no sound estimator from draws of the teacher alone); "
                       "use fkl, rkl or hpd, or a top-k cache")
    tail = config.loss_options.get("tail", "bucket")
    if tail != "bucket" and (config.loss == "fkl" or (config.loss == "hpd" and config.loss_options.get("forward") == "cached")):
        raise HPDError(f"--loss-option tail={tail} does not apply to sampled cache {sampled.path} (the {config.loss} estimate needs no tail); drop the option")


def check_widths(config: DistillConfig, model: Any, tokenizer: Any, stores: list[CacheStore]) -> None:
    """A student narrower than its tokenizer cannot embed every token: refuse it. A
    teacher wider than the student is the seed paper's own pair (Qwen2.5-7B, 152,064
    rows, over Qwen2.5-1.5B, 151,936): say what happens to the ids past the student."""
    rows = int(model.get_input_embeddings().num_embeddings)
    width = int(getattr(model.get_output_embeddings(), "out_features", rows))
    if min(rows, width) < len(tokenizer):
        raise HPDError(f"--student {config.student}: its embedding has {min(rows, width)} rows, fewer than its tokenizer's {len(tokenizer)} tokens; "
                       "resize the student's embeddings (model.resize_token_embeddings) before distilling")
    teacher = max(int((s.attrs.get("teacher") or {}).get("vocab_size") or 0) for s in stores)
    if teacher > width:
        log.info("teacher width %d > student width %d (one tokenizer of %d tokens): top-k ids >= %d drop out and their mass joins the tail; "
                 "metrics.jsonl logs it as %s/dropped_mass", teacher, width, len(tokenizer), width, config.loss)

def to_targets(batch: Batch, device: torch.device) -> tuple[dict[str, Any], Targets]:
    """The student's inputs and the flat targets of the trained positions.

    Position i is trained on token i+1 (the cache's convention), so hidden
    state [b, i] meets labels[b, i] = input_ids[b, i+1]. A padded batch gets an
    attention mask; a packed one position ids restarting at each sequence and no
    mask, from which transformers builds the block-diagonal causal mask (each
    sequence attends to itself only).

    The training stream's batches carry only their trained rows, in the cache's
    dtypes, and are decoded on ``device`` (hpd_tools.stream.batch_targets);
    other batches (rollouts, evaluation) go through the dense path.
    """
    from ..stream import batch_targets

    return batch_targets(batch, device)


@torch.no_grad()
def packing_works(model: Any) -> bool:
    """Whether the student keeps packed sequences apart: two short sequences,
    run packed and one by one, give the same hidden states. Models whose
    attention ignores position-id boundaries would mix them."""
    vocab = int(model.config.vocab_size)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randint(3, vocab, (1, 5), generator=gen), torch.randint(3, vocab, (1, 7), generator=gen)
    device = next(model.parameters()).device
    base = model.base_model
    was_training = model.training
    model.eval()
    try:
        apart = torch.cat([base(input_ids=x.to(device), use_cache=False).last_hidden_state for x in (a, b)], dim=1)
        pos = torch.cat([torch.arange(5), torch.arange(7)])[None].to(device)
        together = base(input_ids=torch.cat([a, b], dim=1).to(device), position_ids=pos, use_cache=False).last_hidden_state
    except Exception:  # a model that does not take position ids
        return False
    finally:
        model.train(was_training)
    return bool(torch.allclose(apart.float(), together.float(), atol=1e-4, rtol=1e-4))


def _slice(t: Targets, a: int, b: int) -> Targets:
    return Targets(**{f.name: None if getattr(t, f.name) is None else getattr(t, f.name)[a:b] for f in fields(Targets)})


def chunked_loss(model: Any, hidden: torch.Tensor, targets: Targets, config: DistillConfig,
                 teacher: TeacherRows | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sum of the per-token loss over ``hidden``'s rows, one chunk of rows at a time.

    Each chunk's logits are built, used and freed inside a checkpointed call, so
    backward recomputes them chunk by chunk instead of keeping [rows, vocab].
    A loss that samples y' (hpd, rkl) draws it once, from the forward pass's
    logits, and the recomputation reuses that draw (T longs per chunk): its
    logits need not be bit-identical on a GPU, and a resampled y' near a CDF
    boundary would train another token than the one the weight was computed
    for. Backward then skips the sampler's softmax and cumsum, too.

    With ``teacher`` (the dense reference's hidden states of these rows), each
    chunk's ``Targets.teacher_logprobs`` [chunk, V] is made beside the student's
    logits, under no_grad (again in the recomputation: no graph, one head matmul).
    """
    head = model.get_output_embeddings()
    samples = config.loss in SAMPLING_LOSSES

    def run(h: torch.Tensor, t: Targets, drawn: list[torch.Tensor], a: int, b: int) -> Any:
        logits = head(h)
        if teacher is not None:
            t = dataclasses.replace(t, teacher_logprobs=teacher.logprobs(a, b))
        if samples:
            if not drawn:  # the forward pass; the recomputation finds the draw here
                drawn.append(sample_from_logits(logits, t.noise))
            t = dataclasses.replace(t, sampled=drawn[0])
        return compute_loss(config.loss, logits, t, **config.loss_options)

    total = hidden.new_zeros((), dtype=torch.float32)
    stats: dict[str, torch.Tensor] = {}
    for a in range(0, hidden.shape[0], config.loss_chunk_tokens):
        b = min(a + config.loss_chunk_tokens, hidden.shape[0])
        part = _slice(targets, a, b)
        drawn: list[torch.Tensor] = [part.sampled] if part.sampled is not None else []
        out = checkpoint(run, hidden[a:b], part, drawn, a, b, use_reentrant=False) if torch.is_grad_enabled() else run(hidden[a:b], part, drawn, a, b)
        total = total + out.loss_sum.float()
        for name, value in out.stats.items():
            stats[name] = stats.get(name, 0) + value.detach().double()
    return total, stats


# -- the student as one module ------------------------------------------------------

class StudentLoss(torch.nn.Module):
    """The student's forward pass and chunked loss for one micro-batch, as one
    module, so DDP and FSDP2 see a single forward (and backward) per micro-batch.
    ``evaluate=True`` returns the eval sums instead (see :func:`evaluate`).
    ``teacher`` (a dense.DenseTeacher, held outside the module so that DDP and
    FSDP2 never wrap it) runs on the same inputs first."""

    def __init__(self, model: Any, config: DistillConfig):
        super().__init__()
        self.model = model
        self.config = config

    def forward(self, inputs: dict[str, Any], mask: torch.Tensor, targets: Targets, evaluate: bool = False, teacher: DenseTeacher | None = None) -> Any:
        rows = teacher.hidden(inputs, mask) if teacher is not None else None
        hidden = self.model.base_model(**inputs).last_hidden_state[mask]
        if not evaluate:
            return chunked_loss(self.model, hidden, targets, self.config, rows)
        head, c = self.model.get_output_embeddings(), self.config.loss_chunk_tokens
        # fkl on the top-k, student NLL, teacher NLL, count, dropped mass, full-distribution fkl (with a teacher)
        sums = torch.zeros(6, dtype=torch.float64, device=hidden.device)
        for a in range(0, hidden.shape[0], c):
            b = min(a + c, hidden.shape[0])
            ls = torch.log_softmax(head(hidden[a:b]).float(), dim=-1)
            # Teacher ids past the student's width drop out of the top-k (hpd_tools.losses, "Widths").
            ids, lt, dropped = restrict_to_width(targets.topk_ids[a:b], targets.topk_logprobs[a:b], ls.shape[-1])
            # On a sampled cache the weights are count/N (0 on padding): the unbiased estimate of
            # forward KL to the full distribution, not a KL on the drawn set.
            p = lt.exp() if targets.sample_weights is None else targets.sample_weights[a:b].float().masked_fill(~torch.isfinite(lt), 0.0)
            sums[0] += (p * torch.where(p > 0, lt - ls.gather(-1, ids), 0.0)).sum().double()
            sums[1] -= ls.gather(-1, targets.labels[a:b, None]).sum().double()
            sums[2] -= targets.label_logprob[a:b].sum().double()
            sums[4] += dropped.sum().double()
            if rows is not None:
                sums[5] += full_fkl_sum(rows.logprobs(a, b), ls)
        sums[3] = hidden.shape[0]
        return sums


def as_step_module(model: Any, config: DistillConfig) -> Any:
    return StudentLoss(model, config) if hasattr(model, "get_output_embeddings") else model



def micro_step(model: Any, batch: Batch, noise_gen: torch.Generator, config: DistillConfig, device: torch.device, scale: float,
               teacher: DenseTeacher | None = None) -> tuple[float, dict[str, torch.Tensor]]:
    """Forward + backward of one micro-batch, its loss scaled by ``scale`` (1 / the
    step's response tokens). ``model`` is the student, or its StudentLoss under
    DDP/FSDP2; ``teacher``: the dense reference's full distribution replaces the
    batch's cached teacher arrays. Returns the unscaled loss sum and diagnostic sums."""
    step_module = as_step_module(model, config)
    inputs, targets = to_targets(batch, device)
    targets.noise = torch.rand(targets.labels.shape[0], generator=noise_gen).to(device)
    with autocast(config.dtype, device):
        loss_sum, stats = step_module(inputs, torch.from_numpy(batch.loss_mask).to(device), targets, teacher=teacher)
    (loss_sum * scale).backward()
    return float(loss_sum.detach()), stats

